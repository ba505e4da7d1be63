"""MHIM-MIL: masked hard instance mining (Tang et al., ICCV 2023 = v1; IJCV 2025 = v2; SPEC §2).

A momentum teacher with the student's architecture (ABMIL, gated ABMIL, TransMIL or DSMIL) reads the whole bag and
scores its instances; the student is trained on the bag with the easiest (highest-scoring) instances removed, so it
has to learn from the hard ones. Per training step:

1. teacher (no gradient, dropout off) on the full bag → bag embedding ``F_t`` and scores ``s`` (``score``):
   ``attention`` (v1: raw attention; TransMIL: first-layer CLS attention per head, fused by head voting) or
   ``class_aware`` (v2: ``s_i = max_c softmax_c(W (a_i z_i))``; TransMIL: per-head attention × values through the
   layer's ``W_O``; DSMIL uses its instance-classifier logits ``max_c`` for both, as the official code does);
2. masks, united (:func:`select_masked`): the top ``⌈β_h N⌉`` scores (``high_random_fraction`` f < 1: the top
   ``⌈β_h N / f⌉`` are candidates and a random ``f`` of them is masked — SPEC's "take top 2β_h N, mask half" is
   f = 0.5), the bottom ``⌈β_l N⌉`` and a random ``⌈β_r N⌉``; ``high_decay`` decays β_h to 0 by a per-step
   cosine over the planned ``epochs × steps`` (official ``mrh_sche``);
3. masked instances are removed from the student's input (kept ones compacted, in their original order, into a new
   padded batch); with ``recycle_ratio`` r > 0 (v2's Global Recycle Network) a random ``⌈r L⌉`` of the ``L``
   remaining instances are dropped too and summarised by ``recycle_tokens`` global queries (8-head cross-attention,
   queries moved by an EMA of their outputs, not by gradient), appended to the student's bag as tokens;
4. loss ``CE + α L_con``, ``L_con = −Σ softmax(F_t / τ) · log softmax(F_s)`` on the bag embeddings (τ =
   ``temperature``; DSMIL's embedding is compared row by row, one row per class, as the official code does); the
   CE part is the task's bag loss (survival: discrete-time NLL) plus, for classification, the backbone's own
   supervised terms with its weights (DSMIL: 0.5 bag stream + 0.5 max-instance stream, as in its baseline);
5. after every optimiser step the teacher follows the student: ``θ_t ← m θ_t + (1 − m) θ_s`` (``cosine_momentum``:
   m follows a per-step cosine from ``momentum`` to 1, official ``mm_sche``).

The teacher starts from a plain supervised model of the same fold: the run folder ``teacher_init``
(``--teacher-init RUN``, validated against this run) or, when not given, one trained first with the same split and
seed under ``RUN/baseline`` (``ctx.baseline``). ``init_student_projection`` (v1) copies its projection into the
student. The teacher and the recycle network are attributes of the method, never submodules of the student: the
student alone is optimised through the model, evaluated and saved (the recycle network's trained parameters join
the optimiser through :meth:`MHIM.parameters`). Inference: the student on the full bag.

Registered as ``mhim`` (every option; defaults = v2) and the presets ``mhim_v1`` / ``mhim_v2`` whose defaults are
the official repository's settings (see their docstrings). Decisions where SPEC §2 is silent:

- the teacher runs with dropout off (v2's EMA model is in eval mode; v1 left it in training mode);
- head voting ranks instances by the number of heads whose top-k (bottom-k) holds them, ties by the mean score
  over heads (the official ``topk`` leaves ties arbitrary); single-score ties go to the lower index;
- if the masks cover a whole bag, its highest-scoring instance outside the high mask stays (else its lowest);
- kept instances keep their original order (matters for TransMIL's PPEG; the official recycle path shuffles them);
- counts are ``⌈ratio · n⌉`` throughout; the recycled count ``⌈r L⌉`` is what the official ``L − ⌊L · merge_ratio⌋``
  gives, with ``merge_ratio = 1 − r``;
- with mini-batches of several bags, the recycle queries move by the mean of their outputs over the bags.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil.checkpoint import fold_checkpoint, load_checkpoint
from wsimil.errors import WsimilError, problems_error
from wsimil.methods.base import Batch, FoldContext, TrainingMethod, register_method
from wsimil.models import MILModel
from wsimil.models.layers import SCORE_KINDS, masked_softmax

#: what a backbone must provide for MHIM (ABMIL, gated ABMIL, TransMIL and DSMIL do)
HOOKS = ("embed", "aggregate", "score_instances")


# ---------------------------------------------------------------------------------------------------- pure parts
def consistency_loss(student: Tensor, teacher: Tensor, temperature: float = 0.1, rows: int = 1) -> Tensor:
    """``L_con = −Σ_j softmax(F_t / τ)_j · log softmax(F_s)_j``, averaged over bags (and rows).

    ``student``/``teacher`` ``(B, R·E)`` bag embeddings, split into ``rows`` = R rows of E (DSMIL: one per class)
    that are compared separately; τ = ``temperature`` sharpens the teacher only (student temperature 1).
    """
    s = student.reshape(student.shape[0], rows, -1)
    t = teacher.reshape(teacher.shape[0], rows, -1).detach()
    return -(F.softmax(t / temperature, dim=-1) * F.log_softmax(s, dim=-1)).sum(-1).mean()


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``θ_t ← m θ_t + (1 − m) θ_s`` for every parameter, in place; buffers are copied."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - momentum)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        t.copy_(s)


def cosine_schedule(start: float, end: float, step: int, total: int) -> float:
    """``end + (start − end)(1 + cos(π step / total)) / 2``: ``start`` at step 0, ``end`` at step ``total``."""
    if total <= 0:
        return start
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(step, total) / total))


def ratio_count(ratio: float, n: int) -> int:
    """``⌈ratio · n⌉`` capped at ``n`` (tolerant of float error: 0.3 · 10 is 3, not 4)."""
    return min(n, math.ceil(round(ratio * n, 9)))


def rank_instances(scores: Tensor, k: int, largest: bool) -> Tensor:
    """Indices of the ``k`` highest (``largest``) or lowest of ``scores``.

    ``scores (n,)``: ties go to the lower index. ``scores (H, n)`` (one row per head): head voting — each head
    votes for its own top (bottom) ``k``; the ``k`` instances with most votes win, ties by the mean score over
    heads (higher first for ``largest``, lower first otherwise), then by index.
    """
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    sign = -1.0 if largest else 1.0
    if scores.dim() == 1:
        return torch.argsort(sign * scores, stable=True)[:k]
    per_head = torch.argsort(sign * scores, dim=-1, stable=True)[:, :k]  # (H, k)
    votes = torch.zeros(scores.shape[-1]).index_add_(0, per_head.flatten(), torch.ones(per_head.numel()))
    by_mean = torch.argsort(sign * scores.mean(0), stable=True)
    by_votes = torch.argsort(-votes[by_mean], stable=True)
    return by_mean[by_votes][:k]


@dataclass(frozen=True)
class MaskSelection:
    """One bag's masks: index tensors of the high, low and random masks and their union ``masked (n,)`` bool."""

    high: Tensor
    low: Tensor
    random: Tensor
    masked: Tensor


