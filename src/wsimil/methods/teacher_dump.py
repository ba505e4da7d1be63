"""The teacher dump of LRMIL (step 2): the HR teacher's per-slide outputs, written once per fold by the recipe
(:mod:`wsimil.lrmil.pipeline`) and read by the stage-2 method (:mod:`wsimil.methods.lrmil`) and stage 1.

``dump_teacher`` runs a trained fold teacher (a trainer checkpoint: ABMIL on HR features, selected on validation
AUC) over slides and writes one HDF5 file per fold::

    /{slide_id}/logits            (C,)     bag logits y_T
    /{slide_id}/attention_logits  (N_hr,)  raw attention e^T
    /{slide_id}/attention         (N_hr,)  softmax attention α^T

**[SPEC decision]** both raw and softmax attention are stored (the official dump stores the bag vector under
"attention"). Root attributes: the checkpoint's ``config_hash`` and the class names.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from wsimil.data.batching import Standardizer
from wsimil.errors import WsimilError
from wsimil.features.store import FeatureStore
from wsimil.io import atomic_path

TEACHER_MODELS = ("abmil", "gated_abmil")


@torch.no_grad()
def dump_teacher(
    checkpoint: str | Path, features: str | Path, slide_ids: list[str], out: str | Path, device: str = "cpu"
) -> Path:
    """Write the teacher's logits and raw/softmax attention for ``slide_ids`` (HR features in ``features``)."""
    from wsimil.progress import track
    from wsimil.run import load_model  # not at import time: wsimil.run imports the method registry

    model, ck = load_model(checkpoint, device)
    if ck["model"] not in TEACHER_MODELS:
        raise WsimilError(f"the LRMIL teacher must be one of {', '.join(TEACHER_MODELS)}, not {ck['model']!r}")
    std = Standardizer.from_state(ck.get("standardizer"))
    store = FeatureStore(features)
    out = Path(out)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["config_hash"] = str(ck.get("config_hash", ""))
        f.attrs["classes"] = np.array([str(c) for c in ck["classes"]], dtype=h5py.string_dtype())
        for sid in track(slide_ids, f"Teacher outputs → {out.name}"):
            x = torch.from_numpy(store.read(sid).features).to(device)
            if std is not None:
                x = std(x)
            o = model(x.unsqueeze(0))
            e = o.attention_logits[0].float()
            g = f.create_group(sid)
            g.create_dataset("logits", data=o.logits[0].float().cpu().numpy())
            g.create_dataset("attention_logits", data=e.cpu().numpy())
            g.create_dataset("attention", data=torch.softmax(e, -1).cpu().numpy())
    return out


def dump_covers(path: str | Path, slide_ids: list[str]) -> bool:
    """True if the dump at ``path`` holds the teacher outputs of every slide in ``slide_ids``."""
    try:
        with h5py.File(path, "r") as f:
            return all(s in f for s in slide_ids)
    except OSError:
        return False


def dump_hash(path: str | Path) -> str | None:
    """The ``config_hash`` of the checkpoint a dump was made from (``None`` if there is no readable dump)."""
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("config_hash", "")) or None
    except OSError:
        return None


def read_dump(path: str | Path, slide_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits (C,), attention_logits (N_hr,), attention (N_hr,))`` of one slide."""
    with h5py.File(path, "r") as f:
        if slide_id not in f:
            raise WsimilError(f"slide {slide_id!r}: no teacher outputs in {path}")
        g = f[slide_id]
        return g["logits"][()], g["attention_logits"][()], g["attention"][()]
