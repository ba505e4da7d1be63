"""Bags as tensors in memory, padded mini-batches, and feature standardisation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


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
    def fit(cls, bags: Sequence[Tensor]) -> Standardizer:
        """Streaming per-dimension mean and (population) std over all instances of ``bags``."""
        n, s1, s2 = 0, 0.0, 0.0
        for b in bags:
            x = b.double()
            n += x.shape[0]
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
