"""Heatmap building blocks against hand-computed values; a full figure on a small synthetic slide."""

import matplotlib
import numpy as np
import pytest

from wsimil.errors import WsimilError
from wsimil.viz.heatmap import CMAP, HeatmapInput, overlay, render_heatmap, safe_name, scale_values, top_k


def test_scale_values():
    v = np.array([0.1, 0.5, 0.5, 2.0])
    r, label = scale_values(v, "rank")
    np.testing.assert_allclose(r, [0, 1.5 / 3, 1.5 / 3, 1])  # ties share the mean rank
    assert "percentile" in label
    np.testing.assert_allclose(scale_values(v, "minmax")[0], [0, 0.4 / 1.9, 0.4 / 1.9, 1])
    np.testing.assert_allclose(scale_values(v, "absolute")[0], [0.1, 0.5, 0.5, 1.0])
    assert scale_values(v, "auto", "instance")[1] == "probability"  # probabilities keep their scale
    np.testing.assert_allclose(scale_values(v, "auto", "attention")[0], r)
    np.testing.assert_allclose(scale_values(np.array([3.0, 3.0]), "minmax")[0], [1, 1])
    with pytest.raises(WsimilError, match="unknown heatmap scale"):
        scale_values(v, "log")


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
    with pytest.raises(WsimilError, match="2 patch coordinates but 3 scores"):
        render_heatmap(HeatmapInput("s", str(tmp_path / "s.svs"), coords[:2], 256.0, values[:3]), None, 640)
