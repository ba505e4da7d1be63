"""Slides scored in memory: tiling one magnification without writing a tiling job (:func:`tile_in_memory`, the
tiling of bundles whose members carry their own encoders), one slide → prediction path end to end (tile + read +
encode + predict, :class:`SlidePipeline`) and the timing of the HR and LR inference paths that every LRMIL run
reports (SPEC §1: "measured seconds per slide for the HR and LR inference paths").

The LR path (SPEC §1 step 6) tiles at 5× only, so every read comes from the pyramid level closest below 2 µm/px:
nothing at 20× is opened (tested by instrumenting the reader).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from wsimil.data.batching import Standardizer
from wsimil.features.encoders import Encoder
from wsimil.features.extract import EncodeSettings, encode_grid, final_fn
from wsimil.features.patches import PatchGrid
from wsimil.models import MILModel
from wsimil.predict.score import Heads, score_bag
from wsimil.slide.job import SlideSpec, TileSettings


@dataclass
class SlidePipeline:
    """One inference path: tiling at a single magnification, a patch encoder and the aggregator(s) whose class
    probabilities are averaged (none when only tiling and encoding are asked of it, as by the predict pipeline for
    members that carry their own encoders)."""

    tiling: TileSettings
    encoder: Encoder
    members: list[tuple[MILModel, Standardizer | None]]
    encode: EncodeSettings
    fold: int | None = None  # the bundle fold it belongs to, if any

    def __post_init__(self) -> None:
        if len(self.tiling.mags) != 1:
            raise ValueError(f"an inference path tiles one magnification, got {self.tiling.mags}")
        self.encoder.model.to(self.encode.device).eval()

    @property
    def mag(self) -> float:
        return float(self.tiling.mags[0])

    def tile(self, spec: SlideSpec) -> PatchGrid:
        return tile_in_memory(spec, self.tiling)

    def features(self, grid: PatchGrid, mpp: float | None) -> np.ndarray:
        out = encode_grid(final_fn(self.encoder), grid, self.encode, mpp)
        return out.get("features", np.zeros((0, self.encoder.embed_dim), dtype=np.float32))

    def classify(self, feats: np.ndarray) -> np.ndarray:
        """Mean class probabilities ``(C,)`` of the members for one bag ``(N, D)`` (the ensemble scorer, no maps)."""
        return score_bag(self.members, feats, Heads(), self.encode.device, maps=False).probs

    def predict(self, spec: SlideSpec) -> tuple[np.ndarray, int]:
        """Tile, read, encode and classify one slide; returns ``(class probabilities (C,), number of patches)``."""
        grid = self.tile(spec)
        return self.classify(self.features(grid, spec.mpp)), len(grid.coords)

    def warm_up(self) -> None:
        """One untimed encoder call, so lazy initialisation is not charged to whichever path runs first."""
        s = self.encoder.spec.input_size
        with torch.inference_mode():
            self.encoder.model(torch.zeros(1, 3, s, s, device=self.encode.device))


def tile_in_memory(spec: SlideSpec, settings: TileSettings) -> PatchGrid:
    """The tissue patches of one slide at ``settings.mags[0]``, exactly as ``wsimil tile`` finds them (same
    thumbnail, tissue detection and grid), kept in memory: inference writes no patch file and no QC image (whose
    thumbnail would read a fine level of a small slide)."""
    from wsimil.slide.job import find_grids
    from wsimil.slide.reader import open_slide

    mpp = spec.mpp if spec.mpp is not None else settings.mpp
    with open_slide(spec.path, settings.reader, mpp=mpp, slide_id=spec.slide_id) as slide:
        grids = find_grids(slide, settings)[0]
        g = grids[float(settings.mags[0])]
        level = slide.best_level(g.target_mpp)
        return PatchGrid(
            spec.slide_id,
            str(spec.path),
            g.coords,
            g.cells,
            g.patch_size,
            g.patch_size_level0,
            level,
            float(slide.level_downsamples[level]),
            float(slide.mpp),
            {"target_magnification": g.mag, "mpp_level0": float(slide.mpp)},
        )


def time_paths(hr: SlidePipeline, lr: SlidePipeline, slides: list[SlideSpec]) -> dict:
    """Seconds per slide of both paths on the same ``slides``, each measured end to end (tile + read + encode +
    predict), alternating HR and LR slide by slide so both see the same machine load."""
    hr.warm_up()
    lr.warm_up()
    rows = []
    for spec in slides:
        row = {"slide_id": spec.slide_id}
        for name, path in (("hr", hr), ("lr", lr)):
            t0 = time.perf_counter()
            _, n = path.predict(spec)
            row[f"{name}_seconds"] = time.perf_counter() - t0
            row[f"{name}_patches"] = n
        rows.append(row)
    out: dict = {"n_slides": len(rows), "slides": rows}
    for name, path in (("hr", hr), ("lr", lr)):
        out[name] = {
            "magnification": path.mag,
            "seconds_per_slide": float(np.mean([r[f"{name}_seconds"] for r in rows])) if rows else None,
            "patches_per_slide": float(np.mean([r[f"{name}_patches"] for r in rows])) if rows else None,
            "encoder_input": int(path.encoder.spec.input_size),
        }
    if rows and out["lr"]["seconds_per_slide"]:
        out["speedup"] = out["hr"]["seconds_per_slide"] / out["lr"]["seconds_per_slide"]
    return out
