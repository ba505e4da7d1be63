"""Bags as tensors in memory, padded mini-batches, and feature standardisation."""

from __future__ import annotations

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
    out = xs[0].new_zeros(len(xs), n_max, xs[0].shape[1])
    mask = torch.zeros(len(xs), n_max, dtype=torch.bool, device=xs[0].device)
    for i, x in enumerate(xs):
        out[i, : x.shape[0]] = x
        mask[i, : x.shape[0]] = True
    return out, mask


@dataclass
class Standardizer:
    """Per-dimension ``(x − mean) / std`` with statistics fitted on training instances only."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, bags: list[Tensor]) -> Standardizer:
        x = torch.cat(bags, 0).double()
        mean, std = x.mean(0), x.std(0, unbiased=False)
        return cls(mean.float(), torch.where(std > 1e-8, std, torch.ones_like(std)).float())

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, state: dict[str, Tensor] | None) -> Standardizer | None:
        return None if state is None else cls(state["mean"], state["std"])


def epoch_order(labels: np.ndarray, balanced: bool, generator: torch.Generator) -> list[int]:
    """Indices for one epoch: a permutation, or (``balanced``) as many draws with replacement where each class
    is equally likely, so minority classes are seen as often as majority ones."""
    n = len(labels)
    if not balanced:
        return torch.randperm(n, generator=generator).tolist()
    counts = np.bincount(labels)
    w = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    return torch.multinomial(w, n, replacement=True, generator=generator).tolist()
