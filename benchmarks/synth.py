"""Speed and memory of ``wsimil synth``: writes a cohort, prints JSON with wall time, seconds per slide (CPU and
wall × workers / slides), peak memory (the largest process: the parent or any worker) and, with ``--tile``, the
median bag sizes at 20× and 5× (256 px patches) of ``wsimil tile --mag 20 --mag 5``.

    python benchmarks/synth.py --out /tmp/synth_bench [--slides 4] [--preset camelyon] [--mpp 0.5] [--workers 2]
        [--scale 1.0] [--tile]

``--scale`` shrinks both sides of the preset's default slide (e.g. 0.5 for a quarter of the area). Timings only mean
something on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="camelyon")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--tile", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the cohort (default: delete it afterwards)")
    a = ap.parse_args()

    import pandas as pd

    from wsimil.slide.synth import make_cohort
    from wsimil.slide.synth_camelyon import composition, default_size

    w, h = default_size(a.mpp) if a.preset == "camelyon" else (12288, 8192)
    w, h = int(w * a.scale), int(h * a.scale)
    cohort = a.out / "cohort"
    t0 = time.perf_counter()
    make_cohort(cohort, a.slides, a.seed, w, h, a.mpp, int(round(10 / a.mpp)), preset=a.preset, workers=a.workers)
    wall = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    man = pd.read_csv(cohort / "manifest.csv")
    res = {
        "preset": a.preset,
        "slides": a.slides,
        "width": w,
        "height": h,
        "mpp": a.mpp,
        "workers": a.workers,
        "wall_s": round(wall, 1),
        "s_per_slide_wall_x_workers": round(wall * a.workers / a.slides, 1),
        "cpu_s_per_slide": round(cpu / a.slides, 1),
        "peak_rss_mb": round(max(me.ru_maxrss, kids.ru_maxrss) / 1024, 1),
        "slide_file_mb": round(sum(Path(p).stat().st_size for p in man.path) / len(man) / 2**20, 1),
    }
    if "size_class" in man:
        res["composition"] = composition(man).to_dict("records")
    if a.tile:
        from wsimil.slide.job import TileSettings, run_tiling

        t0 = time.perf_counter()
        st = run_tiling(cohort / "manifest.csv", a.out / "job", TileSettings(mags=[20, 5], patch_size=256))
        res["tile_s"] = round(time.perf_counter() - t0, 1)
        res["tile_status"] = st["status"].value_counts().to_dict()
        for m in ("20x", "5x"):
            if f"patches_{m}" in st:
                res[f"median_bag_{m}"] = float(st[f"patches_{m}"].median())
                res[f"min_bag_{m}"] = int(st[f"patches_{m}"].min())
    print(json.dumps(res, indent=1))
    if not a.keep:
        shutil.rmtree(a.out / "cohort", ignore_errors=True)
        shutil.rmtree(a.out / "job", ignore_errors=True)


if __name__ == "__main__":
    main()
