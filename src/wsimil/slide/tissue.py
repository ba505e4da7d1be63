"""Tissue detection on a thumbnail: Otsu threshold on saturation, morphology, hole and area filters."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TissueParams:
    """Tunable tissue detection. Sizes are physical so they mean the same at any thumbnail scale.

    - ``min_saturation``: lower bound on the Otsu threshold (0–255), so a blank slide is not split into noise;
    - ``max_brightness``: pixels brighter than this (mean RGB) are background whatever their saturation;
    - ``close_um`` / ``open_um``: morphological closing (joins nearby tissue) and opening (drops specks);
    - ``min_area_um2``: tissue pieces smaller than this are dropped;
    - ``max_hole_um2``: holes smaller than this inside tissue are filled.
    """

    thumb_mpp: float = 8.0
    min_saturation: int = 15
    max_brightness: int = 235
    blur_um: float = 40.0
    close_um: float = 64.0
    open_um: float = 32.0
    min_area_um2: float = 0.05e6
    max_hole_um2: float = 0.02e6

    def to_dict(self) -> dict:
        return asdict(self)


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 else n + 1


def detect_tissue(rgb: np.ndarray, um_per_px: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail whose pixels are ``um_per_px`` µm wide."""
    import cv2

    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    sat = cv2.medianBlur(sat, _odd(params.blur_um / um_per_px))
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = max(float(otsu), float(params.min_saturation))
    mask = (sat > thr) & (rgb.mean(-1) < params.max_brightness)
    mask = mask.astype(np.uint8)
    if params.close_um > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(params.close_um / um_per_px),) * 2)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, k)
    if params.open_um > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(params.open_um / um_per_px),) * 2)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, k)
    px_area = um_per_px * um_per_px
    # fill small holes: background components not touching the border and smaller than max_hole
    n, lab, stats, _ = cv2.connectedComponentsWithStats(1 - mask, connectivity=4)
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        touches = x == 0 or y == 0 or x + w == mask.shape[1] or y + h == mask.shape[0]
        if not touches and area * px_area <= params.max_hole_um2:
            mask[lab == i] = 1
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] * px_area >= params.min_area_um2
    return keep[lab]


def tissue_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Outer and hole contours of a mask, as ``(K, 2)`` arrays of (x, y) in mask pixels."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2) for c in contours]
