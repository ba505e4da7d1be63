"""The ``camelyon`` synthetic preset: procedural H&E lymph-node sections with nodal metastases (no image is copied
from anywhere). See :mod:`wsimil.slide.synth_layout` for what a slide holds and :mod:`wsimil.slide.synth_render`
for how pixels are made. Slides are written by worker processes, one slide each, chunk by chunk.

Per slide the manifest gains: ``mimic_mask`` (PNG of :data:`~wsimil.slide.synth_layout.MIMICS` codes: 1 germinal
centre, 2 sinus histiocytosis, 3 histiocyte cluster), ``largest_focus_mm`` (largest dimension of the largest tumour
focus), ``size_class`` (``macro`` > 2 mm, ``micro`` 0.2–2 mm, ``itc`` < 0.2 mm, or ``negative``),
``tumor_fraction`` (tumour share of the tissue) and ``artefacts`` (``fold``, ``pen``, ``bubble``, ``blur``).
Masks are at :data:`~wsimil.slide.synth_layout.MAP_UM` µm per pixel (``mask_downsample`` = that / level-0 µm/px).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from wsimil.io import atomic_path
from wsimil.slide.synth_layout import (
    HIERARCHY,
    MAP_UM,
    SIZE_CLASSES,
    SlideSpec,
    largest_focus_mm,
    make_layout,
    size_class,
)

#: slide size (mm) when none is given: with 1–3 node sections and their fat, ~40–60 mm² of tissue
SLIDE_MM = (12.0, 9.5)
#: default shares of the metastasis size classes among positive slides (a choice, not an epidemiological figure)
DEFAULT_SHARES = {"macro": 0.4, "micro": 0.4, "itc": 0.2}
TEXTURE_UM = 512.0  # period of the cell textures


def default_size(mpp: float) -> tuple[int, int]:
    return int(round(SLIDE_MM[0] * 1000 / mpp)), int(round(SLIDE_MM[1] * 1000 / mpp))


def _classes(rng, n_pos: int, shares: dict[str, float]) -> list[str]:
    """``n_pos`` size classes in the given shares (largest remainder), shuffled."""
    if set(shares) - set(SIZE_CLASSES) or min(shares.values()) < 0 or sum(shares.values()) <= 0:
        raise ValueError(f"size-class shares must be non-negative over {SIZE_CLASSES}, got {shares}")
    p = np.array([shares.get(c, 0.0) for c in SIZE_CLASSES], float)
    want = p / p.sum() * n_pos
    k = np.floor(want).astype(int)
    for i in np.argsort(-(want - k))[: n_pos - k.sum()]:
        k[i] += 1
    return list(rng.permutation(np.repeat(SIZE_CLASSES, k)))


def plan_slides(task: str, n: int, seed: int, pos_fraction: float, tumor_fraction: float, shares: dict) -> list[dict]:
    """Per slide: ``label``, ``spec`` (:class:`SlideSpec`) and the task's extra manifest columns."""
    rng = np.random.default_rng([seed, 5])
    if task == "classification":
        n_pos = int(round(n * pos_fraction))
        labels = rng.permutation([1] * n_pos + [0] * (n - n_pos))
        classes = iter(_classes(rng, n_pos, shares))
        return [{"label": int(y), "spec": SlideSpec(next(classes) if y else None), "columns": {}} for y in labels]
    if task == "hierarchical":
        names = list(HIERARCHY)
        fine = [str(f) for f in rng.permutation([names[i % len(names)] for i in range(n)])]
        classes = iter(_classes(rng, sum(f in ("low_grade", "high_grade") for f in fine), shares))
        plan = []
        for f in fine:
            spec = SlideSpec(
                next(classes) if f in ("low_grade", "high_grade") else None,
                grade=2 if f == "high_grade" else 1,
                hyperplasia=f == "hyperplasia",
            )
            plan.append({"label": f, "spec": spec, "columns": {"fine_label": f, "coarse_label": HIERARCHY[f][0]}})
        return plan
    target = rng.permutation(np.linspace(0.0, 3.0 * tumor_fraction, n))  # survival, as in the toy preset
    return [
        {
            "label": int(t >= 0.5 * tumor_fraction),
            "spec": SlideSpec(target_fraction=float(t) if t >= 0.5 * tumor_fraction else None),
            "columns": {},
        }
        for t in target
    ]


