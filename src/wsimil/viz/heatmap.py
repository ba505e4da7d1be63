"""Heatmaps: per-patch scores (attention or instance probabilities) over a slide thumbnail, with tissue contours,
the ground-truth tumour outline when the cohort has one, a colour bar and the top-k patches as a strip. The title
gives the slide's predicted probability, the predicted class and the label when known.

Colour scales (``scale``):

- ``absolute`` (default) puts every slide on one fixed scale, so two slides' colours can be compared. Instance
  probabilities and ABMIL's patch evidence (the bag classifier applied to each patch alone) are shown as they are,
  on 0–1: a confidently negative slide stays blue. Softmax attention sums to 1 over a slide's N patches, so a raw
  weight shrinks as the slide grows; it is shown as ``attention × N`` (1 = the uniform share, > 1 = the model
  weighs the patch more than an average patch) on a log scale clipped to [1/16, 16]. That is still *where the
  model looks*, not whether the slide is positive: a confidently negative slide can concentrate its attention too,
  which is why its probability and prediction are in the title.
- ``percentile``: each patch's percentile within its slide (ranks; every slide spans the whole colour range).
- ``minmax``: ``(v − min) / (max − min)`` within the slide.

The figure is exactly ``size`` pixels wide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from wsimil.errors import WsimilError
from wsimil.io import atomic_path

SCALES = ("absolute", "percentile", "minmax")
_ALIASES = {"auto": "absolute", "rank": "percentile"}  # names of earlier versions
CMAP = "turbo"
#: absolute attention: log2(attention × N) is clipped to ±ATTN_LOG2_RANGE (×1/16 … ×16 the uniform share)
ATTN_LOG2_RANGE = 4.0
TISSUE_RGB = (30, 30, 30)
TUMOUR_RGB = (255, 0, 255)  # magenta: not a colour of the turbo map


class Scaled(NamedTuple):
    """Scores mapped to ``[0, 1]`` for colouring, the colour bar's label and its ticks ``{position: text}``."""

    values: np.ndarray
    label: str
    ticks: dict[float, str] | None = None


def scale_values(values: np.ndarray, scale: str = "absolute", kind: str = "attention") -> Scaled:
    """Map scores to ``[0, 1]`` for colouring (see the module docstring).

    ``absolute``: probabilities clipped to ``[0, 1]``; attention ``w`` over ``N`` patches →
    ``(clip(log2(w·N), −R, R) + R) / 2R`` with ``R = ATTN_LOG2_RANGE`` (uniform attention → 0.5).
    ``percentile``: ``(rank − 1) / (N − 1)`` with ties averaged (one patch: 1). ``minmax``: ``(v − min) / (max −
    min)`` (all equal: 1)."""
    from scipy.stats import rankdata

    v = np.asarray(values, dtype=np.float64)
    scale = _ALIASES.get(scale, scale)
    if scale not in SCALES:
        raise WsimilError(f"unknown heatmap scale {scale!r}; choose from {', '.join(SCALES)}")
    what = "probability" if kind == "instance" else "attention"
    if scale == "absolute" and kind == "instance":
        return Scaled(np.clip(v, 0, 1), "probability (absolute, 0–1)")
    if scale == "absolute":
        r = ATTN_LOG2_RANGE
        rel = np.log2(np.maximum(v * len(v), 2.0**-30))
        ticks = {(e + r) / (2 * r): _ratio(e) for e in np.arange(-r, r + 1, 2)}
        ticks[1.0] += "+"
        label = "attention × N (log scale, one for all slides)\n1 = the uniform share 1/N of the N patches"
        return Scaled((np.clip(rel, -r, r) + r) / (2 * r), label, ticks)
    if len(v) <= 1:
        return Scaled(np.ones_like(v), f"{what} ({scale} within slide)")
    if scale == "percentile":
        return Scaled((rankdata(v) - 1) / (len(v) - 1), f"{what} (percentile within slide)")
    lo, hi = v.min(), v.max()
    return Scaled(np.ones_like(v) if hi <= lo else (v - lo) / (hi - lo), f"{what} (min–max within slide)")


