"""The tiling job an LRMIL run reads: both grids (HR, LR) of every slide, the links between them, slide paths.

The job must be tiled at both magnifications from one level-0 grid (``wsimil tile --mag 20 --mag 5``), so that
``JOB/links/{slide_id}_links.h5`` holds ``links_{lo}x_{hi}x (N_lr, f²)``: HR patch indices, −1 = no tissue patch,
child at column offset ``a`` and row offset ``b`` in column ``b·f + a`` (see :mod:`wsimil.slide.tiling`). An HR
patch is a child of LR patch ``r`` iff its level-0 top-left lies in ``r``'s footprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import yaml

from wsimil.errors import WsimilError, problems_error
from wsimil.features.extract import read_job_slides
from wsimil.features.patches import PatchGrid, patch_labels_from_mask
from wsimil.slide.job import SlideSpec, TileSettings, links_path, patches_path
from wsimil.slide.tiling import mag_name
from wsimil.slide.tissue import TissueParams


def links_dataset(lo: float, hi: float) -> str:
    return f"links_{mag_name(lo)}_{mag_name(hi)}"


@dataclass
class LRMILJob:
    """A tiling job seen by LRMIL: ``hr``/``lr`` magnifications, the patch size, and the job's slide table."""

    root: Path
    hr: float = 20.0
    lr: float = 5.0
    patch_size: int | None = None  # default: the job's

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.slides = {s["slide_id"]: s for s in read_job_slides(self.root)}
        if self.patch_size is None:
            self.patch_size = int(self.tiling().get("patch_size", 256))
        if self.hr <= self.lr:
            raise WsimilError(f"the HR magnification ({self.hr:g}x) must be higher than the LR one ({self.lr:g}x)")
        f = self.hr / self.lr
        if abs(f - round(f)) > 1e-9:
            raise WsimilError(f"{self.hr:g}x / {self.lr:g}x = {f:g} is not an integer: the grids cannot nest")
        self.factor = int(round(f))

    # ------------------------------------------------------------------ settings
    def tiling(self) -> dict:
        """The job's ``tiling.yaml`` (settings the job was tiled with)."""
        p = self.root / "tiling.yaml"
        if not p.is_file():
            raise WsimilError(f"{self.root} is not a tiling job: {p} is missing (run `wsimil tile` first)")
        return yaml.safe_load(p.read_text()) or {}

    def tile_settings(self, mags: list[float]) -> TileSettings:
        """The job's tiling settings restricted to ``mags`` (the inference paths tile one magnification)."""
        t = self.tiling()
        return TileSettings(
            mags=list(mags),
            patch_size=int(self.patch_size),
            reader=str(t.get("reader", "auto")),
            mpp=t.get("mpp"),
            min_tissue=float(t.get("min_tissue", 0.1)),
            tissue=TissueParams(**(t.get("tissue") or {})),
        )

    def spec(self, slide_id: str) -> SlideSpec:
        s = self.slides[slide_id]
        extra = {k: v for k, v in s.items() if k not in ("slide_id", "path", "mpp")}
        return SlideSpec(str(slide_id), s["path"], float(s["mpp"]) if s.get("mpp") else None, extra)

    def mpp(self, slide_id: str) -> float | None:
        v = self.slides[slide_id].get("mpp")
        return float(v) if v else None

    # ------------------------------------------------------------------ per slide
    def grid(self, slide_id: str, mag: float) -> PatchGrid:
        return PatchGrid.from_h5(patches_path(self.root, mag, self.patch_size, slide_id), self.slides[slide_id]["path"])

    def links(self, slide_id: str) -> np.ndarray:
        """``(N_lr, f²)`` HR child indices of every LR patch (−1 = none)."""
        name = links_dataset(self.lr, self.hr)
        with h5py.File(links_path(self.root, slide_id), "r") as f:
            if name not in f:
                raise WsimilError(
                    f"slide {slide_id!r}: {links_path(self.root, slide_id)} has no {name} (tiled at "
                    f"{self.hr:g}x and {self.lr:g}x together?)"
                )
            return f[name][()].astype(np.int64)

    def instance_labels(self, slide_id: str, grid: PatchGrid) -> np.ndarray | None:
        """Per-patch labels from the slide table's ``tumor_mask`` column (as ``wsimil extract`` makes them)."""
        s = self.slides[slide_id]
        if not s.get("tumor_mask"):
            return None
        from PIL import Image

        mask = np.asarray(Image.open(s["tumor_mask"]))
        return patch_labels_from_mask(grid, mask, float(s.get("mask_downsample") or 16))

    def check(self, slide_ids: list[str]) -> None:
        """Every slide must be in the job with patches at both magnifications and links that fit them; one error
        lists every problem."""
        problems = []
        for sid in slide_ids:
            if sid not in self.slides:
                problems.append(f"slide {sid!r}: not in the job's slide table {self.root / 'slides.csv'}")
                continue
            paths = {m: patches_path(self.root, m, self.patch_size, sid) for m in (self.hr, self.lr)}
            missing = [f"{m:g}x patches ({p})" for m, p in paths.items() if not p.is_file()]
            if not links_path(self.root, sid).is_file():
                missing.append(f"links ({links_path(self.root, sid)})")
            if missing:
                problems.append(f"slide {sid!r}: missing {', '.join(missing)}")
                continue
            try:
                lk = self.links(sid)
                n_hr, n_lr = (len(self.grid(sid, m).coords) for m in (self.hr, self.lr))
            except (WsimilError, OSError, KeyError) as e:
                problems.append(f"slide {sid!r}: {e}")
                continue
            if lk.shape != (n_lr, self.factor**2) or lk.max(initial=-1) >= n_hr:
                problems.append(
                    f"slide {sid!r}: links {lk.shape} do not fit {n_lr} LR and {n_hr} HR patches "
                    f"(expected ({n_lr}, {self.factor**2})); re-tile the job"
                )
            elif n_lr == 0:
                problems.append(f"slide {sid!r}: no {self.lr:g}x tissue patches")
        if problems:
            raise problems_error(
                f"tiling job {self.root} does not fit LRMIL ({self.hr:g}x and {self.lr:g}x with links, "
                f"{self.patch_size} px)",
                problems,
            )
