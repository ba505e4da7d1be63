"""WENO's networks (Qu et al., NeurIPS 2022, "Bi-directional weakly supervised knowledge distillation for whole slide
image classification"): one shared instance encoder, an attention teacher that classifies bags, and an instance
student (SPEC §3). Trained only by the ``weno`` method (``wsimil.methods.weno``), so not in the model registry.

Layout, following the official repository (``miccaiif/WENO``) where SPEC §3 is silent:

- encoder ``f``: ``Linear(D, 512) + BatchNorm1d`` applied to the real instances only (padding never enters the batch
  statistics);
- teacher ``abmil``: ``[Dropout(0.5) + Linear + ReLU]`` to 1024 twice, Ilse attention ``w^T tanh(V g)`` (V: 1024→512),
  ``Linear(1024, 2)`` on the attention-pooled bag; its per-instance score is the raw attention ``e_i``;
- teacher ``dsmil``: the same MLP, then DSMIL's instance classifier, critical-instance query attention
  (``q``: Linear, no activation) and a ``Conv1d(C, C, kernel=width)``-equivalent bag classifier; its per-instance
  score is the instance classifier's positive logit (the official DSMIL variant distils that, since the query
  attention depends on the bag's critical instance and cannot be scored instance by instance);
- student: ``[Linear + ReLU]`` 512→4096→4096, then ``Linear(4096, 2)``.

Linear layers of the heads start from ``N(0, 0.01)`` weights and zero biases as in the official code (``init_std``;
``None`` keeps PyTorch's default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil.models.base import MILModel, MILOutput, full_mask
from wsimil.models.layers import masked_softmax


class MaskedBatchNormEncoder(nn.Module):
    """``h = BatchNorm1d(Linear(x))`` over the real instances of a padded batch.

    Input ``x (B, N, D)`` with ``mask (B, N)`` or flat instances ``(M, D)``; output ``(B, N, E)`` (zero on padding) or
    ``(M, E)``. In training mode the statistics come from the real instances only; a single instance (BatchNorm
    cannot normalise one value per channel) is normalised with the running statistics instead.
    """

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, dim)
        self.bn = nn.BatchNorm1d(dim)

    def flat(self, x: Tensor) -> Tensor:
        z = self.linear(x)
        if self.training and z.shape[0] < 2:
            bn = self.bn
            return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return self.bn(z)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.flat(x[mask])
        out = h.new_zeros(*x.shape[:2], h.shape[-1])
        out[mask] = h
        return out


class TeacherOutput(NamedTuple):
    """``logits (B, C)`` bag logits; ``scores (B, N)`` raw instance scores (``-inf`` on padding); ``embedding (B, E)``;
    ``max_logits (B, C)``: DSMIL's max-instance stream (the instance logits of the top-scoring instance), else None."""

    logits: Tensor
    scores: Tensor
    embedding: Tensor
    max_logits: Tensor | None = None


def _mlp(in_dim: int, widths: Sequence[int], dropout: float) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    d = in_dim
    for w in widths:
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    return nn.Sequential(*layers), d


class AttentionTeacher(nn.Module):
    """ABMIL teacher: ``g = MLP(h)``; ``e_i = w^T tanh(V g_i)``; ``z = Σ softmax(e)_i g_i``; ``logits = W z``.

    ``forward(h (B,N,E), mask)`` → :class:`TeacherOutput` with ``scores`` = raw ``e`` and ``embedding`` = ``z``;
    ``instance_scores(h (..., E))`` → ``e (...)`` (independent of the other instances).
    """

    def __init__(self, dim: int, n_classes: int, widths: Sequence[int], dropout: float, attn_dim: int):
        super().__init__()
        self.mlp, width = _mlp(dim, widths, dropout)
        self.attention = nn.Sequential(nn.Linear(width, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))
        self.classifier = nn.Linear(width, n_classes)

    def instance_scores(self, h: Tensor) -> Tensor:
        return self.attention(self.mlp(h)).squeeze(-1)

    def forward(self, h: Tensor, mask: Tensor) -> TeacherOutput:
        g = self.mlp(h)
        e = self.attention(g).squeeze(-1)
        z = (masked_softmax(e, mask).unsqueeze(1) @ g).squeeze(1)
        return TeacherOutput(self.classifier(z), e.masked_fill(~mask, float("-inf")), z)


