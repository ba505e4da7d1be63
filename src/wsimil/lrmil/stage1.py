"""Step 3 of LRMIL: patch-level cross-resolution distillation of a student encoder (SPEC §1 stage 1).

The student ``E_S`` starts as a copy of the frozen teacher encoder ``E_T`` and sees LR patches at the LR patch size
(256 px: a 16×16 token grid for ViT-B/16, so each of the 16 HR children owns a 4×4 block). Per LR patch:

- ``L_layer``: for every tapped block ``l ∈ K`` (default: first, second and last-but-one), the student's grid
  pooled over each child's block regresses the teacher's summary token of that HR child (precomputed in step 1);
- ``L_attn``: the student's final embedding regresses the children's teacher embeddings, weighted by the fold
  teacher's softmax attention renormalised over the children.

``L = λ_layer L_layer + λ_attn L_attn``. **[decision]** SPEC's Adam at lr 1e-5 for a few epochs hardly moves the
weights (about 150 steps on a 40-slide cohort), so stage 1 runs a budget of optimiser steps (default 500) with a
linear warm-up and a cosine decay from lr 1e-4, augments each LR patch with one of the 8 flips/rotations and mild
brightness/contrast changes (the children's targets are permuted with the patch, so every child keeps its HR
partner), and keeps the step whose loss on held-out pairs (the fold's validation slides, never its test slides) is
lowest; every loss term is logged per step. Batch-norm layers get their statistics re-estimated on LR patches
before training (``norm_stats: reestimate``; the teacher's were computed on HR patches) and kept fixed while the
affine weights train, so that the function trained is the one used (``teacher``: keep the teacher's statistics;
``train``: plain train-mode batch norm). Linear adapters map student widths to teacher widths only where they differ
(a student architecture other than the teacher's). Only the fold's training slides are used (see
:mod:`wsimil.lrmil.pipeline` for the fold policy).
"""

from __future__ import annotations

import copy
import math
import os
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from wsimil.checkpoint import load_checkpoint, save_checkpoint
from wsimil.features.encoders import Encoder
from wsimil.features.patches import read_block
from wsimil.lrmil.config import Stage1Config
from wsimil.lrmil.job import LRMILJob
from wsimil.lrmil.losses import attention_feature_loss, layer_distill_loss, pool_children
from wsimil.lrmil.taps import block_widths, forward_taps, freeze, make_student
from wsimil.methods.teacher_dump import read_dump

OPEN_SLIDES = 16  # per worker: slide handles kept open


class Stage1Settings(Stage1Config):
    """Stage 1 as :func:`train_stage1` runs it: the configured :class:`~wsimil.lrmil.config.Stage1Config` plus
    what the run resolves (``input_size``: the student input in pixels, the fold's seed, device, slide reader)."""

    input_size: int = Field(256, ge=1)
    seed: int = 0
    device: str = "cpu"
    reader: str = "auto"


