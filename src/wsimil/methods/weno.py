"""WENO: bi-directional weakly supervised knowledge distillation (Qu et al., NeurIPS 2022; SPEC §3).

A teacher (attention bag classifier) and a student (instance classifier) share one instance encoder. Every epoch:

(A) teacher phase, one optimiser step per mini-batch of whole bags: the bag loss (CE; DSMIL teacher: ``0.5·CE(bag
    stream) + 0.5·CE(max instance)``). From epoch ``warmup`` on (0-based, i.e. after ``warmup`` full epochs; the
    official ``epoch > smoothE`` starts one epoch later), the student mines each positive bag first: instances it
    scores above ``threshold`` are hidden from the teacher (variant ``mining: lowest``: only the ``keep_k`` lowest
    scored are kept), so the teacher must find positive evidence beyond what the student already knows. The raw
    teacher score of every instance the teacher saw gives the epoch's global ``min``/``max``.
(B) student phase, one step per mini-batch of ``instance_batch`` instances shuffled across bags: pseudo-labels
    ``y_i = clamp((A_i − min)/(max − min), 1e-5, 1 − 1e-5)`` from the teacher's raw score of each instance, ``0`` in
    negative bags, and the loss ``−mean[w (1 − y) log p_0 + (1 − w) y log p_1]`` with ``w = neg_weight``.

Both phases step the shared encoder (the "bi-directional" part); the optimiser only moves parameters that received a
gradient, so phase A moves encoder + teacher and phase B encoder + student, as the official per-module SGD optimisers
do. Defaults follow the official repository where SPEC §3 is silent: plain SGD (no momentum, no weight decay),
lr 1e-3 (``config_defaults``; any value the user sets wins). Early stopping monitors validation AUC by default.

Decisions beyond the official code:

- pseudo-labels are computed on the fly (as in the official code) by the current teacher, but with its dropout off
  (the official code leaves the teacher in training mode, so its pseudo-labels are dropout samples);
- logs use ``log_softmax`` instead of ``log(p + 1e-5)``;
- phase B draws instances from pools of at most ``pool_instances`` (bags in a random order, each bag whole), so
  memory stays bounded on large cohorts; a pool as large as the training set is the official global shuffle;
- mini-batches of one instance are folded into the previous one (BatchNorm needs two).

Class index 1 is the positive class (the second entry of ``classes``); WENO is binary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsimil.errors import WsimilError
from wsimil.methods.base import Batch, FoldContext, TrainingMethod, register_method
from wsimil.models.weno import TeacherOutput, WENONet

if TYPE_CHECKING:
    from wsimil.data.manifest import Manifest

MINING = ("threshold", "lowest", "none")


def pseudo_labels(scores: Tensor, positive: Tensor, lo: float, hi: float, eps: float = 1e-5) -> Tensor:
    """``y_i = clamp((s_i − lo)/(hi − lo), eps, 1 − eps)`` for instances of positive bags, ``0`` for the others.

    ``scores (M,)`` raw teacher scores; ``positive (M,)`` bool, True where the instance's bag is positive; ``lo``/``hi``
    the epoch's global min/max raw score (a zero range gives ``eps``)."""
    y = ((scores - lo) / max(hi - lo, 1e-12)).clamp(eps, 1.0 - eps)
    return torch.where(positive, y, torch.zeros_like(y))


def student_loss(logits: Tensor, target: Tensor, neg_weight: float = 0.1) -> Tensor:
    """``−mean_i[w (1 − y_i) log p_i0 + (1 − w) y_i log p_i1]`` with ``p = softmax(logits)``, ``logits (M, 2)``,
    soft targets ``y (M,)`` in [0, 1] and ``w = neg_weight``."""
    logp = F.log_softmax(logits, dim=-1)
    return -(neg_weight * (1 - target) * logp[:, 0] + (1 - neg_weight) * target * logp[:, 1]).mean()


