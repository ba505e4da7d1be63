"""Synthetic whole-slide images: pyramidal TIFFs that OpenSlide and tiffslide both read, with ground truth.

Each slide is tissue (pink stroma with purple nuclei) on a white background, written Aperio-style (level 0 tiled
JPEG with an Aperio ImageDescription carrying ``AppMag`` and ``MPP``, an untiled thumbnail page, then tiled
reduced levels at 4× and 16×). Positive slides hold a few small tumour foci (``tumor_fraction`` of the tissue).
Their evidence is fine nuclear detail: tumour nuclei have the same mean colour and nearly the same size as normal
ones but a coarse chromatin texture with a period of ~1 µm and a nucleolus, clear at 20× (0.5 µm/px) and averaged
away at 5× (2 µm/px), where only a faint difference in nuclear density remains.

Outputs of :func:`make_cohort`: ``DIR/slides/{slide_id}.svs``, ``DIR/masks/{slide_id}_tumor.png`` (tumour mask at
``MASK_DOWNSAMPLE`` level-0 px per mask px) and ``DIR/manifest.csv`` (``case_id,slide_id,label,path,tumor_mask,…``).
Besides binary classification, ``task="hierarchical"`` writes fine/coarse labels (two subtly different fine classes
per coarse class) and ``task="survival"`` writes ``time,event`` whose hazard rises with the tumour burden.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsimil.io import atomic_path, write_csv, write_json
from wsimil.progress import track
from wsimil.slide.synth_layout import HIERARCHY

MASK_DOWNSAMPLE = 16
#: lesion kinds of :func:`render_slide` → extra nuclear density inside the foci (fraction of the stroma's)
LESIONS = {"tumor": 0.25, "high_grade": 0.25, "hyperplasia": 1.0}
TASKS = ("classification", "hierarchical", "survival")
#: ``toy``: the generator of this module; ``camelyon``: lymph-node sections (:mod:`wsimil.slide.synth_camelyon`)
PRESETS = ("toy", "camelyon")
#: hierarchical cohort: fine class → (coarse class, lesion or None for no lesion)
BACKGROUND = np.array([243, 242, 245], dtype=np.float32)
STROMA = np.array([232, 178, 208], dtype=np.float32)
NUCLEUS = np.array([92, 58, 140], dtype=np.float32)


@dataclass
class SynthSlide:
    slide_id: str
    label: int | str  # hierarchical task: the fine class name
    path: Path
    mask_path: Path
    tumor_fraction: float  # of tissue area


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (f - f.mean()) / (f.std() + 1e-8)


def _tissue_mask(rng, mh: int, mw: int) -> np.ndarray:
    """A blobby tissue region covering roughly half of the slide, away from the borders."""
    yy, xx = np.mgrid[0:mh, 0:mw]
    ellipse = ((xx - mw / 2) / (0.42 * mw)) ** 2 + ((yy - mh / 2) / (0.40 * mh)) ** 2
    field = _smooth_field(rng, (mh, mw), sigma=max(mh, mw) / 14) - 1.6 * ellipse
    return field > np.quantile(field, 0.55)


def _tumor_mask(rng, tissue: np.ndarray, fraction: float, n_foci: int) -> np.ndarray:
    """``n_foci`` round foci inside the tissue whose union covers about ``fraction`` of the tissue area."""
    mh, mw = tissue.shape
    ys, xs = np.nonzero(tissue)
    area = fraction * tissue.sum() / n_foci
    r = max(1.5, np.sqrt(area / np.pi))
    yy, xx = np.mgrid[0:mh, 0:mw]
    mask = np.zeros_like(tissue)
    for _ in range(n_foci):
        i = rng.integers(len(ys))
        mask |= (yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 <= r * r
    return mask & tissue


def _sprites(rng, n: int, tumor: bool, px_per_um: float, grade: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Nucleus stamps ``(alpha (s, s), colour (s, s, 3))``. Normal: smooth, evenly stained. Tumour: same mean
    colour, slightly larger, with a chromatin checker texture of period ~1 µm and a dark nucleolus. ``grade=2``
    (high-grade tumour): larger nuclei, stronger chromatin contrast and a larger nucleolus, from the same random
    draws."""
    hi = tumor and grade >= 2
    out = []
    for _ in range(n):
        r_um = (rng.uniform(4.4, 5.6) if hi else rng.uniform(3.4, 4.4)) if tumor else rng.uniform(2.8, 3.6)
        ecc = rng.uniform(0.75, 1.0)
        r = r_um * px_per_um
        s = int(np.ceil(2 * r + 4))
        yy, xx = np.mgrid[0:s, 0:s] - (s - 1) / 2
        th = rng.uniform(0, np.pi)
        u = xx * np.cos(th) + yy * np.sin(th)
        v = (-xx * np.sin(th) + yy * np.cos(th)) / ecc
        d = np.sqrt(u * u + v * v) / r
        alpha = np.clip((1.0 - d) * r / 1.5, 0, 1) * 0.92
        shade = 1.0 + 0.06 * rng.standard_normal()
        colour = np.broadcast_to(NUCLEUS * shade, (s, s, 3)).copy()
        if tumor:
            period = max(2.0, 2.0 * px_per_um)  # 2 µm: 4 px at 20x (kept after resizing to 224), 1 px at 5x
            phase = rng.uniform(0, 2 * np.pi, 2)
            tex = np.sign(np.sin(2 * np.pi * xx / period + phase[0]) * np.sin(2 * np.pi * yy / period + phase[1]))
            colour = colour * (1.0 + (0.8 if hi else 0.6) * tex[..., None])
            cy, cx = rng.uniform(-0.3, 0.3, 2) * r
            nucleolus = (yy - cy) ** 2 + (xx - cx) ** 2 <= ((0.32 if hi else 0.22) * r) ** 2
            colour[nucleolus] = NUCLEUS * 0.45
        out.append((alpha.astype(np.float32), np.clip(colour, 0, 255).astype(np.float32)))
    return out