def select_masked(
    scores: Tensor,
    high: float = 0.0,
    low: float = 0.0,
    random: float = 0.0,
    high_random_fraction: float = 1.0,
    gen: torch.Generator | None = None,
) -> MaskSelection:
    """The instances of one bag to hide from the student, from the teacher's ``scores`` ``(n,)`` or ``(H, n)``.

    - high: the top ``⌈β_h n⌉`` (``high``); with ``f = high_random_fraction < 1`` the top ``c = ⌈β_h n / f⌉`` are
      candidates and a random ``⌈f c⌉`` of them is masked (if ``c`` exceeds ``n``: all are candidates and ``⌈β_h n⌉``
      are masked), as the official ``mask_ratio_hr``;
    - low: the bottom ``⌈β_l n⌉`` (``low``); random: ``⌈β_r n⌉`` drawn uniformly (``random``);
    - the union is masked; if it covers the whole bag, the highest-scoring instance outside the high mask (else the
      lowest-scoring one) stays.
    Random draws come from ``gen``.
    """
    scores = scores.detach().float().cpu()
    n = scores.shape[-1]
    high_idx = torch.empty(0, dtype=torch.long)
    if high > 0:
        n_high = ratio_count(high, n)
        if high_random_fraction < 1.0:
            n_cand = ratio_count(high / high_random_fraction, n)
            if math.ceil(round(high * n / high_random_fraction, 9)) <= n:
                n_high = ratio_count(high_random_fraction, n_cand)
            cand = rank_instances(scores, n_cand, largest=True)
            high_idx = cand[torch.randperm(n_cand, generator=gen)[:n_high]]
        else:
            high_idx = rank_instances(scores, n_high, largest=True)
    low_idx = (
        rank_instances(scores, ratio_count(low, n), largest=False) if low > 0 else torch.empty(0, dtype=torch.long)
    )
    rand_idx = (
        torch.randperm(n, generator=gen)[: ratio_count(random, n)] if random > 0 else torch.empty(0, dtype=torch.long)
    )
    masked = torch.zeros(n, dtype=torch.bool)
    masked[torch.cat([high_idx, low_idx, rand_idx])] = True
    if n and bool(masked.all()):
        mean = scores if scores.dim() == 1 else scores.mean(0)
        outside = torch.ones(n, dtype=torch.bool)
        outside[high_idx] = False
        if outside.any():
            keep = int(torch.where(outside, mean, torch.full_like(mean, -math.inf)).argmax())
        else:
            keep = int(mean.argmin())
        masked[keep] = False
    return MaskSelection(high_idx, low_idx, rand_idx, masked)