def hard_positive_keep(
    p_pos: Tensor,
    mask: Tensor,
    positive: Tensor,
    mining: str = "threshold",
    threshold: float = 0.5,
    keep_k: int | None = None,
) -> Tensor:
    """Which instances the teacher sees ``(B, N)`` bool after the student mines positive bags.

    ``p_pos (B, N)`` student positive probabilities, ``mask (B, N)`` real instances, ``positive (B,)`` bag labels.
    Negative bags keep every instance. In a positive bag, ``threshold`` keeps ``p ≤ threshold`` (if that drops every
    instance, the single most positive one is kept, as in the official code); ``lowest`` keeps the ``keep_k`` lowest
    scored (all of a bag with fewer); ``none`` keeps everything."""
    if mining == "none":
        return mask
    p = p_pos.masked_fill(~mask, float("inf"))  # padding: never among the lowest
    if mining == "threshold":
        keep = mask & (p <= threshold)
        empty = ~keep.any(1)
        top = p_pos.masked_fill(~mask, float("-inf")).argmax(1)
        keep[empty, top[empty]] = True
    elif mining == "lowest":
        k = min(int(keep_k), p.shape[1])
        keep = torch.zeros_like(mask)
        keep.scatter_(1, p.topk(k, dim=1, largest=False).indices, True)
        keep &= mask
    else:
        raise WsimilError(f"WENO mining must be one of {', '.join(MINING)}, got {mining!r}")
    return torch.where(positive.unsqueeze(1), keep, mask)


