"""A look at synthetic slides: for a few slides of a cohort, a thumbnail with mask outlines (tumour red, mimics
blue) and matching 5× and 20× crops (256 px at 2 and 0.5 µm/px) of tumour, mimic and normal tissue.

    python benchmarks/synth_gallery.py --out /tmp/gallery [--cohort DIR | --slides 3 --seed 0] [--preset camelyon]

Without ``--cohort`` it first writes a small cohort (``--slides``, all positive, at ``--mpp``) under ``OUT/cohort``.
Writes ``OUT/{slide_id}_thumb.png`` and ``OUT/{slide_id}_crops.png`` (top row 5×, bottom row 20×; columns tumour,
mimic, normal; a grey square where the slide has no such tissue) and prints the paths as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _centre(mask: np.ndarray, avoid: np.ndarray | None = None) -> tuple[int, int] | None:
    """The mask pixel deepest inside the mask (and farthest from ``avoid``), or None."""
    import cv2

    if not mask.any():
        return None
    d = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    if avoid is not None and avoid.any():
        d = np.minimum(d, cv2.distanceTransform((~avoid).astype(np.uint8), cv2.DIST_L2, 5) / 4)
    y, x = np.unravel_index(np.argmax(d), d.shape)
    return int(x), int(y)


def _crop(slide, cx0: float, cy0: float, um_per_px: float, size: int = 256) -> np.ndarray:
    from PIL import Image

    lvl = slide.best_level(um_per_px)
    ds = slide.level_downsamples[lvl]
    span0 = size * um_per_px / slide.mpp  # level-0 px
    n = int(round(span0 / ds))
    img = slide.read_region((int(cx0 - span0 / 2), int(cy0 - span0 / 2)), lvl, (n, n))
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BOX))


def gallery(cohort: Path, out: Path, n: int) -> list[str]:
    import cv2
    import pandas as pd
    from PIL import Image

    from wsimil.slide.reader import open_slide

    out.mkdir(parents=True, exist_ok=True)
    man = pd.read_csv(cohort / "manifest.csv")
    written = []
    for r in list(man.itertuples())[:n]:
        tumour = np.asarray(Image.open(r.tumor_mask)) > 0
        mimic = np.asarray(Image.open(r.mimic_mask)) > 0 if "mimic_mask" in man else np.zeros_like(tumour)
        ds = float(r.mask_downsample)
        with open_slide(r.path) as slide:
            thumb, tds = slide.thumbnail(1600)
            t = np.array(thumb)
            for m, colour in ((mimic, (40, 60, 230)), (tumour, (230, 20, 20))):
                cs, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cs = [(c * ds / tds).astype(np.int32) for c in cs]
                cv2.drawContours(t, cs, -1, colour, 2)
            p = out / f"{r.slide_id}_thumb.png"
            Image.fromarray(t).save(p)
            written.append(str(p))
            small = cv2.resize(thumb, (tumour.shape[1], tumour.shape[0]), interpolation=cv2.INTER_AREA)
            tissue = small.mean(-1) < 215
            normal = tissue & ~tumour & ~mimic
            panel = np.full((512, 768, 3), 128, np.uint8)
            for j, (m, avoid) in enumerate(((tumour, None), (mimic, tumour), (normal, tumour | mimic))):
                c = _centre(m, avoid)
                if c is None:
                    continue
                x0, y0 = (c[0] + 0.5) * ds, (c[1] + 0.5) * ds
                panel[:256, j * 256 : (j + 1) * 256] = _crop(slide, x0, y0, 2.0)
                panel[256:, j * 256 : (j + 1) * 256] = _crop(slide, x0, y0, 0.5)
            p = out / f"{r.slide_id}_crops.png"
            Image.fromarray(panel).save(p)
            written.append(str(p))
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cohort", type=Path)
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="camelyon")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--width", type=int, default=None, help="level-0 px (default: the preset's)")
    ap.add_argument("--height", type=int, default=None)
    a = ap.parse_args()
    cohort = a.cohort
    if cohort is None:
        from wsimil.slide.synth import make_cohort

        cohort = a.out / "cohort"
        make_cohort(cohort, a.slides, a.seed, a.width, a.height, a.mpp, int(round(10 / a.mpp)), pos_fraction=1.0,
                    preset=a.preset)  # fmt: skip
    print(json.dumps({"cohort": str(cohort), "images": gallery(cohort, a.out, a.slides)}, indent=1))


if __name__ == "__main__":
    main()