def gather_bags(x: Tensor, index: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Compact bag ``b``'s instances ``index[b]`` (positions in ``x (B, N, F)``) into a new padded batch
    ``(B, max_b |index[b]|, F)`` with its mask; padding is zero."""
    width = max((len(i) for i in index), default=0)
    idx = torch.zeros(len(index), width, dtype=torch.long)
    mask = torch.zeros(len(index), width, dtype=torch.bool)
    for b, i in enumerate(index):
        idx[b, : len(i)] = i
        mask[b, : len(i)] = True
    idx, mask = idx.to(x.device), mask.to(x.device)
    out = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return out * mask[..., None].to(out.dtype), mask


class RecycleNetwork(nn.Module):
    """MHIM-v2's Global Recycle Network: ``k`` global queries read the recycled instances with multi-head
    cross-attention and return ``k`` tokens ``(B, k, E)`` for the student's bag.

    ``z = W_o · softmax(q̂ K̂ᵀ / √d) V̂`` with queries ``LayerNorm(g) W_q`` and keys/values ``LayerNorm(h) W_k``,
    ``LayerNorm(h) W_v`` (one shared LayerNorm; ``heads`` × ``head_dim``; dropout on attention and output). The global
    queries ``g (k, E)`` get no gradient: after each optimiser step :meth:`commit` moves them by
    ``g ← m g + (1 − m) z̄`` with ``z̄`` the step's output tokens (mean over bags). Initialisation as the official code
    (VPT's uniform prompt initialisation for ``g``).
    """

    def __init__(
        self,
        dim: int,
        tokens: int = 1,
        heads: int = 8,
        head_dim: int = 64,
        dropout: float = 0.1,
        momentum: float = 0.9999,
    ):
        super().__init__()
        self.heads, self.head_dim, self.momentum = heads, head_dim, momentum
        inner = heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        bound = math.sqrt(6.0 / (3 * 16 * 16 + dim))
        self.register_buffer("queries", torch.empty(tokens, dim).uniform_(-bound, bound))
        self._pending: Tensor | None = None

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """``h (B, M, E)`` recycled instances with ``mask (B, M)`` → tokens ``(B, k, E)``; a bag with no recycled
        instance gets the output bias."""
        b, n, _ = h.shape
        k, hd, d = self.queries.shape[0], self.heads, self.head_dim
        q = self.to_q(self.norm(self.queries)).view(k, hd, d).transpose(0, 1)  # (H, k, d)
        kv = self.to_kv(self.norm(h)).view(b, n, 2, hd, d).permute(2, 0, 3, 1, 4)  # (2, B, H, M, d)
        sim = (q.unsqueeze(0) @ kv[0].transpose(-1, -2)) * d**-0.5  # (B, H, k, M)
        att = self.attn_drop(masked_softmax(sim, mask[:, None, None, :]))
        z = self.to_out((att @ kv[1]).transpose(1, 2).reshape(b, k, hd * d))
        has = mask.any(1)
        if self.training and bool(has.any()):
            self._pending = z.detach()[has].mean(0)
        return z

    @torch.no_grad()
    def commit(self) -> None:
        """Apply the pending EMA step of the global queries (after the optimiser step, so that the queries used
        in the step's graph are not modified before its backward pass)."""
        if self._pending is not None:
            self.queries.lerp_(self._pending, 1.0 - self.momentum)
            self._pending = None


# ---------------------------------------------------------------------------------------------------- the method
@register_method("mhim")
class MHIM(TrainingMethod):
    """MHIM-MIL: EMA teacher masks the easiest instances; the student learns from the hard ones (SPEC §2)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        _validate(self.name, self.opts)
        self.teacher: MILModel | None = None
        self.recycle: RecycleNetwork | None = None
        self._gen: torch.Generator | None = None
        self._step = 0
        self._total_steps = 0
        self._momentum = self.opts["momentum"]

    # -------------------------------------------------------------- fold-level
    def build(self, in_dim: int, n_classes: int) -> MILModel:
        model = super().build(in_dim, n_classes)
        missing = [h for h in HOOKS if not callable(getattr(model, h, None))]
        if self.opts["init_student_projection"] and not hasattr(model, "proj"):
            missing.append("proj")
        if missing:
            raise WsimilError(
                f"method {self.name!r} needs a backbone with {', '.join(HOOKS)}: model {self.cfg.model!r} lacks "
                f"{', '.join(missing)}; use abmil, gated_abmil, transmil or dsmil"
            )
        return model

    def setup(self, model: MILModel, ctx: FoldContext) -> None:
        """Build the fold's teacher (from ``teacher_init`` or a baseline trained now), the recycle network and the
        random stream of the masks; plan the per-step schedules over ``epochs × steps per epoch``."""
        o = self.opts
        if o["teacher_init"] is not None:
            teacher = load_teacher(Path(o["teacher_init"]), model, ctx)
        else:
            overrides = {"epochs": o["baseline_epochs"]} if o["baseline_epochs"] else {}
            teacher, _ = ctx.baseline(**overrides)
            teacher = copy.deepcopy(teacher)
        teacher = teacher.to(ctx.device).eval()
        teacher.requires_grad_(False)
        self.teacher = teacher
        if o["init_student_projection"]:
            model.proj.load_state_dict(teacher.proj.state_dict())
        seed = int(np.random.SeedSequence([ctx.seed, 0x4D48494D]).generate_state(1)[0])
        self._gen = torch.Generator().manual_seed(seed)
        self.recycle = None
        if o["recycle_ratio"] > 0:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                dim = model.embed(torch.zeros(1, 1, ctx.in_dim, device=ctx.device)).shape[-1]
                self.recycle = RecycleNetwork(
                    dim, o["recycle_tokens"], o["recycle_heads"], momentum=o["recycle_momentum"]
                ).to(ctx.device)
        self._step = 0
        self._total_steps = self.cfg.epochs * math.ceil(len(ctx.train) / self.cfg.batch_size)

    def parameters(self, model: MILModel) -> list[nn.Parameter]:
        params = super().parameters(model)
        if self.recycle is not None:
            params += [p for p in self.recycle.parameters() if p.requires_grad]
        return params

    # -------------------------------------------------------------- schedules
    def high_ratio(self, step: int) -> float:
        """β_h at optimiser step ``step`` (cosine decay to 0 with ``high_decay``)."""
        o = self.opts
        if not o["high_decay"]:
            return o["high_ratio"]
        return cosine_schedule(o["high_ratio"], 0.0, step, self._total_steps)

    def momentum(self, step: int) -> float:
        """Teacher EMA momentum at optimiser step ``step`` (cosine to 1 with ``cosine_momentum``)."""
        o = self.opts
        if not o["cosine_momentum"]:
            return o["momentum"]
        return cosine_schedule(o["momentum"], 1.0, step, self._total_steps)

    # -------------------------------------------------------------- training
    def train_step(self, model: MILModel, batch: Batch, epoch: int) -> dict[str, Tensor]:
        if self.teacher is None:
            raise WsimilError(f"method {self.name!r}: setup() must run before training (no teacher)")
        o = self.opts
        with torch.no_grad():
            t_out, scores = self.teacher.score_instances(batch.x, batch.mask, o["score"])
        beta_h = self.high_ratio(self._step)
        self._momentum = self.momentum(self._step)
        n_valid = batch.mask.sum(1).tolist()
        pos = [torch.nonzero(batch.mask[b].cpu(), as_tuple=True)[0] for b in range(len(n_valid))]
        remaining, kept, recycled = [], [], []
        masked_frac, recycled_frac = [], []
        for b, n in enumerate(n_valid):
            s = scores[b][..., pos[b].to(scores.device)]
            sel = select_masked(s, beta_h, o["low_ratio"], o["random_ratio"], o["high_random_fraction"], self._gen)
            rest = torch.nonzero(~sel.masked, as_tuple=True)[0]  # positions within the bag's valid instances
            masked_frac.append(float(sel.masked.sum()) / max(n, 1))
            if self.recycle is not None:
                drop = torch.randperm(len(rest), generator=self._gen)[: ratio_count(o["recycle_ratio"], len(rest))]
                is_rec = torch.zeros(len(rest), dtype=torch.bool)
                is_rec[drop] = True
                kept.append(torch.nonzero(~is_rec, as_tuple=True)[0])  # positions within ``rest``
                recycled.append(torch.nonzero(is_rec, as_tuple=True)[0])
                recycled_frac.append(float(is_rec.sum()) / max(n, 1))
            remaining.append(pos[b][rest])

        x_rest, m_rest = gather_bags(batch.x, remaining)
        if self.recycle is None:
            out = model(x_rest, m_rest)
            mask_out = m_rest
        else:
            self.recycle.train()
            h = model.embed(x_rest)
            h_keep, m_keep = gather_bags(h, kept)
            h_rec, m_rec = gather_bags(h, recycled)
            tokens = self.recycle(h_rec, m_rec)
            out = model.aggregate(h_keep, m_keep, extra_tokens=tokens)
            ones = torch.ones(tokens.shape[:2], dtype=torch.bool, device=m_keep.device)
            mask_out = torch.cat([m_keep, ones], dim=1)

        ce, sup = self._supervised(model, out, batch, mask_out)
        rows = getattr(model, "embedding_rows", 1)
        con = consistency_loss(out.bag_embedding, t_out.bag_embedding, o["temperature"], rows)
        terms = {
            "loss": ce + o["alpha"] * con,
            "ce": ce.detach(),
            "con": con.detach(),
            "masked": _scalar(np.mean(masked_frac)),
            "high_ratio": _scalar(beta_h),
            "momentum": _scalar(self._momentum),
        }
        if len(sup) > 1:
            terms.update({k: v.detach() for k, v in sup.items()})
        if self.recycle is not None:
            terms["recycled"] = _scalar(np.mean(recycled_frac))
        return terms

    def _supervised(self, model: MILModel, out, batch: Batch, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The CE part and its terms: the task's bag loss and, for classification, the backbone's own terms mixed
        with ``model.loss_weights`` (as the supervised baseline does)."""
        bag = self.bag_loss(out.logits, batch)
        if not self.task.uses_model_aux_losses:  # survival: the hazards' NLL alone
            return bag, {"bag": bag}
        terms = {"bag": bag, **model.aux_losses(out, batch.y, mask)}
        w = model.loss_weights
        return sum(w.get(k, 0.0) * v for k, v in terms.items()), terms

    def on_step_end(self, model: MILModel) -> None:
        """EMA of the teacher towards the student, then of the recycle queries; advance the step counter."""
        ema_update_(self.teacher, model, self._momentum)
        if self.recycle is not None:
            self.recycle.commit()
        self._step += 1


def _scalar(v: float) -> Tensor:
    return torch.tensor(float(v), dtype=torch.float64)  # logged as is: 0.9997 stays 0.9997


def load_teacher(run: Path, model: MILModel, ctx: FoldContext) -> MILModel:
    """The teacher of this fold from ``RUN/checkpoints/repeat{r}_fold{k}.safetensors``, checked against this run:
    same model, model options, feature width, classes and task, and the same training fold (its standardiser
    statistics)."""
    split = ctx.split
    path = fold_checkpoint(run / "checkpoints", split.repeat, split.fold)
    if not run.is_dir():
        raise WsimilError(f"teacher_init {run} is not a folder (expected a run folder written by `wsimil train`)")
    if not path.is_file():
        raise WsimilError(
            f"teacher_init {run} has no checkpoint for repeat {split.repeat} fold {split.fold} ({path}); train the "
            "baseline with the same folds, repeats, seed and validation fraction as this run"
        )
    ck = load_checkpoint(path, "teacher_init checkpoint")
    cfg = ctx.cfg
    want = {
        "model": cfg.model,
        "model_kwargs": json.loads(json.dumps(cfg.model_kwargs)),  # as stored: tuples are lists
        "in_dim": ctx.in_dim,
        "classes": list(ctx.classes),
        "task": cfg.task,
    }
    have = {**{k: ck.get(k) for k in want}, "classes": list(ck.get("classes") or [])}
    problems = [f"{k}: teacher has {have[k]!r}, this run {v!r}" for k, v in want.items() if have[k] != v]
    std, ck_std = ctx.standardizer, ck.get("standardizer")
    if (std is None) != (ck_std is None):
        problems.append(f"standardize: teacher {ck_std is not None}, this run {std is not None}")
    elif std is not None and not torch.allclose(ck_std["mean"].float(), std.mean.cpu().float(), atol=1e-5):
        problems.append(
            "the teacher was trained on a different training fold (its standardiser statistics differ): use the same "
            "manifest, folds, repeats, seed and validation fraction"
        )
    if problems:
        raise problems_error(f"teacher_init checkpoint {path} does not match this run", problems)
    teacher = copy.deepcopy(model)
    try:
        teacher.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise WsimilError(f"teacher_init checkpoint {path} does not fit model {cfg.model!r}: {e}") from None
    return teacher


def _validate(name: str, o: dict[str, Any]) -> None:
    problems = []
    if o["score"] not in SCORE_KINDS:
        problems.append(f"score must be one of {', '.join(SCORE_KINDS)}, not {o['score']!r}")
    for k in ("high_ratio", "low_ratio", "random_ratio", "recycle_ratio", "momentum", "recycle_momentum"):
        if not isinstance(o[k], (int, float)) or not 0.0 <= o[k] <= 1.0:
            problems.append(f"{k} must be a number in [0, 1], not {o[k]!r}")
    f = o["high_random_fraction"]
    if not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
        problems.append(f"high_random_fraction must be in (0, 1], not {f!r}")
    for k in ("recycle_tokens", "recycle_heads"):
        if not isinstance(o[k], int) or o[k] < 1:
            problems.append(f"{k} must be a positive integer, not {o[k]!r}")
    if not isinstance(o["alpha"], (int, float)) or o["alpha"] < 0:
        problems.append(f"alpha must be ≥ 0, not {o['alpha']!r}")
    if not isinstance(o["temperature"], (int, float)) or o["temperature"] <= 0:
        problems.append(f"temperature must be > 0, not {o['temperature']!r}")
    be = o["baseline_epochs"]
    if be is not None and (not isinstance(be, int) or be < 1):
        problems.append(f"baseline_epochs must be a positive integer or null, not {be!r}")
    if o["teacher_init"] is not None and not isinstance(o["teacher_init"], (str, Path)):
        problems.append(f"teacher_init must be a run folder path, not {o['teacher_init']!r}")
    if problems:
        raise problems_error(f"invalid options for method {name!r}", problems)


@register_method("mhim_v1")
class MHIMv1(MHIM):
    """MHIM-MIL v1 (ICCV 2023) with the official README's Camelyon16 settings.

    ABMIL/DSMIL: attention scores, β_h = 0.01 randomised (top 2β_h N, mask half) with cosine decay, 50% random
    masking, α = 0.1, m = 0.9999, projection copied into the student. TransMIL: β_h = 0.03 (randomised, decayed),
    80% low-score masking, no random masking, cosine momentum schedule.
    """

    # its defaults are wsimil.methods.options.MHIM_V1


@register_method("mhim_v2")
class MHIMv2(MHIM):
    """MHIM-MIL v2 (IJCV 2025) with the official master's settings.

    Class-aware instance probability, β_h = 0.01 (the README's grid is {0.01, 0.03, 0.05}) without randomisation or
    decay, Global Recycle Network with 80% of the remaining instances recycled (official ``merge_ratio`` 0.2 kept)
    into k = 1 token, query momentum 0.9999, α = 0.5, teacher m = 0.9997 constant.
    """

    # its defaults are MHIM's (wsimil.methods.options.MHIM_V2)