def strip_value(values: np.ndarray, i: int, scale: str, kind: str) -> str:
    """Patch ``i``'s score as the top-k strip prints it: attention on the absolute scale as a multiple of the
    uniform share (``2.4× uniform``), anything else as is."""
    if kind != "instance" and _ALIASES.get(scale, scale) == "absolute":
        return f"{values[i] * len(values):.2g}× uniform"
    return f"{values[i]:.3g}"


def _ratio(log2: float) -> str:
    return str(int(2**log2)) if log2 >= 0 else f"1/{int(2**-log2)}"


def map_kind(name: str) -> str:
    """``"instance"`` for maps of per-patch probabilities (``instance:…`` and ABMIL's ``evidence:…``, see
    :mod:`wsimil.predict.score`), ``"attention"`` for the rest."""
    return "instance" if name.split(":")[0] in ("instance", "evidence") else "attention"


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
    probs: np.ndarray | None = None  # (C,) the slide's predicted class probabilities
    classes: list[str] | None = None
    label: str | None = None  # the slide's true class, when known
    tumor_mask: str | None = None  # ground-truth mask image (non-zero = tumour)
    mask_downsample: float | None = None  # level-0 px per mask px (default: slide width / mask width)

    def headline(self) -> str:
        """``P(1) = 0.006 · predicted 0 · label 0 (correct)``: binary tasks give the positive (second) class's
        probability, others the predicted class's."""
        if self.probs is None or not len(self.probs):
            return f"label {self.label}" if self.label is not None else ""
        probs = np.asarray(self.probs, dtype=float)
        classes = self.classes or [str(i) for i in range(len(probs))]
        k = int(np.argmax(probs))
        shown = 1 if len(probs) == 2 else k
        parts = [f"P({classes[shown]}) = {probs[shown]:.3f}", f"predicted {classes[k]}"]
        if self.label is not None:
            parts.append(f"label {self.label} ({'correct' if str(self.label) == classes[k] else 'WRONG'})")
        else:
            parts.append("label unknown")
        return " · ".join(parts)


def tumour_outline(path: str, ds: float, shape: tuple[int, int], mask_downsample: float | None, w0: int):
    """A ground-truth mask image resampled onto a thumbnail of ``shape`` (rows, cols) whose pixels span ``ds``
    level-0 pixels; ``mask_downsample`` level-0 px per mask px (``None``: the mask spans the slide's width ``w0``)."""
    import cv2

    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise WsimilError(f"tumour mask {path} cannot be read as an image")
    mds = float(mask_downsample) if mask_downsample else w0 / m.shape[1]
    w, h = max(1, round(m.shape[1] * mds / ds)), max(1, round(m.shape[0] * mds / ds))
    m = cv2.resize((m > 0).astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_AREA) >= 128
    out = np.zeros(shape, dtype=bool)
    hh, ww = min(h, shape[0]), min(w, shape[1])
    out[:hh, :ww] = m[:hh, :ww]
    return out


