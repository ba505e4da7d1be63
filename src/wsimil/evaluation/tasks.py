"""The learning task of a run (``TrainConfig.task``): what a label is, the bag loss, and how predictions are scored.

The trainer and the methods ask the task; nothing else branches on classification vs survival.

- ``classification``: labels are class indices; loss = cross-entropy; validation ``val_loss`` = cross-entropy,
  ``val_auc`` = AUC; test metrics :func:`~wsimil.evaluation.metrics.classification_metrics` with bootstrap CIs.
- ``survival`` (discrete time, :mod:`wsimil.evaluation.survival`): labels are quantile time bins with ``event`` and
  ``time`` beside them; loss = the hazards' NLL; ``val_auc`` carries the c-index (so ``monitor: val_auc`` selects on
  it); test metric ``c_index`` with a bootstrap CI and a per-slide risk ``−Σ_k S_k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsimil.errors import WsimilError, problems_error
from wsimil.evaluation import survival as surv
from wsimil.evaluation.metrics import bootstrap_ci, classification_metrics, pooled_oof

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

    from wsimil.evaluation.predict import Predictions


@dataclass(frozen=True)
class Targets:
    """What a model is trained and scored against, per slide of a manifest (rows in manifest order).

    ``labels`` ``(n,)`` class indices (survival: time bins); ``events``/``times`` ``(n,)`` (survival only)."""

    labels: np.ndarray
    events: np.ndarray | None = None
    times: np.ndarray | None = None


@dataclass
class TestScores:
    """A fold's test-set scores: ``metrics``, their bootstrap CIs (or ``None``) and, for survival, the risks."""

    metrics: dict[str, float]
    ci: dict | None
    risk: np.ndarray | None = None


class Task:
    """One learning task; stateless (one shared instance per name, :func:`get_task`)."""

    name = "base"
    #: the metric that summarises a fold in progress lines
    primary_metric = "auc"
    #: whether the supervised losses add the backbone's own auxiliary terms (e.g. CLAM's instance loss)
    uses_model_aux_losses = True

    def risk(self, logits: np.ndarray) -> np.ndarray | None:
        """A risk score per bag from its logits (survival), ``None`` where the task has none."""
        return None

    def label_columns(self, label_column: str) -> tuple[str, ...]:
        """The manifest columns this task reads its labels from."""
        return (label_column,)

    def read_labels(self, df: pd.DataFrame, label_column: str, classes: list[str] | None, bins: int, path: Path,
                    problems: list[str]) -> tuple[pd.DataFrame, list[str]]:  # fmt: skip
        """Check the label columns of manifest ``df`` (string columns; ``problems`` holds the other rows' problems)
        and add the class index column ``y``; returns ``(df, class names)`` or raises one error listing every
        problem."""
        raise NotImplementedError

    def targets(self, df: pd.DataFrame, labels: np.ndarray) -> Targets:
        """The targets of a validated manifest table ``df`` whose class indices are ``labels``."""
        return Targets(np.asarray(labels))

    def batch_extras(self, targets: Targets, idx: np.ndarray, device: str) -> dict[str, Tensor]:
        """Per-bag tensors a batch carries besides ``y`` (``Batch.event``/``Batch.time`` for survival)."""
        return {}

    def loss(self, logits: Tensor, y: Tensor, event: Tensor | None = None) -> Tensor:
        """The bag loss of ``logits (B, C)`` against ``y (B,)``."""
        raise NotImplementedError

    def validation(self, targets: Targets, idx: np.ndarray, pred: Predictions) -> dict[str, float]:
        """``{"val_loss", "val_auc"}`` of the validation bags at positions ``idx``."""
        raise NotImplementedError

    def test_scores(self, targets: Targets, idx: np.ndarray, pred: Predictions, n_boot: int, seed: int) -> TestScores:
        raise NotImplementedError

    def prediction_row(self, targets: Targets, i: int, classes: list[str], risk: float | None) -> dict[str, Any]:
        """The task's columns of slide ``i`` in ``predictions.csv`` (before the ``prob_<class>`` columns)."""
        raise NotImplementedError

    def pooled(self, targets: Targets, idx: np.ndarray, probs: np.ndarray, repeats: np.ndarray, n_boot: int,
               seed: int) -> list[dict] | None:  # fmt: skip
        """Pooled out-of-fold metrics with CIs per repeat (``results.json`` ``pooled``), or ``None``."""
        return None


