"""Readers of the older bundle layouts, upgraded in memory to the current description (``wsimil convert bundle``
rewrites them on disk, :func:`wsimil.predict.write.upgrade_bundle`).

- Ordinary bundles of format 1 (``torch.save`` members) and 2 (safetensors members) hold a ``bundle.json`` whose
  fields the current format keeps; their members carry no encoder. :func:`wsimil.predict.bundle.load_bundle` reads
  them as they are.
- LRMIL bundles of format 1 and 2 (``wsimil lrmil`` before bundle format 3)::

      lrmil.json                 format "wsimil-lrmil-bundle", version, wsimil version, class names, the encoder
                                 (registry name, student input size, teacher weights: a file, hub or random with
                                 seed, their SHA-256), the LR tiling and per fold the bundle folder and the
                                 distilled encoder file with its SHA-256 (null when stage 1 was ablated)
      fold{k}/bundle.json        an ordinary bundle of fold k's student (no encoder, no tiling)
      fold{k}/aggregators/...    its checkpoint
      fold{k}/lrmil_encoder.safetensors   fold k's distilled encoder (format 1: ``lrmil_encoder.pt``)

  :func:`lrmil_bundle_json` turns them into one bundle description whose members are the fold students, each
  carrying its fold's encoder, at the LR tiling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsimil.errors import WsimilError

LRMIL_FORMAT = "wsimil-lrmil-bundle"
LRMIL_FORMAT_VERSION = 2  # the last LRMIL layout; bundle format 3 made LRMIL bundles ordinary bundles
_AGREE = ("task", "classes", "aggregator")


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WsimilError(f"{path} is missing (an incomplete LRMIL bundle)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WsimilError(f"{path} is not valid JSON: {e}") from e


def lrmil_bundle_json(p: Path) -> dict[str, Any]:
    """The bundle description (current format's fields) of the old LRMIL bundle folder ``p``, file paths relative
    to ``p``."""
    meta = _read(p / "lrmil.json")
    fv = int(meta.get("format_version", 0))
    if meta.get("format") != LRMIL_FORMAT or not 1 <= fv <= LRMIL_FORMAT_VERSION:
        raise WsimilError(f"{p / 'lrmil.json'}: unsupported bundle format {meta.get('format')!r} v{fv}")
    e, t = meta["encoder"], meta["tiling"]
    weights = "hub" if e.get("hub") else e.get("weights")  # None: seeded random initialisation
    teacher = {"name": e["name"], "weights": weights, "weights_sha256": e.get("weights_sha256"),
               "seed": int(e.get("seed", 0)), "input_size": e.get("input_size")}  # fmt: skip
    first: dict[str, Any] | None = None
    members = []
    for entry in meta["folds"]:
        fold_dir = str(entry["bundle"])
        fb = _read(p / fold_dir / "bundle.json")
        first = first or fb
        for key in _AGREE:
            if fb.get(key) != first.get(key):
                raise WsimilError(f"{p}: the fold bundles disagree on {key} ({fold_dir} differs from the first)")
        if entry.get("encoder"):
            enc = {"name": e["name"], "weights": entry["encoder"], "weights_sha256": entry.get("encoder_sha256"),
                   "input_size": e.get("input_size"), "distilled": True}  # fmt: skip
        else:  # stage 1 ablated: the teacher encoder at the LR input size
            enc = teacher
        for m in fb["members"]:
            members.append({**m, "file": f"{fold_dir}/{m['file']}", "encoder": enc})
    if first is None:
        raise WsimilError(f"{p / 'lrmil.json'} lists no folds")
    return {
        **{key: first[key] for key in ("format", "task", "head_classes", "config") if key in first},
        "format_version": fv,
        "wsimil_version": meta.get("wsimil_version", "?"),
        "classes": list(meta["classes"]),
        "aggregator": first["aggregator"],
        "members": members,
        "encoder": None,
        "tiling": {
            "mag": float(t["mag"]),
            "patch_size": int(t["patch_size"]),
            "min_tissue": float(t["min_tissue"]),
            "tissue": dict(t["tissue"]),
            "reader": t["reader"],
        },  # fmt: skip
        "slide_settings_missing": None,
    }
