"""HMIL's hierarchical aggregator (Jin et al., IEEE TMI 2025, "HMIL: Hierarchical Multi-Instance Learning for
Fine-Grained Whole Slide Image Classification"; SPEC §4). Trained only by the ``hmil`` method
(``wsimil.methods.hmil``), which knows the label hierarchy, so it is not in the model registry.

Per bag ``x (N, D)``:

- coarse instance features ``h_c = W_2 · Dropout(ReLU(W_1 x))`` (``D → mlp_dim → coarse_dim``), fine instance
  features ``h_f = W_3 h_c`` (``coarse_dim → fine_dim``);
- class-wise gated attention per level: ``e = W (tanh(V h) ⊙ σ(U h))`` with one output row per class, so
  ``A_c = softmax_N(e_c) ∈ R^{K_c×N}`` and ``A_f = softmax_N(e_f) ∈ R^{K_f×N}``;
- class-wise bag features ``Z_c = A_c h_c ∈ R^{K_c×coarse_dim}``, ``Z_f = A_f h_f ∈ R^{K_f×fine_dim}``;
- one ``Linear(dim, 1)`` per level, shared by the class rows, scores row ``k`` as class ``k``'s logit.

Widths follow the official repository (``ChengJin-git/HMIL``, where SPEC §4 is silent): MLP hidden 256, fine
features 256, attention hidden 256 (coarse) and 64 (fine), no dropout (``dropout`` adds it after the MLP's ReLU,
``attn_dropout`` in the attention), Kaiming-normal weights with zero biases. One departure:
the official MLP maps back to the input width (1024 for its ResNet features); here ``coarse_dim`` (default 512) is
independent of the encoder, so foundation-model features of any width give the same aggregator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil.models.base import MILModel, MILOutput, full_mask
from wsimil.models.layers import AttentionScore, masked_softmax


class HierarchicalOutput(NamedTuple):
    """Everything HMIL's losses need from one forward pass.

    ``fine_logits (B, K_f)``, ``coarse_logits (B, K_c)``; raw class-wise attention ``fine_attention (B, K_f, N)`` and
    ``coarse_attention (B, K_c, N)`` (``-inf`` on padding); class-wise bag features ``fine_features (B, K_f, fine_dim)``
    and ``coarse_features (B, K_c, coarse_dim)``."""

    fine_logits: Tensor
    coarse_logits: Tensor
    fine_attention: Tensor
    coarse_attention: Tensor
    fine_features: Tensor
    coarse_features: Tensor


def mapping_matrix(parents: Sequence[int], n_coarse: int | None = None) -> Tensor:
    """``M ∈ {0,1}^{K_c×K_f}`` with ``M[c, f] = 1`` iff fine class ``f``'s parent is coarse class ``c``."""
    p = torch.as_tensor(list(parents), dtype=torch.long)
    k_c = int(p.max()) + 1 if n_coarse is None else n_coarse
    return F.one_hot(p, k_c).T.to(torch.float32)


def marginal_log_probs(fine_logits: Tensor, m: Tensor) -> Tensor:
    """``log(M · softmax(z_f))`` ``(B, K_c)``: each coarse class's log-probability as the log-sum-exp of its
    children's fine log-probabilities (stable where the plain log of a sum of probabilities underflows)."""
    logp = F.log_softmax(fine_logits, dim=-1)  # (B, K_f)
    log_m = torch.log(m.to(logp.dtype))  # 0 on edges, -inf elsewhere
    return torch.logsumexp(logp.unsqueeze(1) + log_m.unsqueeze(0), dim=-1)


