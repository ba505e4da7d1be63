"""The tiling QC image: the thumbnail with tissue contours and patch grids, above a legend with counts."""

import numpy as np
from PIL import Image

from wsimil.slide.job import qc_legend, write_qc
from wsimil.slide.tiling import GridLevel


def _grid(mag: float, ps0: float, coords: list) -> GridLevel:
    c = np.array(coords, dtype=np.int64)
    return GridLevel(mag, 256, ps0, c, c // int(ps0), (4, 4))


def test_qc_image_has_a_legend_with_counts(tmp_path):
    thumb = np.full((120, 200, 3), 240, np.uint8)
    mask = np.zeros((120, 200), bool)
    mask[20:100, 30:170] = True
    grids = {20.0: _grid(20, 40, [[40, 40], [80, 40], [120, 40]]), 5.0: _grid(5, 160, [[0, 0]])}
    write_qc(tmp_path / "qc.png", thumb, 1.0, mask, 1.0, grids)
    img = np.asarray(Image.open(tmp_path / "qc.png").convert("RGB"))
    band = img[120:]
    assert img.shape[1] >= 200 and band.shape[0] == 3 * 22 + 8  # one legend row per entry: tissue, 20x, 5x
    assert (img[:120, :200] != 240).any(axis=-1).sum() > 200  # the contours and patch outlines
    # each row has its swatch in the colour the image uses (green contour, blue finest grid, orange coarser)
    for row, colour in enumerate([(20, 170, 60), (40, 90, 230), (240, 140, 20)]):
        swatch = band[4 + row * 22 : 4 + (row + 1) * 22, :30].reshape(-1, 3).astype(int)
        assert (np.abs(swatch - colour).max(1) < 30).sum() >= 10, row
        text = band[4 + row * 22 : 4 + (row + 1) * 22, 34:]
        assert (text < 128).all(-1).sum() > 30  # dark text on white
    # the text names the counts: render the expected rows and compare
    expect = qc_legend(
        [((20, 170, 60), f"tissue contour ({mask.mean():.0%} of the thumbnail is tissue)", "line"),
         ((40, 90, 230), "20x patches: 3 (256 px)", "box"), ((240, 140, 20), "5x patches: 1 (256 px)", "box")],
        200,
    )  # fmt: skip
    np.testing.assert_array_equal(band, expect)


def test_qc_legend_text_shrinks_to_fit_narrow_thumbnails():
    def last_dark(band):
        return np.nonzero((band < 128).all(-1).any(0))[0].max()

    wide = qc_legend([((0, 0, 0), "x" * 20, "box")], 1000)
    narrow = qc_legend([((0, 0, 0), "x" * 20, "box")], 150)
    assert wide.shape[1] == 1000 and last_dark(wide) > 150  # unshrunk, the text would run off 150 px
    assert narrow.shape[1] == 150 and last_dark(narrow) < 148  # shrunk, it ends inside
    tiny = qc_legend([((0, 0, 0), "x" * 60, "box")], 150)  # too long to shrink legibly: the band widens
    assert tiny.shape[1] > 150 and last_dark(tiny) < tiny.shape[1] - 2


def test_qc_image_widens_for_a_legend_wider_than_a_narrow_slide(tmp_path):
    thumb = np.full((300, 60, 3), 240, np.uint8)
    mask = np.zeros((300, 60), bool)
    mask[10:290, 10:50] = True
    write_qc(tmp_path / "qc.png", thumb, 1.0, mask, 1.0, {20.0: _grid(20, 20, [[10, 10]])})
    img = np.asarray(Image.open(tmp_path / "qc.png").convert("RGB"))
    assert img.shape[1] > 60 and (img[:300, 60:] == 255).all()  # white to the right of the thumbnail
