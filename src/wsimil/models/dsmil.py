"""DSMIL (Li, Li & Eliceiri, CVPR 2021): dual-stream MIL.

Stream 1 classifies every instance and max-pools per class. Stream 2 takes, per class, the critical instance
(highest stream-1 score) and attends to all instances by similarity of their queries to its query. The output
is the mean of both streams' logits; training uses the official loss ``0.5·CE(stream 2) + 0.5·CE(stream 1)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil.models.base import MILModel, MILOutput, full_mask, register_model
from wsimil.models.layers import append_tokens, check_score_kind, masked_softmax, projection


class DSMIL(MILModel):
    """Shapes: ``x (B, N, D)`` → logits ``(B, C)``; attention_logits ``(B, C, N)`` (raw query similarities);
    instance_logits ``(B, N, C)``; bag_embedding ``(B, C·E)``."""

    loss_weights = {"bag": 0.0, "bag_stream": 0.5, "max_instance": 0.5}

    input_layer = "proj.0"  # x is read by the projection only

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dims=(512,),
        dropout: float = 0.25,
        q_dim: int = 128,
        v_dropout: float = 0.0,
    ):
        super().__init__()
        self.proj = projection(in_dim, hidden_dims, dropout)
        width = hidden_dims[-1] if hidden_dims else in_dim
        self.instance_classifier = nn.Linear(width, n_classes)
        self.q = nn.Sequential(nn.Linear(width, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        self.v = nn.Sequential(nn.Dropout(v_dropout), nn.Linear(width, width), nn.ReLU())
        # Conv1d(C, C, kernel=E) over the (C, E) bag matrix is a linear map of its flattening.
        self.bag_classifier = nn.Linear(n_classes * width, n_classes)
        self.scale = 1.0 / math.sqrt(q_dim)
        #: the bag embedding is ``C`` rows of ``E`` (one per class); MHIM's consistency loss compares row by row
        self.embedding_rows = n_classes

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        return self.aggregate(self.embed(x), mask)

    def embed(self, x: Tensor) -> Tensor:
        """Projected instance tokens ``h (B, N, E)`` of ``x (B, N, D)``."""
        return self.proj(x)

    def aggregate(self, h: Tensor, mask: Tensor | None = None, extra_tokens: Tensor | None = None) -> MILOutput:
        """Both streams on projected tokens ``h (B, N, E)``; ``extra_tokens (B, K, E)`` join every bag as ``K``
        further instances (outputs then cover ``N + K`` positions)."""
        m = full_mask(h, mask)
        if extra_tokens is not None:
            h, m = append_tokens(h, m, extra_tokens)
        inst = self.instance_classifier(h)  # (B, N, C)
        inst_masked = inst.masked_fill(~m.unsqueeze(-1), float("-inf"))
        max_logits, crit_idx = inst_masked.max(1)  # (B, C)
        q = self.q(h)  # (B, N, Q)
        q_crit = torch.gather(q, 1, crit_idx.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, C, Q)
        e = (q_crit @ q.transpose(1, 2)) * self.scale  # (B, C, N)
        a = masked_softmax(e, m.unsqueeze(1))
        bag = a @ self.v(h)  # (B, C, E)
        bag_logits = self.bag_classifier(bag.flatten(1))
        logits = 0.5 * (bag_logits + max_logits)
        return MILOutput(
            logits=logits,
            bag_embedding=bag.flatten(1),
            attention_logits=e.masked_fill(~m.unsqueeze(1), float("-inf")),
            instance_logits=inst,
        )

    def score_instances(
        self, x: Tensor, mask: Tensor | None = None, kind: str = "attention"
    ) -> tuple[MILOutput, Tensor]:
        """The full-bag output and MHIM's teacher scores ``(B, N)`` (``-inf`` on padding): the largest
        instance-classifier logit ``max_c`` of stream 1, for both kinds, as the official MHIM code does for DSMIL
        in v1 and v2 (its instance classifier is already class-aware)."""
        check_score_kind(kind)
        m = full_mask(x, mask)
        out = self.aggregate(self.embed(x), m)
        return out, out.instance_logits.amax(-1).masked_fill(~m, float("-inf"))

    def aux_losses(self, out: MILOutput, y: Tensor, mask: Tensor) -> dict[str, Tensor]:
        max_logits = out.instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        bag_logits = 2.0 * out.logits - max_logits  # the mean of the two streams is the output
        return {"bag_stream": F.cross_entropy(bag_logits, y), "max_instance": F.cross_entropy(max_logits, y)}


@register_model("dsmil", options_of=DSMIL)
def dsmil(in_dim: int, n_classes: int, **kw) -> MILModel:
    return DSMIL(in_dim, n_classes, **kw)
