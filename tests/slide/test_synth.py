import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from wsimil.slide.synth import HIERARCHY, make_cohort, render_slide

W, H = 1024, 768


def test_classification_cohort_keeps_its_layout(tmp_path):
    slides = make_cohort(tmp_path / "c", 4, seed=5, width=W, height=H)
    m = pd.read_csv(tmp_path / "c" / "manifest.csv")
    assert list(m.columns) == ["case_id", "slide_id", "label", "path", "tumor_mask", "mask_downsample"]
    # labels come from the seed's permutation exactly as before the other tasks existed
    np.testing.assert_array_equal(m.label, np.random.default_rng(5).permutation([1, 1, 0, 0]))
    assert [s.label for s in slides] == m.label.tolist()
    assert "task" not in (tmp_path / "c" / "cohort.json").read_text()


def test_hierarchical_cohort(tmp_path):
    slides = make_cohort(tmp_path / "h", 8, seed=1, width=W, height=H, tumor_fraction=0.05, task="hierarchical")
    m = pd.read_csv(tmp_path / "h" / "manifest.csv")
    assert list(m.columns[:5]) == ["case_id", "slide_id", "label", "fine_label", "coarse_label"]
    assert (m.label == m.fine_label).all() and m.fine_label.value_counts().to_dict() == dict.fromkeys(HIERARCHY, 2)
    assert all(HIERARCHY[f][0] == c for f, c in zip(m.fine_label, m.coarse_label, strict=True))
    for f, s in zip(m.fine_label, slides, strict=True):
        lesion = np.asarray(Image.open(s.mask_path)) > 0
        assert lesion.any() == (f != "normal")  # every class but normal holds lesion foci


def test_high_grade_lesions_have_larger_nuclei():
    kw = dict(seed=3, width=W, height=H, positive=True, tumor_fraction=0.1, n_foci=1)
    low, tissue, mask = render_slide(**kw)
    high, _, mask_h = render_slide(**kw, lesion="high_grade")
    np.testing.assert_array_equal(mask, mask_h)
    with pytest.raises(ValueError, match="unknown lesion"):
        render_slide(**kw, lesion="nope")
    assert not np.array_equal(low, high)
    # high-grade nuclei are larger: more dark (nuclear) pixels inside the lesion
    up = np.kron(mask, np.ones((16, 16), dtype=bool))[:H, :W]
    dark = lambda img: (img[up].mean(-1) < 150).mean()  # noqa: E731
    assert dark(high) > 1.2 * dark(low)


def test_survival_cohort_hazard_follows_burden(tmp_path):
    from wsimil.data.synthetic import survival_times

    make_cohort(tmp_path / "s", 12, seed=2, width=W, height=H, tumor_fraction=0.04, task="survival")
    m = pd.read_csv(tmp_path / "s" / "manifest.csv")
    assert {"time", "event", "burden", "label"} <= set(m.columns)
    assert (m.time > 0).all() and set(m.event) <= {0, 1} and m.burden.nunique() > 6
    assert ((m.burden > 0) == (m.label == 1)).all() and (m.label == 0).sum() >= 1
    # times are drawn from the documented proportional-hazards model of the recorded burden
    t, e = survival_times(m.burden.to_numpy() / 0.04, np.random.default_rng([2, 3]), log_hazard_ratio=0.7)
    np.testing.assert_allclose(m.time, t, rtol=1e-3, atol=2e-3)
    np.testing.assert_array_equal(m.event, e)


def test_cli_synth_task(tmp_path):
    from wsimil.cli import app

    args = ["synth", "--slides", "4", "--width", str(W), "--height", str(H), "--seed", "0"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "h"), "--task", "hierarchical"])
    assert r.exit_code == 0, r.output
    assert set(pd.read_csv(tmp_path / "h" / "manifest.csv").fine_label) == set(HIERARCHY)
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--task", "nope"])
    assert r.exit_code == 2 and "--task must be one of classification, hierarchical, survival" in r.output
