"""How hard is a synthetic cohort, and where is its evidence? Prints JSON with

- ``low_power_auc``: for each single 5× colour/density statistic (slide-level max over patches; see
  :func:`wsimil.slide.synth_camelyon.low_power_statistics`), the AUC of positive vs negative slides, and
  ``max(auc, 1 - auc)`` (a cohort that rewards shortcuts has values near 1);
- ``cnn``: the same small CNN trained on patches with mask labels (≥ 10% tumour → 1, none → 0) at 20× and at 5× on
  half of the slides (up to ``--max-patches`` tumour and as many normal patches per slide), scored on *every* tissue
  patch of the other half (slide score = max patch probability, so a negative slide's score is its most
  tumour-like patch among all of them): slide AUC on all test slides and on the micro/ITC positives against the
  negatives, and patch AUC over every labelled test patch. On a cohort whose evidence is nuclear detail, 20× beats
  5× on micro and ITC slides.

    python benchmarks/synth_difficulty.py --out /tmp/synth_diff [--cohort DIR | --slides 40 --mpp 0.5 --scale 1]
        [--patch-size 128] [--epochs 4] [--max-patches 300]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _grid(row, mag: float, patch_size: int):
    """A slide's tissue grid at ``mag`` and each patch's mask label (1 tumour, 0 normal, -1 ambiguous)."""
    from PIL import Image

    from wsimil.features.patches import patch_labels_from_mask
    from wsimil.predict.memory import tile_in_memory
    from wsimil.slide.job import SlideSpec, TileSettings

    spec = SlideSpec(str(row.slide_id), str(row.path))
    grid = tile_in_memory(spec, TileSettings(mags=[mag], patch_size=patch_size))
    return grid, patch_labels_from_mask(grid, np.asarray(Image.open(row.tumor_mask)), float(row.mask_downsample))


def slide_patches(row, mag: float, patch_size: int, rng, max_neg: int) -> tuple[np.ndarray, np.ndarray]:
    """Labelled training patches of one slide at ``mag``: up to ``max_neg`` random tumour and as many normal ones."""
    from wsimil.features.patches import read_block
    from wsimil.slide.reader import open_slide

    grid, lab = _grid(row, mag, patch_size)
    pos, neg = np.flatnonzero(lab == 1), np.flatnonzero(lab == 0)
    keep = np.concatenate([rng.permutation(pos)[:max_neg], rng.permutation(neg)[:max_neg]]).astype(int)
    with open_slide(str(row.path), "auto", slide_id=str(row.slide_id)) as slide:
        x = np.stack([read_block(slide, grid, np.array([k]))[0] for k in keep]) if len(keep) else None
    return x, lab[keep]


def all_patches(row, mag: float, patch_size: int, rows_per_read: int = 8):
    """Every tissue patch of a slide, a band of ``rows_per_read`` grid rows per read: yields ``(patches, labels)``."""
    from wsimil.features.patches import read_block
    from wsimil.slide.reader import open_slide

    grid, lab = _grid(row, mag, patch_size)
    band = grid.cells[:, 1] // rows_per_read
    with open_slide(str(row.path), "auto", slide_id=str(row.slide_id)) as slide:
        for b in np.unique(band):
            idx = np.flatnonzero(band == b)
            yield read_block(slide, grid, idx), lab[idx]


def small_cnn():
    from torch import nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 1))  # fmt: skip


def train(data: tuple[np.ndarray, np.ndarray], epochs: int, seed: int):
    """The small CNN trained on ``data`` (patches, labels) with a class-balanced BCE."""
    import torch

    torch.manual_seed(seed)
    x, y = data
    net = small_cnn()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    w = torch.tensor([(y == 0).sum() / max((y == 1).sum(), 1)], dtype=torch.float32)
    lossf = torch.nn.BCEWithLogitsLoss(pos_weight=w)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        net.train()
        for b in np.array_split(rng.permutation(len(y)), max(1, len(y) // 64)):
            opt.zero_grad()
            lossf(net(_tensor(x[b])).squeeze(1), torch.from_numpy(y[b]).float()).backward()
            opt.step()
    return net.eval()


def _tensor(a: np.ndarray):
    import torch

    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255


def score_slides(net, rows, mag: float, patch_size: int) -> tuple[list[float], float, int]:
    """Each slide's max patch probability over all its tissue patches, the patch AUC over every labelled patch, and
    the number of patches scored."""
    import torch

    from wsimil.slide.synth_camelyon import auc

    scores, ps, ys, n = [], [], [], 0
    with torch.no_grad():
        for row in rows:
            best = 0.0
            for x, lab in all_patches(row, mag, patch_size):
                p = torch.cat([torch.sigmoid(net(_tensor(x[i : i + 256])).squeeze(1)) for i in range(0, len(x), 256)])
                p = p.numpy()
                best, n = max(best, float(p.max())), n + len(p)
                ps.append(p[lab >= 0])
                ys.append(lab[lab >= 0])
            scores.append(best)
    return scores, auc(np.concatenate(ps), np.concatenate(ys)), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cohort", type=Path)
    ap.add_argument("--slides", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the preset's slide side")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--patch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--max-patches", type=int, default=300, help="tumour and normal patches kept per slide and mag")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    a = ap.parse_args()

    import pandas as pd
    import torch

    from wsimil.slide.reader import open_slide
    from wsimil.slide.synth import make_cohort
    from wsimil.slide.synth_camelyon import STAT_NAMES, auc, default_size, low_power_statistics

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cohort = a.cohort
    if cohort is None:
        cohort = a.out / "cohort"
        if not (cohort / "manifest.csv").is_file():
            w, h = (int(v * a.scale) for v in default_size(a.mpp))
            make_cohort(cohort, a.slides, a.seed, w, h, a.mpp, int(round(10 / a.mpp)), preset="camelyon",
                        workers=a.workers)  # fmt: skip
    man = pd.read_csv(cohort / "manifest.csv")
    y = man.label.to_numpy().astype(int)
    res: dict = {"cohort": str(cohort), "slides": len(man), "positives": int(y.sum())}

    stats = []
    for r in man.itertuples():
        with open_slide(r.path) as s:
            lvl = s.best_level(2.0)
            img = s.read_region((0, 0), lvl, s.level_dimensions[lvl])
        f = s.level_mpp(lvl) / 2.0
        if abs(f - 1) > 1e-3:
            import cv2

            img = cv2.resize(img, (int(img.shape[1] * f), int(img.shape[0] * f)), interpolation=cv2.INTER_AREA)
        stats.append(low_power_statistics(img))
    st = pd.DataFrame(stats)
    res["low_power_auc"] = {k: round(auc(st[k].to_numpy(), y), 3) for k in STAT_NAMES}
    res["low_power_separation"] = {k: round(max(v, 1 - v), 3) for k, v in res["low_power_auc"].items()}

    rng = np.random.default_rng(a.seed)
    test = np.zeros(len(man), bool)  # half of each class held out
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: len(idx) // 2]] = True
    small = test & man.size_class.isin(["micro", "itc"]).to_numpy()
    res["cnn"] = {}
    rows = list(man.itertuples())
    for mag in (20.0, 5.0):
        t1 = time.perf_counter()
        tr = [slide_patches(r, mag, a.patch_size, rng, a.max_patches) for r, t in zip(rows, test, strict=True) if not t]
        tr = [d for d in tr if d[0] is not None]
        data = (np.concatenate([d[0] for d in tr]), np.concatenate([d[1] for d in tr]))
        net = train(data, a.epochs, a.seed)
        scores, patch_auc, n_scored = score_slides(net, [r for r, t in zip(rows, test, strict=True) if t], mag,
                                                   a.patch_size)  # fmt: skip
        s_all = np.array(scores)
        yt = y[test]
        sub = (yt == 0) | small[test]
        res["cnn"][f"{mag:g}x"] = {
            "train_patches": len(data[1]),
            "test_patches_scored": n_scored,
            "slide_auc": round(auc(s_all, yt), 3),
            "slide_auc_micro_itc": round(auc(s_all[sub], yt[sub]), 3),
            "patch_auc": round(patch_auc, 3),
            "seconds": round(time.perf_counter() - t1, 1),
        }
    res["composition"] = man.size_class.value_counts().to_dict()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
