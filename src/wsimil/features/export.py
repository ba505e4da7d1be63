"""Export a feature folder to CLAM's layout (``wsimil export clam``).

``OUT/h5_files/{slide_id}.h5``: datasets ``features`` float32 ``(N, D)`` and ``coords`` int64 ``(N, 2)``, no
attributes (what CLAM's feature extraction writes); ``OUT/pt_files/{slide_id}.pt``: the same features as a plain
float tensor (CLAM's training default), in the same row order.

With ``patches``: ``OUT/patches/{slide_id}.h5`` as CLAM's patching writes it. CLAM's ``patch_size`` counts pixels at
``patch_level``, so a patch covers ``patch_size × downsample`` level-0 pixels. wsimil tiles at exact µm/px, so a
level is chosen whose downsample divides the true footprint into a whole number of pixels (that number is then
CLAM's ``patch_size``; it equals wsimil's patch size when the level's resolution is the target's, otherwise
CLAM resizes with ``--target_patch_size``). A slide where no level does (0.2527 µm/px, 256 px at 20×: 506.6 level-0
px) is refused with that reason rather than written with a wrong footprint; the other slides go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from wsimil.errors import WsimilError
from wsimil.features.patches import level0_footprint
from wsimil.features.store import FeatureStore
from wsimil.io import atomic_path

#: a level fits when ``patch_size · downsample`` is within this relative distance of the true footprint
FOOTPRINT_TOL = 1e-4


@dataclass(frozen=True)
class ClamLevel:
    level: int
    patch_size: int  # pixels at ``level``
    downsample: tuple[float, float]  # CLAM's (x, y) downsample of ``level``
    level_dim: tuple[int, int]  # (width, height) of ``level``


def clam_downsamples(dims: list[tuple[int, int]], downsamples: list[float]) -> list[tuple[float, float]]:
    """CLAM's per-level ``(x, y)`` downsample: the reported one, unless the level's size says otherwise."""
    w0, h0 = dims[0]
    out = []
    for (w, h), d in zip(dims, downsamples, strict=True):
        est = (w0 / w, h0 / h)
        out.append((float(d), float(d)) if est == (d, d) else (float(est[0]), float(est[1])))
    return out


def choose_clam_level(
    footprint: float, patch_size: int, dims: list[tuple[int, int]], downsamples: list[float], slide_id: str = ""
) -> ClamLevel:
    """The level whose downsample makes ``footprint`` (level-0 px) a whole number of its pixels: the one where that
    number is ``patch_size`` if any, else the smallest number above it, else the largest. Raises
    :class:`WsimilError` with the reason when no level fits."""
    ds_xy = clam_downsamples(dims, downsamples)
    fits = []
    for lvl, (dx, dy) in enumerate(ds_xy):
        p = round(footprint / dx)
        if p >= 1 and all(abs(p * d - footprint) <= FOOTPRINT_TOL * footprint for d in (dx, dy)):
            fits.append(ClamLevel(lvl, int(p), (dx, dy), tuple(int(v) for v in dims[lvl])))
    if not fits:
        levels = ", ".join(f"{d[0]:g}" for d in ds_xy)
        raise WsimilError(
            f"slide {slide_id!r}: its patches cover {footprint:.3f} level-0 px, not a whole number of pixels at any "
            f"level (downsamples {levels}); CLAM's patch_size × downsample cannot describe them"
        )
    exact = [c for c in fits if c.patch_size == patch_size]
    above = sorted((c for c in fits if c.patch_size > patch_size), key=lambda c: c.patch_size)
    return (exact or above or sorted(fits, key=lambda c: -c.patch_size))[0]


def clam_patch_attrs(slide_id: str, choice: ClamLevel, save_path: Path) -> dict:
    """The ``coords`` attributes CLAM's patching writes."""
    return {
        "patch_size": choice.patch_size,
        "patch_level": choice.level,
        "downsample": np.asarray(choice.downsample, dtype=np.float64),
        "downsampled_level_dim": np.asarray(choice.level_dim, dtype=np.int64),
        "level_dim": np.asarray(choice.level_dim, dtype=np.int64),
        "name": slide_id,
        "save_path": str(save_path),
    }


def _slide_specs(slides: str | Path | None) -> dict:
    if slides is None:
        return {}
    from wsimil.slide.job import collect_slides

    return {s.slide_id: s for s in collect_slides(slides)}


def _write_patches(out: Path, slide_id: str, coords: np.ndarray, attrs: dict, spec, reader: str) -> ClamLevel:
    from wsimil.slide.reader import open_slide

    footprint = level0_footprint(attrs)
    if footprint is None or "patch_size" not in attrs:
        raise WsimilError(f"slide {slide_id!r}: its coords record no patch size / footprint")
    path = spec.path if spec is not None else attrs.get("slide_path")
    if not path:
        raise WsimilError(f"slide {slide_id!r}: the features record no slide file; pass --slides")
    mpp = spec.mpp if spec is not None and spec.mpp is not None else attrs.get("mpp_level0")
    with open_slide(str(path), reader, mpp=float(mpp) if mpp else None, slide_id=slide_id) as slide:
        dims, downsamples = list(slide.level_dimensions), list(slide.level_downsamples)
    choice = choose_clam_level(footprint, int(attrs["patch_size"]), dims, downsamples, slide_id)
    extra = {"patch_size_level0_exact": float(footprint)}
    for k in ("mpp_level0", "target_mpp"):
        if k in attrs:
            extra[k] = float(attrs[k])
    with atomic_path(out / "patches" / f"{slide_id}.h5") as tmp, h5py.File(tmp, "w") as f:
        d = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        for k, v in {**clam_patch_attrs(slide_id, choice, out / "patches"), **extra}.items():
            d.attrs[k] = v
    return choice


def export_clam(
    features: str | Path,
    out: str | Path,
    patches: bool = False,
    slides: str | Path | None = None,
    reader: str = "auto",
) -> list[dict]:
    """Write every bag of ``features`` in CLAM's layout under ``out``; returns one status row per slide
    (``slide_id``, ``status`` ok/failed, ``error``, and with ``patches`` the chosen ``patch_level``/``patch_size``).
    A slide that fails (no coordinates, no fitting level, unreadable slide) fails alone."""
    import torch

    store, out = FeatureStore(features), Path(out)
    specs = _slide_specs(slides)
    rows = []
    for sid in store.slide_ids():
        row = {"slide_id": sid, "status": "ok", "error": ""}
        try:
            bag = store.read(sid)
            if bag.coords is None and patches:
                raise WsimilError(f"slide {sid!r}: {store.path(sid)} has no coords to write CLAM patch files from")
            with atomic_path(out / "h5_files" / f"{sid}.h5") as tmp, h5py.File(tmp, "w") as f:
                f.create_dataset("features", data=bag.features)
                if bag.coords is not None:
                    f.create_dataset("coords", data=bag.coords)
            with atomic_path(out / "pt_files" / f"{sid}.pt") as tmp:
                torch.save(torch.from_numpy(np.ascontiguousarray(bag.features)), tmp)
            if patches:
                with h5py.File(store.path(sid), "r") as f:
                    attrs = {
                        k: (v.item() if np.ndim(v) == 0 and hasattr(v, "item") else v)
                        for k, v in f["coords"].attrs.items()
                    }
                choice = _write_patches(out, sid, bag.coords, attrs, specs.get(sid), reader)
                row.update(patch_level=choice.level, patch_size=choice.patch_size)
        except WsimilError as e:
            row.update(status="failed", error=str(e))
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the export
            row.update(status="failed", error=f"unexpected: {type(e).__name__}: {e}")
        rows.append(row)
    return rows
