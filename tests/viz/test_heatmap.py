"""Heatmap building blocks against hand-computed values; a full figure on a small synthetic slide."""

import matplotlib
import numpy as np
import pandas as pd
import pytest

from wsimil.errors import WsimilError
from wsimil.viz.heatmap import (
    CMAP,
    TUMOUR_RGB,
    HeatmapInput,
    overlay,
    render_heatmap,
    safe_name,
    scale_values,
    slide_truth,
    top_k,
    tumour_outline,
)


def test_scale_values():
    v = np.array([0.1, 0.5, 0.5, 2.0])
    r, label, _ = scale_values(v, "percentile")
    np.testing.assert_allclose(r, [0, 1.5 / 3, 1.5 / 3, 1])  # ties share the mean rank
    assert "percentile" in label
    np.testing.assert_allclose(scale_values(v, "rank").values, r)  # the earlier name
    np.testing.assert_allclose(scale_values(v, "minmax").values, [0, 0.4 / 1.9, 0.4 / 1.9, 1])
    np.testing.assert_allclose(scale_values(v, "absolute", "instance").values, [0.1, 0.5, 0.5, 1.0])
    assert "0–1" in scale_values(v, "absolute", "instance").label  # probabilities keep their scale
    np.testing.assert_allclose(scale_values(np.array([3.0, 3.0]), "minmax").values, [1, 1])
    with pytest.raises(WsimilError, match="unknown heatmap scale"):
        scale_values(v, "log")


def test_absolute_attention_scale_is_the_same_for_every_slide():
    """attention × N on a log2 scale clipped to ±4: uniform attention is mid-scale whatever the bag size, 16× the
    uniform share is the top, and the default (and "auto") is this absolute scale."""
    for n in (10, 1000):
        s = scale_values(np.full(n, 1 / n))
        np.testing.assert_allclose(s.values, 0.5)
        assert "attention × N" in s.label and s.ticks[0.5] == "1" and s.ticks[1.0] == "16+" and s.ticks[0.0] == "1/16"
    w = np.array([16, 4, 1, 1 / 4, 1 / 64]) / 100  # as multiples of the uniform share of 100 patches
    w = np.concatenate([w, np.full(95, (1 - w.sum()) / 95)])
    np.testing.assert_allclose(scale_values(w, "absolute").values[:5], [1, 0.75, 0.5, 0.25, 0])
    np.testing.assert_allclose(scale_values(w, "auto").values, scale_values(w, "absolute").values)
    # a near-uniform slide stays mid-scale, where percentiles would paint its top patch as red as any
    flat = np.full(50, 1 / 50) + np.linspace(-1e-4, 1e-4, 50)
    assert scale_values(flat).values.max() < 0.51 and scale_values(flat, "percentile").values.max() == 1


def test_headline_gives_probability_prediction_and_label():
    h = HeatmapInput("s", "x.svs", np.zeros((1, 2)), 256.0, np.ones(1), probs=np.array([0.994, 0.006]),
                     classes=["normal", "tumour"], label="normal")  # fmt: skip
    assert h.headline() == "P(tumour) = 0.006 · predicted normal · label normal (correct)"
    h.label = "tumour"
    assert h.headline().endswith("label tumour (WRONG)")
    h.label, h.probs = None, np.array([0.2, 0.5, 0.3])
    h.classes = ["a", "b", "c"]
    assert h.headline() == "P(b) = 0.500 · predicted b · label unknown"  # multi-class: the predicted class


def test_tumour_outline_resamples_the_mask_onto_the_thumbnail(tmp_path):
    from PIL import Image

    m = np.zeros((8, 12), np.uint8)
    m[2:4, 6:9] = 255  # level-0 x 96..144, y 32..64 at 16 px per mask px
    Image.fromarray(m).save(tmp_path / "m.png")
    out = tumour_outline(str(tmp_path / "m.png"), 8.0, (24, 24), 16, 192)  # thumbnail px = 8 level-0 px
    assert out.shape == (24, 24) and out.sum() == 4 * 6
    assert out[4:8, 12:18].all() and not out[:4].any() and not out[:, 18:].any()
    # without mask_downsample the mask is taken to span the slide's width
    np.testing.assert_array_equal(tumour_outline(str(tmp_path / "m.png"), 8.0, (24, 24), None, 192), out)
    (tmp_path / "bad.png").write_text("no image")
    with pytest.raises(WsimilError, match="cannot be read"):
        tumour_outline(str(tmp_path / "bad.png"), 8.0, (24, 24), 16, 192)


def test_slide_truth_reads_labels_and_masks(tmp_path):
    pd.DataFrame({"slide_id": ["a", "b"], "label": ["1", "0"], "tumor_mask": ["masks/a.png", ""],
                  "mask_downsample": ["16", ""]}).to_csv(tmp_path / "m.csv", index=False)  # fmt: skip
    pd.DataFrame({"path": ["/x/c.svs"], "label": ["1"]}).to_csv(tmp_path / "s.csv", index=False)
    t = slide_truth(tmp_path / "m.csv", tmp_path / "missing.csv", None, tmp_path / "s.csv")
    assert t["a"] == {"label": "1", "tumor_mask": str((tmp_path / "masks" / "a.png").resolve()), "mask_downsample": 16}
    assert t["b"] == {"label": "0"} and t["c"] == {"label": "1"}


