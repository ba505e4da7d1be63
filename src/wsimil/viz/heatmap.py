"""Heatmaps: per-patch scores (attention or instance probabilities) over a slide thumbnail, with tissue contours, a
colour bar and the top-k patches as a strip.

Attention weights are shown as their percentile within the slide by default (``scale="rank"``; as CLAM's heatmaps
do — raw weights are dominated by a few patches and their scale depends on the bag size); instance probabilities on
their absolute 0–1 scale. The figure is exactly ``size`` pixels wide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsimil.errors import WsimilError
from wsimil.io import atomic_path

SCALES = ("auto", "rank", "minmax", "absolute")
CMAP = "turbo"


def scale_values(values: np.ndarray, scale: str, kind: str = "attention") -> tuple[np.ndarray, str]:
    """Map scores to ``[0, 1]`` for colouring; returns ``(values, colour-bar label)``.

    ``rank``: percentile within the slide, ``(rank − 1) / (N − 1)`` with ties averaged (one patch: 1); ``minmax``:
    ``(v − min) / (max − min)`` (all equal: 1); ``absolute``: clipped to ``[0, 1]`` (probabilities); ``auto``:
    ``absolute`` for instance probabilities, ``rank`` otherwise."""
    from scipy.stats import rankdata

    v = np.asarray(values, dtype=np.float64)
    if scale == "auto":
        scale = "absolute" if kind == "instance" else "rank"
    if scale not in SCALES:
        raise WsimilError(f"unknown heatmap scale {scale!r}; choose from {', '.join(SCALES)}")
    what = "probability" if kind == "instance" else "attention"
    if scale == "absolute":
        return np.clip(v, 0, 1), what
    if len(v) <= 1:
        return np.ones_like(v), f"{what} ({scale})"
    if scale == "rank":
        return (rankdata(v) - 1) / (len(v) - 1), f"{what} (percentile within slide)"
    lo, hi = v.min(), v.max()
    return (np.ones_like(v) if hi <= lo else (v - lo) / (hi - lo)), f"{what} (min–max within slide)"


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first (ties: lower index first)."""
    v = np.asarray(values)
    return np.argsort(-v, kind="stable")[: max(0, min(k, len(v)))]


def overlay(
    thumb: np.ndarray,
    ds: float,
    coords: np.ndarray,
    patch_size_level0: float,
    values: np.ndarray,
    alpha: float = 0.5,
    cmap: str = CMAP,
) -> np.ndarray:
    """Blend colour-mapped ``values`` (in ``[0, 1]``) over an RGB thumbnail whose pixels span ``ds`` level-0
    pixels: each patch's footprint gets ``(1 − α) · thumb + α · colour(value)``; pixels outside every patch keep
    the thumbnail. Overlapping patches: the later one wins."""
    import matplotlib

    h, w = thumb.shape[:2]
    canvas = np.full((h, w), np.nan, dtype=np.float32)
    x0 = np.floor(coords[:, 0] / ds).astype(int)
    y0 = np.floor(coords[:, 1] / ds).astype(int)
    s = patch_size_level0 / ds
    x1 = np.ceil((coords[:, 0] + patch_size_level0) / ds - 1e-6).astype(int)
    y1 = np.ceil((coords[:, 1] + patch_size_level0) / ds - 1e-6).astype(int)
    if s < 1:  # patches smaller than a thumbnail pixel still get one pixel
        x1, y1 = np.maximum(x1, x0 + 1), np.maximum(y1, y0 + 1)
    for i in range(len(coords)):
        canvas[max(y0[i], 0) : min(y1[i], h), max(x0[i], 0) : min(x1[i], w)] = values[i]
    covered = ~np.isnan(canvas)
    colours = matplotlib.colormaps[cmap](np.nan_to_num(canvas))[..., :3] * 255
    out = thumb.astype(np.float32)
    out[covered] = (1 - alpha) * out[covered] + alpha * colours[covered]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def draw_contours(img: np.ndarray, mask: np.ndarray, colour=(20, 20, 20), width: int = 2) -> np.ndarray:
    """Draw the outlines of a tissue ``mask`` (same size as ``img``) on ``img`` (in place; returned)."""
    import cv2

    from wsimil.slide.tissue import tissue_contours

    contours = [c.reshape(-1, 1, 2).astype(np.int32) for c in tissue_contours(mask)]
    cv2.drawContours(img, contours, -1, colour, width)
    return img


def read_patches(slide, coords: np.ndarray, patch_size_level0: float, target_mpp: float | None, px: int) -> list:
    """RGB patches ``(px, px, 3)`` at ``coords`` read from the level closest below ``target_mpp`` (level 0 when
    unknown) and resized to ``px``."""
    import cv2

    level = slide.best_level(target_mpp) if target_mpp else 0
    ds = slide.level_downsamples[level]
    n = max(1, int(np.ceil(patch_size_level0 / ds)))
    out = []
    for x, y in coords:
        img = slide.read_region((int(x), int(y)), level, (n, n))
        out.append(cv2.resize(img, (px, px), interpolation=cv2.INTER_AREA if n > px else cv2.INTER_LINEAR))
    return out


