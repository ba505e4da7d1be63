"""Step 3 of LRMIL: patch-level cross-resolution distillation of a student encoder (SPEC §1 stage 1).

The student ``E_S`` starts as a copy of the frozen teacher encoder ``E_T`` and sees LR patches at the LR patch size
(256 px: a 16×16 token grid for ViT-B/16, so each of the 16 HR children owns a 4×4 block). Per LR patch:

- ``L_layer``: for every tapped block ``l ∈ K`` (default: first, second and last-but-one), the student's grid
  pooled over each child's block regresses the teacher's summary token of that HR child (precomputed in step 1);
- ``L_attn``: the student's final embedding regresses the children's teacher embeddings, weighted by the fold
  teacher's softmax attention renormalised over the children.

``L = λ_layer L_layer + λ_attn L_attn`` (Adam, lr 1e-5); the epoch with the lowest mean loss is kept. **[decision]**
Batch-norm layers keep the teacher's running statistics (:func:`freeze_norm_statistics`). Linear
adapters map student widths to teacher widths only where they differ (a student architecture other than the
teacher's). Only the fold's training slides are used (see :mod:`wsimil.lrmil.pipeline` for the fold policy).
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from wsimil.checkpoint import load_checkpoint, save_checkpoint
from wsimil.features.encoders import Encoder
from wsimil.features.patches import read_block
from wsimil.lrmil.job import LRMILJob
from wsimil.lrmil.losses import attention_feature_loss, layer_distill_loss, pool_children
from wsimil.lrmil.taps import block_widths, forward_taps, freeze, make_student
from wsimil.lrmil.teacher import read_dump

OPEN_SLIDES = 16  # per worker: slide handles kept open


@dataclass
class Stage1Settings:
    epochs: int = 5
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 16
    lambda_layer: float = 1.0
    lambda_attn: float = 1.0
    input_size: int = 256  # student input in pixels (the LR patch size)
    workers: int = 0
    seed: int = 0
    device: str = "cpu"
    reader: str = "auto"
    freeze_norm_stats: bool = True  # batch-norm layers keep the teacher's running statistics (see train_stage1)


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


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put batch-norm layers in eval mode (their affine weights still train): the student then computes exactly the
    teacher's function at the start of stage 1 and keeps the teacher's running statistics, instead of normalising
    with the statistics of small batches of LR patches (and drifting its running statistics towards them). ViTs have
    no batch norm, so this only matters for CNNs; the official code distils a ViT (CONCH)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_stage1(
    teacher: Encoder,
    data: Stage1Patches,
    st: Stage1Settings,
    factor: int,
    student_layers: tuple[int, ...] | None = None,
    progress=None,
) -> tuple[Encoder, nn.ModuleDict, list[dict]]:
    """Distil ``teacher`` into a student on ``data``; returns ``(student in eval mode, adapters, history)``. The
    teacher encoder is frozen and never updated (its targets were computed in step 1)."""
    freeze(teacher.model)
    torch.manual_seed(st.seed)
    student = make_student(teacher, st.input_size)
    model = student.model.to(st.device)
    for p in model.parameters():
        p.requires_grad_(True)
    t_layers = data.layers
    s_layers = tuple(student_layers or t_layers)
    adapters = build_adapters(model, teacher.model, s_layers, t_layers, student.embed_dim, teacher.embed_dim)
    adapters.to(st.device)
    params = [p for p in model.parameters()] + list(adapters.parameters())
    opt = torch.optim.Adam(params, lr=st.lr, weight_decay=st.weight_decay)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=st.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(st.seed),
        num_workers=st.workers,
    )
    best, best_state, history = float("inf"), None, []
    task = progress.add_task("stage 1", total=st.epochs * len(loader), info="") if progress is not None else None
    for epoch in range(st.epochs):
        model.train()
        if st.freeze_norm_stats:
            freeze_norm_statistics(model)
        adapters.train()
        sums = {"loss": 0.0, "layer": 0.0, "attn": 0.0}
        n = 0
        for patch, mask, final, summaries, alpha in loader:
            dev = st.device
            x = student.preprocess(patch.to(dev))
            taps = forward_taps(model, x, s_layers)
            s_children = [_adapt(adapters, str(i), pool_children(g, factor)) for i, g in enumerate(taps.grids)]
            mask = mask.to(dev)
            l_layer = layer_distill_loss(s_children, [s.to(dev) for s in summaries], mask)
            l_attn = attention_feature_loss(_adapt(adapters, "final", taps.final), final.to(dev), alpha.to(dev), mask)
            loss = st.lambda_layer * l_layer + st.lambda_attn * l_attn
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in (("loss", loss), ("layer", l_layer), ("attn", l_attn)):
                sums[k] += float(v.detach())
            n += 1
            if task is not None:
                progress.update(task, advance=1, info=f"epoch {epoch} loss {sums['loss'] / n:.4g}")
        row = {"epoch": epoch, **{f"train_{k}": v / max(n, 1) for k, v in sums.items()}}
        history.append(row)
        if row["train_loss"] < best:
            best = row["train_loss"]
            best_state = (copy.deepcopy(model.state_dict()), copy.deepcopy(adapters.state_dict()))
    if task is not None:
        progress.remove_task(task)
    if best_state is not None:
        model.load_state_dict(best_state[0])
        adapters.load_state_dict(best_state[1])
    for row in history:
        row["best"] = row["train_loss"] == best
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
