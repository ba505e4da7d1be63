"""Periodic cell textures for the ``camelyon`` synthetic preset: one per cell population, drawn once per slide.

A texture is ``(T, T, 4)`` uint8 that tiles the plane (nuclei near an edge are drawn again across it):

- channel 0: hematoxylin concentration × :data:`H_SCALE` (nuclei),
- channel 1: eosin concentration × :data:`E_SCALE` (cytoplasm, membranes),
- channel 2: the cell's *rank* (0–255): a cell is present where its rank is below the population's local density
  (× 255), so one texture serves any density, and a density map that falls smoothly thins cells out smoothly,
- channel 3: coverage (alpha × 255) of the cell's footprint.

Ranks are random for lymphocytes and follow a smooth noise field for tumour and histiocytes, so that at low density
those cells stay in cohesive clusters (isolated tumour cell clusters, histiocyte aggregates) rather than scattering.
All sizes are in µm and converted with the slide's µm/px.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

H_SCALE = 80.0  # texture value = concentration × scale
E_SCALE = 160.0
POPULATIONS = ("fat", "spindle", "lym", "hist", "gc", "tum")  # drawn bottom to top


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float, periodic: bool = False) -> np.ndarray:
    """Zero-mean unit-variance noise whose features are about ``scale`` pixels wide (coarse noise resized up)."""
    import cv2

    h, w = shape
    ch, cw = max(2, int(np.ceil(h / scale))), max(2, int(np.ceil(w / scale)))
    if periodic:  # wrap the coarse grid so the upsampled field tiles too
        c = rng.standard_normal((ch, cw)).astype(np.float32)
        big = np.tile(c, (3, 3))
        up = cv2.resize(big, (3 * w, 3 * h), interpolation=cv2.INTER_CUBIC)[h : 2 * h, w : 2 * w]
    else:
        c = rng.standard_normal((ch + 3, cw + 3)).astype(np.float32)
        up = cv2.resize(c, (int((cw + 3) * w / cw), int((ch + 3) * h / ch)), interpolation=cv2.INTER_CUBIC)[:h, :w]
    return (up - up.mean()) / (up.std() + 1e-6)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Values → uniform ranks in [0, 254]."""
    order = np.argsort(np.argsort(values))
    return (order * 254 / max(len(values) - 1, 1)).astype(np.uint8)


def _centres(rng, size_px: int, spacing_px: float, jitter: float) -> np.ndarray:
    """Jittered hexagonal lattice of cell centres covering a square of ``size_px`` (periodic up to a sliver)."""
    rows = max(1, int(round(size_px / (spacing_px * 0.866))))
    cols = max(1, int(round(size_px / spacing_px)))
    dy, dx = size_px / rows, size_px / cols
    jj, ii = np.mgrid[0:rows, 0:cols]
    x = (ii + 0.5 * (jj % 2)) * dx
    y = jj * dy
    pts = np.stack([x.ravel(), y.ravel()], 1) + rng.normal(0, jitter * spacing_px, (rows * cols, 2))
    return pts[rng.permutation(len(pts))] % size_px


def _polys(rng, cx, cy, r, ecc, irregular, theta=None, n: int = 12) -> np.ndarray:
    """Irregular ellipses ``(N, n, 2)`` int32 in 1/16 px (cv2 ``shift=4``), one per centre; all arguments are
    arrays of length N (or scalars)."""
    m = len(cx)
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.asarray(r, np.float64).reshape(-1, 1) * (
        1 + np.asarray(irregular).reshape(-1, 1) * rng.standard_normal((m, n)).clip(-2, 2)
    )
    rad = (rad + np.roll(rad, 1, 1) + np.roll(rad, -1, 1)) / 3
    th = rng.uniform(0, np.pi, (m, 1)) if theta is None else np.asarray(theta).reshape(-1, 1)
    x, y = rad * np.cos(t), rad * np.sin(t) * np.asarray(ecc).reshape(-1, 1)
    px = np.asarray(cx).reshape(-1, 1) + x * np.cos(th) - y * np.sin(th)
    py = np.asarray(cy).reshape(-1, 1) + x * np.sin(th) + y * np.cos(th)
    return (np.stack([px, py], -1) * 16).astype(np.int32)


def _scaled(polys: np.ndarray, f: float) -> np.ndarray:
    c = polys.mean(1, keepdims=True)
    return ((polys - c) * f + c).astype(np.int32)


