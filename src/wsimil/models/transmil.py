"""TransMIL (Shao et al., NeurIPS 2021): a CLS token, two Nyström self-attention layers and a pyramid position
encoding generator (PPEG) between them.

Each bag's ``N`` tokens are extended to a square ``H² = ⌈√N⌉²`` by repeating its first tokens (as the
original does); PPEG reshapes them to an ``H×H`` grid and adds 7×7, 5×5 and 3×3 depthwise convolutions. In a
padded batch each bag keeps its own ``H`` (its grid is placed in the corner of a zero canvas, which is what zero
padding would give), so padding never changes a bag's result. TransMIL is not permutation invariant.

[decision] TransMIL has no raw attention scores; ``attention_logits`` holds the last layer's CLS→instance
attention weights per head ``(B, heads, N)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsimil.models.base import MILModel, MILOutput, full_mask, register_model
from wsimil.models.layers import append_tokens, check_score_kind, class_aware_probability, projection
from wsimil.models.nystrom import NystromAttention, square_side


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, num_landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim, heads=heads, dim_head=dim // heads, num_landmarks=num_landmarks, dropout=dropout
        )

    def forward(self, x: Tensor, lengths: Tensor, cls_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        out, cls = self.attn(self.norm(x), lengths, cls_attention)
        return x + out, cls

    def attend(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` with the CLS attention ``(B, heads, L)`` and the values ``(B, heads, L, d)``."""
        out, cls, v = self.attn.attend(self.norm(x), lengths, cls_attention=True)
        return x + out, cls, v


class PPEG(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: Tensor, side: Tensor) -> Tensor:
        """``tokens (B, T, E)`` with bag ``b``'s ``side[b]²`` grid tokens first; returns the same layout."""
        b, t, e = tokens.shape
        s_max = int(side.max())
        j = torch.arange(t, device=tokens.device)
        valid = j[None, :] < (side * side)[:, None]
        row = torch.div(j[None, :], side[:, None].clamp_min(1), rounding_mode="floor")
        col = j[None, :] - row * side[:, None]
        flat = torch.where(valid, row * s_max + col, torch.full_like(row, s_max * s_max))
        canvas = tokens.new_zeros(b, s_max * s_max + 1, e)
        canvas.scatter_(1, flat[..., None].expand(-1, -1, e), tokens * valid[..., None])
        grid = canvas[:, :-1].transpose(1, 2).reshape(b, e, s_max, s_max)
        grid = grid + sum(conv(grid) for conv in self.convs)
        out = grid.flatten(2).transpose(1, 2)
        out = torch.cat([out, out.new_zeros(b, 1, e)], dim=1)
        return torch.gather(out, 1, flat[..., None].expand(-1, -1, e)) * valid[..., None]


