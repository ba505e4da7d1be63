"""LRMIL stage-2 losses (SPEC §1) as pure functions of tensors: the student ABMIL taught by the HR teacher
(method ``lrmil``, :mod:`wsimil.methods.lrmil`; stage 1's losses are in :mod:`wsimil.lrmil.losses`).

Stage 2 (student ABMIL on LR features), for padded bags ``(B, N)`` with ``mask (B, N)``:

- :func:`children_attention`: ``g_r = mean_{j∈children(r)} e^T_j`` (option ``max``; 0 if ``r`` has no children);
- :func:`bag_kd_loss`: ``T_b² · KL(softmax(y_T/T_b) ‖ softmax(y_S/T_b))``;
- :func:`attention_kd_loss`: ``T_a² · KL(softmax_N(g/T_a) ‖ softmax_N(e_S/T_a))`` over each bag's real instances;
- :func:`instance_targets` + :func:`instance_loss`: pseudo-labelled instances for the instance head, sized to the
  bag (below); :func:`topk_instance_loss` is the paper's rule
  ``CE(inst([h_topk(g); h_bottomk(g)]), [1…, 0…])``, ``k = min(k, ⌊N/2⌋)`` in every bag.

**[decision] Instance targets that fit the bag.** The paper labels the ``k = 4`` highest-guidance patches of every
bag "tumour", negative slides included, while a positive 5× bag of a small metastasis holds one or two tumour
patches and a macro-metastasis hundreds. Here (``mode="mass"``, the default):

- a *positive* bag (label ≠ the first class) gets ``k⁺`` pseudo-positives: the fewest top-guidance instances whose
  share of ``softmax_N(g)`` reaches ``mass`` (0.5), capped at ``max(1, ⌊max_frac·N⌋)`` (``max_frac`` 0.1) and at
  ``⌊N/2⌋``, and as many pseudo-negatives from the bottom of the ranking;
- a *negative* bag has no tumour, so every instance is a true negative: its ``k⁻`` highest-guidance instances (the
  same rule: the teacher's hard negatives) are labelled 0 and none 1.

``mode="fraction"`` takes ``k⁺ = max(1, round(frac·N))`` (same caps); ``mode="fixed"`` with ``positive_only=False``
is the paper's rule.

KL terms are summed over classes/instances and averaged over bags. **[SPEC]** The official attention KL calls
``kl_div(..., reduction="batchmean")`` on a 1-D vector, which divides the KL by ``N``; we use the KL itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------------------------- stage 2
def children_attention(teacher_logits: np.ndarray, links: np.ndarray, agg: str = "mean") -> np.ndarray:
    """Teacher guidance per LR patch: ``g_r`` = mean (or max) of the raw teacher attention logits ``e^T`` of
    ``r``'s HR children (``links (N_lr, f²)``, −1 = none), 0 when ``r`` has no child. Returns ``(N_lr,)``."""
    if agg not in ("mean", "max"):
        raise ValueError(f"teacher attention aggregation must be 'mean' or 'max', not {agg!r}")
    e = np.asarray(teacher_logits, dtype=np.float64)
    valid = links >= 0
    vals = e[np.where(valid, links, 0)]
    count = valid.sum(1)
    if agg == "mean":
        g = np.where(valid, vals, 0.0).sum(1) / np.maximum(count, 1)
    else:
        g = np.where(valid, vals, -np.inf).max(1)
    return np.where(count > 0, g, 0.0).astype(np.float32)