def render_heatmap(
    h: HeatmapInput,
    out_png: str | Path | None = None,
    size: int = 1600,
    k: int = 8,
    scale: str = "absolute",
    alpha: float = 0.5,
    reader: str = "auto",
) -> np.ndarray:
    """Draw one heatmap figure (``size`` px wide PNG at ``out_png`` when given); returns the RGB image.

    Layout: title (slide, map; probability, prediction and label; what the outlines mean), the slide thumbnail
    with the colour-mapped scores, tissue contours and the ground-truth tumour outline (top-k patches outlined and
    numbered), a colour bar, and below a strip of the ``k`` top-scoring patches read at the patches'
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
    margin, cbar_w, cbar_pad = 0.02 * size, 0.02 * size, 0.12 * size
    img_w = size - 2 * margin - cbar_w - cbar_pad
    scaled = scale_values(h.values, scale, h.kind)
    top = top_k(h.values, k)
    legend = ["tissue outline: black"]
    with open_slide(h.slide_path, reader, mpp=h.mpp, slide_id=h.slide_id) as slide:
        w0, h0 = slide.dimensions
        thumb, ds = slide.thumbnail(int(round(img_w)) if w0 >= h0 else int(round(img_w * h0 / w0)))
        mask = detect_tissue(thumb, ds * slide.mpp)
        img = overlay(thumb, ds, h.coords, h.patch_size_level0, scaled.values, alpha)
        draw_contours(img, mask, TISSUE_RGB, max(1, size // 800))
        if h.tumor_mask:
            tumour = tumour_outline(h.tumor_mask, ds, img.shape[:2], h.mask_downsample, w0)
            draw_contours(img, tumour, TUMOUR_RGB, max(2, size // 500))
            legend.append(f"ground-truth tumour: magenta ({'none in this slide' if not tumour.any() else 'outlined'})")
        lw = max(1, size // 600)
        for rank, i in enumerate(top, 1):
            x, y = int(h.coords[i, 0] / ds), int(h.coords[i, 1] / ds)
            s = max(2, int(round(h.patch_size_level0 / ds)))
            cv2.rectangle(img, (x, y), (x + s - 1, y + s - 1), (255, 255, 255), lw)
            fsc = float(np.clip(s / 90, 0.3, 1.0))
            cv2.putText(img, str(rank), (x + 3, y + int(24 * fsc) + 2), cv2.FONT_HERSHEY_SIMPLEX, fsc, (255,) * 3, lw)
        strip_px = int((img_w - (k - 1) * 4) / k) if k else 0
        patches = read_patches(slide, h.coords[top], h.patch_size_level0, 10 / h.mag if h.mag else None, strip_px)
    if len(top):
        legend.append(f"white boxes: the top {len(top)} patches by score (below)")
    th, tw = img.shape[:2]
    img_h = img_w * th / tw
    fs = max(7, size / 110)
    lines = [x for x in (h.headline(), h.subtitle, " · ".join(legend)) if x]
    title_h = margin * 0.6 + fs * 1.25 * 1.5 + len(lines) * fs * 1.55
    strip_h = strip_px + 0.035 * size if k and len(top) else 0
    height = int(round(title_h + img_h + strip_h + 2 * margin))
    fig = plt.figure(figsize=(size / dpi, height / dpi), dpi=dpi)

    def box(x, y_top, w, hh):  # pixels from the top-left → figure fractions
        return [x / size, 1 - (y_top + hh) / height, w / size, hh / height]

    fig.text(margin / size, 1 - margin * 0.6 / height, f"{h.slide_id} — {h.name}", va="top", fontsize=fs * 1.25)
    y_line = margin * 0.6 + fs * 1.25 * 1.5
    for j, line in enumerate(lines):
        bold = j == 0 and line == h.headline()
        colour = ("#c62828" if "WRONG" in line else "#1d2430") if bold else "#4a5464"
        fig.text(margin / size, 1 - y_line / height, line, va="top", fontsize=fs * (1.0 if bold else 0.85),
                 fontweight="bold" if bold else "normal", color=colour)  # fmt: skip
        y_line += fs * 1.55
    ax = fig.add_axes(box(margin, title_h + margin * 0.5, img_w, img_h))
    ax.imshow(img, interpolation="none")
    ax.set_axis_off()
    cax = fig.add_axes(box(margin + img_w + cbar_w * 0.6, title_h + margin * 0.5, cbar_w, img_h))
    sm = matplotlib.cm.ScalarMappable(norm=Normalize(0, 1), cmap=CMAP)
    cb = fig.colorbar(sm, cax=cax)
    if scaled.ticks:
        cb.set_ticks(list(scaled.ticks), labels=list(scaled.ticks.values()))
    cb.set_label(scaled.label, fontsize=fs * 0.9)
    cb.ax.tick_params(labelsize=fs * 0.85)
    y_strip = title_h + margin * 0.5 + img_h + 0.01 * size
    for j, (i, p) in enumerate(zip(top, patches, strict=True)):
        pax = fig.add_axes(box(margin + j * (strip_px + 4), y_strip, strip_px, strip_px))
        pax.imshow(p)
        pax.set_xticks([])
        pax.set_yticks([])
        pax.set_xlabel(f"#{j + 1}  {strip_value(h.values, i, scale, h.kind)}", fontsize=fs * 0.8, labelpad=2)
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


def slide_truth(*tables: str | Path | None) -> dict[str, dict]:
    """What slide tables know about each slide: ``{slide_id: {"label", "tumor_mask", "mask_downsample"}}`` (keys
    only when the table has them) from CSVs with ``slide_id`` (or ``path``) and any of ``label``, ``tumor_mask``
    (relative paths are relative to the table) and ``mask_downsample``, such as a manifest of ``wsimil synth`` or a
    job's ``slides.csv``. Earlier tables win; tables that are missing or not CSV files are skipped."""
    out: dict[str, dict] = {}
    for t in tables:
        if t is None or Path(t).suffix.lower() != ".csv" or not Path(t).is_file():
            continue
        df = pd.read_csv(t, dtype=str, keep_default_na=False)
        if "slide_id" not in df.columns and "path" not in df.columns:
            continue
        for _, r in df.iterrows():
            sid = r["slide_id"] if "slide_id" in df.columns and r["slide_id"] else Path(r["path"]).stem
            info = out.setdefault(sid, {})
            if "label" in df.columns and r["label"] != "" and "label" not in info:
                info["label"] = r["label"]
            if "tumor_mask" in df.columns and r["tumor_mask"] and "tumor_mask" not in info:
                m = Path(r["tumor_mask"])
                info["tumor_mask"] = str(m if m.is_absolute() else (Path(t).parent / m).resolve())
                md = r.get("mask_downsample", "")
                info["mask_downsample"] = float(md) if md else None
    return out


