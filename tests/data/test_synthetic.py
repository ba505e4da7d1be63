import numpy as np
import pytest

from wsimil.data.synthetic import make_digit_bags, make_unit_test_bags, unit_test_concepts


def test_digit_bags_labels_follow_instances():
    bags = make_digit_bags(50, target=9, seed=0)
    assert len(bags) == 50 and {b.label for b in bags} == {0, 1}
    for b in bags:
        assert b.features.shape == (len(b.instance_labels), 64)
        assert b.label == int(b.instance_labels.max())
    again = make_digit_bags(50, target=9, seed=0)
    assert all(np.array_equal(a.features, b.features) for a, b in zip(bags, again, strict=True))


def test_unit_test_bags_move_the_poison():
    tr = make_unit_test_bags("poison", "train", n_bags=20, seed=0)
    te = make_unit_test_bags("poison", "test", n_bags=20, seed=0)
    _, poison = unit_test_concepts(16)
    u = poison / np.linalg.norm(poison)
    has_poison = lambda b: (b.features @ u).max() > 3.0  # noqa: E731  poison instances project to ~6
    assert all(has_poison(b) == (b.label == 0) for b in tr)
    assert all(has_poison(b) == (b.label == 1) for b in te)
    assert all(b.label == int(b.instance_labels.max()) for b in tr + te)
    with pytest.raises(ValueError):
        make_unit_test_bags("nope", "train")


def test_hierarchical_digit_bags_are_balanced_and_consistent(tmp_path):
    import pandas as pd

    from wsimil.data.synthetic import HIERARCHICAL_DIGITS, make_hierarchical_digit_bags, write_bags

    bags = make_hierarchical_digit_bags(42, seed=1)
    counts = pd.Series([b.columns["fine_label"] for b in bags]).value_counts()
    assert set(counts.index) == set(HIERARCHICAL_DIGITS) and counts.max() - counts.min() <= 1
    for b in bags:
        digit, coarse = HIERARCHICAL_DIGITS[b.label]
        assert b.columns == {"fine_label": b.label, "coarse_label": coarse}
        # instance labels mark the key digit images: 1–3 per bag
        assert 1 <= b.instance_labels.sum() <= 3
    m = pd.read_csv(write_bags(bags, tmp_path / "h"))
    assert list(m.columns) == ["case_id", "slide_id", "label", "fine_label", "coarse_label"]
    assert (m.groupby("fine_label").coarse_label.nunique() == 1).all()
    assert dict(zip(m.fine_label, m.coarse_label, strict=True)) == {k: v[1] for k, v in HIERARCHICAL_DIGITS.items()}


def test_survival_times_hazard_rises_with_risk():
    from wsimil.data.synthetic import survival_times

    rng = np.random.default_rng(0)
    risk = np.repeat([0.0, 1.0, 2.0, 3.0], 5000)
    time, event = survival_times(risk, rng, base_hazard=1 / 60, log_hazard_ratio=0.7)
    assert 0 < event.mean() < 1 and (time > 0).all() and time.max() <= 96.0
    # exponential model with independent censoring: the hazard's MLE is events / total follow-up time
    hazard = np.array([event[risk == r].sum() / time[risk == r].sum() for r in range(4)])
    np.testing.assert_allclose(hazard, np.exp(0.7 * np.arange(4)) / 60, rtol=0.06)
    assert (np.diff(hazard) > 0).all()
    censored = 1 - np.array([event[risk == r].mean() for r in range(4)])
    assert (np.diff(censored) < 0).all()  # low-risk patients are censored more often


def test_survival_digit_bags(tmp_path):
    import pandas as pd

    from wsimil.data.synthetic import make_survival_digit_bags, write_bags

    bags = make_survival_digit_bags(30, max_burden=4, seed=2)
    for b in bags:
        assert b.instance_labels.sum() == b.columns["burden"] and b.label == int(b.columns["burden"] > 0)
        assert b.columns["time"] > 0 and b.columns["event"] in (0, 1)
    m = pd.read_csv(write_bags(bags, tmp_path / "s"))
    assert {"time", "event", "burden"} <= set(m.columns) and set(m.burden) == {0, 1, 2, 3, 4}
    assert 0 < m.event.mean() < 1
    from wsimil.data.manifest import read_manifest

    assert read_manifest(tmp_path / "s" / "manifest.csv", task="survival").classes[0] == "bin0"
