"""One trainer for every method: cross-validation folds, mini-batches of bags, early stopping on validation,
checkpoints, ``history.csv``, ``predictions.csv`` and ``results.json``. The run folder's layout is
:class:`wsimil.run.RunDir`'s; the task (classification, survival) is asked for losses, metrics and label columns
(:mod:`wsimil.evaluation.tasks`); each fold gets a fresh method object (:func:`wsimil.methods.create_method`).

Outputs of ``run_training(cfg, features, manifest, out)`` (the bundle is written by ``wsimil train``,
:func:`wsimil.predict.write.bundle_from_run`, not here):

- ``config.yaml``: the resolved configuration (plus data paths, classes, feature width, version);
- ``checkpoints/repeat{r}_fold{k}.safetensors``: per-fold weights and metadata, no pickle (a re-run with the
  same config reuses them);
- ``history.csv``: per fold and epoch, every loss term, validation loss and AUC;
- ``predictions.csv``: ``slide_id,repeat,fold,label,prob_<class>…`` for every test slide;
- ``results.json``: ``{"metrics": {m: {mean, std}}, "folds": [{repeat, fold, metrics, ci}], "config": {…}}``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsimil import __version__
from wsimil.config import TrainConfig, resolve_device
from wsimil.data.batching import (
    BagTensors,
    Standardizer,
    epoch_order,
    folded_inputs,
    pad_batch,
)
from wsimil.data.manifest import Cohort, Manifest, load_cohort, read_manifest
from wsimil.data.splits import Split, kfold_splits, read_splits
from wsimil.evaluation.metrics import (
    bootstrap_ci,
    classification_metrics,
    instance_auc,
    nan_to_none,
    summarize,
    summarize_repeats,
)
from wsimil.evaluation.predict import predict
from wsimil.evaluation.tasks import get_task
from wsimil.features.store import FeatureStore
from wsimil.methods.base import Batch, TrainingMethod, create_method
from wsimil.models import MILModel
from wsimil.progress import console, make_progress
from wsimil.run import RunDir
from wsimil.threads import StepTuner, apply_threads, mil_step_elements


@dataclass
class FoldResult:
    split: Split
    probs: np.ndarray
    metrics: dict
    ci: dict | None
    history: list[dict]
    head_metrics: dict[str, dict] = field(default_factory=dict)  # {head: {metrics, ci}} for extra output heads
    risk: np.ndarray | None = None  # survival risk per test slide
    method: TrainingMethod | None = None  # the fold's method object


@dataclass
class FoldContext:
    """What a training method sees of one fold: the trainer's data, the fold's indices, its standardiser."""

    trainer: Trainer
    split: Split
    train: np.ndarray  # positions in trainer.slide_ids
    val: np.ndarray
    test: np.ndarray
    standardizer: Standardizer | None
    seed: int
    progress: Any = None
    folded: bool = False  # True while the standardiser is folded into the models' input layers: batches stay raw

    @property
    def cfg(self) -> TrainConfig:
        return self.trainer.cfg

    @property
    def device(self) -> str:
        return self.trainer.device

    @property
    def slide_ids(self) -> list[str]:
        return self.trainer.ids

    @property
    def in_dim(self) -> int:
        return self.trainer.cohort.in_dim

    @property
    def classes(self) -> list[str]:
        return self.trainer.classes

    def make_batch(self, idx: np.ndarray, gen: torch.Generator | None = None) -> Batch:
        """Pad, move and standardise the bags at positions ``idx`` (subsampled to ``max_instances`` with
        ``gen`` when given, as in training)."""
        t = self.trainer
        xs, rows = [], []
        for i in idx:
            bag, kept = t.bags[i], None
            k = self.cfg.max_instances
            if gen is not None and k is not None and bag.shape[0] > k:
                kept = torch.randperm(bag.shape[0], generator=gen)[:k].sort().values
                bag = bag[kept]
            xs.append(bag.to(t.device, non_blocking=True))
            rows.append(kept)
        x, mask = pad_batch(xs)
        if self.standardizer is not None and not self.folded:
            x = self.standardizer.apply_padded(x, mask, owned=len(xs) > 1)
        y = torch.as_tensor(t.labels[idx], device=t.device)
        return Batch(x, mask, y, np.asarray(idx), rows, **t.task.batch_extras(t.targets, idx, t.device))

    def train_batches(self, epoch: int, gen: torch.Generator) -> Iterator[Batch]:
        """The epoch's training mini-batches (class-balanced draws when configured)."""
        t, cfg = self.trainer, self.cfg
        order = self.train[epoch_order(t.labels[self.train], cfg.balanced_sampling, gen)]
        for start in range(0, len(order), cfg.batch_size):
            yield self.make_batch(order[start : start + cfg.batch_size], gen)

    def baseline(self, **overrides: Any) -> tuple[MILModel, Standardizer | None]:
        """Train (or reuse from ``RUN/baseline``) a plain supervised model on this very fold, same split and seed —
        the teacher initialisation of MHIM-MIL. ``overrides`` change config fields (e.g. ``epochs``)."""
        t = self.trainer
        cfg = t.cfg.model_copy(update={"method": "supervised", "method_kwargs": {}, **overrides})
        sub = Trainer(cfg, t.cohort, t.run.baseline, t.device, t.manifest, t.bags)
        model, std, _ = sub.train_fold(self.split, self.progress, label="baseline ")[:3]
        return model, std