def test_top_k_orders_by_score_then_index():
    assert top_k(np.array([0.2, 0.9, 0.5, 0.9]), 3).tolist() == [1, 3, 2]
    assert top_k(np.array([1.0]), 5).tolist() == [0]


def test_overlay_blends_each_patch_footprint():
    thumb = np.full((8, 12, 3), 200, np.uint8)
    coords = np.array([[0, 0], [16, 8]])  # level-0; the thumbnail has ds = 4 → patches of 8 px side = 2 thumb px
    img = overlay(thumb, 4.0, coords, 8.0, np.array([0.0, 1.0]), alpha=0.5)
    c0, c1 = (np.array(matplotlib.colormaps[CMAP](v)[:3]) * 255 for v in (0.0, 1.0))
    np.testing.assert_allclose(img[0, 0], np.round(0.5 * 200 + 0.5 * c0), atol=1)
    np.testing.assert_allclose(img[1, 1], np.round(0.5 * 200 + 0.5 * c0), atol=1)
    np.testing.assert_allclose(img[2, 4], np.round(0.5 * 200 + 0.5 * c1), atol=1)
    np.testing.assert_allclose(img[3, 5], np.round(0.5 * 200 + 0.5 * c1), atol=1)
    assert (img[0, 2] == 200).all() and (img[4, 4] == 200).all() and (img[7, 11] == 200).all()  # outside: untouched


def test_safe_name():
    assert safe_name("attention:tumour/x y") == "attention-tumour_x_y"


def test_render_heatmap_figure(tmp_path):
    from wsimil.slide.synth import render_slide, write_aperio_tiff

    img, _, _ = render_slide(3, 1536, 1024, mpp=0.5, positive=True, tumor_fraction=0.05)
    write_aperio_tiff(tmp_path / "s.svs", img, mpp=0.5, app_mag=20, downsamples=(4,))
    coords = np.array([[x, y] for y in range(0, 1024 - 255, 256) for x in range(0, 1536 - 255, 256)])
    values = np.arange(len(coords), dtype=float)
    h = HeatmapInput("s", str(tmp_path / "s.svs"), coords, 256.0, values, "attention", mag=20.0)
    rgb = render_heatmap(h, tmp_path / "h.png", size=640, k=4)
    from PIL import Image

    png = Image.open(tmp_path / "h.png")
    assert png.size[0] == 640 and rgb.shape[1] == 640 and png.size[1] == rgb.shape[0]
    assert rgb.std() > 20  # not blank
    assert not _magenta(rgb).any()  # no mask given: no tumour outline

    # a ground-truth mask is outlined in magenta, and the title carries the prediction and the label
    mask = np.zeros((1024 // 16, 1536 // 16), np.uint8)
    mask[20:40, 30:60] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    h.probs, h.classes, h.label = np.array([0.1, 0.9]), ["0", "1"], "1"
    h.tumor_mask, h.mask_downsample = str(tmp_path / "mask.png"), 16
    rgb = render_heatmap(h, None, size=640, k=4)
    ys, xs = np.nonzero(_magenta(rgb))
    assert len(ys) > 100
    # the outline sits where the mask is: level-0 x 480..960 of 1536 → the left half of the slide panel
    assert 0.2 < np.median(xs) / 640 < 0.6
    with pytest.raises(WsimilError, match="2 patch coordinates but 3 scores"):
        render_heatmap(HeatmapInput("s", str(tmp_path / "s.svs"), coords[:2], 256.0, values[:3]), None, 640)


def _magenta(rgb: np.ndarray) -> np.ndarray:
    return np.abs(rgb.astype(int) - np.array(TUMOUR_RGB)).max(-1) < 40


def test_run_truth_reads_the_job_its_features_record(tmp_path):
    """A run's ground truth comes from the tiling job named by its feature files, wherever the features were moved."""
    import yaml

    from wsimil.features.store import write_bag
    from wsimil.slide.tiling_job import SlideSpec, TileSettings, TilingJob
    from wsimil.viz.heatmap import run_truth

    settings = TileSettings(mags=[5.0], patch_size=64)
    job = TilingJob.create(tmp_path / "job", settings, [SlideSpec("a", "a.svs", None, {"tumor_mask": "m/a.png"})])
    coords_attrs = {"target_magnification": 5.0, "patch_size": 64, "settings_key": settings.key()}
    feats = tmp_path / "elsewhere" / "features"
    one = np.zeros((1, 4), np.float32), np.zeros((1, 2), np.int64)
    write_bag(feats / "a.h5", *one, encoder="toy", attrs={"tiling_job": str(job.root)}, coords_attrs=coords_attrs)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"features": str(feats)}))
    pd.DataFrame({"slide_id": ["a"], "label": ["1"]}).to_csv(run / "predictions.csv", index=False)
    t = run_truth(run)["a"]
    assert t["label"] == "1" and t["tumor_mask"] == str((job.root / "m" / "a.png").resolve())
    # features that record no job: nothing is guessed from their folders
    write_bag(feats / "a.h5", *one, encoder="toy", coords_attrs=coords_attrs)
    assert run_truth(run)["a"] == {"label": "1"}  # the label from predictions.csv alone