@register_method("weno")
class WENO(TrainingMethod):
    """WENO: teacher (abmil|dsmil via --model) and instance student distil each other through a shared encoder."""

    def __init__(self, cfg):
        super().__init__(cfg)
        o = self.opts
        if o["mining"] not in MINING:
            raise WsimilError(f"method weno: mining must be one of {', '.join(MINING)}, got {o['mining']!r}")
        if o["mining"] == "lowest" and not (isinstance(o["keep_k"], int) and o["keep_k"] >= 1):
            raise WsimilError(f"method weno: mining=lowest needs keep_k=<positive integer>, got {o['keep_k']!r}")
        if not 0 <= o["neg_weight"] <= 1:
            raise WsimilError(f"method weno: neg_weight must be in [0, 1], got {o['neg_weight']!r}")
        if int(o["instance_batch"]) < 2 or int(o["pool_instances"]) < 2:
            raise WsimilError("method weno: instance_batch and pool_instances must be at least 2")

    def prepare(self, manifest: Manifest) -> None:
        if len(manifest.classes) != 2:
            raise WsimilError(
                f"method weno is binary (negative/positive bags), but the labels have {len(manifest.classes)} "
                f"classes: {', '.join(manifest.classes)}"
            )

    def build(self, in_dim: int, n_classes: int) -> WENONet:
        if self.cfg.model not in ("abmil", "dsmil"):
            raise WsimilError(f"method weno needs --model abmil or dsmil (the teacher), got {self.cfg.model!r}")
        if n_classes != 2:
            raise WsimilError(f"method weno is binary (negative/positive bags), got {n_classes} classes")
        try:
            return WENONet(in_dim, n_classes, teacher=self.cfg.model, **self.cfg.model_kwargs)
        except TypeError as e:
            raise WsimilError(
                f"bad model options for weno: {e}; it takes embed_dim, teacher_dims, dropout, attn_dim, "
                "student_dims, init_std"
            ) from e

    # ------------------------------------------------------------------ training
    def teacher_loss(self, t: TeacherOutput, batch: Batch) -> Tensor:
        """Bag loss of the teacher; DSMIL: ``0.5·bag_loss(bag stream) + 0.5·bag_loss(max instance)``."""
        if t.max_logits is None:
            return self.bag_loss(t.logits, batch)
        return 0.5 * self.bag_loss(t.logits, batch) + 0.5 * self.bag_loss(t.max_logits, batch)

    def fit_epoch(
        self, model: WENONet, opt: torch.optim.Optimizer, ctx: FoldContext, epoch: int, gen: torch.Generator
    ) -> dict[str, float]:
        """Phase A (teacher on bags) then phase B (student on instances); returns their mean losses, the fraction of
        positive-bag instances hidden by mining, and the attention range used for the pseudo-labels."""
        model.train()
        teacher, mined, lo, hi = self._teacher_phase(model, opt, ctx, epoch, gen)
        student = self._student_phase(model, opt, ctx, gen, lo, hi)
        self.on_epoch_end(model, epoch)
        return {
            "loss": teacher + student,
            "teacher": teacher,
            "student": student,
            "mined": mined,
            "attention_min": lo,
            "attention_max": hi,
        }

    def _step(self, model: WENONet, opt: torch.optim.Optimizer, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)  # untouched parameters keep grad None, so the optimiser skips them
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters(model), self.cfg.grad_clip)
        opt.step()
        self.on_step_end(model)

    def _teacher_phase(
        self, model: WENONet, opt: torch.optim.Optimizer, ctx: FoldContext, epoch: int, gen: torch.Generator
    ) -> tuple[float, float, float, float]:
        o = self.opts
        mining = o["mining"] if epoch >= o["warmup"] else "none"
        total, steps, n_pos, n_hidden = 0.0, 0, 0, 0
        lo, hi = float("inf"), float("-inf")
        for batch in ctx.train_batches(epoch, gen):
            h = model.encoder(batch.x, batch.mask)
            keep = batch.mask
            positive = batch.y == 1
            if mining != "none" and bool(positive.any()):
                with torch.no_grad():
                    p = model.student(h).softmax(-1)[..., 1]
                keep = hard_positive_keep(p, batch.mask, positive, mining, o["threshold"], o["keep_k"])
                n_pos += int(batch.mask[positive].sum())
                n_hidden += int((batch.mask & ~keep)[positive].sum())
            t = model.teacher(h, keep)
            loss = self.teacher_loss(t, batch)
            self._step(model, opt, loss)
            seen = t.scores.detach()[keep]
            lo, hi = min(lo, float(seen.min())), max(hi, float(seen.max()))
            total += float(loss.detach())
            steps += 1
        return total / max(steps, 1), n_hidden / max(n_pos, 1), lo, hi

    def _student_phase(
        self, model: WENONet, opt: torch.optim.Optimizer, ctx: FoldContext, gen: torch.Generator, lo: float, hi: float
    ) -> float:
        order = ctx.train[torch.randperm(len(ctx.train), generator=gen).numpy()]
        pool_x: list[Tensor] = []
        pool_pos: list[Tensor] = []
        n, total, steps = 0, 0.0, 0
        for k, i in enumerate(order):
            b = ctx.make_batch(np.array([i]), gen)
            pool_x.append(b.x[0])
            pool_pos.append((b.y == 1).expand(b.x.shape[1]))
            n += b.x.shape[1]
            if n >= self.opts["pool_instances"] or k == len(order) - 1:
                s, c = self._train_pool(model, opt, torch.cat(pool_x), torch.cat(pool_pos), gen, lo, hi)
                total, steps = total + s, steps + c
                pool_x, pool_pos, n = [], [], 0
        return total / max(steps, 1)

    def _train_pool(
        self,
        model: WENONet,
        opt: torch.optim.Optimizer,
        x: Tensor,
        positive: Tensor,
        gen: torch.Generator,
        lo: float,
        hi: float,
    ) -> tuple[float, int]:
        chunks = list(torch.randperm(x.shape[0], generator=gen).to(x.device).split(int(self.opts["instance_batch"])))
        if len(chunks) > 1 and len(chunks[-1]) < 2:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        total = 0.0
        for idx in chunks:
            h = model.encoder.flat(x[idx])
            model.teacher.eval()
            with torch.no_grad():
                target = pseudo_labels(model.teacher.instance_scores(h), positive[idx], lo, hi)
            model.teacher.train()
            loss = student_loss(model.student(h), target, self.opts["neg_weight"])
            self._step(model, opt, loss)
            total += float(loss.detach())
        return total, len(chunks)
