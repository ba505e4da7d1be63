"""LRMIL stage-1 losses (SPEC §1) as pure functions of tensors.

Stage 1 (patch-level cross-resolution distillation), for a batch of ``B`` LR patches with ``f²`` HR children
each (``f`` = HR/LR magnification ratio, 4 for 20×/5×; child ``j = b·f + a`` sits at column offset ``a`` and row
offset ``b``; ``child_mask (B, f²)`` marks the children that are tissue patches):

- :func:`pool_children`: the student's spatial grid ``(B, C, h, w)`` → one vector per child ``(B, f², C)``, the
  mean over the child's ``(h/f)×(w/f)`` block;
- :func:`layer_distill_loss`: ``L_layer = mean_{l∈K} mean_{children j} MSE(pool_j(S_l), T_l(x_j^HR))``;
- :func:`attention_feature_loss`: ``L_attn = Σ_j w_j · MSE(s_final, T_final(x_j^HR))``,
  ``w_j = α^T_j / Σ_children α^T`` (uniform over the children when that sum is 0).

Both are averaged over the LR patches of the batch that have at least one child.

The stage-2 losses (student ABMIL on LR features) are a training method's: :mod:`wsimil.methods.lrmil_losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------------------------- stage 1
def pool_children(grid: Tensor, factor: int) -> Tensor:
    """``(B, C, h, w)`` → ``(B, f², C)``: the mean of each child's block; row ``j = b·f + a`` is the block at
    column ``a``, row ``b`` (the order of the link table). Exact block means when ``f`` divides ``h`` and ``w``;
    otherwise adaptive pooling's (overlapping) bins."""
    return F.adaptive_avg_pool2d(grid, factor).flatten(2).transpose(1, 2)


def _mse_rows(s: Tensor, t: Tensor) -> Tensor:
    """Mean over the last axis of ``(s − t)²``."""
    return (s - t).pow(2).mean(-1)


def layer_distill_loss(student: list[Tensor], teacher: list[Tensor], child_mask: Tensor) -> Tensor:
    """``L_layer``. ``student[l]``, ``teacher[l]``: ``(B, f², C_l)`` per tapped block (student pooled per child,
    teacher summary tokens of the children; same widths); ``child_mask (B, f²)`` bool."""
    m = child_mask.float()
    n_child = m.sum(1)
    has = n_child > 0
    per_layer = [(_mse_rows(s, t) * m).sum(1) / n_child.clamp_min(1) for s, t in zip(student, teacher, strict=True)]
    per_patch = torch.stack(per_layer).mean(0)  # (B,)
    return per_patch[has].mean() if has.any() else per_patch.sum() * 0


def attention_weights(alpha: Tensor, child_mask: Tensor) -> Tensor:
    """``w_j = α_j / Σ_children α`` over real children (uniform over them when the sum is 0): ``(B, f²)``."""
    m = child_mask.float()
    a = alpha.clamp_min(0) * m
    s = a.sum(1, keepdim=True)
    uniform = m / m.sum(1, keepdim=True).clamp_min(1)
    return torch.where(s > 0, a / s.clamp_min(1e-30), uniform)


def attention_feature_loss(student_final: Tensor, teacher_final: Tensor, alpha: Tensor, child_mask: Tensor) -> Tensor:
    """``L_attn``. ``student_final (B, D)``, ``teacher_final (B, f², D)``, teacher softmax attention of the
    children ``alpha (B, f²)``, ``child_mask (B, f²)``."""
    w = attention_weights(alpha, child_mask)
    per_patch = (w * _mse_rows(student_final.unsqueeze(1), teacher_final)).sum(1)
    has = child_mask.any(1)
    return per_patch[has].mean() if has.any() else per_patch.sum() * 0
