"""Patch grids at exact µm/px, nested across magnifications, with the links between them.

Magnification ``m`` means ``10/m`` µm/px (20× = 0.5, 5× = 2.0). A patch of ``ps`` pixels at ``m`` covers
``ps · (10/m) / mpp0`` level-0 pixels (not rounded). The finest magnification defines the base grid with step
``s``; a coarser magnification ``m_lo`` uses step ``f·s`` with ``f = m_hi/m_lo`` (an integer) from the same
origin, so each of its cells holds exactly ``f²`` base cells and shares its top-left with the first of them.
Coordinates are level-0 top-left corners, rounded to integers. A cell becomes a patch when it touches tissue and
at least ``min_tissue`` of its footprint is tissue (so ``min_tissue = 0`` keeps every cell that touches tissue,
as TRIDENT's ``min_tissue_proportion 0``, never pure background).

TRIDENT and Patho-Bench describe a grid by *nominal* values: the level-0 magnification snapped to a bucket
(:func:`nominal_magnification`, 0.2527 µm/px counts as 40×) and ``patch_size_level0 = patch_size · level0 mag /
target mag`` (:func:`nominal_patch_size_level0`). wsimil writes those for compatibility; its own geometry always
uses the exact footprint (``patch_size_level0_exact``).

``links[r, b·f + a]`` is the index (in the high-magnification patch list) of the child cell at column offset
``a`` and row offset ``b`` of low-magnification patch ``r``, or −1 when that cell is not a tissue patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsimil.slide.mag import mag_to_mpp

#: TRIDENT's µm/px → objective buckets: below each bound the slide counts as that magnification
_MAG_BUCKETS = ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5))


def nominal_magnification(mpp0: float) -> int | None:
    """The objective magnification TRIDENT assigns to a slide of ``mpp0`` µm/px (``None`` beyond 2.4 µm/px)."""
    return next((mag for bound, mag in _MAG_BUCKETS if mpp0 < bound), None)


def nominal_patch_size_level0(patch_size: int, mag: float, mpp0: float) -> int:
    """TRIDENT's integer ``patch_size_level0`` (equal for a 0.25 and a 0.2527 µm/px slide); the rounded exact
    footprint when ``mpp0`` has no magnification bucket."""
    nominal = nominal_magnification(mpp0)
    exact = patch_size * mag_to_mpp(mag) / mpp0
    return int(round(patch_size * nominal / mag)) if nominal else int(round(exact))


#: the most a patch may be upsampled from level 0: scanners' "40x" ranges over 0.22–0.27 µm/px, so asking 40x of
#: a 0.263 µm/px (38x) scan is fine, but 80x of a 40x scan (or 40x of a 20x scan) would invent pixels
MAX_UPSAMPLE = 1.1


def check_mags(mags: list[float]) -> list[float]:
    """Refuse magnifications that cannot be tiled, before any slide is read: each must be a positive number and
    every one must divide the finest by a whole number (so their grids nest). Returns them finest first."""
    from wsimil.errors import WsimilError

    if not mags:
        raise WsimilError("give at least one --mag, e.g. --mag 20")
    for m in mags:
        if not np.isfinite(m) or m <= 0:
            raise WsimilError(f"--mag {m:g} is not a magnification: give a positive number, e.g. --mag 20 (0.5 µm/px)")
    mags = sorted({float(m) for m in mags}, reverse=True)
    for m in mags[1:]:
        f = mags[0] / m
        if abs(f - round(f)) > 1e-9:
            raise WsimilError(
                f"--mag {mags[0]:g} and --mag {m:g} do not nest: {mags[0]:g}/{m:g} = {f:.3g} is not a whole number; "
                f"use magnifications that divide {mags[0]:g}x (e.g. {', '.join(f'{mags[0] / k:g}' for k in (2, 4))})"
            )
    return mags


def check_native(mags: list[float], mpp0: float, slide_id: str) -> None:
    """Refuse to tile a slide above its scan's magnification (level 0 at ``mpp0`` µm/px): that would upsample."""
    from wsimil.errors import WsimilError

    native = mag_to_mpp(mpp0)  # 10/mpp0: the same formula both ways
    top = max(mags)
    if top > native * MAX_UPSAMPLE:
        raise WsimilError(
            f"slide {slide_id!r}: --mag {top:g} needs {mag_to_mpp(top):g} µm/px but the slide was scanned at "
            f"{mpp0:.4g} µm/px ({native:.3g}x); wsimil does not upsample: use --mag {np.floor(native * 1.0001):g} or "
            "lower (or --mpp if the slide's metadata is wrong)"
        )


