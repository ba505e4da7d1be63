"""The LRMIL stage-2 student: ABMIL with an instance head (trained by method ``lrmil``, :mod:`wsimil.methods.lrmil`)."""

from __future__ import annotations

from torch import Tensor, nn

from wsimil.models.abmil import ABMIL
from wsimil.models.base import MILModel, MILOutput, full_mask, register_model
from wsimil.models.layers import masked_softmax


class StudentABMIL(ABMIL):
    """ABMIL (Ilse et al. 2018) plus an instance head: ``instance_logits = inst(h) (B, N, C)`` on the projected
    instances ``h = proj(x)``. Bag outputs are ABMIL's. The instance head is trained by method ``lrmil`` only
    (first class vs the others, :meth:`wsimil.methods.lrmil.LRMILStudent.instance_term`)."""

    #: parameters only a method's own loss trains (the supervised bag loss leaves them untouched)
    trained_by_method = ("instance_head",)

    def __init__(self, in_dim: int, n_classes: int, **kw):
        super().__init__(in_dim, n_classes, **kw)
        self.instance_head = nn.Linear(self.classifier.in_features, n_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        m = full_mask(x, mask)
        h = self.proj(x)
        e = self.attention(h).squeeze(-1)
        a = masked_softmax(e, m)
        z = (a.unsqueeze(1) @ h).squeeze(1)
        return MILOutput(
            logits=self.classifier(z),
            bag_embedding=z,
            attention_logits=e.masked_fill(~m, float("-inf")),
            instance_logits=self.instance_head(h),
        )


@register_model("lrmil_student", options_of=ABMIL)
def lrmil_student(in_dim: int, n_classes: int, **kw) -> MILModel:
    """``gated`` (default False) picks gated attention, as ``gated_abmil`` does."""
    return StudentABMIL(in_dim, n_classes, **kw)