def fold_seed(seed: int, repeat: int, fold: int) -> int:
    return int(np.random.SeedSequence([seed, repeat, fold]).generate_state(1)[0])


def config_hash(cfg: TrainConfig, extra: dict) -> str:
    keep = cfg.model_dump(exclude={"device", "bootstrap", "eval_batch_size", "max_memory_gb", "threads"})
    blob = json.dumps({**keep, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Trainer:
    """Trains ``cfg.method`` fold by fold on one cohort; ``run_fold`` = ``train_fold`` + test-set evaluation.

    Each fold gets its own method object (built once, by :meth:`new_method`, and passed along), so no state of one
    fold's method (teachers, caches) reaches the next."""

    def __init__(
        self,
        cfg: TrainConfig,
        cohort: Cohort,
        out_dir: str | Path | RunDir,
        device: str,
        manifest: Manifest | None = None,
        bags: BagTensors | None = None,
    ):
        self.cfg, self.cohort, self.device = cfg, cohort, device
        self.run = out_dir if isinstance(out_dir, RunDir) else RunDir(out_dir)
        self.manifest = m = manifest if manifest is not None else cohort.manifest
        self.ids = m.slide_ids
        self.pos = {sid: i for i, sid in enumerate(self.ids)}
        self.task = get_task(cfg.task)
        self.targets = self.task.targets(m.df, m.labels)
        self.labels = self.targets.labels
        self.classes = m.classes
        self.n_classes = len(m.classes)
        self.bags = bags if bags is not None else BagTensors(cohort, self.ids, pin_memory=device.startswith("cuda"))
        self.inst_labels = [cohort.bags[sid].instance_labels for sid in self.ids]
        self.hash = config_hash(cfg, {"classes": m.classes, "in_dim": cohort.in_dim})
        self.tuner: StepTuner | None = None  # times training steps to choose the thread count (threads: auto)
        self._spare: TrainingMethod | None = None

    @property
    def out(self) -> Path:
        return self.run.path

    @property
    def slide_ids(self) -> list[str]:
        return self.ids

    def new_method(self) -> TrainingMethod:
        """A fresh method object for one fold, prepared on the manifest (the one :meth:`check` built first)."""
        if self._spare is not None:
            method, self._spare = self._spare, None
            return method
        method = create_method(self.cfg)
        method.prepare(self.manifest)
        return method

    def check(self, method: TrainingMethod | None = None) -> None:
        """Fail on bad method or model options now, not after a fold of training. ``method`` (built from this
        config, not yet prepared) or a new one trains the first fold."""
        if method is None:
            method = self.new_method()
        else:
            method.prepare(self.manifest)
        method.build(self.cohort.in_dim, self.n_classes)
        self._spare = method

    # ------------------------------------------------------------------ one fold
    def train_fold(
        self, split: Split, progress, label: str = "", method: TrainingMethod | None = None
    ) -> tuple[MILModel, Standardizer | None, list[dict], TrainingMethod]:
        """Train on ``split`` (or load its checkpoint when the config hash matches) with ``method`` (default: a
        new one); return the best model, its standardiser, the history and the method."""
        cfg = self.cfg
        method = method if method is not None else self.new_method()
        ctx = self._context(split, progress)
        torch.manual_seed(ctx.seed)
        model = method.build(self.cohort.in_dim, self.n_classes).to(self.device)
        history: list[dict] = []
        task = progress.add_task(f"{label}repeat {split.repeat} fold {split.fold}", total=cfg.epochs, info="")
        try:
            ck = self.run.load_fold_checkpoint(split.repeat, split.fold)
            if ck is not None and ck.get("config_hash") == self.hash:
                model.load_state_dict(ck["state_dict"])
                return model, Standardizer.from_state(ck.get("standardizer")), ck.get("history", []), method
            method.setup(model, ctx)
            history = self._fit(model, method, ctx, progress, task)
            self._save_checkpoint(model, method, ctx.standardizer, split, history)
            return model, ctx.standardizer, history, method
        finally:
            progress.remove_task(task)

    def run_fold(self, split: Split, progress) -> FoldResult:
        cfg = self.cfg
        model, std, history, method = self.train_fold(split, progress)
        te = np.array([self.pos[s] for s in split.test], dtype=int)
        seed = fold_seed(cfg.seed, split.repeat, split.fold)
        pred = predict(
            model,
            self.bags.take(te),
            self.device,
            self.labels[te],
            std,
            cfg.eval_batch_size,
            with_instances=self.cohort.has_instance_labels,
        )
        scores = self.task.test_scores(self.targets, te, pred, cfg.bootstrap, seed)
        metrics = scores.metrics
        if pred.instance_scores is not None:
            metrics["instance_auc"] = instance_auc(pred.instance_scores, [self.inst_labels[i] for i in te])
        heads = {}
        for head, probs in (pred.extra_probs or {}).items():
            y, _ = method.head_labels(head, [self.ids[i] for i in te], self.labels[te], self.classes)
            heads[head] = {"metrics": classification_metrics(y, probs)}
            if cfg.bootstrap:
                heads[head]["ci"] = bootstrap_ci(y, probs, cfg.bootstrap, seed)
        return FoldResult(split, pred.probs, metrics, scores.ci, history, heads, scores.risk, method)

    def _context(self, split: Split, progress) -> FoldContext:
        cfg = self.cfg
        tr = np.array([self.pos[s] for s in split.train], dtype=int)
        va = np.array([self.pos[s] for s in split.val], dtype=int)
        te = np.array([self.pos[s] for s in split.test], dtype=int)
        std = Standardizer.fit(self.bags.take(tr)) if cfg.standardize else None
        return FoldContext(self, split, tr, va, te, std, fold_seed(cfg.seed, split.repeat, split.fold), progress)

    def _validate(self, model: MILModel, ctx: FoldContext) -> dict[str, float]:
        va = ctx.val
        pv = predict(
            model, self.bags.take(va), self.device, self.labels[va], ctx.standardizer, self.cfg.eval_batch_size
        )
        return self.task.validation(self.targets, va, pv)

    def _fit(self, model: MILModel, method: TrainingMethod, ctx: FoldContext, progress, task) -> list[dict]:
        cfg, split = self.cfg, ctx.split
        opt = _optimizer(cfg, method.parameters(model))
        hooks = self.tuner.attach(model, opt) if self.tuner else []
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs) if cfg.scheduler == "cosine" else None
        gen = torch.Generator().manual_seed(ctx.seed)
        best_state, best_score, best_epoch, bad_epochs = None, math.inf, -1, 0
        history = []
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            with folded_inputs(ctx, model, method):
                terms = method.fit_epoch(model, opt, ctx, epoch, gen)
            if sched is not None:
                sched.step()
            row = {
                "repeat": split.repeat,
                "fold": split.fold,
                "epoch": epoch,
                "lr": opt.param_groups[0]["lr"],
                **{f"train_{k}": v for k, v in terms.items()},
            }
            if len(ctx.val):
                row.update(self._validate(model, ctx))
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            progress.update(task, advance=1, info=_info(row))

            # a kept model has trained at least min_epochs epochs: on a validation part of a few slides the
            # validation loss can rise from the first epoch on, and "best" would be the untrained model
            if len(ctx.val) and cfg.early_stopping and epoch + 1 >= min(cfg.min_epochs, cfg.epochs):
                score = row["val_loss"] if cfg.monitor == "val_loss" else -_nan_to(row["val_auc"], -math.inf)
                if score < best_score:
                    best_score, best_epoch, bad_epochs = score, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_epochs += 1
                if bad_epochs >= cfg.patience:
                    break
        for h in hooks:
            h.remove()
        if best_state is not None:
            model.load_state_dict(best_state)
            for row in history:
                row["best"] = row["epoch"] == best_epoch
        return history

    def _save_checkpoint(self, model, method: TrainingMethod, std, split: Split, history: list[dict]) -> None:
        ck = {
            "model": self.cfg.model,
            "model_kwargs": self.cfg.model_kwargs,
            "method": self.cfg.method,
            "method_kwargs": self.cfg.method_kwargs,
            "method_state": method.state(),
            "task": self.cfg.task,
            "in_dim": self.cohort.in_dim,
            "n_classes": self.n_classes,
            "classes": self.classes,
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "standardizer": std.state_dict() if std is not None else None,
            "config_hash": self.hash,
            "repeat": split.repeat,
            "fold": split.fold,
            "history": history,
            "wsimil_version": __version__,
        }
        self.run.save_fold(split.repeat, split.fold, ck)


def _optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # the fused kernel updates all parameters in one call: ~30% less per-step time for small models on CPU
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)


