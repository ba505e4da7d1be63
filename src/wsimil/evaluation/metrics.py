"""Slide-level classification metrics, bootstrap confidence intervals and instance-level AUC.

AUC is the positive-class probability's ROC AUC for two classes and the one-vs-rest macro AUC otherwise.
Metrics that are undefined on a set (AUC with one class present) are ``NaN`` and written as ``null``. A bootstrap
CI needs at least :data:`MIN_PER_CLASS` slides of every class: below that the resamples hold one or two slides of a
class and their percentiles say nothing (a 4-slide fold reads AUC [1, 1]), so the interval is ``null`` with
``"too_small": true``; pool the out-of-fold predictions (:func:`pooled_oof`) for an interval instead.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted")
#: fewest slides of each class for which a bootstrap CI is computed
MIN_PER_CLASS = 5


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC via the Mann–Whitney statistic (ties count one half); ``NaN`` if one class is absent."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Positive-class AUC for two classes; one-vs-rest macro AUC over the classes present otherwise."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return binary_auc(y == 1, probs[:, 1])
    return float(np.mean([binary_auc(y == c, probs[:, c]) for c in np.unique(y)]))


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``y (n,)`` class indices, ``probs (n, C)`` → ``{auc, accuracy, balanced_accuracy, f1_macro, f1_weighted}``.

    Balanced accuracy averages recall over the classes present in ``y``; F1 averages over all ``C`` classes
    (macro) or weights by support (weighted), with F1 = 0 for a class never predicted nor present (scikit-learn's
    ``zero_division=0``)."""
    y = np.asarray(y, dtype=np.int64)
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    cm = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    present = support > 0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "auc": auc(y, probs),
        "accuracy": float(tp.sum() / max(len(y), 1)),
        "balanced_accuracy": float((tp[present] / support[present]).mean()) if present.any() else float("nan"),
        "f1_macro": float(f1.mean()),
        "f1_weighted": float((f1 * support).sum() / support.sum()) if support.sum() else float("nan"),
    }


def too_small_for_ci(y: np.ndarray, n_classes: int, min_per_class: int = MIN_PER_CLASS) -> bool:
    """Whether some class has fewer than ``min_per_class`` slides in ``y`` (class indices ``0…n_classes−1``)."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes)
    return bool((counts < min_per_class).any())


def bootstrap_ci(
    y: np.ndarray,
    probs: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    min_per_class: int = MIN_PER_CLASS,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap over slides: ``{metric: {"value", "ci_low", "ci_high"}}``; when a class has fewer than
    ``min_per_class`` slides, ``ci_low``/``ci_high`` are ``NaN`` and ``"too_small": True``."""
    point = classification_metrics(y, probs)
    if too_small_for_ci(y, probs.shape[1], min_per_class):
        nan = float("nan")
        return {k: {"value": v, "ci_low": nan, "ci_high": nan, "too_small": True} for k, v in point.items()}
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
        out[k] = {
            "value": v,
            "ci_low": float(np.percentile(s, lo)) if s else float("nan"),
            "ci_high": float(np.percentile(s, hi)) if s else float("nan"),
        }
    return out


def pooled_oof(y: np.ndarray, probs: np.ndarray, repeats: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Metrics of the out-of-fold predictions pooled over the folds of each repeat (every slide once), with
    bootstrap CIs over slides: ``[{"repeat", "n", "metrics": {metric: {"value", "ci_low", "ci_high"}}}]``.

    Pooling mixes fold models whose scores need not be on one scale, so a pooled AUC can sit below the mean of the
    per-fold AUCs; it is the interval that small folds cannot give."""
    y, probs, repeats = np.asarray(y), np.asarray(probs), np.asarray(repeats)
    out = []
    for r in sorted(set(repeats.tolist())):
        m = repeats == r
        out.append({"repeat": int(r), "n": int(m.sum()), "metrics": bootstrap_ci(y[m], probs[m], n_boot, seed)})
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
    return binary_auc(np.concatenate(y_all) == 1, np.concatenate(s_all))


def summarize(fold_metrics: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation (ddof=0, NaN-ignoring) of each metric across folds."""
    keys = sorted({k for m in fold_metrics for k in m})
    out = {}
    for k in keys:
        vals = np.array([m.get(k, float("nan")) for m in fold_metrics], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        out[k] = {
            "mean": float(vals.mean()) if len(vals) else float("nan"),
            "std": float(vals.std()) if len(vals) else float("nan"),
        }
    return out


def summarize_repeats(fold_metrics: list[dict[str, float]], repeats: list[int]) -> dict[str, dict[str, float]]:
    """Average folds within each repeat, then mean, std and standard error of the mean across repeats (the
    statistic Ilse et al. 2018 report for the classic MIL benchmarks)."""
    per_repeat = []
    for r in sorted(set(repeats)):
        per_repeat.append(
            {
                k: v["mean"]
                for k, v in summarize([m for m, rr in zip(fold_metrics, repeats, strict=True) if rr == r]).items()
            }
        )
    out = summarize(per_repeat)
    for v in out.values():
        v["sem"] = v["std"] / math.sqrt(max(len(per_repeat) - 1, 1)) if not math.isnan(v["std"]) else float("nan")
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
