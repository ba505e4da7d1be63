"""Step 5 of LRMIL: the stage-2 student, a training method of the shared trainer (``method: lrmil``).

The student is ABMIL on LR features with an extra instance head ``inst = Linear(E, C)`` (model ``lrmil_student``,
:class:`wsimil.models.lrmil_student.StudentABMIL`; the instance loss reads it as first class vs the others).
Per bag (SPEC §1 stage 2)::

    g_r = mean_{j ∈ children(r)} e^T_j            (option max; 0 when r has no HR child)
    L = λ_ce CE(y_S, Y) + λ_bag T_b² KL(softmax(y_T/T_b) ‖ softmax(y_S/T_b))
      + λ_soft T_a² KL(softmax_N(g/T_a) ‖ softmax_N(e_S/T_a))
      + λ_hard CE(inst(pseudo-labelled instances), targets)

The pseudo-labelled instances fit the bag (:func:`wsimil.methods.lrmil_losses.instance_targets`): in positive bags the
top-guidance instances holding half the teacher's attention mass (at most 10% of the bag) → 1 and as many from
the bottom → 0; in negative bags the top-guidance instances → 0. ``instance_targets: paper`` gives SPEC's rule
(top 4 → 1, bottom 4 → 0 in every bag). ``y_T``, ``e^T`` come from the fold teacher's dump
(:mod:`wsimil.methods.teacher_dump`); the links from the tiling job.
Defaults **[SPEC decision]**: all λ = 1, T = 1, Adam lr 1e-4, early stopping on validation (SPEC: AUC; ``wsimil
lrmil`` monitors the validation loss by default, see :mod:`wsimil.lrmil.config`).

**[decision]** The instance head reads the student's projected instances ``h = proj(x)`` (the embeddings its
attention and classifier use), so the instance loss shapes the representation the bag prediction is made from.
The official code applies it to the frozen input features, where it cannot affect the bag prediction; with an
identity projection (``hidden_dims: []``) the two coincide. Bags without any LR patch that has HR children get
only the CE and bag-KD terms (the official code skips the guidance terms when the guidance is all zero).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from wsimil.errors import WsimilError
from wsimil.methods.base import Batch, TrainingMethod, register_method
from wsimil.methods.lrmil_losses import attention_kd_loss, bag_kd_loss, children_attention, instance_loss
from wsimil.methods.teacher_dump import read_dump
from wsimil.models import MILModel, MILOutput, create_model


@register_method("lrmil")
class LRMILStudent(TrainingMethod):
    """LRMIL stage 2: an LR student ABMIL taught by the HR teacher (set up by `wsimil lrmil`).

    Bag-logit KD, attention KD and a top/bottom-k instance loss; needs the options teacher_dump and links_dir."""

    def __init__(self, cfg):
        super().__init__(cfg)
        o = self.opts
        if o["teacher_agg"] not in ("mean", "max"):
            raise WsimilError(f"lrmil option teacher_agg must be 'mean' or 'max', not {o['teacher_agg']!r}")
        if int(o["topk"]) < 1:
            raise WsimilError(f"lrmil option topk must be at least 1, got {o['topk']}")
        if o["instance_targets"] not in ("mass", "fraction", "fixed", "paper"):
            raise WsimilError(
                f"lrmil option instance_targets must be mass, fraction, fixed or paper, not {o['instance_targets']!r}"
            )
        for k in ("instance_mass", "instance_frac", "instance_max_frac"):
            if not 0 < float(o[k]) <= 1:
                raise WsimilError(f"lrmil option {k} must be in (0, 1], got {o[k]}")
        for k in ("t_bag", "t_attn"):
            if float(o[k]) <= 0:
                raise WsimilError(f"lrmil option {k} must be positive, got {o[k]}")
        for k in ("lambda_ce", "lambda_bag", "lambda_soft", "lambda_hard"):
            if float(o[k]) < 0:
                raise WsimilError(f"lrmil option {k} must be non-negative, got {o[k]}")
        self._side: dict[str, tuple[Tensor, np.ndarray, np.ndarray]] = {}
        self._ids: list[str] = []

    def build(self, in_dim: int, n_classes: int) -> MILModel:
        if self.cfg.model not in ("abmil", "gated_abmil"):
            raise WsimilError(
                f"method 'lrmil' trains an ABMIL student (model abmil or gated_abmil), not {self.cfg.model!r}"
            )
        gated = self.cfg.model == "gated_abmil"
        return create_model("lrmil_student", in_dim, n_classes, gated=gated, **self.cfg.model_kwargs)

    def setup(self, model: MILModel, ctx) -> None:
        o = self.opts
        for k in ("teacher_dump", "links_dir"):
            if not o[k] or not Path(o[k]).exists():
                raise WsimilError(f"method 'lrmil' needs option {k} (an existing path), got {o[k]!r}")
        self._side.clear()
        self._ids = ctx.slide_ids

    def side(self, slide_id: str) -> tuple[Tensor, np.ndarray, np.ndarray]:
        """``(teacher logits (C,), guidance g (N_lr,), has_children (N_lr,))`` of one slide (cached)."""
        if slide_id not in self._side:
            o = self.opts
            logits, e, _ = read_dump(o["teacher_dump"], slide_id)
            path = Path(o["links_dir"]) / f"{slide_id}_links.h5"
            try:
                with h5py.File(path, "r") as f:
                    links = f[o["links_dataset"]][()]
            except (OSError, KeyError) as err:
                raise WsimilError(f"slide {slide_id!r}: cannot read {o['links_dataset']} from {path}: {err}") from err
            if links.max(initial=-1) >= len(e):
                raise WsimilError(
                    f"slide {slide_id!r}: links point to HR patch {links.max()} but the teacher saw {len(e)}"
                )
            g = children_attention(e, links, o["teacher_agg"])
            self._side[slide_id] = (torch.as_tensor(logits, dtype=torch.float32), g, (links >= 0).any(1))
        return self._side[slide_id]

    def guidance(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher logits ``(B, C)``, padded guidance ``g (B, N)`` and the bags with guidance ``(B,)``."""
        dev = batch.x.device
        n = batch.mask.sum(1).tolist()
        g = torch.zeros(batch.mask.shape, dtype=torch.float32)
        use = torch.zeros(len(n), dtype=torch.bool)
        y_t = []
        for b, i in enumerate(batch.index):
            sid = self._ids[int(i)]
            logits, gb, has = self.side(sid)
            rows = batch.rows[b]
            if rows is not None:
                gb, has = gb[rows.numpy()], has[rows.numpy()]
            if len(gb) != n[b]:
                raise WsimilError(
                    f"slide {sid!r}: {n[b]} LR features but {len(gb)} LR patches in the links (features from "
                    "another tiling?)"
                )
            g[b, : n[b]] = torch.from_numpy(gb)
            use[b] = bool(has.any())
            y_t.append(logits)
        return torch.stack(y_t).to(dev), g.to(dev), use.to(dev)

    def instance_term(self, out: MILOutput, g: Tensor, batch: Batch, use: Tensor) -> Tensor:
        """The instance head's loss on pseudo-labelled instances (``instance_targets``; positive = not class 0)."""
        o = self.opts
        mode = o["instance_targets"]
        z = out.instance_logits  # (B, N, C) → (B, N, 2): first class vs any other (the same logits when C = 2)
        if z.shape[-1] > 2:
            z = torch.stack([z[..., 0], z[..., 1:].logsumexp(-1)], -1)
        return instance_loss(
            z,
            g,
            batch.mask,
            batch.y != 0,
            use,
            mode="fixed" if mode == "paper" else mode,
            positive_only=mode != "paper",
            k=int(o["topk"]),
            mass=float(o["instance_mass"]),
            frac=float(o["instance_frac"]),
            max_frac=float(o["instance_max_frac"]),
        )

    def losses(self, model: MILModel, out: MILOutput, batch: Batch, epoch: int) -> dict[str, Tensor]:
        o = self.opts
        y_t, g, use = self.guidance(batch)
        terms = {
            "ce": self.bag_loss(out.logits, batch),
            "bag_kd": bag_kd_loss(out.logits, y_t, float(o["t_bag"])),
            "attn_kd": attention_kd_loss(out.attention_logits, g, batch.mask, float(o["t_attn"]), use),
            "instance": self.instance_term(out, g, batch, use),
        }
        weights = {
            "ce": o["lambda_ce"],
            "bag_kd": o["lambda_bag"],
            "attn_kd": o["lambda_soft"],
            "instance": o["lambda_hard"],
        }
        total = sum(float(weights[k]) * v for k, v in terms.items())
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}
