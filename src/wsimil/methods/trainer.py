"""One trainer for every method: cross-validation folds, mini-batches of bags, early stopping on validation,
checkpoints, ``history.csv``, ``predictions.csv`` and ``results.json``.

Outputs of ``run_training(cfg, features, manifest, out)``:

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
from wsimil.checkpoint import SUFFIX, fold_checkpoint, load_checkpoint, save_checkpoint
from wsimil.config import TrainConfig, resolve_device
from wsimil.data.batching import BagTensors, Standardizer, epoch_order, pad_batch
from wsimil.data.manifest import Cohort, Manifest, load_cohort, read_manifest
from wsimil.data.splits import Split, kfold_splits, read_splits
from wsimil.evaluation.metrics import (
    bootstrap_ci,
    classification_metrics,
    instance_auc,
    nan_to_none,
    pooled_oof,
    summarize,
    summarize_repeats,
)
from wsimil.evaluation.predict import predict
from wsimil.features.store import FeatureStore
from wsimil.io import write_csv, write_json, write_yaml
from wsimil.methods.base import Batch, create_method
from wsimil.models import MILModel
from wsimil.progress import console, make_progress
from wsimil.threads import apply_threads, mil_step_elements


@dataclass
class FoldResult:
    split: Split
    probs: np.ndarray
    metrics: dict
    ci: dict | None
    history: list[dict]
    head_metrics: dict[str, dict] = field(default_factory=dict)  # {head: {metrics, ci}} for extra output heads
    risk: np.ndarray | None = None  # survival risk per test slide


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

    @property
    def cfg(self) -> TrainConfig:
        return self.trainer.cfg

    @property
    def device(self) -> str:
        return self.trainer.device

    @property
    def slide_ids(self) -> list[str]:
        return self.trainer.ids

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
        if self.standardizer is not None:
            x = self.standardizer.apply_padded(x, mask, owned=len(xs) > 1)
        y = torch.as_tensor(t.labels[idx], device=t.device)
        event = time_ = None
        if t.events is not None:
            event = torch.as_tensor(t.events[idx], dtype=torch.float32, device=t.device)
            time_ = torch.as_tensor(t.times[idx], dtype=torch.float32, device=t.device)
        return Batch(x, mask, y, np.asarray(idx), rows, event, time_)

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
        sub = Trainer(cfg, t.cohort, t.out / "baseline", t.device, t.manifest, t.bags)
        model, std, _ = sub.train_fold(self.split, self.progress, label="baseline ")
        return model, std


def fold_seed(seed: int, repeat: int, fold: int) -> int:
    return int(np.random.SeedSequence([seed, repeat, fold]).generate_state(1)[0])


def config_hash(cfg: TrainConfig, extra: dict) -> str:
    keep = cfg.model_dump(exclude={"device", "bootstrap", "eval_batch_size", "max_memory_gb", "threads"})
    blob = json.dumps({**keep, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Trainer:
    """Trains ``cfg.method`` fold by fold on one cohort; ``run_fold`` = ``train_fold`` + test-set evaluation."""

    def __init__(
        self,
        cfg: TrainConfig,
        cohort: Cohort,
        out_dir: Path,
        device: str,
        manifest: Manifest | None = None,
        bags: BagTensors | None = None,
    ):
        self.cfg, self.cohort, self.out, self.device = cfg, cohort, out_dir, device
        self.manifest = m = manifest if manifest is not None else cohort.manifest
        self.ids = m.slide_ids
        self.pos = {sid: i for i, sid in enumerate(self.ids)}
        self.labels = m.labels
        self.classes = m.classes
        self.n_classes = len(m.classes)
        self.events = m.df["event"].to_numpy(dtype=np.float32) if cfg.task == "survival" else None
        self.times = m.df["time"].to_numpy(dtype=np.float32) if cfg.task == "survival" else None
        self.bags = bags if bags is not None else BagTensors(cohort, self.ids, pin_memory=device.startswith("cuda"))
        self.inst_labels = [cohort.bags[sid].instance_labels for sid in self.ids]
        self.method = create_method(cfg)
        self.method.prepare(m)
        self.hash = config_hash(cfg, {"classes": m.classes, "in_dim": cohort.in_dim})

    @property
    def slide_ids(self) -> list[str]:
        return self.ids

    # ------------------------------------------------------------------ one fold
    def train_fold(self, split: Split, progress, label: str = "") -> tuple[MILModel, Standardizer | None, list[dict]]:
        """Train on ``split`` (or load its checkpoint when the config hash matches); return the best model."""
        cfg = self.cfg
        ckpt_path = fold_checkpoint(self.out / "checkpoints", split.repeat, split.fold)
        ctx = self._context(split, progress)
        torch.manual_seed(ctx.seed)
        model = self.method.build(self.cohort.in_dim, self.n_classes).to(self.device)
        history: list[dict] = []
        task = progress.add_task(f"{label}repeat {split.repeat} fold {split.fold}", total=cfg.epochs, info="")
        try:
            if ckpt_path.is_file():
                ck = load_checkpoint(ckpt_path)
                if ck.get("config_hash") == self.hash:
                    model.load_state_dict(ck["state_dict"])
                    return model, Standardizer.from_state(ck.get("standardizer")), ck.get("history", [])
            self.method.setup(model, ctx)
            history = self._fit(model, ctx, progress, task)
            self._save_checkpoint(ckpt_path, model, ctx.standardizer, split, history)
            return model, ctx.standardizer, history
        finally:
            progress.remove_task(task)

    def run_fold(self, split: Split, progress) -> FoldResult:
        cfg = self.cfg
        model, std, history = self.train_fold(split, progress)
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
        risk = None
        if cfg.task == "survival":
            metrics, ci, risk = self._survival_metrics(te, pred, seed)
        else:
            metrics = classification_metrics(self.labels[te], pred.probs)
            ci = bootstrap_ci(self.labels[te], pred.probs, cfg.bootstrap, seed) if cfg.bootstrap else None
        if pred.instance_scores is not None:
            metrics["instance_auc"] = instance_auc(pred.instance_scores, [self.inst_labels[i] for i in te])
        heads = {}
        for head, probs in (pred.extra_probs or {}).items():
            y, _ = self.method.head_labels(head, [self.ids[i] for i in te], self.labels[te], self.classes)
            heads[head] = {"metrics": classification_metrics(y, probs)}
            if cfg.bootstrap:
                heads[head]["ci"] = bootstrap_ci(y, probs, cfg.bootstrap, seed)
        return FoldResult(split, pred.probs, metrics, ci, history, heads, risk)

    def _survival_metrics(self, te: np.ndarray, pred, seed: int) -> tuple[dict, dict | None, np.ndarray]:
        from wsimil.evaluation.survival import bootstrap_cindex, concordance_index, risk_from_logits

        risk = risk_from_logits(pred.logits)
        metrics = {"c_index": concordance_index(self.times[te], self.events[te], risk)}
        ci = None
        if self.cfg.bootstrap:
            ci = {"c_index": bootstrap_cindex(self.times[te], self.events[te], risk, self.cfg.bootstrap, seed)}
        return metrics, ci, risk

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
        if self.cfg.task == "survival":
            from wsimil.evaluation.survival import concordance_index, nll_survival_loss, risk_from_logits

            logits = torch.as_tensor(pv.logits)
            y, ev = torch.as_tensor(self.labels[va]), torch.as_tensor(self.events[va])
            c = concordance_index(self.times[va], self.events[va], risk_from_logits(pv.logits))
            # val_auc carries the c-index so that monitor: val_auc selects on it
            return {"val_loss": float(nll_survival_loss(logits, y, ev)), "val_auc": c}
        return {"val_loss": pv.loss, "val_auc": classification_metrics(self.labels[va], pv.probs)["auc"]}

    def _fit(self, model: MILModel, ctx: FoldContext, progress, task) -> list[dict]:
        cfg, method, split = self.cfg, self.method, ctx.split
        opt = _optimizer(cfg, method.parameters(model))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs) if cfg.scheduler == "cosine" else None
        gen = torch.Generator().manual_seed(ctx.seed)
        best_state, best_score, best_epoch, bad_epochs = None, math.inf, -1, 0
        history = []
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            model.train()
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
        if best_state is not None:
            model.load_state_dict(best_state)
            for row in history:
                row["best"] = row["epoch"] == best_epoch
        return history

    def _save_checkpoint(self, path: Path, model, std, split: Split, history: list[dict]) -> None:
        ck = {
            "model": self.cfg.model,
            "model_kwargs": self.cfg.model_kwargs,
            "method": self.cfg.method,
            "method_kwargs": self.cfg.method_kwargs,
            "method_state": self.method.state(),
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
        new = path.with_suffix(SUFFIX)
        save_checkpoint(new, ck)
        if path != new:  # a wsimil 0.1 checkpoint of this fold was retrained: keep one file per fold
            path.unlink(missing_ok=True)


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


def load_model(ckpt_path: str | Path, device: str = "cpu") -> tuple[MILModel, dict]:
    """Rebuild a fold's model from its checkpoint; returns ``(model, checkpoint dict)``. The file is read without
    unpickling (:func:`wsimil.checkpoint.load_checkpoint`)."""
    ck = load_checkpoint(ckpt_path)
    cfg = TrainConfig(
        model=ck["model"],
        model_kwargs=ck.get("model_kwargs", {}),
        method=ck.get("method", "supervised"),
        method_kwargs=ck.get("method_kwargs", {}),
        task=ck.get("task", "classification"),
    )
    method = create_method(cfg)
    method.restore(ck.get("method_state") or {})
    model = method.build(ck["in_dim"], ck["n_classes"])
    model.load_state_dict(ck["state_dict"])
    return model.to(device).eval(), ck


def run_training(cfg: TrainConfig, features: str | Path, manifest: str | Path, out: str | Path) -> dict:
    """Train ``cfg.model`` with ``cfg.method`` over the configured folds; write the run folder; return results."""
    out = Path(out)
    device = resolve_device(cfg.device)
    label_column = cfg.label_column
    if label_column == "label" and create_method(cfg).label_column:
        label_column = create_method(cfg).label_column
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
    # fail on bad model or method options now, not after a fold of training
    trainer = Trainer(cfg, cohort, out, device, man)
    trainer.method.build(cohort.in_dim, len(man.classes))
    out.mkdir(parents=True, exist_ok=True)
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
    write_yaml(out / "config.yaml", resolved)
    results: list[FoldResult] = []
    console.print(
        f"Training [bold]{cfg.model}[/] ({cfg.method}) on {len(man.slide_ids)} slides, "
        f"{len(splits)} split(s), device {device} → {out}"
    )
    with make_progress() as progress:
        overall = progress.add_task("folds", total=len(splits), info="")
        key = "c_index" if cfg.task == "survival" else "auc"
        for s in splits:
            results.append(trainer.run_fold(s, progress))
            last = _nan_to(results[-1].metrics[key], float("nan"))
            progress.update(overall, advance=1, info=f"last test {key.replace('_', '-')} {last:.3f}")

    rows = []
    for r in results:
        for j, (sid, p) in enumerate(zip(r.split.test, r.probs, strict=True)):
            i = trainer.pos[sid]
            row = {"slide_id": sid, "repeat": r.split.repeat, "fold": r.split.fold}
            if cfg.task == "survival":
                row.update(time=float(trainer.times[i]), event=int(trainer.events[i]), risk=float(r.risk[j]))
            else:
                row["label"] = man.classes[int(trainer.labels[i])]
            rows.append({**row, **{f"prob_{c}": float(v) for c, v in zip(man.classes, p, strict=True)}})
    write_csv(out / "predictions.csv", pd.DataFrame(rows))
    write_csv(out / "history.csv", pd.DataFrame([h for r in results for h in r.history]))
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
    if cfg.task != "survival" and cfg.bootstrap:  # folds too small for a CI of their own still pool into one
        te = np.array([trainer.pos[s] for r in results for s in r.split.test], dtype=int)
        reps = np.concatenate([np.full(len(r.split.test), r.split.repeat) for r in results])
        probs = np.concatenate([r.probs for r in results])
        payload["pooled"] = pooled_oof(trainer.labels[te], probs, reps, cfg.bootstrap, cfg.seed)
    primary = getattr(trainer.method, "primary_head", None)  # e.g. HMIL: "metrics" are the fine level's
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
    payload = nan_to_none(payload)
    write_json(out / "results.json", payload)
    from wsimil.predict.write import bundle_from_run

    bundle_from_run(out)  # RUN/bundle/: everything `wsimil predict` needs (wsimil.bundle)
    return payload