def _truth_kw(info: dict) -> dict:
    return {k: info.get(k) for k in ("label", "tumor_mask", "mask_downsample")}


def heatmaps_from_scores(
    scores_h5: str | Path,
    out_dir: str | Path,
    maps: list[str] | None = None,
    size: int = 1600,
    k: int = 8,
    scale: str = "absolute",
    slide_path: str | None = None,
    reader: str = "auto",
    truth: dict | None = None,
) -> list[Path]:
    """One PNG per map of a scores file written by ``wsimil predict`` (``OUT/scores/{slide_id}.h5``):
    ``out_dir/{slide_id}__{map}.png``. ``maps`` picks maps by name (default: all); ``truth`` is the slide's
    entry of :func:`slide_truth` (label, tumour mask)."""
    from wsimil.predict.score import read_scores

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
    out = []
    for name in names:
        kind = map_kind(name)
        h = HeatmapInput(sid, str(path), s["coords"], float(a["patch_size_level0"]), s["maps"][name], name, kind,
                         a.get("mag"), a.get("mpp"), "ensemble of the bundle's models", probs, classes,
                         **_truth_kw(truth or {}))  # fmt: skip
        png = Path(out_dir) / f"{sid}__{safe_name(name)}.png"
        render_heatmap(h, png, size, k, scale, reader=reader)
        out.append(png)
    return out