class Stage1Patches(torch.utils.data.Dataset):
    """Every LR patch with at least one HR child, of ``slide_ids``, with its children's teacher targets.

    Item: ``(patch uint8 (ps, ps, 3), child_mask (f²,) bool, final (f², D), [summary_l (f², C_l)], alpha (f²,))``
    where ``final``/``summary_l`` come from the step-1 HR files in ``hr_dir`` (zeros for missing children) and
    ``alpha`` is the fold teacher's softmax attention from ``dump``. Slides and HDF5 files are opened per
    DataLoader worker and read lazily, so the cohort need not fit in memory."""

    def __init__(
        self,
        job: LRMILJob,
        slide_ids: list[str],
        hr_dir: Path,
        dump: Path,
        layers: tuple[int, ...],
        reader: str = "auto",
    ):
        self.job, self.hr_dir, self.layers, self.reader = job, Path(hr_dir), tuple(layers), reader
        self.grids, self.links, self.alpha, self.items = {}, {}, {}, []
        for sid in slide_ids:
            lk = job.links(sid)
            self.links[sid] = lk
            self.grids[sid] = job.grid(sid, job.lr)
            self.alpha[sid] = read_dump(dump, sid)[2].astype(np.float32)
            self.items += [(sid, int(r)) for r in np.flatnonzero((lk >= 0).any(1))]
        self._slides: OrderedDict = OrderedDict()
        self._files: dict[str, h5py.File] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _handles(self) -> None:
        if self._pid != os.getpid():  # a forked worker must not share handles
            self._slides, self._files, self._pid = OrderedDict(), {}, os.getpid()

    def _slide(self, sid: str):
        from wsimil.slide.reader import open_slide

        if sid in self._slides:
            self._slides.move_to_end(sid)
            return self._slides[sid]
        g = self.grids[sid]
        s = open_slide(g.slide_path, self.reader, self.job.mpp(sid), sid)
        self._slides[sid] = s
        if len(self._slides) > OPEN_SLIDES:
            self._slides.popitem(last=False)[1].close()
        return s

    def _file(self, sid: str) -> h5py.File:
        if sid not in self._files:
            self._files[sid] = h5py.File(self.hr_dir / f"{sid}.h5", "r")
        return self._files[sid]

    def __getitem__(self, i: int):
        self._handles()
        sid, r = self.items[i]
        patch = read_block(self._slide(sid), self.grids[sid], np.array([r]))[0]
        children = self.links[sid][r]
        mask = children >= 0
        order = np.argsort(children[mask])  # HDF5 reads need increasing rows
        rows = children[mask][order]
        where = np.flatnonzero(mask)[order]
        f = self._file(sid)

        def gather(name: str) -> np.ndarray:
            d = f[name]
            out = np.zeros((len(children), d.shape[1]), dtype=np.float32)
            out[where] = d[rows]
            return out

        alpha = np.zeros(len(children), dtype=np.float32)
        alpha[where] = self.alpha[sid][rows]
        summaries = [torch.from_numpy(gather(f"summary/block{i}")) for i in self.layers]
        return (
            torch.from_numpy(patch),
            torch.from_numpy(mask),
            torch.from_numpy(gather("features")),
            summaries,
            (torch.from_numpy(alpha)),
        )


def build_adapters(student: nn.Module, teacher: nn.Module, s_layers, t_layers, s_dim: int, t_dim: int) -> nn.ModuleDict:
    """Linear maps from student to teacher widths, only where they differ (keys: block position, ``final``)."""
    sw, tw = block_widths(student), block_widths(teacher)
    out = nn.ModuleDict()
    for i, (ls, lt) in enumerate(zip(s_layers, t_layers, strict=True)):
        if sw[ls] != tw[lt]:
            out[str(i)] = nn.Linear(sw[ls], tw[lt])
    if s_dim != t_dim:
        out["final"] = nn.Linear(s_dim, t_dim)
    return out


def _adapt(adapters: nn.ModuleDict, key: str, x: Tensor) -> Tensor:
    return adapters[key](x) if key in adapters else x


