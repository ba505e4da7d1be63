"""Low-resolution layout of a ``camelyon`` synthetic slide: where each tissue compartment, tumour focus, mimic and
artefact lies, as maps of :data:`MAP_UM` µm per pixel. The renderer (:mod:`wsimil.slide.synth_render`) turns these
maps into full-resolution pixels tile by tile.

A slide holds 1–3 lymph-node sections, each an irregular oval with a hilar notch, wrapped in a partial rim of
perinodal fat. Inside a node, depth from the surface decides the compartments: capsule, subcapsular sinus, cortex
(with follicles: germinal centre in a mantle of small lymphocytes), paracortex, and medulla (cords and sinuses),
with a few fibrous trabeculae. Metastases are irregular infiltrating foci of a size class (macro > 2 mm, micro
0.2–2 mm, isolated tumour cells < 0.2 mm, by largest dimension), placed like real ones (small foci mostly in the
subcapsular sinus and outer cortex). Mimics: germinal centres, sinus histiocytosis, histiocyte clusters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wsimil.slide.synth_textures import smooth_noise

MAP_UM = 8.0
# compartment labels
BG, FAT, CAPSULE, SUBCAP, CORTEX, MANTLE, GC, PARACORTEX, CORD, MSINUS, TRABECULA = range(11)
#: per compartment: lym, gc, hist, tum, spindle, fat densities and background eosin/hematoxylin (concentrations)
PROPS = np.array(
    [
        # lym  gc   hist tum  spin fat  Ebg   Hbg
        [0.00, 0.0, 0.00, 0.0, 0.00, 0.0, 0.00, 0.00],  # background
        [0.00, 0.0, 0.00, 0.0, 0.00, 1.0, 0.00, 0.00],  # fat
        [0.03, 0.0, 0.00, 0.0, 0.55, 0.0, 0.80, 0.10],  # capsule
        [0.14, 0.0, 0.14, 0.0, 0.10, 0.0, 0.22, 0.05],  # subcapsular sinus
        [0.88, 0.0, 0.00, 0.0, 0.00, 0.0, 0.24, 0.10],  # cortex (interfollicular)
        [1.00, 0.0, 0.00, 0.0, 0.00, 0.0, 0.15, 0.12],  # mantle zone
        [0.12, 1.0, 0.00, 0.0, 0.00, 0.0, 0.33, 0.06],  # germinal centre
        [0.95, 0.0, 0.00, 0.0, 0.00, 0.0, 0.24, 0.10],  # paracortex
        [0.70, 0.0, 0.00, 0.0, 0.00, 0.0, 0.40, 0.12],  # medullary cord
        [0.12, 0.0, 0.18, 0.0, 0.10, 0.0, 0.20, 0.05],  # medullary sinus
        [0.02, 0.0, 0.00, 0.0, 0.45, 0.0, 0.85, 0.08],  # trabecula
    ],
    dtype=np.float32,
)
MIMICS = {1: "germinal_centre", 2: "sinus_histiocytosis", 3: "histiocyte_cluster"}
SIZE_CLASSES = ("macro", "micro", "itc")
#: the hierarchical task's fine class → (coarse class, lesion drawn); shared by the toy and camelyon presets
HIERARCHY = {
    "normal": ("benign", None),
    "hyperplasia": ("benign", "hyperplasia"),
    "low_grade": ("malignant", "tumor"),
    "high_grade": ("malignant", "high_grade"),
}


@dataclass
class SlideSpec:
    """What one slide should hold. ``size_class`` is the class asked for (``None``: no tumour); ``target_fraction``
    (survival cohorts) asks for a tumour share of the tissue instead."""

    size_class: str | None = None
    grade: int = 1
    hyperplasia: bool = False
    target_fraction: float | None = None


@dataclass
class Layout:
    """Maps at :data:`MAP_UM` µm/px (``(mh, mw)``): ``props`` (mh, mw, 8) float32 as :data:`PROPS` columns;
    ``tissue`` float32 0–1; ``tumour`` bool; ``mimic`` uint8 (:data:`MIMICS` codes); ``thick`` float32 (section
    thickness × folds); ``ink`` float32 (pen OD); ``ring`` float32 (bubble edges); ``blur`` float32 (0–1);
    ``lesion`` bool (what the slide's lesion mask marks: tumour, or hyperplastic germinal centres)."""

    props: np.ndarray
    tissue: np.ndarray
    tumour: np.ndarray
    mimic: np.ndarray
    thick: np.ndarray
    ink: np.ndarray
    ring: np.ndarray
    blur: np.ndarray
    lesion: np.ndarray
    artefacts: list[str] = field(default_factory=list)


def _ellipse(shape, cy, cx, ry, rx, angle) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / rx
    v = (-(xx - cx) * s + (yy - cy) * c) / ry
    return np.sqrt(u * u + v * v)


def _nodes(rng, shape) -> list[np.ndarray]:
    """1–3 node sections, each an irregular oval (with a hilar notch) inside its own part of the slide."""
    mh, mw = shape
    k = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    if min(mh, mw) * MAP_UM < 6000:  # a small slide holds one section
        k = 1
    horizontal = mw >= mh
    out = []
    for i in range(k):
        if horizontal:
            cx, cy = (i + 0.5) * mw / k + rng.normal(0, 0.04) * mw / k, mh / 2 + rng.normal(0, 0.05) * mh
            rx, ry = rng.uniform(0.34, 0.44) * mw / k, rng.uniform(0.31, 0.41) * mh * (1 if k == 1 else 0.9)
        else:
            cy, cx = (i + 0.5) * mh / k + rng.normal(0, 0.04) * mh / k, mw / 2 + rng.normal(0, 0.05) * mw
            ry, rx = rng.uniform(0.34, 0.44) * mh / k, rng.uniform(0.31, 0.41) * mw * (1 if k == 1 else 0.9)
        ang = rng.uniform(-0.4, 0.4)
        pad = min(40, 0.08 * min(mh, mw))  # keep clear of the edges
        room_x, room_y = min(cx, mw - cx) * 0.85 - pad, min(cy, mh - cy) * 0.85 - pad
        rx, ry = max(4.0, min(rx, room_x)), max(4.0, min(ry, room_y))
        d = _ellipse(shape, cy, cx, ry, rx, ang)
        f = 1 - d + 0.12 * smooth_noise(rng, shape, max(4, min(rx, ry) * 0.7))
        ha = rng.uniform(0, 2 * np.pi)  # hilar notch
        ex, ey = 1.05 * rx * np.cos(ha), 1.05 * ry * np.sin(ha)  # on the (rotated) outline
        hx, hy = cx + ex * np.cos(ang) - ey * np.sin(ang), cy + ex * np.sin(ang) + ey * np.cos(ang)
        notch = _ellipse(shape, hy, hx, 0.25 * ry, 0.25 * rx, ha)
        out.append((f > 0) & (notch > 1))
    return out


def _blob(rng, shape, cy, cx, diam_px, irregular=0.35) -> np.ndarray:
    """An irregular focus of about ``diam_px`` largest dimension around (cy, cx), computed in a local window."""
    r = max(diam_px / 2, 0.6)
    half = int(np.ceil(r * (1.3 + irregular))) + 3
    y0, x0 = max(0, int(cy) - half), max(0, int(cx) - half)
    y1, x1 = min(shape[0], int(cy) + half + 1), min(shape[1], int(cx) + half + 1)
    out = np.zeros(shape, bool)
    if y1 <= y0 or x1 <= x0:
        return out
    win = (y1 - y0, x1 - x0)
    ecc = rng.uniform(0.5, 0.9)
    d = _ellipse(win, cy - y0, cx - x0, r * ecc, r, rng.uniform(0, np.pi))
    f = 1 - d + irregular * smooth_noise(rng, win, max(2.0, r / 2)) + 0.15 * smooth_noise(rng, win, 3)
    out[y0:y1, x0:x1] = f > 0
    return out


def largest_focus_mm(mask: np.ndarray) -> float:
    """Largest dimension (mm) over the connected foci of a map-resolution mask (longest side of each focus's
    minimum-area rectangle, at least one map pixel)."""
    import cv2

    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    best = 0.0
    for i in np.argsort(-np.hypot(stats[1:, 2], stats[1:, 3])) + 1:  # largest boxes first
        x, y, w, h = stats[i, :4]
        if np.hypot(w, h) + 1.0 <= best:  # no longer side can exceed the box's diagonal
            break
        ys, xs = np.nonzero(lab[y : y + h, x : x + w] == i)
        (_, _), (rw, rh), _ = cv2.minAreaRect(np.stack([xs, ys], 1).astype(np.float32))
        best = max(best, max(rw, rh) + 1.0)
    return best * MAP_UM / 1000.0


def size_class(mm: float) -> str:
    return "negative" if mm <= 0 else "macro" if mm > 2.0 else "micro" if mm >= 0.2 else "itc"


def _tumour(rng, node: np.ndarray, depth_um: np.ndarray, spec: SlideSpec, tissue_px: int) -> np.ndarray:
    """Foci of the asked size class (retried until the largest measured focus falls in it)."""
    shape = node.shape
    want = spec.size_class
    if spec.target_fraction is not None:  # survival: one focus of the area that gives the asked burden
        diam_mm = 2 * np.sqrt(spec.target_fraction * tissue_px / np.pi) * MAP_UM / 1000 * 1.15
        want = None
    if want == "macro":  # in the largest section
        import cv2

        n, lab, stats, _ = cv2.connectedComponentsWithStats(node.astype(np.uint8))
        if n > 2:
            node = lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    ys, xs = np.nonzero(node)
    extent_mm = min(np.ptp(ys), np.ptp(xs)) * MAP_UM / 1000 if len(ys) else 0.0
    for _ in range(8):
        if want == "macro":
            diam_mm = rng.uniform(2.3, max(2.5, min(5.0, 0.75 * extent_mm)))
        elif want is not None:
            diam_mm = rng.uniform(0.35, 1.7) if want == "micro" else rng.uniform(0.06, 0.15)
        diam = diam_mm * 1000 / MAP_UM
        deep = depth_um > (min(diam * MAP_UM / 2.5, 1500) if want == "macro" else 30)
        shallow = deep & (depth_um < 450) if want in ("micro", "itc") and rng.uniform() < 0.7 else deep
        ys, xs = np.nonzero(shallow if shallow.any() else node)
        if not len(ys):
            return np.zeros(shape, bool)
        j = rng.integers(len(ys))
        mask = _blob(rng, shape, ys[j], xs[j], diam, 0.35 if diam > 20 else 0.2)
        if diam > 8:  # infiltrating edge: satellite nests just outside the main outline
            for _ in range(int(rng.integers(2, 7))):
                a, rr = rng.uniform(0, 2 * np.pi), diam / 2 * rng.uniform(0.9, 1.3)
                mask |= _blob(rng, shape, ys[j] + rr * np.sin(a), xs[j] + rr * np.cos(a), rng.uniform(2, 6), 0.2)
        if want in ("micro", "itc") and rng.uniform() < 0.4:  # a second, smaller focus of the same class
            k = rng.integers(len(ys))
            mask |= _blob(rng, shape, ys[k], xs[k], diam * rng.uniform(0.4, 0.8), 0.25)
        mask &= node
        if want is None or size_class(largest_focus_mm(mask)) == want:
            return mask
    return mask


def make_layout(seed: int, shape: tuple[int, int], spec: SlideSpec) -> Layout:
    """The whole layout of one slide from its seed (deterministic)."""
    import cv2

    rng = np.random.default_rng([seed, 7])
    mh, mw = shape
    um = MAP_UM
    nodes = _nodes(rng, shape)
    node = np.zeros(shape, bool)
    for n in nodes:
        node |= n
    margin = max(2, int(min(300 / um, 0.06 * min(shape))))
    edge = np.ones(shape, np.uint8)
    edge[[0, -1], :] = edge[:, [0, -1]] = 0
    to_edge = cv2.distanceTransform(edge, cv2.DIST_L2, 3)
    frame = to_edge > margin * (1.2 + 0.5 * smooth_noise(rng, shape, 800 / um))  # tissue stays clear of the edges
    node &= frame
    rim = cv2.dilate(
        node.astype(np.uint8),
        cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(rng.uniform(300, 1200) / um) + 1,) * 2),
    )
    fat = (rim > 0) & ~node & (smooth_noise(rng, shape, 600 / um) > rng.uniform(-0.6, 0.3)) & frame
    depth = cv2.distanceTransform(node.astype(np.uint8), cv2.DIST_L2, 5) * um  # µm from the node surface
    nd = np.zeros(shape, np.float32)  # depth normalised per node section
    n_lab, lab = cv2.connectedComponents(node.astype(np.uint8))
    for i in range(1, n_lab):
        m = lab == i
        nd[m] = depth[m] / max(depth[m].max(), 1)

    cap = rng.uniform(20, 45)
    sinus_w = rng.uniform(15, 45) * (1.8 if rng.uniform() < 0.3 else 1.0)
    cortex = rng.uniform(500, 1000) * (1 + 0.3 * smooth_noise(rng, shape, 500 / um))
    med = rng.uniform(0.55, 0.72) + 0.12 * smooth_noise(rng, shape, 600 / um)
    reg = np.full(shape, BG, np.uint8)
    reg[fat] = FAT
    reg[node] = PARACORTEX
    reg[node & (depth < cortex)] = CORTEX
    cords = np.abs(smooth_noise(rng, shape, 70 / um)) > 0.45
    reg[node & (nd > med) & cords] = CORD
    reg[node & (nd > med) & ~cords] = MSINUS
    trab = (np.abs(smooth_noise(rng, shape, 400 / um)) < 0.05) & node & (nd < med) & (depth > cap + sinus_w)
    reg[trab] = TRABECULA
    reg[node & (depth < cap + sinus_w)] = SUBCAP
    reg[node & (depth < cap)] = CAPSULE

    # follicles in the cortex: a mantle of small lymphocytes around a (usually) pale germinal centre
    mimic = np.zeros(shape, np.uint8)
    gc_all = np.zeros(shape, bool)
    band = node & (depth > cap + sinus_w + 60) & (depth < cortex * (1.6 if spec.hyperplasia else 1.0))
    ys, xs = np.nonzero(band)
    n_fol = int(band.sum() * um * um / 1e6 * rng.uniform(0.8, 2.2) * (1.8 if spec.hyperplasia else 1.0))
    for _ in range(min(max(n_fol, 2), 400) if len(ys) else 0):
        j = rng.integers(len(ys))
        r = rng.uniform(130, 300) * (1.6 if spec.hyperplasia else 1.0) / um
        fol = _blob(rng, shape, ys[j], xs[j], 2 * r, 0.12) & node & (depth > cap + sinus_w)
        reg[fol] = MANTLE
        if spec.hyperplasia or rng.uniform() < 0.75:  # secondary follicle
            gc = _blob(rng, shape, ys[j] + r * 0.1, xs[j], 2 * r * rng.uniform(0.55, 0.75), 0.1) & fol
            reg[gc] = GC
            gc_all |= gc
    mimic[gc_all] = 1

    props = PROPS[reg].copy()
    props[..., 0] *= rng.uniform(0.55, 1.0)  # cellularity varies between nodes (reactive, depleted, fatty)
    histiocytosis = rng.uniform() < 0.5
    if histiocytosis:  # sinuses packed with histiocytes (pale pink at low power)
        m = np.isin(reg, (SUBCAP, MSINUS)) & (smooth_noise(rng, shape, 300 / um) > -0.3)
        props[m, 2] = rng.uniform(0.6, 0.95)
        props[m, 0] *= 0.5
        props[m, 6] = 0.35
        mimic[m] = 2
    if rng.uniform() < 0.55:  # histiocyte clusters (granuloma-like aggregates) in the node
        ys, xs = np.nonzero(node & (depth > 100))
        for _ in range(int(rng.integers(1, 7)) if len(ys) else 0):
            j = rng.integers(len(ys))
            m = _blob(rng, shape, ys[j], xs[j], rng.uniform(60, 450) / um, 0.3) & node
            props[m, 2] = 0.95
            props[m, 0] *= 0.25
            props[m, 6] = 0.42
            mimic[m] = 3

    tissue_px = int((node | fat).sum())
    tumour = np.zeros(shape, bool)
    if spec.size_class or spec.target_fraction:
        tumour = _tumour(rng, node, depth, spec, tissue_px)
    if tumour.any():
        dens = np.clip(0.8 + 0.45 * smooth_noise(rng, shape, 80 / um), 0.3, 1.0) * tumour
        if largest_focus_mm(tumour) < 0.2:
            dens = 0.55 * tumour  # isolated tumour cells: a loose cluster (ranks keep it cohesive)
        props[..., 3] = dens
        keep = 1 - 0.92 * dens
        props[..., 0] *= keep
        props[..., 1] *= keep
        props[..., 2] *= keep
        props[..., 6] = props[..., 6] * keep + 0.5 * dens
        mimic[tumour] = 0
    # per-compartment density jitter, then soften edges to a cell or two
    props[..., :3] *= np.clip(1 + 0.12 * smooth_noise(rng, shape, 150 / um)[..., None], 0.6, 1.4)
    props = cv2.GaussianBlur(props, (0, 0), 0.8)
    tissue = cv2.GaussianBlur((node | fat).astype(np.float32), (0, 0), 0.8)

    thick = rng.uniform(0.85, 1.2) * (1 + 0.12 * smooth_noise(rng, shape, 1500 / um))
    ink = np.zeros(shape, np.float32)
    ring = np.zeros(shape, np.float32)
    blur = np.zeros(shape, np.float32)
    arts = []
    for _ in range(int(rng.choice([0, 0, 1, 2]))):  # mildly out-of-focus patches
        d = _ellipse(shape, rng.uniform(0, mh), rng.uniform(0, mw), *rng.uniform(400, 1500, 2) / um, 0)
        blur = np.maximum(blur, np.clip(1.5 - d, 0, 1) * rng.uniform(0.5, 1.0))
    if rng.uniform() < 0.15:  # a fold: tissue lying double along a curved band
        f = smooth_noise(rng, shape, 2500 / um)
        band = (np.abs(f - rng.uniform(-0.5, 0.5)) < rng.uniform(0.02, 0.05)) & (node | fat)
        thick = thick * (1 + 0.9 * cv2.GaussianBlur(band.astype(np.float32), (0, 0), 1.0))
        arts.append("fold")
    if rng.uniform() < 0.08:  # pen mark: a stroke crossing the slide
        f = smooth_noise(rng, shape, 3000 / um)
        stroke = np.abs(f - rng.uniform(-0.8, 0.8)) < rng.uniform(0.03, 0.06)
        ink = cv2.GaussianBlur(stroke.astype(np.float32), (0, 0), 1.5) * rng.uniform(0.6, 1.2)
        arts.append("pen")
    if rng.uniform() < 0.1:  # an air bubble: a dark rim
        d = _ellipse(
            shape, rng.uniform(0.2, 0.8) * mh, rng.uniform(0.2, 0.8) * mw, *(rng.uniform(400, 1500) / um,) * 2, 0
        )
        ring = np.clip(1 - np.abs(d - 1) * rng.uniform(20, 40), 0, 1).astype(np.float32) * 0.6
        arts.append("bubble")
    if blur.any():
        arts.append("blur")
    lesion = tumour if not spec.hyperplasia else gc_all
    return Layout(props, tissue, tumour, mimic, thick.astype(np.float32), ink, ring, blur, lesion, arts)
