"""Rebuilding what a bundle member needs from its files: the aggregator of a trainer checkpoint, the class names of
its extra heads, and its patch encoder (a registry encoder, possibly at another input size, or a distilled one).

This is the one place where prediction reaches into training code (:mod:`wsimil.methods`, :mod:`wsimil.lrmil`):
every other module of :mod:`wsimil.predict` sees models and encoders only through these functions.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from wsimil.features.encoders import Encoder
    from wsimil.predict.refs import EncoderRef


def load_member(path: str | Path, device: str = "cpu") -> tuple[Any, dict]:
    """``(aggregator in eval mode on device, checkpoint dict)`` of a trainer checkpoint (read without unpickling)."""
    from wsimil.run import load_model

    return load_model(path, device)


def head_classes(path: str | Path, classes: list[str]) -> dict[str, list[str]]:
    """Class names of the model's extra output heads (``MILOutput.extra_logits``), asked of the training method
    (``head_labels``; HMIL maps fine classes to coarse ones) with one forward pass on a dummy bag."""
    import torch

    from wsimil.run import load_fold

    loaded = load_fold(path)  # the model and its training method, restored as the fold was saved
    model, ck, method = loaded.model, loaded.checkpoint, loaded.method
    with torch.no_grad():
        out = model(torch.zeros(1, 2, int(ck["in_dim"])), torch.ones(1, 2, dtype=torch.bool))
    heads = {}
    if out.extra_logits:
        for head, z in out.extra_logits.items():
            names: list[str] | None = None
            try:
                _, names = method.head_labels(head, [], np.zeros(0, dtype=np.int64), classes)
            except Exception:  # noqa: BLE001 - a method may need real labels; fall back to indices
                names = None
            if names is None or len(names) != z.shape[-1]:
                names = [str(i) for i in range(z.shape[-1])]
            heads[head] = [str(n) for n in names]
    return heads


def build_encoder(ref: EncoderRef, weights: str | None) -> Encoder:
    """The patch encoder ``ref`` describes, with ``weights`` already resolved and checked (``None``: seeded random
    init, ``"hub"``, or a file). A distilled encoder (``ref.distilled``, LRMIL's stage 1) brings all its weights in
    its file and is rebuilt on the registry architecture; a registry encoder at another ``ref.input_size`` than the
    registry's (LRMIL with stage 1 ablated) keeps its weights and works at that size."""
    from wsimil.features.encoders import create_encoder

    with warnings.catch_warnings():
        # a seeded random init is the bundle's recorded choice here (or an architecture to load into)
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        if ref.distilled:
            from wsimil.lrmil.stage1 import load_student

            assert weights is not None
            return load_student(Path(weights), create_encoder(ref.name, None, 0))[0]
        enc = create_encoder(ref.name, weights, ref.seed)
    if ref.input_size is None or ref.input_size == enc.spec.input_size:
        return enc
    from wsimil.lrmil.taps import make_student

    at_size = make_student(enc, int(ref.input_size))
    at_size.weights, at_size.weights_sha256 = enc.weights, enc.weights_sha256  # the same weights, unchanged
    return at_size
