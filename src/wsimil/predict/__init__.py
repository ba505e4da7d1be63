"""Prediction: model bundles and the one slide → tiles → features → scores pipeline for every bundle.

- :mod:`~wsimil.predict.bundle` — the bundle format and its loader (``load_bundle``, every layout);
  :mod:`~wsimil.predict.refs` — what a bundle records of the encoder, tiling and members;
  :mod:`~wsimil.predict.legacy` — readers of the older layouts (format 1/2, LRMIL's ``lrmil.json``);
- :mod:`~wsimil.predict.write` — writing bundles (from checkpoints, a run, LRMIL's folds; upgrading old ones);
- :mod:`~wsimil.predict.members` — rebuilding a member's aggregator and encoder from its files;
- :mod:`~wsimil.predict.score` — the one ensemble scorer and the per-slide scores file;
- :mod:`~wsimil.predict.pipeline` — ``predict_slides`` / ``predict_features`` into an output folder;
- :mod:`~wsimil.predict.memory` — slides tiled and scored in memory, and LRMIL's HR/LR path timing;
- :mod:`~wsimil.predict.runs` — a training run's slides scored out of fold (report heatmaps);
- :mod:`~wsimil.predict.digest` — one SHA-256 per bundle (``wsimil digest``, ``--expect-sha256``).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Bundle": "wsimil.predict.bundle",
    "load_bundle": "wsimil.predict.bundle",
    "EncoderRef": "wsimil.predict.refs",
    "TilingRef": "wsimil.predict.refs",
    "write_bundle": "wsimil.predict.write",
    "bundle_from_run": "wsimil.predict.write",
    "upgrade_bundle": "wsimil.predict.write",
    "predict_slides": "wsimil.predict.pipeline",
    "predict_features": "wsimil.predict.pipeline",
    "score_bag": "wsimil.predict.score",
    "read_scores": "wsimil.predict.score",
    "bundle_digest": "wsimil.predict.digest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: importing the package loads no model code
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsimil.predict' has no attribute {name!r}")
