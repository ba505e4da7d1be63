"""Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018), plain and gated."""

from __future__ import annotations

from torch import Tensor, nn

from wsimil.models.base import MILModel, MILOutput, full_mask, register_model
from wsimil.models.layers import AttentionScore, masked_softmax, projection


class ABMIL(MILModel):
    """``h = proj(x)``; ``e_i = w^T tanh(V h_i)`` (gated: ``w^T (tanh(V h_i) * sigmoid(U h_i))``);
    ``a = softmax_N(e)``; ``z = Σ_i a_i h_i``; ``logits = W z``.

    Shapes: ``x (B, N, D)`` → logits ``(B, C)``, attention_logits ``(B, N)`` (raw ``e``, ``-inf`` on padding).
    """

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
        m = full_mask(x, mask)
        h = self.proj(x)  # (B, N, E)
        e = self.attention(h).squeeze(-1)  # (B, N)
        a = masked_softmax(e, m)
        z = (a.unsqueeze(1) @ h).squeeze(1)  # (B, E)
        return MILOutput(logits=self.classifier(z), bag_embedding=z, attention_logits=e.masked_fill(~m, float("-inf")))


@register_model("abmil")
def abmil(in_dim: int, n_classes: int, **kw) -> MILModel:
    return ABMIL(in_dim, n_classes, gated=False, **kw)


@register_model("gated_abmil")
def gated_abmil(in_dim: int, n_classes: int, **kw) -> MILModel:
    return ABMIL(in_dim, n_classes, gated=True, **kw)