def heatmaps_for_predictions(
    pred_dir: str | Path, out_dir: str | Path, maps: list[str] | None = None, slides: str | Path | None = None, **kw
) -> tuple[list[Path], dict[str, str]]:
    """Heatmaps of every slide scored by ``wsimil predict`` into ``pred_dir`` (``pred_dir/scores/*.h5``); returns
    ``(PNG paths, {slide_id: error})``. ``slides`` locates slide files that moved since; labels and tumour masks
    come from ``slides`` or the prediction's job table (``pred_dir/job/slides.csv``) when they have those columns.
    ``kw``: size, k, scale."""
    from wsimil.slide.job import collect_slides

    files = sorted((Path(pred_dir) / "scores").glob("*.h5"))
    if not files:
        raise WsimilError(f"no per-patch scores in {Path(pred_dir) / 'scores'} (run `wsimil predict` first)")
    paths = {s.slide_id: s.path for s in collect_slides(slides)} if slides is not None else {}
    truth = slide_truth(slides, Path(pred_dir) / "job" / "slides.csv")
    out, failed = [], {}
    for f in files:
        try:
            out += heatmaps_from_scores(f, out_dir, maps, slide_path=paths.get(f.stem), truth=truth.get(f.stem), **kw)
        except WsimilError as e:
            failed[f.stem] = str(e)
    return out, failed


def run_truth(run: str | Path, slides: str | Path | None = None) -> dict[str, dict]:
    """:func:`slide_truth` for a training run: ``slides`` (when a CSV), the run's manifest and the ``slides.csv`` of
    the tiling job its features came from (found from what the feature files record); labels from the run's
    ``predictions.csv`` come first."""
    from wsimil.run import RunDir
    from wsimil.slide.tiling_job import SLIDES_FILE, TilingJob

    run = RunDir(run)
    cfg = run.read_config() if run.config_path.is_file() else {}
    job = TilingJob.find_for_features(cfg["features"]) if cfg.get("features") else None
    truth = slide_truth(slides, cfg.get("manifest"), job.root / SLIDES_FILE if job is not None else None)
    pred = run.predictions_path
    if pred.is_file():
        df = pd.read_csv(pred, dtype={"slide_id": str, "label": str})
        if "label" in df.columns:
            for sid, lab in zip(df["slide_id"], df["label"], strict=True):
                truth.setdefault(sid, {})["label"] = lab
    return truth


def run_heatmap_input(s, name: str, classes: list[str] | None, truth: dict | None) -> HeatmapInput:
    """The :class:`HeatmapInput` of one map of a slide scored out of fold (:class:`wsimil.predict.runs.RunSlide`)."""
    kind = map_kind(name)
    return HeatmapInput(s.slide_id, s.slide_path, s.coords, s.patch_size_level0, s.scores.maps[name], name, kind,
                        s.mag, subtitle=f"fold {s.fold} model (this slide was in its test part)",
                        probs=s.scores.probs, classes=classes, **_truth_kw(truth or {}))  # fmt: skip


def heatmaps_for_run(
    run: str | Path,
    out_dir: str | Path,
    maps: list[str] | None = None,
    slides: str | Path | None = None,
    size: int = 1600,
    k: int = 8,
    scale: str = "absolute",
) -> tuple[list[Path], dict[str, str]]:
    """Out-of-fold heatmaps of a training run's slides (each scored by the fold model that held it out, see
    :func:`wsimil.predict.runs.score_run_slides`); returns ``(PNG paths, {slide_id: error})``."""
    import yaml

    from wsimil.predict.runs import score_run_slides

    scored = score_run_slides(run, slides=slides)
    if not scored:
        raise WsimilError(f"run {run}: no slide could be scored (feature folder or bundle missing?)")
    cfg = yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}
    classes = [str(c) for c in cfg.get("classes", [])] or None
    truth = run_truth(run, slides)
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
            png = Path(out_dir) / f"{s.slide_id}__{safe_name(name)}.png"
            try:
                render_heatmap(run_heatmap_input(s, name, classes, truth.get(s.slide_id)), png, size, k, scale)
                out.append(png)
            except WsimilError as e:
                failed[s.slide_id] = str(e)
    return out, failed