def render_slide(
    seed: int,
    width: int,
    height: int,
    mpp: float = 0.25,
    positive: bool = False,
    tumor_fraction: float = 0.03,
    n_foci: int | None = None,
    lesion: str = "tumor",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render level 0 ``(H, W, 3)`` uint8 and return it with the tissue and tumour (lesion) masks at
    ``MASK_DOWNSAMPLE``. ``lesion`` (when ``positive``) picks what the foci hold: ``tumor`` (textured tumour nuclei,
    25% denser), ``high_grade`` (larger high-grade tumour nuclei, 25% denser) or ``hyperplasia`` (normal nuclei,
    twice as dense)."""
    import cv2

    if lesion not in LESIONS:
        raise ValueError(f"unknown lesion {lesion!r}; choose from {sorted(LESIONS)}")

    rng = np.random.default_rng(seed)
    mh, mw = -(-height // MASK_DOWNSAMPLE), -(-width // MASK_DOWNSAMPLE)
    tissue = _tissue_mask(rng, mh, mw)
    tumor = np.zeros_like(tissue)
    if positive:
        tumor = _tumor_mask(rng, tissue, tumor_fraction, n_foci or int(rng.integers(1, 4)))

    # smooth tissue edge and stroma texture at level 0 from low-resolution fields, built strip by strip in
    # uint8 so a large slide never needs full-size float buffers
    edge_lo = cv2.GaussianBlur(tissue.astype(np.float32), (5, 5), 1.0)
    tex_lo = _smooth_field(rng, (mh * 2, mw * 2), 1.5).astype(np.float32)
    alpha8 = cv2.resize(
        np.clip((edge_lo - 0.35) * 4, 0, 1) * 255, (width, height), interpolation=cv2.INTER_LINEAR
    ).astype(np.uint8)
    tex8 = cv2.resize(np.clip(tex_lo * 40 + 128, 0, 255), (width, height), interpolation=cv2.INTER_LINEAR).astype(
        np.uint8
    )
    img = np.empty((height, width, 3), dtype=np.uint8)
    for y0 in range(0, height, 512):
        y1 = min(y0 + 512, height)
        a = alpha8[y0:y1, :, None].astype(np.float32) / 255
        t = (tex8[y0:y1, :, None].astype(np.float32) - 128) / 40
        strip = BACKGROUND * (1 - a) + STROMA * (1 + 0.035 * t) * a
        strip += rng.standard_normal((y1 - y0, width, 1), dtype=np.float32) * 2.0
        img[y0:y1] = np.clip(strip, 0, 255)
    del alpha8, tex8

    px_per_um = 1.0 / mpp
    normal_sprites = _sprites(rng, 48, False, px_per_um)
    tumor_sprites = _sprites(rng, 48, True, px_per_um)
    lesion_sprites = {"tumor": tumor_sprites, "hyperplasia": normal_sprites}.get(lesion)
    if lesion_sprites is None:  # drawn after the default sprites so the default slide's random stream is unchanged
        lesion_sprites = _sprites(rng, 48, True, px_per_um, grade=2)
    spacing_um = 11.0  # mean distance between nuclei in stroma; tumour foci are a little denser
    area_um2 = width * height * mpp * mpp
    n = rng.poisson(area_um2 / spacing_um**2)
    pts = rng.uniform(0, 1, (n, 2)) * (width, height)
    extra = []
    if positive:  # +25% nuclei inside tumour foci: the faint cue that survives at low magnification
        ty, tx = np.nonzero(tumor)
        if len(ty):
            k = rng.poisson(LESIONS[lesion] * len(ty) * (MASK_DOWNSAMPLE * mpp) ** 2 / spacing_um**2)
            j = rng.integers(len(ty), size=k)
            extra = np.stack(
                [(tx[j] + rng.uniform(0, 1, k)) * MASK_DOWNSAMPLE, (ty[j] + rng.uniform(0, 1, k)) * MASK_DOWNSAMPLE], 1
            )
    if len(extra):
        pts = np.concatenate([pts, extra])
    for x, y in pts:
        mx, my = int(x) // MASK_DOWNSAMPLE, int(y) // MASK_DOWNSAMPLE
        if not tissue[min(my, mh - 1), min(mx, mw - 1)]:
            continue
        is_tumor = positive and tumor[min(my, mh - 1), min(mx, mw - 1)]
        alpha, colour = (lesion_sprites if is_tumor else normal_sprites)[rng.integers(48)]
        s = alpha.shape[0]
        x0, y0 = int(x) - s // 2, int(y) - s // 2
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + s, width), min(y0 + s, height)
        if xa >= xb or ya >= yb:
            continue
        al = alpha[ya - y0 : yb - y0, xa - x0 : xb - x0, None]
        region = img[ya:yb, xa:xb].astype(np.float32)
        region += al * (colour[ya - y0 : yb - y0, xa - x0 : xb - x0] - region)
        img[ya:yb, xa:xb] = np.clip(region, 0, 255)
    return img, tissue, tumor


def write_aperio_tiff(
    path: str | Path,
    img: np.ndarray,
    mpp: float = 0.25,
    app_mag: int = 40,
    downsamples: tuple[int, ...] = (4, 16),
    tile: int = 256,
    quality: int = 80,
    aperio: bool = True,
) -> Path:
    """Write an Aperio-like pyramid (see FORMATS.md) atomically. With ``aperio=False``: a generic tiled TIFF
    whose reduced levels carry ``subfiletype=1`` and whose resolution is in CENTIMETER (or none if ``mpp`` is
    ``None``)."""
    import cv2
    import tifffile

    h, w = img.shape[:2]
    levels = [img] + [
        cv2.resize(img, (max(1, w // d), max(1, h // d)), interpolation=cv2.INTER_AREA)
        for d in downsamples
        if min(w // d, h // d) >= 64
    ]
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality}, "photometric": "rgb", "metadata": None}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=False) as tw:
        if aperio:
            desc = (
                f"Aperio Image Library v10.0.0\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                f"|AppMag = {app_mag}|MPP = {mpp}"
            )
            tw.write(levels[0], tile=(tile, tile), description=desc, **jpeg)
            thumb_ds = max(w, h) / 768
            thumb = cv2.resize(
                img, (max(1, int(w / thumb_ds)), max(1, int(h / thumb_ds))), interpolation=cv2.INTER_AREA
            )
            tw.write(thumb, description="Aperio Image Library v10.0.0\nthumbnail", **jpeg)
            for lvl in levels[1:]:
                tw.write(lvl, tile=(tile, tile), description="Aperio Image Library v10.0.0\n", **jpeg)
        else:
            res = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
            tw.write(levels[0], tile=(tile, tile), **jpeg, **res)
            for i, lvl in enumerate(levels[1:]):
                r = (
                    {}
                    if mpp is None
                    else {"resolution": (1e4 / (mpp * downsamples[i]),) * 2, "resolutionunit": "CENTIMETER"}
                )
                tw.write(lvl, tile=(tile, tile), subfiletype=1, **jpeg, **r)
    return Path(path)


def _slide_plan(task: str, n_slides: int, seed: int, pos_fraction: float, tumor_fraction: float) -> list[dict]:
    """Per slide: ``label``, ``positive``, ``lesion``, ``tumor_fraction`` and the task's extra manifest columns."""
    rng = np.random.default_rng(seed)
    if task == "classification":
        n_pos = int(round(n_slides * pos_fraction))
        labels = rng.permutation([1] * n_pos + [0] * (n_slides - n_pos))
        return [
            {"label": int(y), "positive": bool(y), "lesion": "tumor", "tumor_fraction": tumor_fraction, "columns": {}}
            for y in labels
        ]
    if task == "hierarchical":
        names = list(HIERARCHY)
        fine = rng.permutation([names[i % len(names)] for i in range(n_slides)])
        plan = []
        for f in fine:
            coarse, lesion = HIERARCHY[str(f)]
            plan.append(
                {
                    "label": str(f),
                    "positive": lesion is not None,
                    "lesion": lesion or "tumor",
                    "tumor_fraction": tumor_fraction,
                    "columns": {"fine_label": str(f), "coarse_label": coarse},
                }
            )
        return plan
    # survival: target burdens spread evenly over [0, 3·tumor_fraction]; the lowest sixth carry no tumour
    target = rng.permutation(np.linspace(0.0, 3.0 * tumor_fraction, n_slides))
    return [
        {
            "label": int(t >= 0.5 * tumor_fraction),
            "positive": bool(t >= 0.5 * tumor_fraction),
            "lesion": "tumor",
            "tumor_fraction": float(t),
            "columns": {},
        }
        for t in target
    ]


def check_cohort_options(
    n_slides: int,
    width: int | None,
    height: int | None,
    mpp: float,
    tumor_fraction: float,
    task: str,
    preset: str = "toy",
) -> None:
    """Refuse ``wsimil synth`` options no cohort can be drawn with, in one line, before anything is written
    (``width``/``height`` None: the preset's size)."""
    from wsimil.errors import WsimilError

    if preset not in PRESETS:
        raise WsimilError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if task not in TASKS:
        raise WsimilError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    least = 4 if task == "hierarchical" else 2
    if n_slides < least:
        raise WsimilError(f"--slides must be at least {least} for a {task} cohort (every class needs a slide)")
    if min(width or 256, height or 256) < 256:
        raise WsimilError(f"--width and --height must be at least 256 pixels, got {width}x{height}")
    if not 0.1 <= mpp <= 2.0:
        raise WsimilError(f"--mpp must be in 0.1–2.0 µm/px (0.25 is a 40x scan, 0.5 a 20x scan), got {mpp:g}")
    if not 0 <= tumor_fraction <= 0.3:
        raise WsimilError(f"--tumor-fraction is a share of the tissue in [0, 0.3], got {tumor_fraction:g}")


def make_cohort(
    out: str | Path,
    n_slides: int = 40,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    mpp: float = 0.25,
    app_mag: int = 40,
    tumor_fraction: float = 0.03,
    pos_fraction: float = 0.5,
    task: str = "classification",
    preset: str = "toy",
    workers: int = 1,
    size_shares: dict[str, float] | None = None,
) -> list[SynthSlide]:
    """Write a synthetic cohort and its manifest; returns the slides. ``preset``: ``toy`` (this module; 12288 ×
    8192 px by default) or ``camelyon`` (lymph-node sections, :mod:`wsimil.slide.synth_camelyon`; 12 × 9.5 mm by
    default, ``workers`` slides at a time, ``size_shares`` of the metastasis size classes among positive slides,
    extra manifest columns). ``task``:

    - ``classification`` (default): ``pos_fraction`` of the slides hold tumour foci; ``label`` 1/0.
    - ``hierarchical``: four fine classes in two coarse ones (:data:`HIERARCHY`), balanced: ``normal`` (no lesion)
      and ``hyperplasia`` (foci of twice-as-dense normal nuclei) under ``benign``; ``low_grade`` (the default
      tumour) and ``high_grade`` (larger nuclei, stronger chromatin texture and a larger nucleolus) under
      ``malignant``. Fine classes differ subtly within a coarse class (nuclear density or nuclear detail at the
      same focus size). Columns ``label`` (= fine class), ``fine_label``, ``coarse_label``; the tumour mask marks
      every lesion.
    - ``survival``: tumour burden (tumour share of the tissue) spread from 0 to about ``3·tumor_fraction``;
      ``time,event`` (months) from an exponential model whose hazard rises with the burden (×e per
      ``1.4·tumor_fraction`` more burden) with uniform censoring (:func:`wsimil.data.synthetic.survival_times`).
      Columns ``time``, ``event``, ``burden`` and ``label`` (1 = any tumour).

    The default task writes exactly the same files as before the other tasks existed (same seed, same bytes)."""
    from PIL import Image

    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose from {', '.join(PRESETS)}")
    out = Path(out)
    if preset == "camelyon":
        return _camelyon_cohort(out, n_slides, seed, width, height, mpp, app_mag, tumor_fraction, pos_fraction, task,
                                workers, size_shares)  # fmt: skip
    width, height = width or 12288, height or 8192
    slides, rows = [], []
    plan = _slide_plan(task, n_slides, seed, pos_fraction, tumor_fraction)
    for i in track(range(n_slides), "Synthesising slides"):
        sid = f"synth_{i:04d}"
        p = plan[i]
        img, tissue, tumor = render_slide(
            int(np.random.SeedSequence([seed, i]).generate_state(1)[0]),
            width,
            height,
            mpp,
            p["positive"],
            p["tumor_fraction"],
            lesion=p["lesion"],
        )
        path = write_aperio_tiff(out / "slides" / f"{sid}.svs", img, mpp, app_mag)
        mask_path = out / "masks" / f"{sid}_tumor.png"
        with atomic_path(mask_path) as tmp:
            Image.fromarray((tumor * 255).astype(np.uint8)).save(tmp, format="PNG")
        burden = float(tumor.sum() / max(tissue.sum(), 1))
        slides.append(SynthSlide(sid, p["label"], path, mask_path, burden))
        rows.append({"case_id": sid, "slide_id": sid, "label": p["label"], **p["columns"]})
    if task == "survival":
        _add_survival(rows, slides, seed, tumor_fraction)
    for r, s in zip(rows, slides, strict=True):
        r.update(path=str(s.path.resolve()), tumor_mask=str(s.mask_path.resolve()), mask_downsample=MASK_DOWNSAMPLE)
    write_csv(out / "manifest.csv", pd.DataFrame(rows))
    info = {
        "n_slides": n_slides,
        "seed": seed,
        "width": width,
        "height": height,
        "mpp": mpp,
        "app_mag": app_mag,
        "tumor_fraction": tumor_fraction,
        "mask_downsample": MASK_DOWNSAMPLE,
    }
    write_json(out / "cohort.json", info if task == "classification" else {**info, "task": task})
    return slides


def _add_survival(rows: list[dict], slides: list[SynthSlide], seed: int, tumor_fraction: float) -> None:
    from wsimil.data.synthetic import survival_times

    burden = np.array([s.tumor_fraction for s in slides])
    time, event = survival_times(burden / tumor_fraction, np.random.default_rng([seed, 3]), log_hazard_ratio=0.7)
    for r, t, e, b in zip(rows, time, event, burden, strict=True):
        r.update(time=float(t), event=int(e), burden=round(float(b), 6))


def _camelyon_cohort(
    out, n_slides, seed, width, height, mpp, app_mag, tumor_fraction, pos_fraction, task, workers, shares
) -> list[SynthSlide]:
    from wsimil.slide import synth_camelyon as cam

    dw, dh = cam.default_size(mpp)
    width, height = width or dw, height or dh
    plan = cam.plan_slides(task, n_slides, seed, pos_fraction, tumor_fraction, shares or cam.DEFAULT_SHARES)
    measured = cam.make_camelyon_slides(out, plan, seed, width, height, mpp, app_mag, workers)
    slides, rows = [], []
    for i, (p, m) in enumerate(zip(plan, measured, strict=True)):
        sid = f"synth_{i:04d}"
        slides.append(SynthSlide(sid, p["label"], Path(m["path"]), Path(m["tumor_mask"]), m["tumor_fraction"]))
        rows.append({"case_id": sid, "slide_id": sid, "label": p["label"], **p["columns"]})
    if task == "survival":
        _add_survival(rows, slides, seed, tumor_fraction)
    for r, m in zip(rows, measured, strict=True):
        r.update(m)
    write_csv(out / "manifest.csv", pd.DataFrame(rows))
    info = {"preset": "camelyon", "n_slides": n_slides, "seed": seed, "width": width, "height": height, "mpp": mpp,
            "app_mag": app_mag, "task": task, "tumor_fraction": tumor_fraction, "pos_fraction": pos_fraction,
            "size_shares": shares or cam.DEFAULT_SHARES, "map_um": cam.MAP_UM}  # fmt: skip
    write_json(out / "cohort.json", info)
    return slides
