"""Slide pipeline speed on a synthetic cohort: tiling, patch reading (ours vs. the naive baseline in the same run),
and feature extraction at 20× and 5× with the same encoder. Prints JSON.

- ``tiling_seconds_per_slide``: tissue detection + nested 20×/5× grids + links + QC image;
- ``read``: patches/s and megapixels/s for wsimil's block reader (default `auto` reader, and forced OpenSlide) and
  for CLAM's approach (one OpenSlide ``read_region`` per patch at level 0, then resize), same patches, same run.
  ``source_mp_per_s`` counts pixels decoded from the slide, ``output_mp_per_s`` pixels of finished patches;
- ``extract``: seconds per slide at 20× and at 5× (read + encode + write) and their ratio.

    python benchmarks/pipeline.py [--slides 6] [--mpp 0.25] [--cohort DIR] [--encoder resnet18] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    os.environ.setdefault("WSIMIL_PROGRESS", "0")
    warnings.simplefilter("ignore", UserWarning)
    import torch

    from wsimil.features.extract import ExtractSettings, run_extraction
    from wsimil.features.patches import PatchGrid, plan_blocks, read_block, read_patch_naive
    from wsimil.slide import open_slide
    from wsimil.slide.job import TileSettings, collect_slides, patches_path, run_tiling
    from wsimil.slide.synth import make_cohort

    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--cohort", default=None, help="reuse a cohort made by `wsimil synth` (its manifest.csv)")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--out", default="/tmp/wsimil_pipeline")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--mpp",
        type=float,
        default=0.25,
        help="level-0 µm/px of the synthetic slides (0.2527: a real Aperio 40x "
        "scan, whose patch footprints do not fall on whole pixels)",
    )
    args = ap.parse_args()
    out = Path(args.out)
    if args.cohort:
        manifest = Path(args.cohort) / "manifest.csv"
    else:
        make_cohort(out / "cohort", args.slides, seed=0, mpp=args.mpp)
        manifest = out / "cohort" / "manifest.csv"
    specs = collect_slides(manifest)[: args.slides]
    job = out / "job"

    t0 = time.perf_counter()
    table = run_tiling(specs, job, TileSettings(mags=[20, 5]), overwrite=True)
    tiling = (time.perf_counter() - t0) / len(specs)

    read = {}
    for mag in (20, 5):
        ours_n = ours_t = naive_t = os_t = src_px = 0.0
        for s in specs:
            g = PatchGrid.from_h5(patches_path(job, mag, 256, s.slide_id), s.path)
            with open_slide(s.path) as slide:  # the default reader (auto: tiffslide for these SVS files)
                t = time.perf_counter()
                for idx in plan_blocks(g.cells, 4):
                    read_block(slide, g, idx)
                ours_t += time.perf_counter() - t
            with open_slide(s.path, "openslide") as slide:  # same block reads, OpenSlide decoding
                t = time.perf_counter()
                for idx in plan_blocks(g.cells, 4):
                    read_block(slide, g, idx)
                os_t += time.perf_counter() - t
            with open_slide(s.path, "openslide") as slide:  # CLAM's baseline; fresh handle: no warm tile cache
                t = time.perf_counter()
                for c in g.coords:
                    read_patch_naive(slide, c, g.step0, 256)
                naive_t += time.perf_counter() - t
            ours_n += len(g.coords)
            src_px += len(g.coords) * (g.step0 / g.read_downsample) ** 2
        out_mp = ours_n * 256 * 256 / 1e6
        naive_src_mp = ours_n * round(256 * (10 / mag) / 0.25) ** 2 / 1e6
        read[f"{mag}x"] = {
            "patches": int(ours_n),
            "ours_patches_per_s": round(ours_n / ours_t, 1),
            "naive_patches_per_s": round(ours_n / naive_t, 1),
            "ours_output_mp_per_s": round(out_mp / ours_t, 1),
            "naive_output_mp_per_s": round(out_mp / naive_t, 1),
            "ours_source_mp_per_s": round(src_px / 1e6 / ours_t, 1),
            "naive_source_mp_per_s": round(naive_src_mp / naive_t, 1),
            "speedup_vs_naive": round(naive_t / ours_t, 2),
            "ours_openslide_patches_per_s": round(ours_n / os_t, 1),
            "ours_openslide_source_mp_per_s": round(src_px / 1e6 / os_t, 1),
            "openslide_blocks_speedup_vs_naive": round(naive_t / os_t, 2),
        }
        print(json.dumps({"read": {f"{mag}x": read[f"{mag}x"]}}), flush=True)

    extract = {}
    for mag in (20, 5):
        st = ExtractSettings(mag=mag, encoder=args.encoder, workers=args.workers, batch_size=64)
        t = time.perf_counter()
        run_extraction(job, st, overwrite=True)
        extract[f"{mag}x_seconds_per_slide"] = round((time.perf_counter() - t) / len(specs), 3)
    extract["ratio_20x_over_5x"] = round(extract["20x_seconds_per_slide"] / extract["5x_seconds_per_slide"], 2)
    result = {
        "benchmark": "pipeline",
        "slides": len(specs),
        "mpp_level0": args.mpp if not args.cohort else None,
        "slide_size": [int(table["width"].iloc[0]), int(table["height"].iloc[0])],
        "patches_per_slide": {"20x": float(np.mean(table["patches_20x"])), "5x": float(np.mean(table["patches_5x"]))},
        "tiling_seconds_per_slide": round(tiling, 3),
        "read": read,
        "extract": extract,
        "encoder": args.encoder,
        "threads": torch.get_num_threads(),
        "cpu": platform.machine(),
        "cores": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