class Classification(Task):
    name = "classification"

    def read_labels(self, df: pd.DataFrame, label_column: str, classes: list[str] | None, bins: int, path: Path,
                    problems: list[str]) -> tuple[pd.DataFrame, list[str]]:  # fmt: skip
        """Labels are class names; ``classes`` fixes their order (and rejects others), by default the sorted
        distinct labels (numerically if they are all numbers)."""
        missing = [lab == "" or lab.lower() == "nan" for lab in df[label_column]]
        for i, (sid, miss) in enumerate(zip(df["slide_id"], missing, strict=True)):
            if miss:
                problems.append(f"slide {sid!r} (row {i + 2}): missing {label_column}")
        if classes is None:
            classes = _sort_classes(sorted({v for v, m in zip(df[label_column], missing, strict=True) if not m}))
        else:
            classes = [str(c) for c in classes]
            for i, (sid, lab) in enumerate(zip(df["slide_id"], df[label_column], strict=True)):
                if lab and lab.lower() != "nan" and lab not in classes:
                    problems.append(
                        f"slide {sid!r} (row {i + 2}): unknown {label_column} {lab!r}; expected one of {classes}"
                    )
        if problems:
            raise problems_error(f"manifest {path} is invalid", problems)
        if len(classes) < 2:
            raise WsimilError(
                f"manifest {path}: column {label_column!r} has a single class {classes}; training needs at least two"
            )
        index = {c: i for i, c in enumerate(classes)}
        df["y"] = [index[v] for v in df[label_column]]
        return df, classes

    def loss(self, logits: Tensor, y: Tensor, event: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits, y)

    def validation(self, targets: Targets, idx: np.ndarray, pred: Predictions) -> dict[str, float]:
        return {"val_loss": pred.loss, "val_auc": classification_metrics(targets.labels[idx], pred.probs)["auc"]}

    def test_scores(self, targets: Targets, idx: np.ndarray, pred: Predictions, n_boot: int, seed: int) -> TestScores:
        y = targets.labels[idx]
        metrics = classification_metrics(y, pred.probs)
        return TestScores(metrics, bootstrap_ci(y, pred.probs, n_boot, seed) if n_boot else None)

    def prediction_row(self, targets: Targets, i: int, classes: list[str], risk: float | None) -> dict[str, Any]:
        return {"label": classes[int(targets.labels[i])]}

    def pooled(self, targets: Targets, idx: np.ndarray, probs: np.ndarray, repeats: np.ndarray, n_boot: int,
               seed: int) -> list[dict] | None:  # fmt: skip
        # folds too small for a CI of their own still pool into one
        return pooled_oof(targets.labels[idx], probs, repeats, n_boot, seed) if n_boot else None


class Survival(Task):
    name = "survival"
    primary_metric = "c_index"
    uses_model_aux_losses = False

    def label_columns(self, label_column: str) -> tuple[str, ...]:
        return ("time", "event")

    def risk(self, logits: np.ndarray) -> np.ndarray:
        return surv.risk_from_logits(logits)

    def read_labels(self, df: pd.DataFrame, label_column: str, classes: list[str] | None, bins: int, path: Path,
                    problems: list[str]) -> tuple[pd.DataFrame, list[str]]:  # fmt: skip
        """``time,event`` → ``y`` = the quantile time bin, classes ``bin0…`` (:func:`add_survival_columns`)."""
        if problems:
            raise problems_error(f"manifest {path} is invalid", problems)
        return surv.add_survival_columns(df, bins, path)

    def targets(self, df: pd.DataFrame, labels: np.ndarray) -> Targets:
        missing = [c for c in ("event", "time") if c not in df.columns]
        if missing:
            raise WsimilError(f"task survival needs manifest columns time,event; missing {', '.join(missing)}")
        return Targets(
            np.asarray(labels), df["event"].to_numpy(dtype=np.float32), df["time"].to_numpy(dtype=np.float32)
        )

    def batch_extras(self, targets: Targets, idx: np.ndarray, device: str) -> dict[str, Tensor]:
        return {
            "event": torch.as_tensor(targets.events[idx], dtype=torch.float32, device=device),
            "time": torch.as_tensor(targets.times[idx], dtype=torch.float32, device=device),
        }

    def loss(self, logits: Tensor, y: Tensor, event: Tensor | None = None) -> Tensor:
        if event is None:
            raise ValueError("the survival loss needs the event indicator of each bag")
        return surv.nll_survival_loss(logits, y, event)

    def validation(self, targets: Targets, idx: np.ndarray, pred: Predictions) -> dict[str, float]:
        logits = torch.as_tensor(pred.logits)
        y, ev = torch.as_tensor(targets.labels[idx]), torch.as_tensor(targets.events[idx])
        c = surv.concordance_index(targets.times[idx], targets.events[idx], self.risk(pred.logits))
        return {"val_loss": float(surv.nll_survival_loss(logits, y, ev)), "val_auc": c}

    def test_scores(self, targets: Targets, idx: np.ndarray, pred: Predictions, n_boot: int, seed: int) -> TestScores:
        t, e = targets.times[idx], targets.events[idx]
        risk = self.risk(pred.logits)
        ci = {"c_index": surv.bootstrap_cindex(t, e, risk, n_boot, seed)} if n_boot else None
        return TestScores({"c_index": surv.concordance_index(t, e, risk)}, ci, risk)

    def prediction_row(self, targets: Targets, i: int, classes: list[str], risk: float | None) -> dict[str, Any]:
        return {"time": float(targets.times[i]), "event": int(targets.events[i]), "risk": float(risk)}


def _sort_classes(values: list[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


_TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Survival())}


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise WsimilError(f"unknown task {name!r}; available: {', '.join(list_tasks())}")
    return _TASKS[name]
