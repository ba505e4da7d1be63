"""Mean- and max-pooling baselines."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsimil.models.base import MILModel, MILOutput, full_mask, register_model
from wsimil.models.layers import projection


class MeanPoolMIL(MILModel):
    """Project instances, average them (ignoring padding), classify. Instance logits are the classifier applied
    to each instance, so the bag logits equal their masked mean."""

    input_layer = "proj.0"  # x is read by the projection only

    def __init__(self, in_dim: int, n_classes: int, hidden_dims=(512,), dropout: float = 0.25):
        super().__init__()
        self.proj = projection(in_dim, hidden_dims, dropout)
        self.classifier = nn.Linear(hidden_dims[-1] if hidden_dims else in_dim, n_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        m = full_mask(x, mask)
        h = self.proj(x)  # (B, N, E)
        w = m.unsqueeze(-1).to(h.dtype)
        z = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        return MILOutput(logits=self.classifier(z), bag_embedding=z, instance_logits=self.classifier(h))


class MaxPoolMIL(MILModel):
    """Instance-level max pooling (mi-Net). For two classes the instance head gives one score ``s_i`` and the bag
    logits are ``[0, max_i s_i]``, so only positive evidence can make a bag positive (the standard MIL
    assumption). For more classes each class logit is the max over instances of that class's logit."""

    input_layer = "proj.0"  # x is read by the projection only

    def __init__(self, in_dim: int, n_classes: int, hidden_dims=(512,), dropout: float = 0.25):
        super().__init__()
        self.n_classes = n_classes
        self.proj = projection(in_dim, hidden_dims, dropout)
        width = hidden_dims[-1] if hidden_dims else in_dim
        self.head = nn.Linear(width, 1 if n_classes == 2 else n_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        m = full_mask(x, mask)
        h = self.proj(x)
        s = self.head(h)  # (B, N, 1|C)
        if self.n_classes == 2:
            s = torch.cat([torch.zeros_like(s), s], dim=-1)
        logits = s.masked_fill(~m.unsqueeze(-1), float("-inf")).amax(1)
        z = h.masked_fill(~m.unsqueeze(-1), float("-inf")).amax(1)
        return MILOutput(logits=logits, bag_embedding=z, instance_logits=s)


@register_model("mean", options_of=MeanPoolMIL)
def mean_pool(in_dim: int, n_classes: int, **kw) -> MILModel:
    return MeanPoolMIL(in_dim, n_classes, **kw)


@register_model("max", options_of=MaxPoolMIL)
def max_pool(in_dim: int, n_classes: int, **kw) -> MILModel:
    return MaxPoolMIL(in_dim, n_classes, **kw)
