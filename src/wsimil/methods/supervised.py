"""Plain supervised MIL: bag cross-entropy plus each model's own auxiliary terms (e.g. CLAM's instance loss)."""

from __future__ import annotations

from torch import Tensor

from wsimil.methods.base import Batch, TrainingMethod, register_method
from wsimil.models import MILModel, MILOutput


@register_method("supervised")
class Supervised(TrainingMethod):
    """``L = w_bag · bag_loss(logits, y) + Σ_k w_k · aux_k`` with weights from ``model.loss_weights``."""

    def losses(self, model: MILModel, out: MILOutput, batch: Batch, epoch: int) -> dict[str, Tensor]:
        terms = {"bag": self.bag_loss(out.logits, batch), **model.aux_losses(out, batch.y, batch.mask)}
        w = model.loss_weights
        total = sum(w.get(k, 0.0) * v for k, v in terms.items())
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}
