import math

import numpy as np
import pytest

from wsimil.evaluation.metrics import (
    bootstrap_ci,
    classification_metrics,
    instance_auc,
    nan_to_none,
    pooled_oof,
    summarize,
    summarize_repeats,
    too_small_for_ci,
)


def test_binary_metrics_hand_computed():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9])  # one positive ranked below one negative: AUC 3/4
    m = classification_metrics(y, np.stack([1 - p1, p1], 1))
    assert m["auc"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.5)  # predictions 0,1,0,1
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["f1_macro"] == pytest.approx(0.5)


def test_multiclass_auc_is_ovr_macro():
    y = np.array([0, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    assert classification_metrics(y, p)["auc"] == pytest.approx(1.0)
    p[3] = [0.1, 0.1, 0.8]
    assert classification_metrics(y, p)["accuracy"] == 1.0


def test_auc_undefined_with_one_class():
    m = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert math.isnan(m["auc"])
    assert nan_to_none(m)["auc"] is None


def test_bootstrap_ci_brackets_the_value():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(y * 0.3 + rng.uniform(0, 0.7, 200), 0, 1)
    ci = bootstrap_ci(y, np.stack([1 - p1, p1], 1), n_boot=300, seed=1)
    for v in ci.values():
        assert v["ci_low"] <= v["value"] <= v["ci_high"]
    assert ci["auc"]["ci_high"] - ci["auc"]["ci_low"] < 0.2


def test_instance_auc_normalises_within_bags():
    # bag 1 scores are on a larger scale; after per-bag min-max both bags rank perfectly
    scores = [np.array([10.0, 20.0, 30.0]), np.array([0.1, 0.3])]
    labels = [np.array([0, 0, 1]), np.array([0, 1])]
    assert instance_auc(scores, labels) == pytest.approx(1.0)
    assert math.isnan(instance_auc(scores, [np.array([-1, -1, -1]), np.array([-1, -1])]))  # all unknown


def test_summaries():
    folds = [{"acc": 0.8}, {"acc": 0.9}, {"acc": 0.6}, {"acc": 0.7}]
    s = summarize(folds)
    assert s["acc"]["mean"] == pytest.approx(0.75) and s["acc"]["std"] == pytest.approx(np.std([0.8, 0.9, 0.6, 0.7]))
    r = summarize_repeats(folds, [0, 0, 1, 1])
    assert r["acc"]["mean"] == pytest.approx(0.75) and r["acc"]["std"] == pytest.approx(0.1)
    assert r["acc"]["sem"] == pytest.approx(0.1)


@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_metrics_match_scikit_learn(n_classes):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(n_classes)
    for trial in range(20):
        n = int(rng.integers(5, 40))
        y = rng.integers(0, n_classes, n)
        y[:n_classes] = np.arange(n_classes)  # every class present
        p = rng.dirichlet(np.ones(n_classes), n)
        if trial % 3 == 0:
            p = np.round(p, 1) + 1e-9  # ties
            p /= p.sum(1, keepdims=True)
        m = classification_metrics(y, p)
        pred = p.argmax(1)
        ref_auc = (
            roc_auc_score(y, p[:, 1]) if n_classes == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
        )
        assert m["auc"] == pytest.approx(ref_auc)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        labels = list(range(n_classes))
        assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", labels=labels, zero_division=0))
        assert m["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted", labels=labels, zero_division=0))


def test_bootstrap_ci_refuses_folds_too_small_to_have_one():
    """2 slides of each class: every resample that has both classes ranks them perfectly, so a percentile CI would
    read AUC [1, 1]; instead the interval is missing and marked too small, and the point value stays."""
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.2, 0.8, 0.9])
    ci = bootstrap_ci(y, np.stack([1 - p1, p1], 1), n_boot=100)
    assert ci["auc"]["value"] == 1.0 and ci["auc"]["too_small"] is True
    assert math.isnan(ci["auc"]["ci_low"]) and math.isnan(ci["auc"]["ci_high"])
    assert too_small_for_ci(np.array([0] * 5 + [1] * 4), 2) and not too_small_for_ci(np.array([0] * 5 + [1] * 5), 2)
    assert too_small_for_ci(np.array([0] * 9), 2)  # a class absent
    assert "too_small" not in bootstrap_ci(y, np.stack([1 - p1, p1], 1), n_boot=20, min_per_class=2)["auc"]


def test_pooled_oof_gives_an_interval_per_repeat():
    rng = np.random.default_rng(0)
    y = np.tile(np.repeat([0, 1], 10), 2)  # two repeats of the same 20 slides
    p1 = np.clip(y * 0.4 + rng.uniform(0, 0.6, 40), 0, 1)
    out = pooled_oof(y, np.stack([1 - p1, p1], 1), np.repeat([0, 1], 20), n_boot=100)
    assert [(r["repeat"], r["n"]) for r in out] == [(0, 20), (1, 20)]
    for r, sl in zip(out, (slice(0, 20), slice(20, 40)), strict=True):
        auc = r["metrics"]["auc"]
        assert auc["value"] == pytest.approx(classification_metrics(y[sl], np.stack([1 - p1, p1], 1)[sl])["auc"])
        assert auc["ci_low"] <= auc["value"] <= auc["ci_high"] and "too_small" not in auc