class _Canvas:
    """A periodic ``(T, T, 4)`` texture under construction (channels as in the module docstring); every shape is
    drawn at each wrapped copy that touches the square, so the texture tiles the plane."""

    def __init__(self, size: int):
        self.size = size
        self.img = np.zeros((4, size, size), np.uint8)

    def _wrapped(self, polys: np.ndarray) -> list[np.ndarray]:
        s = self.size * 16
        lo, hi = polys.min(1), polys.max(1)
        out = [polys]
        for a in (-s, 0, s):
            for b in (-s, 0, s):
                if a == b == 0:
                    continue
                sel = (lo[:, 0] + a < s) & (hi[:, 0] + a >= 0) & (lo[:, 1] + b < s) & (hi[:, 1] + b >= 0)
                if sel.any():
                    out.append(polys[sel] + np.array([a, b], np.int32))
        return out

    def fill(self, channel: int, polys: np.ndarray, value, scale: float = 1.0, aa: bool = True) -> None:
        """Fill polygons in one channel; ``value`` is a scalar or one value per polygon (drawn in one cv2 call per
        distinct quantised value)."""
        import cv2

        if not len(polys):
            return
        v = np.clip(np.broadcast_to(np.asarray(value, np.float64) * scale, (len(polys),)), 0, 255).astype(np.int64)
        for val in np.unique(v)[::-1]:  # descending: where cells overlap, the lowest rank is drawn last
            for group in self._wrapped(polys[v == val]):
                cv2.fillPoly(self.img[channel], list(group), int(val), cv2.LINE_AA if aa else cv2.LINE_8, shift=4)

    def cells(self, polys: np.ndarray, ranks: np.ndarray) -> None:
        """Cell footprints: rank (quantised to 64 levels, no antialiasing) and coverage."""
        self.fill(2, polys, (np.asarray(ranks) // 4) * 4, aa=False)
        self.fill(3, polys, 255)

    def image(self, rng: np.random.Generator, k: float) -> np.ndarray:
        img = np.ascontiguousarray(self.img.transpose(1, 2, 0))
        gain = 1 + 0.13 * smooth_noise(rng, (self.size, self.size), 7 * k, periodic=True)  # nucleus to nucleus
        img[..., 0] = np.clip(img[..., 0] * gain, 0, 255).astype(np.uint8)
        img[..., 2][img[..., 3] == 0] = 255
        return img


H, E = 0, 1


def _field_ranks(rng, pts: np.ndarray, size: int, scale: float, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Ranks following a smooth field (so cells kept at low density cluster); returns ``(pts, ranks)`` sorted by
    descending rank, the drawing order that keeps a present cell whole where it overlaps an absent one."""
    field = smooth_noise(rng, (size, size), scale, periodic=True)
    v = field[pts[:, 1].astype(int) % size, pts[:, 0].astype(int) % size] + noise * rng.standard_normal(len(pts))
    r = _ranks(v)
    order = np.argsort(-r.astype(int), kind="stable")
    return pts[order], r[order]


def _random_ranks(rng, n: int) -> np.ndarray:
    """Random ranks in descending order (centres come shuffled, so this is a random assignment)."""
    return np.sort(rng.integers(0, 255, n))[::-1]


def _nuclei(
    cv, rng, pts, k, r, ecc, irr, h_rim, h_core, specks=0, h_speck=None, nucleolus=None, theta=None, ranks=None
):
    """Nuclei at ``pts`` (µm radii ``r`` etc. as arrays): a rim polygon, a paler core when ``h_core < h_rim``
    (vesicular chromatin), chromatin specks and optional nucleoli (``nucleolus``: µm radii, 0 = none)."""
    x, y = pts[:, 0], pts[:, 1]
    outer = _polys(rng, x, y, r * k, ecc, irr, theta)
    if ranks is not None:  # a nucleus carries its own cell's rank, so a neighbour's absence never cuts it
        cv.cells(outer, ranks)
    cv.fill(H, outer, h_rim, H_SCALE)
    cv.fill(E, outer, 0.3, E_SCALE)  # nuclei take some eosin too: purple rather than navy
    if h_core < h_rim:
        cv.fill(H, _scaled(outer, 0.76), h_core, H_SCALE)
    if specks:
        m = len(x) * specks
        a, d = rng.uniform(0, 2 * np.pi, m), rng.uniform(0, 0.7, m) * np.repeat(r * k, specks)
        sx, sy = np.repeat(x, specks) + d * np.cos(a), np.repeat(y, specks) + d * np.sin(a) * np.repeat(ecc, specks)
        cv.fill(H, _polys(rng, sx, sy, rng.uniform(0.3, 0.55, m) * k, 1.0, 0.1, n=6), h_speck or h_rim, H_SCALE)
    if nucleolus is not None:
        on = nucleolus > 0
        a, d = rng.uniform(0, 2 * np.pi, on.sum()), rng.uniform(0, 0.3, on.sum()) * (r * k)[on]
        nx, ny = x[on] + d * np.cos(a), y[on] + d * np.sin(a)
        nuc = _polys(rng, nx, ny, nucleolus[on] * k, 0.9, 0.08, n=8)
        cv.fill(H, nuc, 1.9, H_SCALE)
        cv.fill(E, nuc, 0.75, E_SCALE)
    return outer


def lymphocytes(rng, size: int, k: float) -> np.ndarray:
    """Small lymphocytes: round dark nuclei (r 2.5–3.3 µm), a thin rim of cytoplasm, packed at ~6.7 µm."""
    cv = _Canvas(size)
    pts = _centres(rng, size, 6.7 * k, 0.28)
    n = len(pts)
    r = rng.uniform(2.5, 3.3, n)
    foot = _polys(rng, pts[:, 0], pts[:, 1], (r + 0.8) * k, 0.95, 0.05, n=10)
    cv.fill(E, foot, 0.35, E_SCALE)
    cv.fill(H, foot, 0.15, H_SCALE)
    ranks = _random_ranks(rng, n)
    cv.cells(foot, ranks)
    _nuclei(cv, rng, pts, k, r, rng.uniform(0.85, 1.0, n), 0.05, 2.3, 2.3, specks=2, h_speck=2.9, ranks=ranks)
    return cv.image(rng, k)


def germinal_centre(rng, size: int, k: float) -> np.ndarray:
    """Centroblasts (large vesicular nuclei, peripheral nucleoli), centrocytes (cleaved, mid-sized) and tingible-body
    macrophages (pale cytoplasm with dark debris), loosely packed in pale cytoplasm."""
    cv = _Canvas(size)
    pts = _centres(rng, size, 9.0 * k, 0.3)
    u = rng.uniform(size=len(pts))
    ranks = _random_ranks(rng, len(pts))
    tbm, cb, cc = u < 0.06, (u >= 0.06) & (u < 0.5), u >= 0.5
    for sel, foot_r, e in ((tbm, 9.5, 0.3), (cb, 6.5, 0.3), (cc, 4.8, 0.28)):
        foot = _polys(rng, pts[sel, 0], pts[sel, 1], foot_r * k * rng.uniform(0.85, 1.15, sel.sum()), 0.88, 0.1)
        cv.fill(E, foot, e, E_SCALE)
        cv.fill(H, foot, 0.12, H_SCALE)
        cv.cells(foot, ranks[sel])
    m = cb.sum()
    r = rng.uniform(4.0, 5.0, m)
    _nuclei(cv, rng, pts[cb], k, r, rng.uniform(0.75, 0.95, m), 0.07, 1.55, 0.75, ranks=ranks[cb],
            specks=3, nucleolus=rng.uniform(0.5, 0.7, m))  # fmt: skip
    m = cc.sum()
    _nuclei(cv, rng, pts[cc], k, rng.uniform(3.0, 3.8, m), rng.uniform(0.6, 0.85, m), 0.16, 1.8, 1.5, specks=2,
            ranks=ranks[cc])  # fmt: skip
    m = tbm.sum() * 4  # apoptotic debris in the macrophages
    d = np.repeat(pts[tbm], 4, 0) + rng.normal(0, 3 * k, (m, 2))
    cv.fill(H, _polys(rng, d[:, 0], d[:, 1], rng.uniform(0.8, 1.6, m) * k, 1.0, 0.1, n=8), 2.6, H_SCALE)
    return cv.image(rng, k)


def histiocytes(rng, size: int, k: float) -> np.ndarray:
    """Histiocytes: abundant pale, finely vacuolated pink cytoplasm; oval or bean-shaped pale nuclei with fine
    chromatin and a small nucleolus. Ranks follow a smooth field so sparse histiocytes cluster."""
    cv = _Canvas(size)
    pts, ranks = _field_ranks(rng, _centres(rng, size, 15.0 * k, 0.25), size, 40 * k, 0.5)
    n = len(pts)
    foot = _polys(rng, pts[:, 0], pts[:, 1], rng.uniform(8.5, 11, n) * k, rng.uniform(0.7, 0.95, n), 0.1, n=9)
    cv.fill(E, foot, 0.45, E_SCALE)
    cv.fill(H, foot, 0.1, H_SCALE)
    cv.cells(foot, ranks)
    m = n * 4  # foamy vacuoles
    v = np.repeat(pts, 4, 0) + rng.normal(0, 4 * k, (m, 2))
    cv.fill(E, _polys(rng, v[:, 0], v[:, 1], rng.uniform(0.8, 1.5, m) * k, 1.0, 0.1, n=6), 0.28, E_SCALE)
    off = pts + rng.normal(0, 2 * k, (n, 2))
    _nuclei(cv, rng, off, k, rng.uniform(3.6, 4.6, n), rng.uniform(0.5, 0.7, n), 0.1, 1.15, 0.85, specks=2, ranks=ranks,
            nucleolus=rng.uniform(0.4, 0.5, n))  # fmt: skip
    return cv.image(rng, k)


def tumour(rng, size: int, k: float, grade: int = 1) -> np.ndarray:
    """Metastatic carcinoma: cohesive polygonal cells with eosinophilic cytoplasm and faint borders; large
    pleomorphic vesicular nuclei (chromatin along the membrane, pale core, coarse clumps) with prominent nucleoli;
    occasional mitoses. ``grade=2``: larger, more irregular nuclei and larger nucleoli. Ranks follow a smooth field,
    so low densities leave cohesive nests and clusters."""
    cv = _Canvas(size)
    hi = grade >= 2
    pts, ranks = _field_ranks(rng, _centres(rng, size, (16.5 if hi else 15.5) * k, 0.22), size, 30 * k, 0.35)
    n = len(pts)
    foot = _polys(rng, pts[:, 0], pts[:, 1], (10.0 if hi else 9.2) * k, rng.uniform(0.8, 1.0, n), 0.12, n=7)
    cv.fill(E, foot, 0.84, E_SCALE)  # cell borders, a little darker than the cytoplasm
    cv.fill(H, foot, 0.3, H_SCALE)
    cv.fill(E, _scaled(foot, 0.9), 0.78, E_SCALE)
    cv.fill(H, _scaled(foot, 0.9), 0.22, H_SCALE)
    cv.cells(foot, ranks)
    mit = rng.uniform(size=n) < 0.02
    r = rng.uniform(4.8, 7.2, n) if hi else rng.uniform(4.0, 5.8, n)
    nl = rng.uniform(1.0, 1.5, n) if hi else rng.uniform(0.7, 1.1, n)
    _nuclei(cv, rng, pts[~mit] + rng.normal(0, 1.5 * k, ((~mit).sum(), 2)), k, r[~mit],
            rng.uniform(0.6, 0.95, (~mit).sum()), 0.16 if hi else 0.11, 1.8, 0.95, specks=7, h_speck=2.1,
            nucleolus=nl[~mit], ranks=ranks[~mit])  # fmt: skip
    m = mit.sum() * 6  # mitoses: dark irregular chromosome clumps
    d = np.repeat(pts[mit], 6, 0) + rng.normal(0, 1.5 * k, (m, 2))
    cv.fill(H, _polys(rng, d[:, 0], d[:, 1], rng.uniform(0.8, 1.4, m) * k, 1.0, 0.2, n=6), 2.8, H_SCALE)
    return cv.image(rng, k)


def spindle_cells(rng, size: int, k: float) -> np.ndarray:
    """Fibroblasts and endothelial cells: thin elongated nuclei, sparse, mostly aligned per texture."""
    cv = _Canvas(size)
    pts = _centres(rng, size, 17.0 * k, 0.4)
    n = len(pts)
    th = rng.uniform(0, np.pi) + rng.normal(0, 0.35, n)
    foot = _polys(rng, pts[:, 0], pts[:, 1], rng.uniform(4.5, 7.0, n) * k, 0.22, 0.04, theta=th)
    cv.cells(foot, _random_ranks(rng, n))
    cv.fill(H, foot, 1.9, H_SCALE)
    cv.fill(E, foot, 0.2, E_SCALE)
    return cv.image(rng, k)


def adipocytes(rng, size: int, k: float) -> np.ndarray:
    """Fat: polygonal empty vacuoles (50–100 µm) framed by thin pink membranes with rare flat nuclei. Each
    adipocyte's membrane carries its own rank, so a density map keeps or drops whole cells."""
    import cv2
    from scipy.spatial import cKDTree

    spacing = rng.uniform(60, 80) * k
    seeds = _centres(rng, size, spacing, 0.35)
    off = np.array([(a, b) for a in (-size, 0, size) for b in (-size, 0, size)])
    allp = (seeds[None] + off[:, None]).reshape(-1, 2)
    half = size // 2
    yy, xx = np.mgrid[0:half, 0:half] * 2.0 + 0.5
    _, idx = cKDTree(allp).query(np.stack([xx.ravel(), yy.ravel()], 1), k=1)
    lab = (idx % len(seeds)).reshape(half, half).astype(np.int32)
    edge = np.zeros((half, half), np.uint8)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge = cv2.resize(edge * 255, (size, size), interpolation=cv2.INTER_LINEAR)
    edge = cv2.GaussianBlur(edge, (0, 0), 0.5 * k)
    lab_full = cv2.resize(lab, (size, size), interpolation=cv2.INTER_NEAREST)
    ranks = rng.integers(0, 255, len(seeds)).astype(np.uint8)
    img = np.zeros((size, size, 4), np.uint8)
    a = np.clip(edge.astype(np.float32) * 2.2, 0, 255)
    img[..., 1] = int(0.55 * E_SCALE)
    img[..., 0] = int(0.08 * H_SCALE)
    img[..., 2] = ranks[lab_full]
    img[..., 3] = a.astype(np.uint8)
    ys, xs = np.nonzero(edge[::8, ::8] > 200)  # rare flattened nuclei on the membranes
    m = min(len(ys), max(1, int(size * size / (spacing * spacing) * 0.3)))
    pick = rng.choice(len(ys), size=m, replace=False)
    x, y = xs[pick] * 8.0, ys[pick] * 8.0
    nuc = np.zeros((size, size), np.uint8)
    cv2.fillPoly(nuc, list(_polys(rng, x, y, 3.5 * k, 0.35, 0.05, n=8)), 255, cv2.LINE_AA, shift=4)
    on = nuc > 0
    img[..., 0][on] = int(1.6 * H_SCALE)
    img[..., 3] = np.maximum(img[..., 3], nuc)
    return img


def background(rng, size: int, k: float) -> np.ndarray:
    """Two channels (uint8, mean ~128): fibrillar stroma texture (a few µm wavy fibres) and fine grain (~1 µm)."""
    import cv2

    fib = smooth_noise(rng, (size, size), 4 * k, periodic=True)
    fib = np.abs(fib)  # ridges of |noise| read as wavy fibres
    grain = smooth_noise(rng, (size, size), 1.2 * k, periodic=True)
    out = np.stack([np.clip(255 - fib * 110, 0, 255), np.clip(128 + grain * 40, 0, 255)], -1)
    return cv2.GaussianBlur(out.astype(np.uint8), (3, 3), 0)


BUILDERS: dict[str, Callable[..., np.ndarray]] = {
    "fat": adipocytes,
    "spindle": spindle_cells,
    "lym": lymphocytes,
    "hist": histiocytes,
    "gc": germinal_centre,
    "tum": tumour,
}


@lru_cache(maxsize=2)
def build_textures(seed: int, mpp: float, size: int = 1024, grade: int = 1) -> dict[str, np.ndarray]:
    """All population textures and ``bg`` (``size`` px square at ``mpp`` µm/px). Cached: slides of a cohort share
    a few texture sets (a slide's own phases, layout and stain make its pixels its own)."""
    k = 1.0 / mpp
    out = {}
    for i, name in enumerate(("bg", *POPULATIONS)):
        rng = np.random.default_rng([seed, 101, i])
        if name == "bg":
            out[name] = background(rng, size, k)
        elif name == "tum":
            out[name] = tumour(rng, size, k, grade)
        else:
            out[name] = BUILDERS[name](rng, size, k)
    return out