def _norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put batch-norm layers in eval mode (their affine weights still train): running statistics stay as they are
    instead of following small batches of LR patches. ViTs have no batch norm."""
    for m in _norm_layers(model):
        m.eval()


@torch.no_grad()
def reestimate_norm_statistics(student: Encoder, loader, device: str, max_batches: int = 64) -> int:
    """Recompute every batch-norm layer's running mean and variance as the plain average over up to ``max_batches``
    batches of LR patches (AdaBN); returns the number of patches seen (0: the model has no batch norm)."""
    layers = _norm_layers(student.model)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches seen
        m.train()
    seen = 0
    for i, (patch, *_rest) in enumerate(loader):
        if i >= max_batches:
            break
        student.model(student.preprocess(patch.to(device)))
        seen += len(patch)
    for m, mom in zip(layers, momenta, strict=True):
        m.momentum = mom
        m.eval()
    return seen


def augment_pairs(patch: Tensor, mask: Tensor, final: Tensor, summaries: list[Tensor], alpha: Tensor,
                  factor: int, gen: torch.Generator):  # fmt: skip
    """One random flip/rotation per LR patch ``(B, H, W, 3)``, applied alike to its ``f × f`` grid of children
    (``(B, f², …)``, child ``j = b·f + a`` at row ``b``, column ``a``), so each child keeps its HR targets; and a
    brightness/contrast change of at most 10% (the targets are the HR teacher's, so the student learns to ignore
    it)."""
    b = patch.shape[0]
    ops = torch.randint(0, 8, (b,), generator=gen).tolist()

    def tf(x: Tensor, op: int) -> Tensor:  # x: (H, W, ...) image or (f, f, ...) grid
        x = torch.rot90(x, op % 4, dims=(0, 1))
        return x.flip(1) if op >= 4 else x

    def grid(t: Tensor) -> Tensor:
        g = t.reshape(b, factor, factor, *t.shape[2:])
        return torch.stack([tf(g[i], ops[i]) for i in range(b)]).reshape(t.shape)

    img = torch.stack([tf(patch[i], ops[i]) for i in range(b)]).float()
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.2
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.2
    mean = img.mean((1, 2, 3), keepdim=True)
    img = ((img - mean) * contrast + mean * gain).clamp_(0, 255).round_().to(torch.uint8)
    return img, grid(mask), grid(final), [grid(x) for x in summaries], grid(alpha)


def _lr_at(step: int, st: Stage1Settings, total: int) -> float:
    warm = max(1, round(st.warmup * total))
    if step < warm:
        return st.lr * (step + 1) / warm
    if st.schedule == "constant":
        return st.lr
    t = (step - warm) / max(1, total - warm)
    return st.lr * 0.5 * (1 + math.cos(math.pi * t))


def train_stage1(
    teacher: Encoder,
    data: Stage1Patches,
    st: Stage1Settings,
    factor: int,
    student_layers: tuple[int, ...] | None = None,
    progress=None,
    val_data: Stage1Patches | None = None,
) -> tuple[Encoder, nn.ModuleDict, list[dict]]:
    """Distil ``teacher`` into a student on ``data``; returns ``(student in eval mode, adapters, history)``. The
    teacher encoder is frozen and never updated (its targets were computed in step 1). The kept state is the one
    with the lowest loss on ``val_data`` (held-out pairs; without them, the lowest running training loss);
    ``history`` has one row per step (``step, lr, loss, layer, attn``) and evaluation rows with ``val_*``."""
    if st.norm_stats not in ("reestimate", "teacher", "train"):
        raise ValueError(f"norm_stats must be reestimate, teacher or train, not {st.norm_stats!r}")
    freeze(teacher.model)
    torch.manual_seed(st.seed)
    gen = torch.Generator().manual_seed(st.seed)
    student = make_student(teacher, st.input_size)
    model = student.model.to(st.device)
    for p in model.parameters():
        p.requires_grad_(True)
    t_layers = data.layers
    s_layers = tuple(student_layers or t_layers)
    adapters = build_adapters(model, teacher.model, s_layers, t_layers, student.embed_dim, teacher.embed_dim)
    adapters.to(st.device)
    params = [p for p in model.parameters()] + list(adapters.parameters())
    opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=st.weight_decay)

    def loader(ds, shuffle: bool):
        return torch.utils.data.DataLoader(ds, batch_size=st.batch_size, shuffle=shuffle, num_workers=st.workers,
                                           generator=torch.Generator().manual_seed(st.seed))  # fmt: skip

    train_loader = loader(data, True)
    total = st.epochs * len(train_loader) if st.epochs else st.steps
    if st.norm_stats == "reestimate":
        model.eval()
        reestimate_norm_statistics(student, loader(data, True), st.device)

    def losses(patch, mask, final, summaries, alpha, train: bool) -> dict[str, Tensor]:
        dev = st.device
        if train and st.augment:
            patch, mask, final, summaries, alpha = augment_pairs(patch, mask, final, summaries, alpha, factor, gen)
        taps = forward_taps(model, student.preprocess(patch.to(dev)), s_layers)
        s_children = [_adapt(adapters, str(i), pool_children(g, factor)) for i, g in enumerate(taps.grids)]
        mask = mask.to(dev)
        l_layer = layer_distill_loss(s_children, [x.to(dev) for x in summaries], mask)
        l_attn = attention_feature_loss(_adapt(adapters, "final", taps.final), final.to(dev), alpha.to(dev), mask)
        return {"loss": st.lambda_layer * l_layer + st.lambda_attn * l_attn, "layer": l_layer, "attn": l_attn}

    def train_mode() -> None:
        model.train()
        adapters.train()
        if st.norm_stats != "train":
            freeze_norm_statistics(model)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        adapters.eval()
        sums, n = {"loss": 0.0, "layer": 0.0, "attn": 0.0}, 0
        for batch in loader(val_data, False):
            for k, v in losses(*batch, train=False).items():
                sums[k] += float(v) * len(batch[0])
            n += len(batch[0])
        train_mode()
        return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}

    use_val = val_data is not None and len(val_data) > 0
    best, best_state, history = float("inf"), None, []
    task = progress.add_task("stage 1", total=total, info="") if progress is not None else None
    running = None
    train_mode()
    step = 0
    while step < total:
        for batch in train_loader:
            if step >= total:
                break
            lr = _lr_at(step, st, total)
            for g in opt.param_groups:
                g["lr"] = lr
            terms = losses(*batch, train=True)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            row = {"step": step, "lr": lr, **{k: float(v.detach()) for k, v in terms.items()}}
            running = row["loss"] if running is None else 0.9 * running + 0.1 * row["loss"]
            step += 1
            if step % st.eval_every == 0 or step == total:
                score = running
                if use_val:
                    row.update(evaluate())
                    score = row["val_loss"]
                if score < best:
                    best = score
                    best_state = (copy.deepcopy(model.state_dict()), copy.deepcopy(adapters.state_dict()), step)
            history.append(row)
            if task is not None:
                progress.update(task, advance=1, info=f"loss {running:.4g}" + (f" val {best:.4g}" if use_val else ""))
    if task is not None:
        progress.remove_task(task)
    if best_state is not None:
        model.load_state_dict(best_state[0])
        adapters.load_state_dict(best_state[1])
    for row in history:
        row["best"] = best_state is not None and row["step"] + 1 == best_state[2]
        row["selected_on"] = "val_loss" if use_val else "train_loss (no held-out pairs)"
    freeze(model)
    return student, adapters, history


def save_student(path: Path, student: Encoder, adapters: nn.ModuleDict, meta: dict) -> None:
    """Write the distilled encoder: ``state_dict`` (the whole encoder model), ``adapters``, ``input_size`` and
    ``meta`` (layers, history, settings key)."""
    ck = {
        "encoder": student.name,
        "input_size": int(student.spec.input_size),
        "state_dict": {k: v.cpu() for k, v in student.model.state_dict().items()},
        "adapters": {k: v.cpu() for k, v in adapters.state_dict().items()},
        **meta,
    }
    save_checkpoint(path, ck)


def load_student(path: Path, teacher: Encoder) -> tuple[Encoder, dict]:
    """Rebuild a distilled encoder saved by :func:`save_student` on the architecture of ``teacher`` (the teacher's
    own weights are not needed: every weight comes from the file). Returns ``(student in eval mode, checkpoint)``."""
    ck = load_checkpoint(path, "distilled encoder")
    student = make_student(teacher, int(ck["input_size"]))
    student.model.load_state_dict(ck["state_dict"])
    freeze(student.model)
    from wsimil.features.encoders import sha256_file

    student.weights = str(Path(path).resolve())
    student.weights_sha256 = sha256_file(path)
    return student, ck