@dataclass
class HeatmapInput:
    """What a heatmap needs about one slide and one map."""

    slide_id: str
    slide_path: str
    coords: np.ndarray  # (N, 2) level-0
    patch_size_level0: float
    values: np.ndarray  # (N,) raw scores
    name: str = "attention"  # map name, e.g. "attention:tumour" or "instance:1"
    kind: str = "attention"  # "attention" or "instance"
    mag: float | None = None  # magnification of the patches (for reading the top-k strip)
    mpp: float | None = None  # level-0 µm/px override
    subtitle: str = ""


def render_heatmap(
    h: HeatmapInput,
    out_png: str | Path | None = None,
    size: int = 1600,
    k: int = 8,
    scale: str = "auto",
    alpha: float = 0.5,
    reader: str = "auto",
) -> np.ndarray:
    """Draw one heatmap figure (``size`` px wide PNG at ``out_png`` when given); returns the RGB image.

    Layout: title, the slide thumbnail with the colour-mapped scores and tissue contours (top-k patches outlined
    and numbered), a colour bar, and below a strip of the ``k`` top-scoring patches read at the patches'
    magnification, each with its rank and raw score."""
    import cv2
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    from wsimil.slide.reader import open_slide
    from wsimil.slide.tissue import detect_tissue

    if len(h.coords) != len(h.values):
        raise WsimilError(f"slide {h.slide_id!r}: {len(h.coords)} patch coordinates but {len(h.values)} scores")
    if size < 200:
        raise WsimilError(f"heatmap size {size} px is too small (at least 200)")
    dpi = 100
    margin, cbar_w, cbar_pad = 0.02 * size, 0.02 * size, 0.09 * size
    img_w = size - 2 * margin - cbar_w - cbar_pad
    vals, label = scale_values(h.values, scale, h.kind)
    top = top_k(h.values, k)
    with open_slide(h.slide_path, reader, mpp=h.mpp, slide_id=h.slide_id) as slide:
        w0, h0 = slide.dimensions
        thumb, ds = slide.thumbnail(int(round(img_w)) if w0 >= h0 else int(round(img_w * h0 / w0)))
        mask = detect_tissue(thumb, ds * slide.mpp)
        img = overlay(thumb, ds, h.coords, h.patch_size_level0, vals, alpha)
        draw_contours(img, mask, (30, 30, 30), max(1, size // 800))
        lw = max(1, size // 600)
        for rank, i in enumerate(top, 1):
            x, y = int(h.coords[i, 0] / ds), int(h.coords[i, 1] / ds)
            s = max(2, int(round(h.patch_size_level0 / ds)))
            cv2.rectangle(img, (x, y), (x + s - 1, y + s - 1), (255, 255, 255), lw)
            fsc = float(np.clip(s / 90, 0.3, 1.0))
            cv2.putText(img, str(rank), (x + 3, y + int(24 * fsc) + 2), cv2.FONT_HERSHEY_SIMPLEX, fsc, (255,) * 3, lw)
        strip_px = int((img_w - (k - 1) * 4) / k) if k else 0
        patches = read_patches(slide, h.coords[top], h.patch_size_level0, 10 / h.mag if h.mag else None, strip_px)
    th, tw = img.shape[:2]
    img_h = img_w * th / tw
    title_h, strip_h = 0.045 * size, (strip_px + 0.035 * size if k and len(top) else 0)
    height = int(round(title_h + img_h + strip_h + 2 * margin))
    fig = plt.figure(figsize=(size / dpi, height / dpi), dpi=dpi)
    fs = max(7, size / 110)

    def box(x, y_top, w, hh):  # pixels from the top-left → figure fractions
        return [x / size, 1 - (y_top + hh) / height, w / size, hh / height]

    fig.text(margin / size, 1 - margin * 0.6 / height, f"{h.slide_id} — {h.name}", va="top", fontsize=fs * 1.2)
    if h.subtitle:
        fig.text(margin / size, 1 - (margin * 0.6 + fs * 1.9) / height, h.subtitle, va="top", fontsize=fs * 0.9)
    ax = fig.add_axes(box(margin, title_h + margin * 0.5, img_w, img_h))
    ax.imshow(img, interpolation="none")
    ax.set_axis_off()
    cax = fig.add_axes(box(margin + img_w + cbar_w * 0.6, title_h + margin * 0.5, cbar_w, img_h))
    sm = matplotlib.cm.ScalarMappable(norm=Normalize(0, 1), cmap=CMAP)
    cb = fig.colorbar(sm, cax=cax)
    cb.set_label(label, fontsize=fs)
    cb.ax.tick_params(labelsize=fs * 0.85)
    y_strip = title_h + margin * 0.5 + img_h + 0.01 * size
    for j, (i, p) in enumerate(zip(top, patches, strict=True)):
        pax = fig.add_axes(box(margin + j * (strip_px + 4), y_strip, strip_px, strip_px))
        pax.imshow(p)
        pax.set_xticks([])
        pax.set_yticks([])
        pax.set_xlabel(f"#{j + 1}  {h.values[i]:.3g}", fontsize=fs * 0.8, labelpad=2)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    if out_png is not None:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return rgb


def safe_name(name: str) -> str:
    """A file-name-safe version of a map name (``attention:tumour/x`` → ``attention-tumour_x``)."""
    return "".join(c if c.isalnum() or c in "-_." else ("-" if c == ":" else "_") for c in name)


def heatmaps_from_scores(
    scores_h5: str | Path,
    out_dir: str | Path,
    maps: list[str] | None = None,
    size: int = 1600,
    k: int = 8,
    scale: str = "auto",
    slide_path: str | None = None,
    reader: str = "auto",
) -> list[Path]:
    """One PNG per map of a scores file written by ``wsimil predict`` (``OUT/scores/{slide_id}.h5``):
    ``out_dir/{slide_id}__{map}.png``. ``maps`` picks maps by name (default: all)."""
    from wsimil.inference import read_scores

    s = read_scores(scores_h5)
    a = s["attrs"]
    sid = str(a.get("slide_id", Path(scores_h5).stem))
    path = slide_path or a.get("slide_path")
    if not path:
        raise WsimilError(f"slide {sid!r}: {scores_h5} records no slide file (scored from features); pass --slides")
    if s["coords"] is None or a.get("patch_size_level0") is None:
        raise WsimilError(f"slide {sid!r}: {scores_h5} has no patch coordinates or patch size to place scores")
    names = maps or list(s["maps"])
    unknown = [m for m in names if m not in s["maps"]]
    if unknown:
        raise WsimilError(f"slide {sid!r}: no map {', '.join(unknown)}; available: {', '.join(s['maps'])}")
    probs = np.atleast_1d(s["probs"])
    classes = json.loads(a["classes"]) if "classes" in a else [str(i) for i in range(len(probs))]
    pred = ", ".join(f"P({c}) = {p:.2f}" for c, p in zip(classes, probs, strict=True))
    out = []
    for name in names:
        kind = "instance" if name.startswith("instance") else "attention"
        h = HeatmapInput(
            sid,
            str(path),
            s["coords"],
            float(a["patch_size_level0"]),
            s["maps"][name],
            name,
            kind,
            a.get("mag"),
            a.get("mpp"),
            subtitle="ensemble prediction: " + pred,
        )
        png = Path(out_dir) / f"{sid}__{safe_name(name)}.png"
        render_heatmap(h, png, size, k, scale, reader=reader)
        out.append(png)
    return out


def heatmaps_for_predictions(
    pred_dir: str | Path, out_dir: str | Path, maps: list[str] | None = None, slides: str | Path | None = None, **kw
) -> tuple[list[Path], dict[str, str]]:
    """Heatmaps of every slide scored by ``wsimil predict`` into ``pred_dir`` (``pred_dir/scores/*.h5``); returns
    ``(PNG paths, {slide_id: error})``. ``slides`` locates slide files that moved since. ``kw``: size, k, scale."""
    from wsimil.slide.job import collect_slides

    files = sorted((Path(pred_dir) / "scores").glob("*.h5"))
    if not files:
        raise WsimilError(f"no per-patch scores in {Path(pred_dir) / 'scores'} (run `wsimil predict` first)")
    paths = {s.slide_id: s.path for s in collect_slides(slides)} if slides is not None else {}
    out, failed = [], {}
    for f in files:
        try:
            out += heatmaps_from_scores(f, out_dir, maps, slide_path=paths.get(f.stem), **kw)
        except WsimilError as e:
            failed[f.stem] = str(e)
    return out, failed


def heatmaps_for_run(
    run: str | Path,
    out_dir: str | Path,
    maps: list[str] | None = None,
    slides: str | Path | None = None,
    size: int = 1600,
    k: int = 8,
    scale: str = "auto",
) -> tuple[list[Path], dict[str, str]]:
    """Out-of-fold heatmaps of a training run's slides (each scored by the fold model that held it out, see
    :func:`wsimil.inference.score_run_slides`); returns ``(PNG paths, {slide_id: error})``."""
    from wsimil.inference import score_run_slides

    scored = score_run_slides(run, slides=slides)
    if not scored:
        raise WsimilError(f"run {run}: no slide could be scored (feature folder or bundle missing?)")
    out, failed = [], {}
    for s in scored:
        if s.slide_path is None or s.coords is None or s.patch_size_level0 is None:
            failed[s.slide_id] = "slide file or patch coordinates unknown (pass --slides)"
            continue
        names = maps or list(s.scores.maps)
        for name in names:
            if name not in s.scores.maps:
                failed[s.slide_id] = f"no map {name!r}; available: {', '.join(s.scores.maps)}"
                continue
            kind = "instance" if name.startswith("instance") else "attention"
            h = HeatmapInput(s.slide_id, s.slide_path, s.coords, s.patch_size_level0, s.scores.maps[name], name,
                             kind, s.mag, subtitle=f"fold {s.fold} model (slide held out)")  # fmt: skip
            png = Path(out_dir) / f"{s.slide_id}__{safe_name(name)}.png"
            try:
                render_heatmap(h, png, size, k, scale)
                out.append(png)
            except WsimilError as e:
                failed[s.slide_id] = str(e)
    return out, failed