class HMILNet(MILModel):
    """Two-level class-wise gated-attention MIL (see the module docstring).

    ``forward(x (B, N, D), mask (B, N))`` returns ``MILOutput`` with ``logits`` = fine logits ``(B, K_f)``,
    ``attention_logits`` = raw fine attention ``(B, K_f, N)``, ``bag_embedding`` = the fine class-wise bag features
    flattened ``(B, K_f·fine_dim)`` and ``extra_logits``: ``coarse`` (the coarse head, ``(B, K_c)``) and
    ``coarse_from_fine`` (``log(M · softmax(z_f))``, whose softmax is the fine prediction marginalised onto the
    hierarchy, consistent with it by construction). :meth:`forward_hierarchy` gives both levels' attention and
    features; :meth:`attention_maps` both raw attention maps for heatmaps.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        parents: Sequence[int],
        mlp_dim: int = 256,
        coarse_dim: int = 512,
        fine_dim: int = 256,
        coarse_attn_dim: int = 256,
        fine_attn_dim: int = 64,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        init: str = "kaiming",
    ):
        super().__init__()
        if len(parents) != n_classes:
            raise ValueError(f"parents has {len(parents)} entries but there are {n_classes} fine classes")
        if init not in ("kaiming", "default"):
            raise ValueError(f"init must be 'kaiming' or 'default', got {init!r}")
        m = mapping_matrix(parents)
        if (m.sum(1) == 0).any():
            raise ValueError(f"coarse class(es) {torch.nonzero(m.sum(1) == 0).flatten().tolist()} have no fine class")
        self.n_fine, self.n_coarse = n_classes, m.shape[0]
        self.register_buffer("mapping", m)
        layers: list[nn.Module] = [nn.Linear(in_dim, mlp_dim), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.coarse_mlp = nn.Sequential(*layers, nn.Linear(mlp_dim, coarse_dim))
        self.fine_proj = nn.Linear(coarse_dim, fine_dim)
        self.coarse_attention = AttentionScore(
            coarse_dim, coarse_attn_dim, self.n_coarse, gated=True, dropout=attn_dropout
        )
        self.fine_attention = AttentionScore(fine_dim, fine_attn_dim, self.n_fine, gated=True, dropout=attn_dropout)
        self.coarse_classifier = nn.Linear(coarse_dim, 1)
        self.fine_classifier = nn.Linear(fine_dim, 1)
        if init == "kaiming":
            for mod in self.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.kaiming_normal_(mod.weight)
                    nn.init.zeros_(mod.bias)

    @staticmethod
    def _level(h: Tensor, scorer: AttentionScore, classifier: nn.Linear, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e = scorer(h).transpose(1, 2)  # (B, K, N)
        a = masked_softmax(e, m.unsqueeze(1))
        z = a @ h  # (B, K, dim)
        return classifier(z).squeeze(-1), e.masked_fill(~m.unsqueeze(1), float("-inf")), z

    def forward_hierarchy(self, x: Tensor, mask: Tensor | None = None) -> HierarchicalOutput:
        """Both levels of one forward pass (one dropout draw), for the losses and for inspection."""
        m = full_mask(x, mask)
        h_c = self.coarse_mlp(x)
        h_f = self.fine_proj(h_c)
        z_c, e_c, f_c = self._level(h_c, self.coarse_attention, self.coarse_classifier, m)
        z_f, e_f, f_f = self._level(h_f, self.fine_attention, self.fine_classifier, m)
        return HierarchicalOutput(z_f, z_c, e_f, e_c, f_f, f_c)

    def output(self, h: HierarchicalOutput) -> MILOutput:
        """The common ``MILOutput`` view of a :class:`HierarchicalOutput`."""
        return MILOutput(
            logits=h.fine_logits,
            bag_embedding=h.fine_features.flatten(1),
            attention_logits=h.fine_attention,
            extra_logits={
                "coarse": h.coarse_logits,
                "coarse_from_fine": marginal_log_probs(h.fine_logits, self.mapping),
            },
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        return self.output(self.forward_hierarchy(x, mask))

    def attention_maps(self, x: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Raw class-wise attention of both levels: ``{"fine": (B, K_f, N), "coarse": (B, K_c, N)}`` (``-inf`` on
        padding); ``softmax`` over the last axis gives the attention weights."""
        h = self.forward_hierarchy(x, mask)
        return {"fine": h.fine_attention, "coarse": h.coarse_attention}