def render_slide_files(
    out: Path, sid: str, seed: int, spec: SlideSpec, width: int, height: int, mpp: float, app_mag: int
) -> dict:
    """Write one slide and its masks; return its measured manifest columns."""
    from PIL import Image

    from wsimil.slide.synth_render import SlideRenderer, Stain, write_streamed_pyramid
    from wsimil.slide.synth_textures import build_textures

    shape = (int(np.ceil(height * mpp / MAP_UM)), int(np.ceil(width * mpp / MAP_UM)))
    layout = make_layout(seed, shape, spec)
    tex_px = max(256, int(round(TEXTURE_UM / mpp / 64)) * 64)
    textures = build_textures(seed % 3, mpp, tex_px, spec.grade)
    renderer = SlideRenderer(layout, mpp, seed, textures, Stain.draw(np.random.default_rng([seed, 13])))
    path = write_streamed_pyramid(out / "slides" / f"{sid}.svs", width, height, renderer.render, mpp, app_mag)
    masks = {}
    for name, arr in (("tumor", layout.lesion.astype(np.uint8) * 255), ("mimic", layout.mimic)):
        masks[name] = out / "masks" / f"{sid}_{name}.png"
        with atomic_path(masks[name]) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
    tissue = layout.tissue > 0.5
    mm = largest_focus_mm(layout.tumour)
    return {
        "path": str(path.resolve()),
        "tumor_mask": str(masks["tumor"].resolve()),
        "mask_downsample": MAP_UM / mpp,
        "mimic_mask": str(masks["mimic"].resolve()),
        "largest_focus_mm": round(mm, 3),
        "size_class": size_class(mm),
        "tumor_fraction": round(float((layout.tumour & tissue).sum() / max(tissue.sum(), 1)), 6),
        "artefacts": ",".join(layout.artefacts),
    }


def _job(args: tuple) -> dict:
    return render_slide_files(*args)


def _worker_threads(threads: int) -> None:
    """Pool initializer: spawned workers do not inherit the parent's OpenCV thread count, and each would otherwise
    start a pool as large as the machine."""
    import cv2

    cv2.setNumThreads(threads)


def make_camelyon_slides(
    out: Path, plan: list[dict], seed: int, width: int, height: int, mpp: float, app_mag: int, workers: int = 1
) -> list[dict]:
    """Write every planned slide (``workers`` processes) and return their measured columns, in plan order."""
    from wsimil.progress import track

    jobs = [
        (
            out,
            f"synth_{i:04d}",
            int(np.random.SeedSequence([seed, i]).generate_state(1)[0]),
            p["spec"],
            width,
            height,
            mpp,
            app_mag,
        )
        for i, p in enumerate(plan)
    ]
    if workers <= 1:
        return [_job(j) for j in track(jobs, "Synthesising slides")]
    from wsimil.threads import plan_threads

    threads = plan_threads(None, "image", workers=workers).cv2  # the image-work rule `wsimil tile` applies
    with ProcessPoolExecutor(workers, get_context("spawn"), initializer=_worker_threads, initargs=(threads,)) as pool:
        return list(track(pool.map(_job, jobs), "Synthesising slides", total=len(jobs)))


def composition(manifest: pd.DataFrame) -> pd.DataFrame:
    """Cohort composition: slides, share of tissue that is tumour and largest focus (median, range) per size
    class, and how many slides carry each artefact."""
    rows = []
    for cls in ("macro", "micro", "itc", "negative"):
        m = manifest[manifest.size_class == cls]
        if not len(m):
            continue
        rows.append(
            {
                "size_class": cls,
                "slides": len(m),
                "median_focus_mm": round(float(m.largest_focus_mm.median()), 3),
                "focus_mm_range": f"{m.largest_focus_mm.min():.2f}-{m.largest_focus_mm.max():.2f}",
                "median_tumor_fraction": round(float(m.tumor_fraction.median()), 5),
                "with_artefacts": int((m.artefacts.fillna("") != "").sum()),
            }
        )
    return pd.DataFrame(rows)


def composition_text(manifest: str | Path) -> str:
    """The composition table of a cohort's manifest, as text."""
    return composition(pd.read_csv(manifest)).to_string(index=False)


STAT_NAMES = ("mean_r", "mean_g", "mean_b", "dark_fraction", "saturation")


def low_power_statistics(rgb: np.ndarray, patch: int = 256, min_tissue: float = 0.25) -> dict[str, float]:
    """Slide-level maxima of single colour/density statistics over the tissue patches of a 5× image (``rgb`` at
    2 µm/px): mean R, G, B, fraction of dark pixels (grey < 120) and mean HSV saturation, each over the patch's
    tissue pixels. These are the shortcuts a cohort must not reward: on a good synthetic cohort none of them alone
    separates positive from negative slides."""
    import cv2

    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32)
    grey = rgb.mean(-1)
    tissue = (sat > 20) & (grey < 225)
    best = dict.fromkeys(STAT_NAMES, -np.inf)
    h, w = grey.shape
    for y in range(0, max(h - patch // 2, 1), patch):
        for x in range(0, max(w - patch // 2, 1), patch):
            t = tissue[y : y + patch, x : x + patch]
            if t.mean() < min_tissue:
                continue
            px = rgb[y : y + patch, x : x + patch][t].astype(np.float32)
            vals = (*px.mean(0), float((px.mean(-1) < 120).mean()), float(sat[y : y + patch, x : x + patch][t].mean()))
            for k, v in zip(STAT_NAMES, vals, strict=True):
                best[k] = max(best[k], float(v))
    return best


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count half)."""
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(
        ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    )
