"""The ``camelyon`` synthetic preset on small slides rendered at low resolution (1–2 µm/px), so each test takes
seconds."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from wsimil.slide.reader import open_slide
from wsimil.slide.synth import make_cohort
from wsimil.slide.synth_camelyon import STAT_NAMES, auc, low_power_statistics
from wsimil.slide.synth_layout import MAP_UM, PARACORTEX, SlideSpec, largest_focus_mm, make_layout, size_class

COLUMNS = ["mimic_mask", "largest_focus_mm", "size_class", "tumor_fraction", "artefacts"]


@pytest.mark.parametrize("cls", ["macro", "micro", "itc"])
def test_layout_size_classes(cls):
    lay = make_layout(11, (500, 650), SlideSpec(cls))  # 4 x 5.2 mm
    mm = largest_focus_mm(lay.tumour)
    assert size_class(mm) == cls, mm
    assert not (lay.tumour & (lay.mimic > 0)).any()  # a pixel is tumour or mimic, not both
    assert set(np.unique(lay.mimic)) <= {0, 1, 2, 3} and (lay.mimic == 1).any()  # germinal centres in every node
    assert lay.tumour.any() and not (lay.tumour & (lay.tissue < 0.5)).any()


def test_largest_focus_and_classes():
    m = np.zeros((100, 100), bool)
    m[10:12, 10:40] = True  # 30 px long
    m[50:55, 50:55] = True
    assert largest_focus_mm(m) == pytest.approx(30 * MAP_UM / 1000, rel=0.05)
    assert [size_class(x) for x in (0, 0.1, 0.2, 2.0, 2.01)] == ["negative", "itc", "micro", "micro", "macro"]


def test_chunks_are_independent():
    """A rectangle renders the same alone as inside a larger rectangle (tiles can be rendered in any order)."""
    from wsimil.slide.synth_render import SlideRenderer, Stain
    from wsimil.slide.synth_textures import build_textures

    lay = make_layout(3, (200, 250), SlideSpec("micro"))
    r = SlideRenderer(lay, 1.0, 3, build_textures(0, 1.0, 256), Stain.draw(np.random.default_rng(0)))
    big = r.render(800, 650, 400, 300)
    small = r.render(900, 750, 128, 96)
    assert big.mean() < 220  # tissue, not glass
    diff = np.abs(big[100:196, 100:228].astype(int) - small.astype(int))
    assert diff.mean() < 1.0 and (diff > 30).mean() < 0.01
    assert not np.array_equal(big, r.render(801, 650, 400, 300))  # but depends on position
    # scratch buffers are reused between renders: outputs never alias them, and no state carries over
    keep = big.copy()
    again = r.render(800, 650, 400, 300)
    assert np.array_equal(big, keep) and np.array_equal(again, big)


def test_cohort_manifest_and_masks(tmp_path):
    out = tmp_path / "c"
    slides = make_cohort(out, 4, seed=2, width=1200, height=1000, mpp=1.0, app_mag=10, preset="camelyon")
    m = pd.read_csv(out / "manifest.csv")
    assert list(m.columns[:6]) == ["case_id", "slide_id", "label", "path", "tumor_mask", "mask_downsample"]
    assert set(COLUMNS) <= set(m.columns) and (m.mask_downsample == MAP_UM).all()
    assert ((m.size_class == "negative") == (m.label == 0)).all() and sorted(m.label) == [0, 0, 1, 1]
    assert ((m.tumor_fraction > 0) == (m.label == 1)).all()
    for r, s in zip(m.itertuples(), slides, strict=True):
        tum = np.asarray(Image.open(r.tumor_mask)) > 0
        mim = np.asarray(Image.open(r.mimic_mask))
        assert tum.shape == mim.shape == (np.ceil(1000 / MAP_UM), np.ceil(1200 / MAP_UM))
        assert tum.any() == bool(r.label) and s.tumor_fraction == r.tumor_fraction
        with open_slide(r.path) as sl:
            assert sl.dimensions == (1200, 1000) and sl.mpp == pytest.approx(1.0) and sl.level_count >= 2
            img = sl.read_region((0, 0), 0, sl.dimensions)
        assert (img.mean(-1) < 200).mean() > 0.1  # there is tissue


def test_tumour_is_paler_and_pinker_than_lymphoid_tissue_at_5x():
    from wsimil.slide.synth_render import SlideRenderer, Stain
    from wsimil.slide.synth_textures import build_textures

    for seed in (1, 2):
        lay = make_layout(seed, (300, 380), SlideSpec("micro"))
        r = SlideRenderer(lay, 2.0, seed, build_textures(0, 2.0, 256), Stain.draw(np.random.default_rng(seed)))
        img = r.render(0, 0, 380 * 4, 300 * 4).astype(float)
        up = lambda a: np.kron(a, np.ones((4, 4), bool))  # noqa: E731
        dense = lay.props[..., 0] > 0.8 * lay.props[..., 0].max()  # lymphoid tissue
        t, lym = img[up(lay.tumour)], img[up(dense & ~lay.tumour)]
        assert t.mean() > lym.mean() + 15  # paler
        assert (t[:, 0] - t[:, 2]).mean() > (lym[:, 0] - lym[:, 2]).mean() + 10  # pinker


def test_other_tasks_and_determinism(tmp_path):
    kw = dict(width=600, height=500, mpp=2.0, app_mag=5, preset="camelyon")
    make_cohort(tmp_path / "h", 4, seed=1, task="hierarchical", **kw)
    h = pd.read_csv(tmp_path / "h" / "manifest.csv")
    assert sorted(h.fine_label) == ["high_grade", "hyperplasia", "low_grade", "normal"]
    for r in h.itertuples():  # every class but normal marks its lesion (tumour, or hyperplastic follicles)
        assert (np.asarray(Image.open(r.tumor_mask)) > 0).any() == (r.fine_label != "normal")
    make_cohort(tmp_path / "s", 6, seed=1, task="survival", tumor_fraction=0.05, **kw)
    s = pd.read_csv(tmp_path / "s" / "manifest.csv")
    assert {"time", "event", "burden"} <= set(s.columns) and (s.burden == s.tumor_fraction).all()
    assert ((s.burden > 0) == (s.label == 1)).all()
    make_cohort(tmp_path / "s2", 6, seed=1, task="survival", tumor_fraction=0.05, **kw)
    a, b = (tmp_path / d / "slides" / "synth_0003.svs" for d in ("s", "s2"))
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        make_cohort(tmp_path / "x", 1, preset="nope")


def test_cli_preset_prints_composition(tmp_path):
    from wsimil.cli import app

    args = ["synth", "--slides", "2", "--width", "600", "--height", "500", "--mpp", "2.0", "--preset"]
    r = CliRunner().invoke(app, [*args, "camelyon", "--out", str(tmp_path / "c"), "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert "size_class" in r.output and "negative" in r.output
    r = CliRunner().invoke(app, [*args, "nope", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--preset must be one of toy, camelyon" in r.output


@pytest.mark.slow
def test_low_power_statistics_do_not_separate_slides(tmp_path):
    """No single 5× colour or density statistic (slide-level max over patches) separates positive from negative
    slides: AUC within [0.15, 0.85] for each."""
    make_cohort(tmp_path / "c", 16, seed=1, width=1500, height=1200, mpp=2.0, app_mag=5, preset="camelyon")
    m = pd.read_csv(tmp_path / "c" / "manifest.csv")
    stats = []
    for r in m.itertuples():
        with open_slide(r.path) as s:
            stats.append(low_power_statistics(s.read_region((0, 0), 0, s.dimensions)))
    st = pd.DataFrame(stats)
    for k in STAT_NAMES:
        a = auc(st[k].to_numpy(), m.label.to_numpy())
        assert 0.15 <= a <= 0.85, (k, a)


def test_low_power_statistics_and_auc():
    img = np.full((512, 512, 3), 240, np.uint8)
    img[:256, :256] = (120, 60, 150)  # one tissue patch
    st = low_power_statistics(img)
    assert st["mean_r"] == pytest.approx(120) and st["dark_fraction"] == 1.0
    assert auc(np.array([1, 2, 3, 4]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.array([1, 1]), np.array([0, 1])) == 0.5
    assert PARACORTEX > 0


def test_plan_shares_and_composition():
    from wsimil.slide.synth_camelyon import DEFAULT_SHARES, composition, plan_slides

    plan = plan_slides("classification", 20, 0, 0.5, 0.03, DEFAULT_SHARES)
    asked = [p["spec"].size_class for p in plan if p["label"] == 1]
    assert sorted(asked) == ["itc"] * 2 + ["macro"] * 4 + ["micro"] * 4
    assert all(p["spec"].size_class is None for p in plan if p["label"] == 0)
    plan = plan_slides("classification", 4, 0, 1.0, 0.03, {"itc": 1.0})
    assert {p["spec"].size_class for p in plan} == {"itc"}
    with pytest.raises(ValueError, match="size-class shares"):
        plan_slides("classification", 4, 0, 0.5, 0.03, {"huge": 1.0})
    m = pd.DataFrame(
        {"size_class": ["macro", "negative", "macro"], "largest_focus_mm": [3.0, 0.0, 5.0],
         "tumor_fraction": [0.1, 0.0, 0.3], "artefacts": ["fold", None, ""]}
    )  # fmt: skip
    c = composition(m).set_index("size_class")
    assert c.loc["macro", "slides"] == 2 and c.loc["macro", "median_focus_mm"] == 4.0
    assert c.loc["macro", "with_artefacts"] == 1 and c.loc["negative", "slides"] == 1