class TransMIL(MILModel):
    """Shapes: ``x (B, N, D)`` → logits ``(B, C)``; bag_embedding = CLS token ``(B, E)``; attention_logits
    ``(B, heads, N)``."""

    permutation_invariant = False

    input_layer = "proj.0"  # x is read by the projection only

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dims=(512,),
        dropout: float = 0.25,
        heads: int = 8,
        num_landmarks: int = 256,
        attn_dropout: float = 0.1,
    ):
        super().__init__()
        self.proj = projection(in_dim, hidden_dims, dropout)
        dim = hidden_dims[-1] if hidden_dims else in_dim
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, heads, num_landmarks, attn_dropout)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, num_landmarks, attn_dropout)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        return self.aggregate(self.embed(x), mask)

    def embed(self, x: Tensor) -> Tensor:
        """Projected instance tokens ``h (B, N, E)`` of ``x (B, N, D)``."""
        return self.proj(x)

    def aggregate(self, h: Tensor, mask: Tensor | None = None, extra_tokens: Tensor | None = None) -> MILOutput:
        """The transformer on projected tokens ``h (B, N, E)``; ``extra_tokens (B, K, E)`` (MHIM-v2's recycle
        tokens) follow each bag's own instances in its sequence (outputs then cover ``N + K`` positions)."""
        m = full_mask(h, mask)
        if extra_tokens is not None:
            h, m = append_tokens(h, m, extra_tokens)
        out, _, _ = self._run(h, m, first_layer=False)
        return out

    def score_instances(
        self, x: Tensor, mask: Tensor | None = None, kind: str = "attention"
    ) -> tuple[MILOutput, Tensor]:
        """The full-bag output and MHIM's teacher scores from the *first* layer, ``-inf`` on padding:

        - ``"attention"`` (MHIM-v1): the CLS token's attention to each instance per head, ``(B, heads, N)``;
        - ``"class_aware"`` (MHIM-v2): per head, attention × value ``a_hi v_hi``, heads concatenated and passed
          through the layer's output projection ``W_O``, then ``max_c softmax_c(W ·)`` with the classifier
          weight ``W``: ``(B, N)``.
        """
        check_score_kind(kind)
        m = full_mask(x, mask)
        out, att, values = self._run(self.embed(x), m, first_layer=True)
        if kind == "attention":
            return out, att.masked_fill(~m[:, None, :], float("-inf"))
        weighted = att.unsqueeze(-1) * values  # (B, H, N, d)
        feats = self.layer1.attn.to_out(weighted.permute(0, 2, 1, 3).flatten(2))  # (B, N, E)
        s = class_aware_probability(self.classifier.weight, feats)
        return out, s.masked_fill(~m, float("-inf"))

    def _run(self, h: Tensor, m: Tensor, first_layer: bool) -> tuple[MILOutput, Tensor | None, Tensor | None]:
        """Forward on tokens ``h (B, N, E)`` with mask ``m``; with ``first_layer`` also the first layer's CLS
        attention ``(B, heads, N)`` and values ``(B, heads, N, d)`` at the input positions (zero on padding)."""
        b, n, _ = h.shape
        # Compact each bag's valid instances to the front (stable, so order is kept).
        order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)
        h = torch.gather(h, 1, order[..., None].expand_as(h))
        n_valid = m.sum(1)
        side = square_side(n_valid)
        n_sq = side * side
        t = int(n_sq.max())
        j = torch.arange(t, device=h.device)
        src = torch.where(j[None, :] < n_valid[:, None], j[None, :], j[None, :] - n_valid[:, None])
        src = src.clamp(0, max(n - 1, 0))
        tokens = torch.gather(h, 1, src[..., None].expand(-1, -1, h.shape[-1]))
        tokens = tokens * (j[None, :] < n_sq[:, None])[..., None]
        seq = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        lengths = n_sq + 1
        first_att = first_values = None
        if first_layer:
            seq, cls1, v1 = self.layer1.attend(seq, lengths)
            first_att = _to_input_positions(cls1[:, :, 1 : n + 1], order, m)
            v1 = v1[:, :, 1 : n + 1].transpose(1, 2).flatten(2)  # (B, n', H·d), compacted order
            first_values = _to_input_positions(v1.transpose(1, 2), order, m)  # (B, H·d, N)
            first_values = first_values.view(b, cls1.shape[1], -1, n).transpose(2, 3)  # (B, H, N, d)
        else:
            seq, _ = self.layer1(seq, lengths)
        seq = torch.cat([seq[:, :1], self.ppeg(seq[:, 1:], side)], dim=1)
        seq, cls_att = self.layer2(seq, lengths, cls_attention=True)
        z = self.norm(seq[:, 0])
        # Attention of CLS to the original instances, scattered back to their input positions.
        att_in = _to_input_positions(cls_att[:, :, 1 : n + 1], order, m)
        att_in = att_in.masked_fill(~m[:, None, :], float("-inf"))
        out = MILOutput(logits=self.classifier(z), bag_embedding=z, attention_logits=att_in)
        return out, first_att, first_values


def _to_input_positions(t: Tensor, order: Tensor, m: Tensor) -> Tensor:
    """``t (B, F, n')`` over the compacted sequence (valid instances first) → ``(B, F, N)`` at the input positions
    ``order`` came from, zero on padding."""
    b, f, n = t.shape[0], t.shape[1], m.shape[1]
    if t.shape[-1] < n:
        t = torch.cat([t, t.new_zeros(b, f, n - t.shape[-1])], dim=-1)
    out = torch.empty_like(t).scatter_(2, order[:, None, :].expand_as(t), t)
    return out.masked_fill(~m[:, None, :], 0.0)


@register_model("transmil", options_of=TransMIL)
def transmil(in_dim: int, n_classes: int, **kw) -> MILModel:
    return TransMIL(in_dim, n_classes, **kw)