def bag_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · mean_b KL(softmax(y_T/T) ‖ softmax(y_S/T))`` for ``(B, C)`` logits."""
    t = temperature
    log_p = F.log_softmax(student_logits / t, -1)
    log_q = F.log_softmax(teacher_logits / t, -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean() * t * t


def attention_kd_loss(
    student_attn: Tensor, guidance: Tensor, mask: Tensor, temperature: float = 1.0, use: Tensor | None = None
) -> Tensor:
    """``T² · mean_b KL(softmax_N(g/T) ‖ softmax_N(e_S/T))`` over each bag's real instances. ``student_attn``
    (raw ``e_S``), ``guidance`` (``g``), ``mask``: ``(B, N)``; ``use (B,)`` picks the bags that count (those with
    teacher guidance); 0 when none does."""
    t = temperature
    neg = torch.finfo(student_attn.dtype).min
    log_p = F.log_softmax((student_attn / t).masked_fill(~mask, neg), -1)
    log_q = F.log_softmax((guidance / t).masked_fill(~mask, neg), -1)
    kl = torch.where(mask, log_q.exp() * (log_q - log_p), torch.zeros_like(log_p)).sum(-1) * t * t
    picked = kl[use] if use is not None else kl
    return picked.mean() if picked.numel() else kl.sum() * 0


def topk_instance_loss(
    instance_logits: Tensor, guidance: Tensor, mask: Tensor, k: int = 4, use: Tensor | None = None
) -> Tensor:
    """The paper's instance loss: cross-entropy of the instance head on each bag's ``k`` instances with the highest
    teacher guidance (target 1) and the ``k`` lowest (target 0), ``k = min(k, ⌊N_b/2⌋)``, in every bag whatever its
    label (:func:`instance_loss` with ``mode="fixed", positive_only=False``): one stable ranking, so that no
    instance is in both (ties, e.g. patches without HR children, would otherwise be)."""
    everyone = torch.ones(instance_logits.shape[0], dtype=torch.bool)
    return instance_loss(instance_logits, guidance, mask, everyone, use, "fixed", False, k=k)


def instance_count(guidance: Tensor, mode: str = "mass", k: int = 4, mass: float = 0.5, frac: float = 0.02,
                   max_frac: float = 0.1) -> int:  # fmt: skip
    """How many instances of one bag (guidance ``g (N,)``) to pseudo-label at each end (see the module docstring):
    ``mass``: the fewest top instances holding ``mass`` of ``softmax(g)``; ``fraction``: ``round(frac·N)``;
    ``fixed``: ``k``. Always at least 1 and at most ``⌊N/2⌋``; ``mass``/``fraction`` also at most
    ``max(1, ⌊max_frac·N⌋)``. 0 for a bag of fewer than 2 instances."""
    n = int(guidance.numel())
    if n < 2:
        return 0
    if mode == "fixed":
        return max(1, min(int(k), n // 2))
    if mode == "mass":
        p = torch.softmax(guidance.double(), 0).sort(descending=True).values
        want = int(torch.searchsorted(p.cumsum(0), torch.tensor(mass * (1 - 1e-9), dtype=torch.float64))) + 1
    elif mode == "fraction":
        want = round(frac * n)
    else:
        raise ValueError(f"instance target mode must be 'mass', 'fraction' or 'fixed', not {mode!r}")
    return max(1, min(want, max(1, int(max_frac * n)), n // 2))


def instance_targets(guidance: Tensor, positive: bool, mode: str = "mass", positive_only: bool = True,
                     **count_kw) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Indices ``(pseudo-positives, pseudo-negatives)`` of one bag's ``N`` instances (guidance ``g (N,)``), from one
    stable descending ranking of ``g``. With ``positive_only`` (default) a negative bag gets no pseudo-positive and
    its ``k`` highest-guidance instances as negatives; otherwise every bag gets top ``k`` → 1, bottom ``k`` → 0."""
    k = instance_count(guidance, mode, **count_kw)
    order = torch.argsort(guidance, descending=True, stable=True)
    empty = order[:0]
    if k == 0:
        return empty, empty
    if positive or not positive_only:
        return order[:k], order[len(order) - k :]
    return empty, order[:k]


def instance_loss(instance_logits: Tensor, guidance: Tensor, mask: Tensor, positive: Tensor,
                  use: Tensor | None = None, mode: str = "mass", positive_only: bool = True,
                  **count_kw) -> Tensor:  # fmt: skip
    """Cross-entropy of the instance head on each bag's :func:`instance_targets`, averaged within a bag, then over
    the bags that count (``use``, those with teacher guidance) and have targets. ``instance_logits (B, N, 2)``,
    ``guidance``/``mask (B, N)``, ``positive (B,)`` bool (the bag's label is not the first class)."""
    losses = []
    for b in range(instance_logits.shape[0]):
        if use is not None and not bool(use[b]):
            continue
        idx = torch.nonzero(mask[b], as_tuple=True)[0]
        pos, neg = instance_targets(guidance[b, idx], bool(positive[b]), mode, positive_only, **count_kw)
        if len(pos) + len(neg) == 0:
            continue
        z = instance_logits[b, idx[torch.cat([pos, neg])]]
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long().to(z.device)
        losses.append(F.cross_entropy(z, y))
    return torch.stack(losses).mean() if losses else instance_logits.sum() * 0
