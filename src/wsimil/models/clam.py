"""CLAM (Lu et al., Nature BME 2021): gated attention with instance-level clustering.

Single-branch (SB) shares one attention branch; multi-branch (MB) has one branch and one bag classifier per
class. Each class ``c`` has an instance classifier scoring whether an instance is evidence for ``c``.
[decision] CLAM's two-way instance classifiers are written as one logit per class (``instance_logits[..., c]``),
which is the same function family (a 2-way softmax depends only on the logit difference) and fits the
``(B, N, C)`` contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil.models.base import MILModel, MILOutput, full_mask, register_model
from wsimil.models.layers import AttentionScore, masked_softmax, projection


def clam_instance_loss(
    attention_logits: Tensor, instance_logits: Tensor, y: Tensor, mask: Tensor, k: int = 8, subtyping: bool = False
) -> Tensor:
    """CLAM's instance clustering loss.

    For each bag, with ``a`` the attention of the branch of its class ``y`` (SB: the only branch): the top-``k``
    attended instances get target 1 and the bottom-``k`` target 0 for classifier ``y`` (BCE on its logit). If
    ``subtyping``, the top-``k`` of every other class's branch get target 0 for that class's classifier, and the
    sum is divided by the number of classes (as CLAM does). ``k`` shrinks to ``⌊n/2⌋`` for small bags.

    Args: attention_logits ``(B, N)`` or ``(B, C, N)``; instance_logits ``(B, N, C)``; y ``(B,)``; mask ``(B, N)``.
    """
    b_sz, _, n_cls = instance_logits.shape
    att = attention_logits if attention_logits.dim() == 3 else attention_logits.unsqueeze(1)
    total = instance_logits.new_zeros(())
    for b in range(b_sz):
        valid = mask[b]
        n = int(valid.sum())
        kk = min(k, n // 2)
        if kk == 0:
            continue
        logits_b = instance_logits[b][valid]  # (n, C)
        bag_loss = instance_logits.new_zeros(())
        for c in range(n_cls):
            scores = att[b, c if att.shape[1] > 1 else 0][valid]
            if c == int(y[b]):
                top = scores.topk(kk).indices
                bottom = (-scores).topk(kk).indices
                pred = torch.cat([logits_b[top, c], logits_b[bottom, c]])
                target = torch.cat([torch.ones(kk), torch.zeros(kk)]).to(pred)
                bag_loss = bag_loss + F.binary_cross_entropy_with_logits(pred, target)
            elif subtyping:
                top = scores.topk(kk).indices
                pred = logits_b[top, c]
                bag_loss = bag_loss + F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred))
        total = total + (bag_loss / n_cls if subtyping else bag_loss)
    return total / b_sz


class CLAM(MILModel):
    """``h = proj(x)``; gated attention with 1 (SB) or C (MB) branches; bag logits from the attended features.

    Shapes: ``x (B, N, D)`` → logits ``(B, C)``; attention_logits ``(B, N)`` (SB) or ``(B, C, N)`` (MB);
    instance_logits ``(B, N, C)``; bag_embedding ``(B, E)`` (SB) or ``(B, C·E)`` (MB).
    """

    loss_weights = {"bag": 0.7, "instance": 0.3}

    input_layer = "proj.0"  # x is read by the projection only

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        multi_branch: bool = False,
        hidden_dims=(512,),
        dropout: float = 0.25,
        attn_dim: int = 256,
        k_sample: int = 8,
        subtyping: bool | None = None,
    ):
        super().__init__()
        self.n_classes = n_classes
        self.multi_branch = multi_branch
        self.k_sample = k_sample
        self.subtyping = n_classes > 2 if subtyping is None else subtyping
        self.proj = projection(in_dim, hidden_dims, dropout)
        width = hidden_dims[-1] if hidden_dims else in_dim
        n_branches = n_classes if multi_branch else 1
        self.attention = AttentionScore(width, attn_dim, n_heads=n_branches, gated=True, dropout=dropout)
        if multi_branch:
            self.bag_classifiers = nn.ModuleList(nn.Linear(width, 1) for _ in range(n_classes))
        else:
            self.classifier = nn.Linear(width, n_classes)
        self.instance_classifier = nn.Linear(width, n_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        m = full_mask(x, mask)
        h = self.proj(x)
        e = self.attention(h).transpose(1, 2)  # (B, K, N)
        a = masked_softmax(e, m.unsqueeze(1))
        z = a @ h  # (B, K, E)
        if self.multi_branch:
            logits = torch.cat([clf(z[:, c]) for c, clf in enumerate(self.bag_classifiers)], dim=1)
            bag_embedding = z.flatten(1)
            att = e
        else:
            logits = self.classifier(z[:, 0])
            bag_embedding = z[:, 0]
            att = e[:, 0]
        return MILOutput(
            logits=logits,
            bag_embedding=bag_embedding,
            attention_logits=att.masked_fill(~(m.unsqueeze(1) if att.dim() == 3 else m), float("-inf")),
            instance_logits=self.instance_classifier(h),
        )

    def aux_losses(self, out: MILOutput, y: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {
            "instance": clam_instance_loss(
                out.attention_logits, out.instance_logits, y, mask, self.k_sample, self.subtyping
            )
        }


@register_model("clam_sb", options_of=CLAM)
def clam_sb(in_dim: int, n_classes: int, **kw) -> MILModel:
    return CLAM(in_dim, n_classes, multi_branch=False, **kw)


@register_model("clam_mb", options_of=CLAM)
def clam_mb(in_dim: int, n_classes: int, **kw) -> MILModel:
    return CLAM(in_dim, n_classes, multi_branch=True, **kw)
