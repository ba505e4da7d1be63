"""Batched inference of a trained aggregator over bags, with instance scores for instance-level AUC."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsimil.data.batching import Standardizer, pad_batch
from wsimil.models import MILModel, MILOutput


@dataclass
class Predictions:
    probs: np.ndarray  # (n, C)
    loss: float  # mean cross-entropy when labels were given, else NaN
    instance_scores: list[np.ndarray] | None  # per bag (N_i,)
    logits: np.ndarray | None = None  # (n, C)
    extra_probs: dict[str, np.ndarray] | None = None  # {head: (n, C_head)} from MILOutput.extra_logits


def instance_scores(out: MILOutput, n_classes: int, prefer: str = "attention") -> Tensor | None:
    """One score per instance ``(B, N)`` for instance-level evaluation and heatmaps.

    Attention: the raw attention (the positive class's branch/head when there is one per class, else the mean
    over heads). Instance: the positive-class instance logit margin (multi-class: the top logit). ``prefer``
    (a model's ``instance_score`` attribute) picks which one when the output has both."""
    att, inst = None, None
    if out.attention_logits is not None:
        a = out.attention_logits
        if a.dim() == 3:
            a = a[:, 1] if a.shape[1] == n_classes == 2 else a.mean(1)
        att = a
    if out.instance_logits is not None:
        z = out.instance_logits
        inst = z[..., 1] - z[..., 0] if n_classes == 2 else z.amax(-1)
    if prefer == "instance":
        return inst if inst is not None else att
    return att if att is not None else inst


@torch.no_grad()
def predict(
    model: MILModel,
    bags: list[Tensor],
    device: str,
    labels: np.ndarray | None = None,
    standardizer: Standardizer | None = None,
    batch_size: int = 8,
    with_instances: bool = False,
) -> Predictions:
    """Run ``model`` in eval mode over ``bags`` (each ``(N_i, D)``), batching bags of similar size."""
    model.eval()
    lengths = getattr(bags, "lengths", None) or [b.shape[0] for b in bags]
    order = np.argsort(lengths, kind="stable")
    n_classes = None
    probs: list[Tensor | None] = [None] * len(bags)
    scores: list[np.ndarray | None] = [None] * len(bags)
    logits_all: list[Tensor | None] = [None] * len(bags)
    extra: dict[str, list] = {}
    for start in range(0, len(bags), batch_size):
        idx = order[start : start + batch_size]
        x, mask = pad_batch([bags[i].to(device, non_blocking=True) for i in idx])
        if standardizer is not None:
            x = standardizer.apply_padded(x, mask, owned=len(idx) > 1)
        out = model(x, mask)
        n_classes = out.logits.shape[1]
        p = out.logits.float().softmax(-1).cpu()
        s = instance_scores(out, n_classes, getattr(model, "instance_score", "attention")) if with_instances else None
        for j, i in enumerate(idx):
            probs[i] = p[j]
            logits_all[i] = out.logits[j].float().cpu()
            for head, z in (out.extra_logits or {}).items():
                extra.setdefault(head, [None] * len(bags))[i] = z[j].float().softmax(-1).cpu()
            if s is not None:
                scores[i] = s[j, : lengths[i]].float().cpu().numpy()
    probs_np = torch.stack(probs).numpy() if bags else np.zeros((0, 0))  # type: ignore[arg-type]
    loss = float("nan")
    if labels is not None and len(bags):
        loss = float(F.cross_entropy(torch.stack(logits_all), torch.as_tensor(np.array(labels))))  # type: ignore[arg-type]
    inst = scores if with_instances and all(s is not None for s in scores) else None
    logits_np = torch.stack(logits_all).numpy() if bags else None  # type: ignore[arg-type]
    extra_np = {h: torch.stack(v).numpy() for h, v in extra.items()} or None
    return Predictions(probs_np, loss, inst, logits_np, extra_np)  # type: ignore[arg-type]