class DSMILTeacher(nn.Module):
    """DSMIL teacher: ``g = MLP(h)``; instance logits ``s = U g``; per class the critical instance
    ``k_c = argmax_i s_ic``; ``A_ci = softmax_i(q(g_i) · q(g_kc) / sqrt(W))``; ``b_c = Σ_i A_ci v(g_i)``;
    ``logits = Linear(flatten(b))``.

    ``forward`` → :class:`TeacherOutput` with the bag-stream ``logits``, ``scores = s_i1``, ``embedding = flatten(b)``
    ``(B, C·W)`` and ``max_logits = s_k`` for the instance ``k`` with the highest positive score (the official WENO
    DSMIL variant's max stream, which ranks instances by the positive class only).
    """

    def __init__(self, dim: int, n_classes: int, widths: Sequence[int], dropout: float):
        super().__init__()
        self.mlp, width = _mlp(dim, widths, dropout)
        self.instance_classifier = nn.Linear(width, n_classes)
        self.q = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.bag_classifier = nn.Linear(n_classes * width, n_classes)
        self.scale = 1.0 / math.sqrt(width)

    def instance_scores(self, h: Tensor) -> Tensor:
        return self.instance_classifier(self.mlp(h))[..., 1]

    def forward(self, h: Tensor, mask: Tensor) -> TeacherOutput:
        g = self.mlp(h)
        s = self.instance_classifier(g)  # (B, N, C)
        crit = s.masked_fill(~mask.unsqueeze(-1), float("-inf")).argmax(1)  # (B, C)
        q = self.q(g)
        q_crit = torch.gather(q, 1, crit.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, C, W)
        a = masked_softmax((q_crit @ q.transpose(1, 2)) * self.scale, mask.unsqueeze(1))  # (B, C, N)
        b = (a @ self.v(g)).flatten(1)
        scores = s[..., 1].masked_fill(~mask, float("-inf"))
        max_logits = s[torch.arange(s.shape[0], device=s.device), scores.argmax(1)]
        return TeacherOutput(self.bag_classifier(b), scores, b, max_logits)


class WENONet(MILModel):
    """Shared encoder + teacher + student. ``forward(x (B,N,D), mask)`` returns the student's view:

    - ``logits (B, 2)``: the bag prediction ``max_i p_i`` of the student's positive probabilities, as the logits
      ``[0, max_i (z_i1 − z_i0)]`` (softmax of which is ``[1 − p, p]`` for ``p = max_i p_i``);
    - ``instance_logits (B, N, 2)``: student logits ``z_i``;
    - ``attention_logits (B, N)``: the teacher's raw instance score (ABMIL attention / DSMIL positive instance logit),
      ``-inf`` on padding;
    - ``extra_logits = {"teacher": (B, 2)}``: the teacher's bag logits;
    - ``bag_embedding``: the teacher's pooled bag representation.
    """

    instance_score = "instance"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        teacher: str = "abmil",
        embed_dim: int = 512,
        teacher_dims: Sequence[int] = (1024, 1024),
        dropout: float = 0.5,
        attn_dim: int = 512,
        student_dims: Sequence[int] = (4096, 4096),
        init_std: float | None = 0.01,
    ):
        super().__init__()
        if n_classes != 2:
            raise ValueError(f"WENO is a binary method (negative/positive bags), got {n_classes} classes")
        self.encoder = MaskedBatchNormEncoder(in_dim, embed_dim)
        if teacher == "abmil":
            self.teacher: AttentionTeacher | DSMILTeacher = AttentionTeacher(
                embed_dim, n_classes, teacher_dims, dropout, attn_dim
            )
        elif teacher == "dsmil":
            self.teacher = DSMILTeacher(embed_dim, n_classes, teacher_dims, dropout)
        else:
            raise ValueError(f"unknown WENO teacher {teacher!r}; choose abmil or dsmil")
        mlp, width = _mlp(embed_dim, student_dims, 0.0)
        self.student = nn.Sequential(*mlp, nn.Linear(width, n_classes))
        if init_std is not None:
            for m in [*self.teacher.modules(), *self.student.modules()]:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, init_std)
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        m = full_mask(x, mask)
        h = self.encoder(x, m)
        t = self.teacher(h, m)
        inst = self.student(h)
        margin = (inst[..., 1] - inst[..., 0]).masked_fill(~m, float("-inf")).amax(1)
        logits = torch.stack([torch.zeros_like(margin), margin], dim=1)
        return MILOutput(
            logits=logits,
            bag_embedding=t.embedding,
            attention_logits=t.scores,
            instance_logits=inst,
            extra_logits={"teacher": t.logits},
        )
