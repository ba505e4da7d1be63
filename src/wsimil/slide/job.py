"""Tiling jobs: many slides → TRIDENT-layout patch files at several magnifications, links, QC images, and a
status table. One bad slide fails alone; re-running skips slides whose outputs validate against the settings.

The folder layout and its settings belong to :class:`wsimil.slide.tiling_job.TilingJob`; this module tiles.
"""

from __future__ import annotations

import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from wsimil import __version__
from wsimil.claims import CLAIM_TIMEOUT, merge_rows, remove_orphans, try_claim
from wsimil.errors import WsimilError
from wsimil.io import atomic_path
from wsimil.slide.mag import mag_name
from wsimil.slide.reader import open_slide
from wsimil.slide.tiling import (
    GridLevel,
    check_native,
    nested_grids,
    nominal_magnification,
    nominal_patch_size_level0,
)
from wsimil.slide.tiling_job import (
    SCHEMA_VERSION,
    SlideSpec,
    TileSettings,
    TilingJob,
    grid_dir_name,
    links_dataset,
    links_path,
    patches_path,
)
from wsimil.slide.tissue import detect_tissue, tissue_contours

QC_MAX_SIDE = 1024
SLIDE_EXTENSIONS = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu"}


def collect_slides(spec: str | Path) -> list[SlideSpec]:
    """Slides from a folder (every file with a slide extension), a CSV (``path`` column, optional ``slide_id``
    and ``mpp``) or a single slide file. Slide ids must be unique."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in SLIDE_EXTENSIONS)
        if not files:
            raise WsimilError(f"no slides in {p} (looked for {', '.join(sorted(SLIDE_EXTENSIONS))})")
        out = [SlideSpec(f.stem, str(f.resolve())) for f in files]
    elif p.suffix.lower() == ".csv":
        if not p.is_file():
            raise WsimilError(f"slide table {p} does not exist")
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
        if "path" not in df.columns:
            raise WsimilError(f"slide table {p} needs a 'path' column; found {', '.join(df.columns)}")
        out = []
        for _, r in df.iterrows():
            path = Path(r["path"])
            if not path.is_absolute():
                path = (p.parent / path).resolve()
            mpp = r["mpp"].strip() if "mpp" in df.columns else ""
            try:
                mpp = float(mpp) if mpp else None
            except ValueError:
                raise WsimilError(f"slide table {p}: 'mpp' of {path.name} is {mpp!r}, not a number (µm/px)") from None
            extra = {k: v for k, v in r.items() if k not in ("slide_id", "path", "mpp")}
            for k in ("tumor_mask",):  # paths relative to the table
                if extra.get(k) and not Path(extra[k]).is_absolute():
                    extra[k] = str((p.parent / extra[k]).resolve())
            out.append(SlideSpec(r.get("slide_id") or path.stem, str(path), mpp, extra))
    elif p.is_file():
        out = [SlideSpec(p.stem, str(p.resolve()))]
    else:
        raise WsimilError(f"--slides {p}: no such file or folder")
    ids = pd.Series([s.slide_id for s in out])
    dup = sorted(set(ids[ids.duplicated()]))
    if dup:
        raise WsimilError(f"slide ids must be unique; repeated: {', '.join(dup)} (give a slide_id column)")
    return out


def _grid_attrs(slide, grid: GridLevel, settings: TileSettings, others: list[str]) -> dict:
    read_level = slide.best_level(grid.target_mpp)
    return {
        "patch_size": grid.patch_size,
        # TRIDENT's nominal values (what Patho-Bench compares across a patient's slides); geometry: *_exact, mpp_level0
        "patch_size_level0": nominal_patch_size_level0(grid.patch_size, grid.mag, slide.mpp),
        "patch_size_level0_exact": float(grid.patch_size_level0),
        "level0_magnification": nominal_magnification(slide.mpp) or float(10.0 / slide.mpp),
        "target_magnification": float(grid.mag),
        "overlap": 0,
        "name": slide.slide_id,
        "level0_width": int(slide.dimensions[0]),
        "level0_height": int(slide.dimensions[1]),
        "mpp_level0": float(slide.mpp),
        "target_mpp": float(grid.target_mpp),
        "read_level": int(read_level),
        "read_downsample": float(slide.level_downsamples[read_level]),
        "grid_cols": grid.grid_shape[0],
        "grid_rows": grid.grid_shape[1],
        "paired_grids": ",".join(others),
        "schema_version": SCHEMA_VERSION,
        "settings_key": settings.key(),
        "wsimil_version": __version__,
        "slide_path": str(slide.path),
    }


def outputs_valid(job: Path, slide_id: str, settings: TileSettings) -> bool:
    """True if every output of ``slide_id`` exists and was made with the same settings."""
    paths = [patches_path(job, m, settings.patch_size, slide_id) for m in settings.mags]
    if len(settings.mags) > 1:
        paths.append(links_path(job, slide_id))
    try:
        for p in paths:
            with h5py.File(p, "r") as f:
                ds = f["coords"] if "coords" in f else f[next(iter(f))]
                if ds.attrs.get("settings_key") != settings.key():
                    return False
    except (OSError, KeyError, StopIteration):
        return False
    return True


def find_grids(slide, settings: TileSettings):
    """Tissue detection on the thumbnail and the nested patch grids of an open slide:
    ``(grids, links, thumbnail, thumbnail downsample, tissue mask)``. One path for ``wsimil tile`` and in-memory
    tiling, so both find exactly the same patches."""
    check_native(settings.mags, slide.mpp, slide.slide_id)
    w0, h0 = slide.dimensions
    max_side = int(np.ceil(max(w0, h0) * slide.mpp / settings.tissue.thumb_mpp))
    thumb, ds = slide.thumbnail(max(64, max_side))
    mask = detect_tissue(thumb, ds * slide.mpp, settings.tissue)
    grids, links = nested_grids((w0, h0), slide.mpp, settings.mags, settings.patch_size, mask, ds, settings.min_tissue)
    return grids, links, thumb, ds, mask


def tile_slide(spec: SlideSpec, job: Path, settings: TileSettings) -> dict:
    """Tile one slide; returns its status row. Raises :class:`WsimilError` for user-facing failures."""
    t0 = time.perf_counter()
    mpp = spec.mpp if spec.mpp is not None else settings.mpp
    with open_slide(spec.path, settings.reader, mpp=mpp, slide_id=spec.slide_id) as slide:
        grids, links, thumb, ds, mask = find_grids(slide, settings)
        if all(len(g.coords) == 0 for g in grids.values()):
            raise WsimilError(
                f"slide {spec.slide_id!r}: no tissue found ({mask.mean():.1%} of the thumbnail passed "
                "the tissue filter, no patch reached min_tissue); check the QC image or lower "
                "--min-tissue"
            )
        names = {m: grid_dir_name(m, settings.patch_size) for m in grids}
        for m, g in grids.items():
            attrs = _grid_attrs(slide, g, settings, [n for k, n in names.items() if k != m])
            with atomic_path(patches_path(job, m, settings.patch_size, spec.slide_id)) as tmp, h5py.File(tmp, "w") as f:
                d = f.create_dataset("coords", data=g.coords)
                for k, v in attrs.items():
                    d.attrs[k] = v
                f.create_dataset("grid_cells", data=g.cells)
        if links:
            with atomic_path(links_path(job, spec.slide_id)) as tmp, h5py.File(tmp, "w") as f:
                coarsest, finest = min(grids), max(grids)
                for (lo, hi), lk in links.items():
                    d = f.create_dataset(links_dataset(lo, hi), data=lk)
                    d.attrs.update(
                        {
                            "low_grid": names[lo],
                            "high_grid": names[hi],
                            "factor": int(round(hi / lo)),
                            "settings_key": settings.key(),
                            "order": "row-major child offsets (col a, row b)"
                            " -> index b*factor + a; -1 = no tissue patch",
                        }
                    )
                    if (lo, hi) == (coarsest, finest):
                        f["links"] = h5py.SoftLink(f"/{links_dataset(lo, hi)}")
        qc_thumb, qc_ds = slide.thumbnail(QC_MAX_SIDE) if max(thumb.shape[:2]) < QC_MAX_SIDE else (thumb, ds)
        write_qc(job / "qc" / f"{spec.slide_id}.png", qc_thumb, qc_ds, mask, ds, grids)
        row = {
            "slide_id": spec.slide_id,
            "path": spec.path,
            "status": "ok",
            "error": "",
            "mpp": slide.mpp,
            "width": slide.dimensions[0],
            "height": slide.dimensions[1],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        row.update({f"patches_{mag_name(m)}": len(g.coords) for m, g in grids.items()})
        return row


def write_qc(
    path: Path, thumb: np.ndarray, ds: float, mask: np.ndarray, mask_ds: float, grids: dict[float, GridLevel]
) -> None:
    """Thumbnail (``ds`` level-0 px per pixel) with tissue contours (green; the mask has ``mask_ds``) and every
    magnification's patch outlines (finest blue, coarser orange, then purple), above a legend band that names each
    colour with its patch count and the tissue share of the thumbnail."""
    import cv2

    img = np.ascontiguousarray(thumb.copy())
    colours = [(40, 90, 230), (240, 140, 20), (200, 30, 160)]
    tissue_rgb = (20, 170, 60)
    legend = [(tissue_rgb, f"tissue contour ({mask.mean():.0%} of the thumbnail is tissue)", "line")]
    for i, m in enumerate(sorted(grids, reverse=True)):
        g = grids[m]
        s = g.patch_size_level0 / ds
        for x, y in g.coords / ds:
            cv2.rectangle(img, (int(x), int(y)), (int(x + s) - 1, int(y + s) - 1), colours[i % 3], 1)
        legend.append((colours[i % 3], f"{mag_name(m)} patches: {len(g.coords)} ({g.patch_size} px)", "box"))
    scale = mask_ds / ds
    contours = [np.round((c + 0.5) * scale).astype(np.int32).reshape(-1, 1, 2) for c in tissue_contours(mask)]
    cv2.drawContours(img, contours, -1, tissue_rgb, 2)
    band = qc_legend(legend, img.shape[1])
    img = np.pad(img, ((0, 0), (0, band.shape[1] - img.shape[1]), (0, 0)), constant_values=255)
    img = np.concatenate([img, band], axis=0)
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        tmp.write_bytes(buf.tobytes())


def qc_legend(entries: list[tuple[tuple[int, int, int], str, str]], width: int) -> np.ndarray:
    """A white RGB band at least ``width`` px wide with one row per ``(colour, text, "line"|"box")`` entry: a swatch
    drawn the way the image draws that thing, then the text, shrunk for narrow thumbnails down to a legible size
    (the band is then wider than ``width``)."""
    import cv2

    font, row = cv2.FONT_HERSHEY_SIMPLEX, 22
    longest = max(cv2.getTextSize(t, font, 0.5, 1)[0][0] for _, t, _ in entries)
    fs = max(0.35, 0.5 * min(1.0, (width - 44) / max(longest, 1)))
    need = 34 + max(cv2.getTextSize(t, font, fs, 1)[0][0] for _, t, _ in entries) + 8
    band = np.full((row * len(entries) + 8, max(width, need), 3), 255, np.uint8)
    for j, (colour, text, kind) in enumerate(entries):
        y = 4 + j * row + row // 2
        if kind == "line":
            cv2.line(band, (6, y), (26, y), colour, 2)
        else:
            cv2.rectangle(band, (8, y - 7), (24, y + 7), colour, 1)
        cv2.putText(band, text, (34, y + 5), font, fs, (30, 30, 30), 1, cv2.LINE_AA)
    return band


def _run_one(spec: SlideSpec, job: Path, settings: TileSettings, overwrite: bool, claim_timeout: float) -> dict:
    if not overwrite and outputs_valid(job, spec.slide_id, settings):
        return {"slide_id": spec.slide_id, "path": spec.path, "status": "skipped", "error": ""}
    with try_claim(job, spec.slide_id, claim_timeout) as claim:
        if not claim.held:  # another worker sharing the job tiles it
            return {"slide_id": spec.slide_id, "path": spec.path, "status": "claimed", "error": claim.describe()}
        if not overwrite and outputs_valid(job, spec.slide_id, settings):  # finished by another worker meanwhile
            return {"slide_id": spec.slide_id, "path": spec.path, "status": "skipped", "error": ""}
        try:
            return tile_slide(spec, job, settings)
        except WsimilError as e:
            return {"slide_id": spec.slide_id, "path": spec.path, "status": "failed", "error": str(e)}
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the batch
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            return {"slide_id": spec.slide_id, "path": spec.path, "status": "failed", "error": f"unexpected: {tb}"}


def run_tiling(
    slides: str | Path | list[SlideSpec],
    job: str | Path,
    settings: TileSettings,
    workers: int = 1,
    overwrite: bool = False,
    claim_timeout: float = CLAIM_TIMEOUT,
) -> pd.DataFrame:
    """Tile every slide (in ``workers`` processes); write ``slides.csv``, ``status.csv`` and ``tiling.yaml``.
    Returns the status table; failed slides are listed there with their error. Several runs may share ``job``
    (:mod:`wsimil.claims`): each slide is tiled by the run that claims it; the others list it as ``claimed``."""
    from wsimil.progress import make_progress

    job = Path(job)
    settings.validate()
    specs = collect_slides(slides) if not isinstance(slides, list) else slides
    job.mkdir(parents=True, exist_ok=True)
    remove_orphans(job, claim_timeout)
    TilingJob.create(job, settings, specs)
    rows: dict[str, dict] = {}
    with make_progress() as progress:
        task = progress.add_task("Tiling slides", total=len(specs), info="")
        if workers <= 1:
            for s in specs:
                rows[s.slide_id] = _run_one(s, job, settings, overwrite, claim_timeout)
                progress.update(task, advance=1, info=f"{s.slide_id}: {rows[s.slide_id]['status']}")
        else:
            with ProcessPoolExecutor(workers) as pool:
                futures = {pool.submit(_run_one, s, job, settings, overwrite, claim_timeout): s for s in specs}
                for fut in as_completed(futures):
                    s = futures[fut]
                    rows[s.slide_id] = fut.result()
                    progress.update(task, advance=1, info=f"{s.slide_id}: {rows[s.slide_id]['status']}")
    table = pd.DataFrame([rows[s.slide_id] for s in specs])
    owned = [s for s, r in rows.items() if r["status"] != "claimed"]
    merge_rows(job / "status.csv", list(rows.values()), [s.slide_id for s in specs], owned)
    return table