def _nan_to(v: float, default: float) -> float:
    return default if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _info(row: dict) -> str:
    parts = [f"loss {row.get('train_loss', float('nan')):.3f}"]
    if "val_auc" in row:
        parts.append(f"val_loss {row['val_loss']:.3f} val_auc {_nan_to(row['val_auc'], float('nan')):.3f}")
    return " ".join(parts)


def run_training(cfg: TrainConfig, features: str | Path, manifest: str | Path, out: str | Path | RunDir) -> dict:
    """Train ``cfg.model`` with ``cfg.method`` over the configured folds; write the run folder; return results.

    The run's bundle (``RUN/bundle``) is not written here: ``wsimil train`` writes it after training
    (:func:`wsimil.predict.write.bundle_from_run`)."""
    run = out if isinstance(out, RunDir) else RunDir(out)
    device = resolve_device(cfg.device)
    task = get_task(cfg.task)
    first = create_method(cfg)  # unknown methods and bad options fail before any data is read; trains fold 1
    label_column = cfg.label_column
    if label_column == "label" and first.spec.label_column:
        label_column = first.spec.label_column
    man = read_manifest(manifest, cfg.classes, label_column, cfg.task, cfg.survival_bins)
    store = FeatureStore(features)
    cohort = load_cohort(man, store, max_memory_gb=cfg.max_memory_gb)  # missing or bad slides first, then splits
    splits = (
        read_splits(cfg.splits, man)
        if cfg.splits
        else kfold_splits(man, cfg.folds, cfg.repeats, cfg.val_fraction, cfg.seed)
    )
    steps = mil_step_elements(cohort.lengths.values(), cohort.in_dim, cfg.batch_size, cfg.max_instances)
    threads = apply_threads(cfg.threads, "mil", elements=steps)
    trainer = Trainer(cfg, cohort, run, device, man)
    trainer.check(first)
    trainer.tuner = StepTuner.for_plan(threads)
    resolved = {
        **cfg.model_dump(mode="json"),
        "label_column": label_column,  # the column actually read (a method may default it, e.g. HMIL)
        "classes": man.classes,
        "in_dim": cohort.in_dim,
        "features": str(Path(features).resolve()),
        "manifest": str(Path(manifest).resolve()),
        "n_splits": len(splits),
        "wsimil_version": __version__,
        "threads_resolved": threads.to_dict(),  # what `threads` resolved to on this machine, and why
    }
    run.write_config(resolved)
    results: list[FoldResult] = []
    console.print(
        f"Training [bold]{cfg.model}[/] ({cfg.method}) on {len(man.slide_ids)} slides, "
        f"{len(splits)} split(s), device {device} → {run.path}"
    )
    with make_progress() as progress:
        overall = progress.add_task("folds", total=len(splits), info="")
        key = task.primary_metric
        for s in splits:
            results.append(trainer.run_fold(s, progress))
            last = _nan_to(results[-1].metrics[key], float("nan"))
            progress.update(overall, advance=1, info=f"last test {key.replace('_', '-')} {last:.3f}")

    rows = []
    for r in results:
        for j, (sid, p) in enumerate(zip(r.split.test, r.probs, strict=True)):
            i = trainer.pos[sid]
            row = {"slide_id": sid, "repeat": r.split.repeat, "fold": r.split.fold}
            row.update(task.prediction_row(trainer.targets, i, man.classes, None if r.risk is None else r.risk[j]))
            rows.append({**row, **{f"prob_{c}": float(v) for c, v in zip(man.classes, p, strict=True)}})
    run.write_predictions(pd.DataFrame(rows))
    run.write_history(pd.DataFrame([h for r in results for h in r.history]))
    payload = {
        "metrics": summarize([r.metrics for r in results]),
        "folds": [
            {
                "repeat": r.split.repeat,
                "fold": r.split.fold,
                "n_train": len(r.split.train),
                "n_val": len(r.split.val),
                "n_test": len(r.split.test),
                "metrics": r.metrics,
                **({"ci": r.ci} if r.ci else {}),
            }
            for r in results
        ],
        "config": resolved,
    }
    te = np.array([trainer.pos[s] for r in results for s in r.split.test], dtype=int)
    reps = np.concatenate([np.full(len(r.split.test), r.split.repeat) for r in results])
    pooled = task.pooled(trainer.targets, te, np.concatenate([r.probs for r in results]), reps, cfg.bootstrap, cfg.seed)
    if pooled is not None:
        payload["pooled"] = pooled
    primary = getattr(first, "primary_head", None)  # e.g. HMIL: "metrics" are the fine level's
    if primary:
        payload[f"metrics_{primary}"] = payload["metrics"]
    for head in sorted({h for r in results for h in r.head_metrics}):
        payload[f"metrics_{head}"] = summarize([r.head_metrics[head]["metrics"] for r in results])
        for f, r in zip(payload["folds"], results, strict=True):
            f[f"metrics_{head}"] = r.head_metrics[head]["metrics"]
            if "ci" in r.head_metrics[head]:
                f[f"ci_{head}"] = r.head_metrics[head]["ci"]
    repeats = sorted({r.split.repeat for r in results})
    if len(repeats) > 1:
        payload["repeat_metrics"] = summarize_repeats([r.metrics for r in results], [r.split.repeat for r in results])
    if trainer.tuner:
        payload["threads_tuned"] = trainer.tuner.summary()  # the thread counts the timed probes chose
    payload = nan_to_none(payload)
    run.write_results(payload)
    return payload
