"""Feature extraction for LRMIL: HR features with per-layer summary tokens (step 1) and LR features (steps 3–4),
through the shared extraction engine (:func:`wsimil.features.extract.encode_grid`) with LRMIL's taps as its hook.

Files follow TRIDENT's layout (``features (N, D)``, ``coords``, ``instance_labels`` from tumour masks, provenance
attributes), so :class:`wsimil.features.store.FeatureStore` and the trainer read them as any other bag. HR files
add ``summary/block{l} (N, C_l)``: the teacher's summary token after block ``l`` (ViT CLS / CNN global average;
:mod:`wsimil.lrmil.taps`). A file is reused when its ``lrmil_key`` attribute matches the current settings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from torch import Tensor

from wsimil import __version__
from wsimil.features.encoders import Encoder
from wsimil.features.extract import EncodeSettings, encode_grid
from wsimil.features.patches import PatchGrid
from wsimil.features.store import write_bag
from wsimil.io import atomic_path
from wsimil.lrmil.job import LRMILJob
from wsimil.lrmil.taps import forward_taps
from wsimil.threads import apply_threads


def taps_fn(encoder: Encoder, layers: tuple[int, ...]) -> Callable[[Tensor], dict[str, Tensor]]:
    """The engine hook of LRMIL's HR step: patches → ``{"features": final embedding (b, D),
    "summary/block{l}": summary token after block l (b, C_l)}``."""

    def fn(u8: Tensor) -> dict[str, Tensor]:
        t = forward_taps(encoder.model, encoder.preprocess(u8), layers)
        return {"features": t.final, **{f"summary/block{i}": s for i, s in zip(layers, t.summaries, strict=True)}}

    return fn


def file_key(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            return str(f["features"].attrs.get("lrmil_key", "")) or None
    except (OSError, KeyError):
        return None


def write_features(
    path: Path,
    outputs: dict[str, np.ndarray],
    grid: PatchGrid,
    labels: np.ndarray | None,
    encoder: Encoder,
    key: str,
    embed_dim: int,
    attrs: dict | None = None,
    job_root: Path | None = None,
) -> None:
    """Write one slide's features (TRIDENT layout, plus ``summary/…`` datasets when ``outputs`` has them)."""
    feats = outputs.get("features", np.zeros((0, embed_dim), dtype=np.float32))
    with atomic_path(path) as tmp:
        write_bag(
            tmp,
            feats,
            grid.coords,
            instance_labels=labels,
            encoder=str(attrs.get("encoder", encoder.name)) if attrs else encoder.name,
            attrs={
                "weights": encoder.weights,
                "weights_sha256": encoder.weights_sha256 or "",
                "transforms": encoder.transforms_description(),
                "tiling_key": grid.attrs.get("settings_key", ""),
                "tiling_job": str(Path(job_root).resolve()) if job_root else "",
                "embed_dim": embed_dim,
                "wsimil_version": __version__,
                "lrmil_key": key,
                **{k: v for k, v in (attrs or {}).items() if k != "encoder"},
            },
            coords_attrs={k: v for k, v in grid.attrs.items() if v is not None},
        )
        summaries = {k: v for k, v in outputs.items() if k.startswith("summary/")}
        if summaries:
            with h5py.File(tmp, "a") as f:
                for k, v in summaries.items():
                    f.create_dataset(k, data=v)


def extract(
    job: LRMILJob,
    slide_ids: list[str],
    mag: float,
    fn: Callable[[Tensor], dict[str, Tensor]],
    encoder: Encoder,
    out_dir: Path,
    key: str,
    st: EncodeSettings,
    desc: str,
    attrs: dict | None = None,
) -> Path:
    """Encode the ``mag`` patches of ``slide_ids`` with ``fn`` into ``out_dir/{slide_id}.h5``; slides whose file
    carries ``key`` are skipped. Returns ``out_dir``."""
    from wsimil.progress import make_progress

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    apply_threads(st.threads, "encode", workers=st.workers)
    encoder.model.to(st.device).eval()
    with make_progress() as progress:
        task = progress.add_task(desc, total=len(slide_ids), info="")
        for sid in slide_ids:
            path = out_dir / f"{sid}.h5"
            if file_key(path) == key:
                progress.update(task, advance=1, info=f"{sid}: reused")
                continue
            grid = job.grid(sid, mag)
            outputs = encode_grid(fn, grid, st, job.mpp(sid))
            write_features(path, outputs, grid, job.instance_labels(sid, grid), encoder, key, _dim(encoder), attrs,
                           job.root)  # fmt: skip
            progress.update(task, advance=1, info=f"{sid}: {len(grid.coords)} patches")
    return out_dir


def _dim(encoder: Encoder) -> int:
    return int(encoder.spec.embed_dim)
