"""The slide-sized feature-bag generator: sizes, composition, labels and difficulty as documented."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wsimil.data.slide_bags import (
    SlideBagSpec,
    make_hierarchical_slide_bags,
    make_slide_bags,
    make_survival_slide_bags,
)
from wsimil.data.synthetic import write_bags
from wsimil.evaluation.metrics import binary_auc

SMALL = SlideBagSpec(dim=32, min_instances=300, max_instances=900)


@pytest.fixture(scope="module")
def bags():
    return make_slide_bags(60, SMALL, seed=0)


def test_sizes_labels_and_size_classes(bags):
    n = np.array([b.columns["n_instances"] for b in bags])
    assert ((n >= 300) & (n <= 900)).all() and all(len(b.features) == k for b, k in zip(bags, n, strict=True))
    assert sum(b.label for b in bags) == 30
    for b in bags:
        k = int(b.instance_labels.sum())
        assert b.columns["tumour_share"] == pytest.approx(k / len(b.features), abs=1e-6)
        cls = b.columns["size_class"]
        assert (cls == "negative") == (b.label == 0) == (k == 0)
        if cls == "itc":
            assert 1 <= k <= 2
        elif cls == "micro":
            assert k >= 3 and k / len(b.features) <= 0.06
        elif cls == "macro":
            assert 0.04 <= k / len(b.features) <= 0.31
        assert len(np.unique(b.coords, axis=0)) == len(b.coords)  # one patch per grid cell
    classes = {b.columns["size_class"] for b in bags}
    assert {"macro", "micro", "itc", "negative"} <= classes


def test_deterministic_per_seed():
    a, b = make_slide_bags(4, SMALL, seed=3), make_slide_bags(4, SMALL, seed=3)
    assert all(np.array_equal(x.features, y.features) for x, y in zip(a, b, strict=True))
    c = make_slide_bags(4, SMALL, seed=4)
    assert not np.array_equal(a[0].features[:10], c[0].features[:10])


def test_tumour_is_a_spatial_focus(bags):
    """Tumour patches lie together: their mean distance to the focus centroid is far below that of random
    patches of the same bag."""
    for b in (b for b in bags if b.columns["size_class"] in ("macro", "micro")):
        t = b.coords[b.instance_labels == 1].astype(float)
        spread_t = np.linalg.norm(t - t.mean(0), axis=1).mean()
        all_ = b.coords.astype(float)
        assert spread_t < 0.7 * np.linalg.norm(all_ - all_.mean(0), axis=1).mean()  # a 30% disc: ~0.55


def test_difficulty_mean_pooling_fails_max_of_tumour_direction_works(bags):
    """Bag means do not separate positives (tumour is a few % of a bag); the bag's most tumour-like patch does."""
    y = np.array([b.label for b in bags])
    X = np.concatenate([b.features for b in bags])
    yi = np.concatenate([b.instance_labels for b in bags])
    w = X[yi == 1].mean(0) - X[yi == 0].mean(0)  # the oracle instance direction
    mean_score = np.array([b.features.mean(0) @ w for b in bags])
    max_score = np.array([(b.features @ w).max() for b in bags])
    assert binary_auc(y, mean_score) < 0.8 < binary_auc(y, max_score)
    # hard negatives: a mimic focus makes a negative slide's most tumour-like patch more tumour-like
    mimic = np.array([b.columns["has_mimic"] for b in bags], dtype=bool)
    neg = y == 0
    assert (neg & mimic).any() and (neg & ~mimic).any()
    assert max_score[neg & mimic].mean() > max_score[neg & ~mimic].mean()


def test_hierarchical_and_survival_variants(tmp_path):
    h = make_hierarchical_slide_bags(12, SMALL, n_fine=3, seed=1)
    assert sorted({b.label for b in h}) == ["c0f0", "c0f1", "c0f2", "c1f0", "c1f1", "c1f2"]
    assert all(b.columns["coarse_label"] == b.label[:2] and b.instance_labels.sum() > 0 for b in h)
    s = make_survival_slide_bags(20, SMALL, seed=1)
    assert all({"time", "event"} <= set(b.columns) and b.columns["time"] > 0 for b in s)
    m = pd.read_csv(write_bags(h, tmp_path / "h"))
    assert {"fine_label", "coarse_label", "size_class", "tumour_share"} <= set(m.columns)
    import h5py

    with h5py.File(tmp_path / "h" / "features" / f"{h[0].slide_id}.h5") as f:
        assert f["coords"].shape == (len(h[0].features), 2) and "instance_labels" in f
