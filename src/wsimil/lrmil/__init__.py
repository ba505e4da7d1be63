"""LRMIL — low-resolution MIL via high-resolution distillation (SPEC §1): classify slides from 5× patches alone with
an encoder distilled from 20× and a student MIL taught by a 20× teacher.

Steps, each usable on its own (see :mod:`wsimil.lrmil.pipeline` for the order, the fold policy and the outputs):

- :mod:`~wsimil.lrmil.features` — HR features with per-layer summary tokens, LR features (``extract``);
- :mod:`wsimil.methods.teacher_dump` — the HR teacher's logits and raw/softmax attention per fold (``dump_teacher``);
- :mod:`~wsimil.lrmil.stage1` — patch-level cross-resolution distillation (``train_stage1``);
- :mod:`wsimil.methods.lrmil` — the stage-2 student as trainer method ``lrmil`` (model ``lrmil_student``);
- :mod:`~wsimil.lrmil.losses` — stage 1's losses as pure functions (stage 2's: :mod:`wsimil.methods.lrmil_losses`);
  :mod:`~wsimil.lrmil.taps` — timm ``forward_intermediates`` for CNNs and ViTs;
- the saved LR pipeline is an ordinary bundle whose members carry their distilled encoders
  (:func:`wsimil.predict.write.bundle_from_distilled`), scored by :func:`wsimil.predict.pipeline.predict_slides`.

``run_lrmil(load_lrmil_config(...), job, manifest, out)`` runs everything (``wsimil lrmil`` on the command line).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "run_lrmil": "wsimil.lrmil.pipeline",
    "LRMILConfig": "wsimil.lrmil.config",
    "load_lrmil_config": "wsimil.lrmil.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: importing one step's module stays light
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsimil.lrmil' has no attribute {name!r}")