@dataclass
class GridLevel:
    mag: float
    patch_size: int
    patch_size_level0: float  # exact footprint in level-0 px
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y) of tissue patches, row-major
    cells: np.ndarray  # (N, 2) int64 (col, row) grid index of each patch
    grid_shape: tuple[int, int]  # (cols, rows)

    @property
    def target_mpp(self) -> float:
        return mag_to_mpp(self.mag)


def integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column."""
    return np.pad((mask > 0).astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)


def box_mean(integral: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: float) -> np.ndarray:
    """Mean of the mask over axis-aligned squares (mask-pixel coordinates, float), via its integral image."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    xa = np.clip(np.floor(x0).astype(int), 0, w)
    ya = np.clip(np.floor(y0).astype(int), 0, h)
    xb = np.clip(np.ceil(x0 + size).astype(int), 0, w)
    yb = np.clip(np.ceil(y0 + size).astype(int), 0, h)
    s = integral[yb, xb] - integral[ya, xb] - integral[yb, xa] + integral[ya, xa]
    area = np.maximum((xb - xa) * (yb - ya), 1)
    return s / area


def nested_grids(
    dimensions: tuple[int, int],
    mpp0: float,
    mags: list[float],
    patch_size: int,
    mask: np.ndarray,
    mask_downsample: float,
    min_tissue: float = 0.1,
) -> tuple[dict[float, GridLevel], dict[tuple[float, float], np.ndarray]]:
    """Tissue patches of every magnification on nested grids, and the links from each coarser magnification to
    the finest one. ``mask`` is a tissue mask where one pixel spans ``mask_downsample`` level-0 pixels."""
    mags = check_mags(mags)
    hi = mags[0]
    w0, h0 = dimensions
    step_hi = patch_size * mag_to_mpp(hi) / mpp0
    integral = integral_image(mask)
    grids: dict[float, GridLevel] = {}
    cell_index: dict[float, np.ndarray] = {}
    for m in mags:
        f = int(round(hi / m))
        step = step_hi * f
        cols, rows = int(np.floor(w0 / step + 1e-9)), int(np.floor(h0 / step + 1e-9))
        jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # row-major order
        ii, jj = ii.ravel(), jj.ravel()
        x, y = ii * step, jj * step
        frac = box_mean(integral, x / mask_downsample, y / mask_downsample, step / mask_downsample)
        keep = (frac >= min_tissue) & (frac > 0)  # min_tissue 0: touches tissue, never pure background
        coords = np.stack([np.round(x[keep]), np.round(y[keep])], 1).astype(np.int64)
        cells = np.stack([ii[keep], jj[keep]], 1).astype(np.int64)
        grids[m] = GridLevel(m, patch_size, step, coords, cells, (cols, rows))
        index = np.full((rows, cols), -1, dtype=np.int64)
        index[cells[:, 1], cells[:, 0]] = np.arange(len(cells))
        cell_index[m] = index
    links: dict[tuple[float, float], np.ndarray] = {}
    hi_index = cell_index[hi]
    for m in mags[1:]:
        f = int(round(hi / m))
        lo = grids[m]
        a, b = np.meshgrid(np.arange(f), np.arange(f), indexing="xy")  # a: column offset, b: row offset
        ci = lo.cells[:, 0, None] * f + a.ravel()[None, :]
        rj = lo.cells[:, 1, None] * f + b.ravel()[None, :]
        inside = (ci < hi_index.shape[1]) & (rj < hi_index.shape[0])
        lk = np.full(ci.shape, -1, dtype=np.int64)
        lk[inside] = hi_index[rj[inside], ci[inside]]
        links[(m, hi)] = lk
    return grids, links
