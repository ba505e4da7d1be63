"""Evaluation plots as PNG bytes (matplotlib, Agg backend): ROC and precision–recall curves, confusion matrix,
reliability (calibration) diagram, training curves, timing bars.

Binary tasks plot the positive class (the second class), one thin curve per fold and the pooled out-of-fold curve
in bold; multi-class tasks plot one pooled one-vs-rest curve per class. Calibration bins predicted probabilities
into equal-width bins and plots the observed frequency against the mean prediction of each bin (binary: the
positive class; multi-class: the top-label confidence against top-label accuracy).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def fig_png(fig, dpi: int = 110) -> bytes:
    """Render and close a figure; PNG bytes."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _binary_curves(y, score, folds, kind: str):
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    def one(yy, ss):
        if len(np.unique(yy)) < 2:
            return None
        if kind == "roc":
            fpr, tpr, _ = roc_curve(yy, ss)
            return fpr, tpr, auc(fpr, tpr)
        prec, rec, _ = precision_recall_curve(yy, ss)
        return rec, prec, average_precision_score(yy, ss)

    per_fold = []
    for f in np.unique(folds):
        m = folds == f
        if (c := one(y[m], score[m])) is not None:
            per_fold.append((f, c))
    return per_fold, one(y, score)


def curve_png(y: np.ndarray, probs: np.ndarray, classes: list[str], folds: np.ndarray, kind: str = "roc") -> bytes:
    """ROC (``kind="roc"``) or precision–recall (``"pr"``) curves of out-of-fold predictions."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    y, probs, folds = np.asarray(y), np.asarray(probs), np.asarray(folds)
    stat = "AUC" if kind == "roc" else "AP"
    if len(classes) == 2:
        per_fold, pooled = _binary_curves(y == 1, probs[:, 1], folds, kind)
        for f, (a, b, _) in per_fold:
            ax.plot(a, b, lw=0.8, alpha=0.45, label=f"fold {f}" if len(per_fold) <= 10 else None)
        if pooled is not None:
            a, b, v = pooled
            ax.plot(a, b, lw=2.2, color="black", label=f"pooled ({stat} {v:.3f})")
        title = f"positive class {classes[1]!r}"
    else:
        for c, name in enumerate(classes):
            _, pooled = _binary_curves(y == c, probs[:, c], np.zeros(len(y)), kind)
            if pooled is not None:
                a, b, v = pooled
                ax.plot(a, b, lw=1.6, label=f"{name} ({stat} {v:.3f})")
        title = "one-vs-rest, pooled out-of-fold"
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC — {title}")
    else:
        ax.set(xlabel="recall", ylabel="precision", title=f"Precision–recall — {title}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
    return fig_png(fig)


def confusion_matrix_png(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> bytes:
    """Counts of (true, predicted) class with each row's share in brackets."""
    plt = _plt()
    k = len(classes)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (np.asarray(y), np.asarray(pred)), 1)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * k, 1.0 + 0.8 * k))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n({share[i, j]:.0%})", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(k), classes, rotation=30 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (out-of-fold)")
    ax.title.set_fontsize(9)
    return fig_png(fig)


def calibration_bins(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Reliability table: per equal-width bin of the confidence, ``mean_pred``, ``observed`` and ``n``. Binary: the
    positive-class probability against the positive rate; multi-class: top-label confidence against accuracy."""
    y, probs = np.asarray(y), np.asarray(probs)
    if probs.shape[1] == 2:
        conf, hit = probs[:, 1], (y == 1).astype(float)
    else:
        conf, hit = probs.max(1), (probs.argmax(1) == y).astype(float)
    b = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    rows = [
        {"bin": i, "mean_pred": conf[b == i].mean(), "observed": hit[b == i].mean(), "n": int((b == i).sum())}
        for i in range(n_bins)
        if (b == i).any()
    ]
    return pd.DataFrame(rows, columns=["bin", "mean_pred", "observed", "n"])


def calibration_png(y: np.ndarray, probs: np.ndarray, classes: list[str], n_bins: int = 10) -> bytes:
    """Reliability diagram with the expected calibration error (ECE: bin-size-weighted |observed − predicted|)."""
    plt = _plt()
    t = calibration_bins(y, probs, n_bins)
    ece = float((t["n"] * (t["observed"] - t["mean_pred"]).abs()).sum() / max(t["n"].sum(), 1))
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="perfect calibration")
    ax.plot(t["mean_pred"], t["observed"], marker="o", lw=1.6, label=f"model (ECE {ece:.3f})")
    for _, r in t.iterrows():
        ax.annotate(str(int(r["n"])), (r["mean_pred"], r["observed"]), fontsize=6, xytext=(3, -8),
                    textcoords="offset points")  # fmt: skip
    what = f"P({classes[1]})" if len(classes) == 2 else "top-label confidence"
    ax.set(xlabel=f"mean predicted {what}", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("Calibration (out-of-fold; n per bin)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return fig_png(fig)


def history_png(history: pd.DataFrame) -> bytes | None:
    """Training loss, validation loss and validation AUC per epoch, one line per fold."""
    cols = [c for c in ("train_loss", "val_loss", "val_auc") if c in history.columns]
    if not cols or history.empty:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(cols), figsize=(3.4 * len(cols), 2.8), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        for (r, f), g in history.groupby(["repeat", "fold"]):
            ax.plot(g["epoch"], g[col], lw=1, label=f"r{r} f{f}")
        ax.set(xlabel="epoch", title=col.replace("_", " "))
        ax.title.set_fontsize(9)
    if history.groupby(["repeat", "fold"]).ngroups <= 10:
        axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    return fig_png(fig)


def timing_png(seconds: dict[str, float]) -> bytes:
    """Horizontal bars of seconds per slide."""
    plt = _plt()
    names = list(seconds)
    fig, ax = plt.subplots(figsize=(5.5, 0.5 + 0.45 * len(names)))
    ax.barh(names, [seconds[n] for n in names], color="#4477aa")
    for i, n in enumerate(names):
        ax.text(seconds[n], i, f" {seconds[n]:.3g} s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per slide")
    ax.set_xlim(0, max(seconds.values()) * 1.25 if seconds else 1)
    return fig_png(fig)
