"""Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018), plain and gated."""

from __future__ import annotations

from torch import Tensor, nn

from wsimil.models.base import MILModel, MILOutput, full_mask, register_model
from wsimil.models.layers import (
    AttentionScore,
    append_tokens,
    check_score_kind,
    class_aware_probability,
    masked_softmax,
    projection,
)


class ABMIL(MILModel):
    """``h = proj(x)``; ``e_i = w^T tanh(V h_i)`` (gated: ``w^T (tanh(V h_i) * sigmoid(U h_i))``);
    ``a = softmax_N(e)``; ``z = Σ_i a_i h_i``; ``logits = W z``.

    Shapes: ``x (B, N, D)`` → logits ``(B, C)``, attention_logits ``(B, N)`` (raw ``e``, ``-inf`` on padding).
    """

    input_layer = "proj.0"  # x is read by the projection only

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dims=(512,),
        dropout: float = 0.25,
        attn_dim: int = 128,
        gated: bool = False,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        self.proj = projection(in_dim, hidden_dims, dropout)
        width = hidden_dims[-1] if hidden_dims else in_dim
        self.attention = AttentionScore(width, attn_dim, n_heads=1, gated=gated, dropout=attn_dropout)
        self.classifier = nn.Linear(width, n_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        return self.aggregate(self.embed(x), mask)

    def embed(self, x: Tensor) -> Tensor:
        """Projected instance tokens ``h (B, N, E)`` of ``x (B, N, D)``."""
        return self.proj(x)

    def aggregate(self, h: Tensor, mask: Tensor | None = None, extra_tokens: Tensor | None = None) -> MILOutput:
        """Attention pooling of projected tokens ``h (B, N, E)``; ``extra_tokens (B, K, E)`` (MHIM-v2's recycle
        tokens) join every bag as ``K`` further instances, so the outputs then cover ``N + K`` positions."""
        m = full_mask(h, mask)
        if extra_tokens is not None:
            h, m = append_tokens(h, m, extra_tokens)
        e = self.attention(h).squeeze(-1)  # (B, N)
        a = masked_softmax(e, m)
        z = (a.unsqueeze(1) @ h).squeeze(1)  # (B, E)
        return MILOutput(logits=self.classifier(z), bag_embedding=z, attention_logits=e.masked_fill(~m, float("-inf")))

    def patch_logits(self, x: Tensor) -> Tensor:
        """The bag classifier applied to each patch alone, ``W h_i + b``: ``(B, N, C)`` for ``x (B, N, D)``. As the
        attention weights sum to 1, the bag logits are their attention-weighted mean, ``Σ_i a_i (W h_i + b)``, so a
        patch's evidence is on the same scale in every bag (heatmaps: ``evidence:<class>``)."""
        return self.classifier(self.embed(x))

    def score_instances(
        self, x: Tensor, mask: Tensor | None = None, kind: str = "attention"
    ) -> tuple[MILOutput, Tensor]:
        """The full-bag output and per-instance scores ``(B, N)`` (``-inf`` on padding) for MHIM's teacher:
        ``"attention"`` = raw attention ``e`` (same ranking as softmax attention, MHIM-v1); ``"class_aware"`` =
        ``max_c softmax_c(W a_i h_i)`` with softmax attention ``a`` and classifier weight ``W`` (MHIM-v2)."""
        check_score_kind(kind)
        m = full_mask(x, mask)
        h = self.embed(x)
        out = self.aggregate(h, m)
        if kind == "attention":
            return out, out.attention_logits
        a = masked_softmax(out.attention_logits, m)
        s = class_aware_probability(self.classifier.weight, a.unsqueeze(-1) * h)
        return out, s.masked_fill(~m, float("-inf"))


@register_model("abmil", options_of=ABMIL)
def abmil(in_dim: int, n_classes: int, **kw) -> MILModel:
    return ABMIL(in_dim, n_classes, gated=False, **kw)


@register_model("gated_abmil", options_of=ABMIL)
def gated_abmil(in_dim: int, n_classes: int, **kw) -> MILModel:
    return ABMIL(in_dim, n_classes, gated=True, **kw)
