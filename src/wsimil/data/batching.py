"""Bags as tensors in memory, padded mini-batches, and feature standardisation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pad_batch(xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack bags ``[(N_i, D)]`` into ``x (B, N_max, D)`` (zeros after each bag) and ``mask (B, N_max)``."""
    if len(xs) == 1:
        x = xs[0].unsqueeze(0)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    n_max = max(x.shape[0] for x in xs)
    out = xs[0].new_empty(len(xs), n_max, xs[0].shape[1])  # only the padded tails are zeroed below
    mask = torch.zeros(len(xs), n_max, dtype=torch.bool, device=xs[0].device)
    for i, x in enumerate(xs):
        n = x.shape[0]
        out[i, :n] = x
        out[i, n:] = 0
        mask[i, :n] = True
    return out, mask


@dataclass
class Standardizer:
    """Per-dimension ``(x − mean) / std`` with statistics fitted on training instances only."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, bags: Sequence[Tensor], chunk: int = 4096) -> Standardizer:
        """Streaming per-dimension mean and (population) std over all instances of ``bags``, accumulated in float64
        over row chunks (temporaries of at most ``chunk × D`` doubles, never a double copy of a bag)."""
        n, s1, s2 = 0, 0.0, 0.0
        for b in bags:
            n += b.shape[0]
            for start in range(0, b.shape[0], chunk):
                x = b[start : start + chunk].double()
                s1 = s1 + x.sum(0)
                s2 = s2 + (x * x).sum(0)
        mean = s1 / n
        std = (s2 / n - mean * mean).clamp_min(0).sqrt()
        return cls(mean.float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float())

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def apply_padded(self, x: Tensor, mask: Tensor, owned: bool) -> Tensor:
        """Standardise a padded batch and keep padding at zero; in place when the batch tensor is ``owned`` (a
        fresh copy made by :func:`pad_batch`), which saves three full-size temporaries on large bags."""
        if not owned:
            return self(x) * mask[..., None]
        x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))
        return x.masked_fill_(~mask[..., None], 0.0)

    def folded_linear(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """Weights that give on raw ``x`` what ``(weight, bias)`` give on standardised ``x``:
        ``W' = W / σ`` (per input column), ``b' = b − W' μ``. Differentiable in ``weight`` and ``bias``."""
        w = weight * (1.0 / self.std.to(weight.device, weight.dtype))
        b = -(w @ self.mean.to(weight.device, weight.dtype))
        return w, b if bias is None else bias + b

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, state: dict[str, Tensor] | None) -> Standardizer | None:
        return None if state is None else cls(state["mean"], state["std"])


class BagTensors(Sequence):
    """The feature tensors ``(N_i, D)`` of a cohort's slides, in the given order: from memory, or read from the
    feature store on access for cohorts larger than the memory budget. ``lengths[i]`` is known without reading."""

    def __init__(self, cohort, slide_ids: list[str], pin_memory: bool = False):
        self.cohort, self.ids, self.pin = cohort, list(slide_ids), pin_memory
        self.lengths = [cohort.lengths.get(s, cohort.bags[s].features.shape[0]) for s in self.ids]
        self._mem = [self._load(i) for i in range(len(self.ids))] if cohort.in_memory else None

    def _load(self, i: int) -> Tensor:
        t = torch.from_numpy(self.cohort.features(self.ids[i]))
        return t.pin_memory() if self.pin else t

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._mem[i] if self._mem is not None else self._load(i)

    def take(self, indices) -> BagView:
        return BagView(self, [int(i) for i in indices])


class BagView(Sequence):
    """A subset of a :class:`BagTensors`, with its ``lengths``."""

    def __init__(self, base: BagTensors, indices: list[int]):
        self.base, self.indices = base, indices
        self.lengths = [base.lengths[i] for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        return self.base[self.indices[i]]


def epoch_order(labels: np.ndarray, balanced: bool, generator: torch.Generator) -> list[int]:
    """Indices for one epoch: a permutation, or (``balanced``) as many draws with replacement where each class
    is equally likely, so minority classes are seen as often as majority ones."""
    n = len(labels)
    if not balanced:
        return torch.randperm(n, generator=generator).tolist()
    counts = np.bincount(labels)
    w = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    return torch.multinomial(w, n, replacement=True, generator=generator).tolist()


def models_reading_inputs(model: nn.Module, owner: object = None) -> list[nn.Module]:
    """``model`` and the MIL models held as attributes of ``owner`` (a training method's teacher), i.e. every
    model a training step may feed the batch features to."""
    from wsimil.models import MILModel

    extra = [v for v in vars(owner).values() if isinstance(v, MILModel)] if owner is not None else []
    return [model, *(m for m in extra if m is not model)]


@contextmanager
def folded_standardizer(std: Standardizer | None, models: Sequence[nn.Module]) -> Iterator[bool]:
    """Fold ``std`` into the input ``Linear`` of every model in ``models`` while the block runs, so batches can
    stay raw: no pass over the bag per step. Each call of the layer computes ``W' = W / σ``, ``b' = b − W' μ``
    from the current parameters (a ``(E, D)`` elementwise product, against the ``(N, D) × (D, E)`` GEMM), so
    gradients and optimiser updates still act on ``W`` and ``b``, which keep their meaning of weights on
    standardised features: checkpoints, the saved standardiser and inference are unchanged.

    Yields True when folded; False (nothing changed) when ``std`` is None or a model has no ``input_linear()``,
    and then the caller standardises the batch itself. Padded rows of a raw batch give other values after the
    folded layer than zero rows of a standardised one; models ignore padded rows (the mask contract)."""
    layers = [getattr(m, "input_linear", lambda: None)() for m in models]
    if std is None or not layers or any(layer is None for layer in layers):
        yield False
        return
    unique = list({id(layer): layer for layer in layers}.values())
    for layer in unique:
        layer.forward = _folded_forward(layer, std)  # an instance attribute shadows Linear.forward
    try:
        yield True
    finally:
        for layer in unique:
            del layer.forward


@contextmanager
def folded_inputs(ctx, model: nn.Module, method: object = None) -> Iterator[bool]:
    """:func:`folded_standardizer` of a fold context's standardiser into ``model`` and the models ``method``
    holds, with ``ctx.folded`` set while it lasts (``make_batch`` then leaves batches raw)."""
    with folded_standardizer(ctx.standardizer, models_reading_inputs(model, method)) as folded:
        ctx.folded = folded
        try:
            yield folded
        finally:
            ctx.folded = False


def _folded_forward(layer: nn.Linear, std: Standardizer):
    def forward(x: Tensor) -> Tensor:
        w, b = std.folded_linear(layer.weight, layer.bias)
        return F.linear(x, w, b)

    return forward
