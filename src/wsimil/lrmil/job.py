"""The tiling job an LRMIL run reads: a :class:`~wsimil.slide.tiling_job.TilingJob` seen at two magnifications.

The job must be tiled at both magnifications from one level-0 grid (``wsimil tile --mag 20 --mag 5``), so that
``JOB/links/{slide_id}_links.h5`` holds ``links_{lo}x_{hi}x (N_lr, f²)``: HR patch indices, −1 = no tissue patch,
child at column offset ``a`` and row offset ``b`` in column ``b·f + a`` (see :mod:`wsimil.slide.tiling`). An HR
patch is a child of LR patch ``r`` iff its level-0 top-left lies in ``r``'s footprint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsimil.errors import WsimilError, problems_error
from wsimil.features.patches import PatchGrid, patch_labels_from_mask
from wsimil.slide.mag import mag_name, parse_mag
from wsimil.slide.tiling_job import TilingJob, check_nesting


class LRMILJob:
    """A tiling job at an ``hr`` and an ``lr`` magnification (``factor = hr/lr``, whole) with the links between
    them; ``patch_size`` must be the job's when given."""

    def __init__(self, root: str | Path | TilingJob, hr: float = 20.0, lr: float = 5.0, patch_size: int | None = None):
        self.tiling_job = root if isinstance(root, TilingJob) else TilingJob.open(root)
        self.tiling_job.check_patch_size(patch_size, "patch_size")
        self.root = self.tiling_job.root
        self.hr, self.lr = parse_mag(hr), parse_mag(lr)
        self.factor = check_nesting(self.hr, self.lr)
        self.patch_size = self.tiling_job.patch_size
        self.slides = self.tiling_job.slides()

    def tile_settings(self, mags: list[float]):
        """The job's tiling settings restricted to ``mags`` (the inference paths tile one magnification)."""
        return self.tiling_job.tile_settings(mags)

    def spec(self, slide_id: str):
        return self.tiling_job.spec(slide_id)

    def mpp(self, slide_id: str) -> float | None:
        return self.tiling_job.mpp(slide_id)

    # ------------------------------------------------------------------ per slide
    def grid(self, slide_id: str, mag: float) -> PatchGrid:
        return PatchGrid.from_h5(self.tiling_job.patches_path(mag, slide_id), self.slides[slide_id]["path"])

    def links(self, slide_id: str) -> np.ndarray:
        """``(N_lr, f²)`` HR child indices of every LR patch (−1 = none)."""
        return self.tiling_job.links(slide_id, self.lr, self.hr)

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
        tj = self.tiling_job
        for sid in slide_ids:
            if sid not in self.slides:
                problems.append(f"slide {sid!r}: not in the job's slide table {self.root / 'slides.csv'}")
                continue
            paths = {m: tj.patches_path(m, sid) for m in (self.hr, self.lr)}
            missing = [f"{mag_name(m)} patches ({p})" for m, p in paths.items() if not p.is_file()]
            if not tj.links_path(sid).is_file():
                missing.append(f"links ({tj.links_path(sid)})")
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
                problems.append(f"slide {sid!r}: no {mag_name(self.lr)} tissue patches")
        if problems:
            raise problems_error(
                f"tiling job {self.root} does not fit LRMIL ({mag_name(self.hr)} and {mag_name(self.lr)} with links, "
                f"{self.patch_size} px)",
                problems,
            )
