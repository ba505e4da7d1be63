import numpy as np
import pytest

from tests.conftest import tissue_iou
from wsimil.slide.synth import MASK_DOWNSAMPLE
from wsimil.slide.tiling import nested_grids
from wsimil.slide.tissue import detect_tissue


def test_tissue_detection_matches_ground_truth(rendered):
    import cv2

    img, tissue, _ = rendered
    thumb = cv2.resize(
        img, (img.shape[1] // MASK_DOWNSAMPLE, img.shape[0] // MASK_DOWNSAMPLE), interpolation=cv2.INTER_AREA
    )
    mask = detect_tissue(thumb, 0.25 * MASK_DOWNSAMPLE)
    assert tissue_iou(mask, tissue[: mask.shape[0], : mask.shape[1]]) > 0.9
    assert not detect_tissue(np.full((100, 100, 3), 242, np.uint8), 8.0).any()  # a blank slide has no tissue


@pytest.mark.parametrize("mpp0", [0.25, 0.5, 0.2631])
def test_grids_nest_exactly(mpp0):
    rng = np.random.default_rng(0)
    mask = rng.random((60, 80)) < 0.6
    dims = (int(80 * 64), int(60 * 64))
    grids, links = nested_grids(dims, mpp0, [20, 5], 256, mask, 64.0, min_tissue=0.3)
    hi, lo = grids[20.0], grids[5.0]
    assert hi.patch_size_level0 == pytest.approx(256 * 0.5 / mpp0)
    assert lo.patch_size_level0 == pytest.approx(4 * hi.patch_size_level0)
    lk = links[(5.0, 20.0)]
    assert lk.shape == (len(lo.coords), 16)
    seen = set()
    for r in range(len(lo.coords)):
        x0, y0 = lo.coords[r]
        for k, idx in enumerate(lk[r]):
            a, b = k % 4, k // 4
            cell = (lo.cells[r, 0] * 4 + a, lo.cells[r, 1] * 4 + b)
            if idx < 0:
                assert not ((hi.cells == cell).all(1)).any()  # -1 only where that cell is not a tissue patch
                continue
            seen.add(int(idx))
            assert tuple(hi.cells[idx]) == cell
            hx, hy = hi.coords[idx]
            # the child's top-left lies in the parent's footprint, at its exact sub-grid offset
            assert x0 <= hx < x0 + lo.patch_size_level0 and y0 <= hy < y0 + lo.patch_size_level0
            assert abs(hx - (x0 + a * hi.patch_size_level0)) <= 1 and abs(hy - (y0 + b * hi.patch_size_level0)) <= 1
    # every HR patch inside some LR patch's footprint is linked to it
    lo_cells = {tuple(c) for c in lo.cells}
    for i, (c, r) in enumerate(hi.cells):
        if (c // 4, r // 4) in lo_cells:
            assert i in seen


def test_three_magnifications_and_non_nesting():
    mask = np.ones((40, 40), bool)
    grids, links = nested_grids((40 * 64, 40 * 64), 0.25, [20, 10, 5], 256, mask, 64.0)
    assert set(links) == {(10.0, 20.0), (5.0, 20.0)}
    assert links[(10.0, 20.0)].shape[1] == 4 and links[(5.0, 20.0)].shape[1] == 16
    assert (links[(5.0, 20.0)] >= 0).all()  # full tissue: every child present
    with pytest.raises(ValueError, match="do not nest"):
        nested_grids((1000, 1000), 0.25, [20, 7], 256, mask, 64.0)


def test_min_tissue_zero_keeps_patches_touching_tissue_not_background():
    mask = np.zeros((40, 40), bool)
    mask[10, 10] = True  # one tissue pixel: the patch holding it touches tissue
    grids, _ = nested_grids((40 * 16, 40 * 16), 0.5, [20], 64, mask, 16.0, min_tissue=0)
    g = grids[20.0]
    assert g.grid_shape == (10, 10) and len(g.coords) == 1 and tuple(g.coords[0]) == (128, 128)
    assert (
        len(nested_grids((640, 640), 0.5, [20], 64, np.zeros((40, 40), bool), 16.0, min_tissue=0)[0][20.0].coords) == 0
    )


@pytest.mark.parametrize(
    ("mpp0", "mag", "nominal_mag", "nominal"),
    [(0.25, 20, 40, 512), (0.2527, 20, 40, 512), (0.499, 20, 20, 256), (0.2527, 5, 40, 2048), (3.0, 1.25, None, 683)],
)
def test_nominal_values_follow_tridents_buckets(mpp0, mag, nominal_mag, nominal):
    from wsimil.slide.tiling import nominal_magnification, nominal_patch_size_level0

    assert nominal_magnification(mpp0) == nominal_mag
    assert nominal_patch_size_level0(256, mag, mpp0) == nominal
