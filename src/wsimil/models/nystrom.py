"""Nyström self-attention (Xiong et al., AAAI 2021) for padded batches of variable-length sequences.

Follows the formulation TransMIL uses: the sequence is (virtually) front-padded to ``m·l`` tokens with
``l = ⌈n/m⌉``; landmarks are the means of ``m`` consecutive segments of ``l`` tokens; attention is
``softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V`` plus a depthwise convolution of ``V`` along the
sequence (kernel 33). Positions of the virtual front padding are masked out (the reference implementation's
masked path). Segments are computed per sequence from its own length, so a padded batch gives each
sequence exactly the result it would get alone.

[decision] The iterative Moore–Penrose pseudo-inverse is initialised per matrix; the common implementation uses
the maximum row/column sums over the whole batch, which makes one bag's output depend on the others.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def iterative_pinv(x: Tensor, iters: int = 6) -> Tensor:
    """Approximate Moore–Penrose inverse of a batch of square matrices ``(..., m, m)`` (Razavi et al. 2014)."""
    abs_x = x.abs()
    scale = abs_x.sum(-1).amax(-1) * abs_x.sum(-2).amax(-1)  # (...,)
    z = x.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström attention on ``x (B, L, dim)`` whose valid tokens are ``x[b, :lengths[b]]``."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.heads, self.dim_head, self.m, self.iters = heads, dim_head, num_landmarks, pinv_iterations
        inner = heads * dim_head
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(
            heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False
        )

    def forward(self, x: Tensor, lengths: Tensor, cls_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """Returns the output ``(B, L, dim)`` (padding rows are zero) and, if ``cls_attention``, the attention of
        token 0 to every token ``(B, heads, L)``."""
        out, cls, _ = self.attend(x, lengths, cls_attention)
        return out, cls

    def attend(self, x: Tensor, lengths: Tensor, cls_attention: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        """:meth:`forward` plus the values ``(B, heads, L, dim_head)`` (zero on padding), which MHIM-v2 weights by
        the CLS attention per head to score instances."""
        b, seq_len, _ = x.shape
        h, m = self.heads, self.m
        pos = torch.arange(seq_len, device=x.device)
        valid = pos[None, :] < lengths[:, None]  # (B, L)
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, seq_len, h, self.dim_head).transpose(1, 2) * valid[:, None, :, None] for t in (q, k, v))
        q = q * self.scale

        seg_len = torch.div(lengths + m - 1, m, rounding_mode="floor").clamp_min(1)  # l per sequence
        front_pad = m * seg_len - lengths
        seg = torch.div(pos[None, :] + front_pad[:, None], seg_len[:, None], rounding_mode="floor")
        seg = torch.where(valid, seg, torch.full_like(seg, m))  # padding goes to a dropped extra segment
        idx = seg[:, None, :, None].expand(b, h, seq_len, self.dim_head)
        q_l = q.new_zeros(b, h, m + 1, self.dim_head).scatter_add_(2, idx, q)[:, :, :m]
        k_l = k.new_zeros(b, h, m + 1, self.dim_head).scatter_add_(2, idx, k)[:, :, :m]
        counts = valid.to(x.dtype).new_zeros(b, m + 1).scatter_add_(1, seg, valid.to(x.dtype))[:, :m]
        q_l = q_l / (counts[:, None, :, None] + 1e-8)
        k_l = k_l / (counts[:, None, :, None] + 1e-8)
        has_l = counts > 0  # (B, m)

        neg = -torch.finfo(x.dtype).max
        sim1 = (q @ k_l.transpose(-1, -2)).masked_fill(~(valid[:, None, :, None] & has_l[:, None, None, :]), neg)
        sim2 = (q_l @ k_l.transpose(-1, -2)).masked_fill(~(has_l[:, None, :, None] & has_l[:, None, None, :]), neg)
        # Empty landmarks attend uniformly to the valid keys; padding keys are excluded outright.
        sim3 = (q_l @ k.transpose(-1, -2)).masked_fill(~has_l[:, None, :, None], neg)
        sim3 = sim3.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn1, attn2, attn3 = (s.softmax(-1) for s in (sim1, sim2, sim3))
        attn2_inv = iterative_pinv(attn2, self.iters)
        out = (attn1 @ attn2_inv) @ (attn3 @ v)
        out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, seq_len, h * self.dim_head)
        out = self.to_out(out) * valid[..., None]
        cls = None
        if cls_attention:
            cls = ((attn1[:, :, :1] @ attn2_inv) @ attn3).squeeze(2)  # (B, heads, L)
        return out, cls, v


def square_side(n: Tensor) -> Tensor:
    return torch.ceil(torch.sqrt(n.to(torch.float64))).to(torch.long)
