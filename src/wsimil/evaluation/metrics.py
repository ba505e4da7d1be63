"""Slide-level classification metrics, bootstrap confidence intervals and instance-level AUC.

AUC is the positive-class probability's ROC AUC for two classes and the one-vs-rest macro AUC otherwise.
Metrics that are undefined on a set (AUC with one class present) are ``NaN`` and written as ``null``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted")


def auc(y: np.ndarray, probs: np.ndarray) -> float:
    n_classes = probs.shape[1]
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    if len(present) < n_classes:  # one-vs-rest macro over the classes that occur
        scores = [roc_auc_score(y == c, probs[:, c]) for c in present]
        return float(np.mean(scores))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(n_classes))))


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``y (n,)`` class indices, ``probs (n, C)`` → ``{auc, accuracy, balanced_accuracy, f1_macro, f1_weighted}``."""
    y = np.asarray(y)
    pred = probs.argmax(1)
    labels = list(range(probs.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "auc": auc(y, probs),
            "accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "f1_macro": float(f1_score(y, pred, average="macro", labels=labels, zero_division=0)),
            "f1_weighted": float(f1_score(y, pred, average="weighted", labels=labels, zero_division=0)),
        }


def bootstrap_ci(y: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, dict[str, float]]:
    """Percentile bootstrap over slides: ``{metric: {"value", "ci_low", "ci_high"}}``."""
    point = classification_metrics(y, probs)
    rng = np.random.default_rng(seed)
    n = len(y)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for k, v in classification_metrics(y[idx], probs[idx]).items():
            if not math.isnan(v):
                samples[k].append(v)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for k, v in point.items():
        s = samples[k]
        out[k] = {"value": v,
                  "ci_low": float(np.percentile(s, lo)) if s else float("nan"),
                  "ci_high": float(np.percentile(s, hi)) if s else float("nan")}
    return out


def instance_auc(scores: list[np.ndarray], labels: list[np.ndarray]) -> float:
    """AUC of instance scores against instance labels pooled over bags (labels −1 are ignored).

    Scores are min–max normalised within each bag first, because attention is only comparable within a bag (the
    same convention WENO uses to score attention baselines)."""
    s_all, y_all = [], []
    for s, lab in zip(scores, labels, strict=True):
        s = np.asarray(s, dtype=np.float64)
        keep = (np.asarray(lab) >= 0) & np.isfinite(s)
        if not keep.any():
            continue
        finite = s[np.isfinite(s)]
        lo, hi = finite.min(), finite.max()
        s = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
        s_all.append(s[keep])
        y_all.append(np.asarray(lab)[keep])
    if not s_all:
        return float("nan")
    y = np.concatenate(y_all)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.concatenate(s_all)))


def summarize(fold_metrics: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation (ddof=0, NaN-ignoring) of each metric across folds."""
    keys = sorted({k for m in fold_metrics for k in m})
    out = {}
    for k in keys:
        vals = np.array([m.get(k, float("nan")) for m in fold_metrics], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        out[k] = {"mean": float(vals.mean()) if len(vals) else float("nan"),
                  "std": float(vals.std()) if len(vals) else float("nan")}
    return out


def nan_to_none(obj):
    """Replace NaN floats with None, recursively, so results are valid JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_none(v) for v in obj]
    return obj
