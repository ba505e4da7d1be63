"""A tiling job folder and the one place its layout is spelled out.

Layout under ``JOB`` (TRIDENT's, plus a status table and the settings)::

    slides.csv                                   slide_id, path, mpp override, other slide-table columns
    status.csv                                   slide_id, status (ok/skipped/failed/claimed), error, patches per mag
    tiling.yaml                                  the resolved settings (TileSettings) + settings_key, wsimil_version
    {mag}x_{ps}px_0px_overlap/patches/{slide_id}_patches.h5    coords (N, 2) level-0 + attributes
    {mag}x_{ps}px_0px_overlap/features_{encoder}/{slide_id}.h5 written by ``wsimil extract``
    links/{slide_id}_links.h5                    links_{lo}x_{hi}x (N_lo, (hi/lo)²); "links" = coarsest→finest
    qc/{slide_id}.png                            thumbnail with tissue contours and the patch grid

:class:`TilingJob` is opened from its folder (:meth:`TilingJob.open`) and handed from ``tile`` to ``extract``,
LRMIL and prediction; nobody else builds these names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsimil.errors import WsimilError
from wsimil.slide.mag import mag_name, parse_mag
from wsimil.slide.reader import MPP_RANGE, READER_CHOICES
from wsimil.slide.tiling import check_mags
from wsimil.slide.tissue import TissueParams

SCHEMA_VERSION = 2  # 2: nominal patch_size_level0/level0_magnification; min_tissue 0 = touches tissue
SETTINGS_FILE = "tiling.yaml"
SLIDES_FILE = "slides.csv"
STATUS_FILE = "status.csv"
GRID_SUFFIX = "_0px_overlap"


@dataclass(frozen=True)
class SlideSpec:
    slide_id: str
    path: str
    mpp: float | None = None
    extra: dict = field(default_factory=dict, hash=False, compare=False)  # other slide-table columns, kept as is


@dataclass
class TileSettings:
    mags: list[float]
    patch_size: int = 256
    reader: str = "auto"
    mpp: float | None = None  # override for every slide (a per-slide 'mpp' column wins)
    min_tissue: float = 0.1
    tissue: TissueParams = field(default_factory=TissueParams)

    def __post_init__(self) -> None:
        self.mags = [parse_mag(m) for m in self.mags]  # 20, "20", "20x" → 20.0

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> TileSettings:
        """Settings from a stored dict (``tiling.yaml``, a bundle's tiling record): missing keys take their
        defaults, unknown ones (``settings_key``, ``wsimil_version``, newer tissue fields) are ignored, ``mag``
        (one) and ``mags`` (several) are both read; ``overrides`` replace stored values."""
        d = {**d, **overrides}
        mags = d.get("mags", [d["mag"]] if d.get("mag") is not None else [])
        known = TissueParams.__dataclass_fields__
        tissue = d.get("tissue") or {}
        if not isinstance(tissue, TissueParams):
            tissue = TissueParams(**{k: v for k, v in dict(tissue).items() if k in known})
        mpp = d.get("mpp")
        return cls(
            mags=list(mags),
            patch_size=int(d.get("patch_size", 256)),
            reader=str(d.get("reader") or "auto"),
            mpp=float(mpp) if mpp is not None else None,
            min_tissue=float(d.get("min_tissue", 0.1)),
            tissue=tissue,
        )

    def to_dict(self) -> dict[str, Any]:
        """What ``tiling.yaml`` stores (:meth:`from_dict` reads it back to equal settings)."""
        return asdict(self)

    def key(self) -> str:
        """Hash of everything that changes the output files (not the reader backend)."""
        d = {
            "mags": sorted(float(m) for m in self.mags),  # --mag 20 (CLI) and mags=[20] (API) tile the same
            "patch_size": self.patch_size,
            "min_tissue": self.min_tissue,
            "tissue": self.tissue.to_dict(),
            "schema": SCHEMA_VERSION,
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        """Refuse settings no slide could be tiled with, before any slide is read (one line each)."""
        check_mags(self.mags)
        if self.patch_size < 16:
            raise WsimilError(f"--patch-size must be at least 16 pixels, got {self.patch_size}")
        if not 0 <= self.min_tissue <= 1:
            raise WsimilError(f"--min-tissue is a share of the patch in [0, 1], got {self.min_tissue:g}")
        if self.reader not in READER_CHOICES:
            raise WsimilError(f"unknown slide reader {self.reader!r}; choose from {', '.join(READER_CHOICES)}")
        if self.mpp is not None and not MPP_RANGE[0] <= self.mpp <= MPP_RANGE[1]:
            raise WsimilError(
                f"--mpp {self.mpp:g} is outside {MPP_RANGE[0]}–{MPP_RANGE[1]} µm/px "
                "(0.25 is a 40x scan, 0.5 a 20x scan)"
            )


# ---------------------------------------------------------------------- the layout (the only place it is spelled)
def grid_dir_name(mag: float, patch_size: int) -> str:
    return f"{mag_name(mag)}_{patch_size}px{GRID_SUFFIX}"


def patches_path(job: Path, mag: float, patch_size: int, slide_id: str) -> Path:
    return Path(job) / grid_dir_name(mag, patch_size) / "patches" / f"{slide_id}_patches.h5"


def links_path(job: Path, slide_id: str) -> Path:
    return Path(job) / "links" / f"{slide_id}_links.h5"


def links_dataset(lo: float, hi: float) -> str:
    """The links dataset from magnification ``lo`` to ``hi`` in a slide's links file (``links_5x_20x``)."""
    return f"links_{mag_name(lo)}_{mag_name(hi)}"


def features_dir(job: Path, mag: float, patch_size: int, encoder: str) -> Path:
    return Path(job) / grid_dir_name(mag, patch_size) / f"features_{encoder}"


def check_nesting(hi: float, lo: float) -> int:
    """The whole factor ``hi/lo`` between two magnifications whose grids nest (:func:`check_mags`, the tiling's own
    check); a clear error otherwise."""
    if hi <= lo:
        raise WsimilError(f"the HR magnification ({mag_name(hi)}) must be higher than the LR one ({mag_name(lo)})")
    check_mags([hi, lo])
    return int(round(hi / lo))


def tiled_grids(job: Path) -> list[tuple[float, int]]:
    """``(mag, patch size)`` of every grid folder of ``job`` holding patch files, finest first."""
    out = []
    for d in Path(job).glob(f"*{GRID_SUFFIX}/patches"):
        m, _, rest = d.parent.name.partition("_")
        try:
            grid = (parse_mag(m), int(rest.partition("_")[0].removesuffix("px")))
        except (WsimilError, ValueError):
            continue  # not a grid folder of ours
        if any(d.glob("*_patches.h5")):
            out.append(grid)
    return sorted(out, key=lambda g: (-g[0], g[1]))


def check_tiled(job: Path, mag: float, patch_size: int) -> None:
    """Refuse, before anything is loaded or written, a magnification and patch size the job holds no patches for;
    the error lists the grids it has."""
    if any(patches_path(job, mag, patch_size, "").parent.glob("*_patches.h5")):
        return
    have = [f"{mag_name(m)} ({ps} px)" for m, ps in tiled_grids(job)]
    held = f"it holds {', '.join(have)}" if have else f"no slide was tiled (see {Path(job) / STATUS_FILE})"
    raise WsimilError(
        f"job {job} has no {mag_name(mag)} patches of {patch_size} px: {held}; pass one of those with --mag, "
        f"or tile the slides at {mag_name(mag)} first (wsimil tile --mag {mag:g})"
    )


def read_slides_csv(job: Path) -> list[dict]:
    p = Path(job) / SLIDES_FILE
    if not p.is_file():
        raise WsimilError(f"{job} is not a tiling job: {p} is missing (run `wsimil tile` first)")
    return pd.read_csv(p, dtype=str, keep_default_na=False).to_dict("records")


# ---------------------------------------------------------------------- the job
class TilingJob:
    """A tiling job folder (layout: module docstring): its settings, slides, grids, links and status.

    ``TilingJob.open(path)`` reads a job ``wsimil tile`` wrote (any wsimil version that wrote ``tiling.yaml``);
    :func:`wsimil.slide.job.run_tiling` writes one. ``settings`` are those of the latest ``tile`` run; the grids
    on disk (:meth:`grids`) may hold more magnifications from earlier runs."""

    def __init__(self, root: str | Path, settings: TileSettings, record: dict[str, Any] | None = None):
        self.root = Path(root)
        self.settings = settings
        self.record = dict(record or {})  # tiling.yaml as stored (settings_key, wsimil_version, ...)
        self._slides: dict[str, dict] | None = None

    @classmethod
    def open(cls, root: str | Path) -> TilingJob:
        import yaml

        root = Path(root)
        p = root / SETTINGS_FILE
        if not root.is_dir():
            raise WsimilError(f"tiling job {root} does not exist (run `wsimil tile --out {root}` first)")
        if not p.is_file():
            raise WsimilError(f"{root} is not a tiling job: {p} is missing (run `wsimil tile` first)")
        try:
            record = yaml.safe_load(p.read_text()) or {}
            settings = TileSettings.from_dict(record)
        except (yaml.YAMLError, TypeError, ValueError, KeyError) as e:
            raise WsimilError(f"{p} is not readable tiling settings: {e}") from None
        return cls(root, settings, record)

    @classmethod
    def create(cls, root: str | Path, settings: TileSettings, specs: list[SlideSpec]) -> TilingJob:
        """Write the slide table and the settings of a ``tile`` run (the grids come per slide)."""
        from wsimil import __version__
        from wsimil.io import write_csv, write_yaml

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        rows = [{"slide_id": s.slide_id, "path": s.path, "mpp": s.mpp, **s.extra} for s in specs]
        write_csv(root / SLIDES_FILE, pd.DataFrame(rows))
        record = {**settings.to_dict(), "settings_key": settings.key(), "wsimil_version": __version__}
        write_yaml(root / SETTINGS_FILE, record)
        return cls(root, settings, record)

    @classmethod
    def find_for_features(cls, features: str | Path) -> TilingJob | None:
        """The job a feature folder was extracted from, from what its files record: the ``tiling_job`` attribute
        (written since this version), else the grid folder the layout puts them in, accepted only when its name
        matches the files' magnification and patch size and its ``tiling.yaml`` has the files' settings key.
        ``None`` when no job matches (features made elsewhere, or a job tiled again since)."""
        import h5py

        files = sorted(Path(features).glob("*.h5"))
        if not files:
            return None
        try:
            with h5py.File(files[0], "r") as f:
                fa = dict(f["features"].attrs) if "features" in f else {}
                ca = dict(f["coords"].attrs) if "coords" in f else {}
        except OSError:
            return None
        key = ca.get("settings_key")
        if not key or "target_magnification" not in ca or "patch_size" not in ca:
            return None
        mag, ps = float(ca["target_magnification"]), int(ca["patch_size"])
        candidates = []
        if fa.get("tiling_job"):
            candidates.append(Path(str(fa["tiling_job"])))
        here = Path(features).resolve()
        if here.parent.name == grid_dir_name(mag, ps):
            candidates.append(here.parent.parent)
        for root in candidates:
            try:
                job = cls.open(root)
            except WsimilError:
                continue
            if job.record.get("settings_key") == key:
                return job
        return None

    # ------------------------------------------------------------------ settings and slides
    @property
    def patch_size(self) -> int:
        return int(self.settings.patch_size)

    @property
    def settings_key(self) -> str | None:
        return self.record.get("settings_key")

    def tile_settings(self, mags: list[float], **overrides: Any) -> TileSettings:
        """The job's settings for tiling ``mags`` again (one magnification for inference: grids at different
        magnifications do not depend on each other)."""
        return TileSettings.from_dict({**self.settings.to_dict(), "mags": list(mags)}, **overrides)

    def slides(self) -> dict[str, dict]:
        """``slides.csv`` rows by slide id (strings, as written)."""
        if self._slides is None:
            self._slides = {s["slide_id"]: s for s in read_slides_csv(self.root)}
        return self._slides

    def spec(self, slide_id: str) -> SlideSpec:
        s = self.slides()[slide_id]
        extra = {k: v for k, v in s.items() if k not in ("slide_id", "path", "mpp")}
        return SlideSpec(str(slide_id), s["path"], float(s["mpp"]) if s.get("mpp") else None, extra)

    def mpp(self, slide_id: str) -> float | None:
        v = self.slides()[slide_id].get("mpp")
        return float(v) if v else None

    def status(self) -> pd.DataFrame:
        """``status.csv`` (one row per slide of every ``tile`` run); empty before the first."""
        p = self.root / STATUS_FILE
        return pd.read_csv(p, dtype={"slide_id": str}) if p.is_file() else pd.DataFrame(columns=["slide_id", "status"])

    # ------------------------------------------------------------------ layout
    def grids(self) -> list[tuple[float, int]]:
        return tiled_grids(self.root)

    def grid_dir(self, mag: float) -> Path:
        return self.root / grid_dir_name(mag, self.patch_size)

    def patches_path(self, mag: float, slide_id: str) -> Path:
        return patches_path(self.root, mag, self.patch_size, slide_id)

    def links_path(self, slide_id: str) -> Path:
        return links_path(self.root, slide_id)

    def features_dir(self, mag: float, encoder: str) -> Path:
        return features_dir(self.root, mag, self.patch_size, encoder)

    def check_tiled(self, mag: float) -> None:
        check_tiled(self.root, mag, self.patch_size)

    def check_patch_size(self, patch_size: int | None, what: str = "--patch-size") -> None:
        """Refuse a patch size other than the job's (it is read from the job; giving it is optional)."""
        if patch_size is not None and int(patch_size) != self.patch_size:
            raise WsimilError(
                f"{what} {patch_size} disagrees with the job: {self.root} was tiled with {self.patch_size} px "
                f"patches ({self.root / SETTINGS_FILE}); leave {what} out, the job knows it"
            )

    def links(self, slide_id: str, lo: float, hi: float) -> np.ndarray:
        """``(N_lo, (hi/lo)²)`` indices of the ``hi`` patches inside each ``lo`` patch (−1 = none)."""
        import h5py

        check_nesting(hi, lo)
        name, path = links_dataset(lo, hi), self.links_path(slide_id)
        with h5py.File(path, "r") as f:
            if name not in f:
                raise WsimilError(
                    f"slide {slide_id!r}: {path} has no {name} (tiled at {mag_name(hi)} and {mag_name(lo)} together?)"
                )
            return f[name][()].astype(np.int64)
