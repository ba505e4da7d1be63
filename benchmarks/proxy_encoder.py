"""A stand-in for a pathology foundation model, for benchmarks that run offline: a timm encoder trained at 20× to tell
tumour from normal patches on a synthetic cohort of its own (disjoint from any benchmark cohort: other seed). Prints
JSON and writes a weights file that ``--encoder-weights`` of ``wsimil extract``/``wsimil lrmil`` loads.

Why: without network access no pretrained weights exist here, and a randomly initialised timm ResNet is a poor
teacher (its residual branches start at zero, so its features are a few pooled filter responses with an effective
rank of about 2). LRMIL distils what the 20× encoder *knows*; this encoder knows 20× nuclear morphology, as UNI or
CONCH would, and nothing about 5× (it never sees 5× patches).

    python benchmarks/proxy_encoder.py --out /tmp/proxy [--slides 8] [--epochs 3] [--encoder resnet18] [--mag 20]
        [--preset toy|camelyon]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np


def hr_patches(
    cohort: Path, mag: float, patch_size: int, max_neg_per_slide: int = 400, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled tissue patches (≥ 10% tumour → 1, none → 0) at ``mag``: every tumour patch and up to
    ``max_neg_per_slide`` random normal ones per slide (so large slides stay within memory):
    ``(patches uint8, labels, slide index)``."""
    import pandas as pd
    from PIL import Image

    from wsimil.features.patches import patch_labels_from_mask, read_block
    from wsimil.predict.memory import tile_in_memory
    from wsimil.slide.job import SlideSpec, TileSettings
    from wsimil.slide.reader import open_slide

    man = pd.read_csv(cohort / "manifest.csv")
    rng = np.random.default_rng(seed)
    xs, ys, ss = [], [], []
    for i, r in enumerate(man.itertuples()):
        spec = SlideSpec(str(r.slide_id), str(r.path))
        grid = tile_in_memory(spec, TileSettings(mags=[mag], patch_size=patch_size))
        ds = float(getattr(r, "mask_downsample", 16))
        lab = patch_labels_from_mask(grid, np.asarray(Image.open(r.tumor_mask)), ds)
        neg = rng.permutation(np.flatnonzero(lab == 0))[:max_neg_per_slide]
        keep = np.sort(np.concatenate([np.flatnonzero(lab == 1), neg]))
        with open_slide(spec.path, "auto", slide_id=spec.slide_id) as slide:
            xs += [read_block(slide, grid, np.array([k]))[0] for k in keep]
        ys.append(lab[keep])
        ss.append(np.full(len(keep), i))
    return np.stack(xs), np.concatenate(ys), np.concatenate(ss)


def train_proxy(
    out: Path,
    encoder: str = "resnet18",
    slides: int = 8,
    epochs: int = 3,
    seed: int = 1000,
    lr: float = 1e-3,
    mag: float = 20.0,
    preset: str = "toy",
    max_per_epoch: int = 2048,
) -> dict:
    """Synthesise ``slides`` slides of ``preset`` (seed ``seed``; ``camelyon`` at 0.5 µm/px), train ``encoder`` + a
    linear head on their patches at ``mag`` (≥ 10% tumour → 1, none → 0), save the encoder's weights to
    ``out/proxy_{encoder}.pt`` (``…_{mag}x.pt`` below 20×); returns a summary with a held-out patch AUC. At 5× this
    is the benchmark's *ceiling* encoder: what a 5×-only model can know when it is told where the tumour is. The
    last fifth of the slides (at least one holding tumour) is held out; an epoch draws at most ``max_per_epoch``
    patches, balanced."""
    import torch
    from torch import nn

    from wsimil.evaluation.metrics import binary_auc
    from wsimil.features.encoders import create_encoder
    from wsimil.slide.synth import make_cohort

    out.mkdir(parents=True, exist_ok=True)
    tag = "" if mag == 20 else f"_{mag:g}x"
    weights = out / f"proxy_{encoder}{tag}.pt"
    info_path = out / f"proxy{tag}.json"
    if weights.is_file() and info_path.is_file():
        return json.loads(info_path.read_text())
    t0 = time.perf_counter()
    cohort = out / "cohort"
    if not (cohort / "manifest.csv").is_file():
        if preset == "camelyon":
            make_cohort(cohort, slides, seed=seed, mpp=0.5, app_mag=20, preset=preset, workers=os.cpu_count() or 1)
        else:
            make_cohort(cohort, slides, seed=seed, tumor_fraction=0.15)
    x, y, s = hr_patches(cohort, mag, 256)
    # the last fifth of the slides is held out to check the encoder learnt something general; it must hold tumour
    held = s >= s.max() + 1 - max(1, (s.max() + 1) // 5)
    if not y[held].any():
        held = s == s[y == 1].max()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        enc = create_encoder(encoder, None, seed)
    torch.manual_seed(seed)
    head = nn.Linear(enc.embed_dim, 2)
    params = list(enc.model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    tr = np.flatnonzero(~held)
    pos, neg = tr[y[tr] == 1], tr[y[tr] == 0]
    rng = np.random.default_rng(seed)
    per_epoch = min(2 * min(len(neg), 4 * len(pos)), max_per_epoch)
    history = []
    for _ in range(epochs):
        enc.model.train()
        idx = np.concatenate([rng.choice(pos, per_epoch // 2), rng.choice(neg, per_epoch // 2)])  # balanced
        rng.shuffle(idx)
        total = 0.0
        for b in range(0, len(idx), 32):
            i = idx[b : b + 32]
            batch = torch.from_numpy(x[i])
            k = int(rng.integers(4))  # flips and right-angle rotations: tissue has no orientation
            batch = torch.rot90(batch, k, (1, 2))
            if rng.random() < 0.5:
                batch = batch.flip(2)
            loss = nn.functional.cross_entropy(head(enc.model(enc.preprocess(batch))), torch.from_numpy(y[i]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(i)
        history.append(round(total / len(idx), 4))
    enc.model.eval()
    with torch.no_grad():
        te = np.flatnonzero(held)
        logits = torch.cat([head(enc.model(enc.preprocess(torch.from_numpy(x[te[b : b + 64]])))) for b in
                            range(0, len(te), 64)])  # fmt: skip
    auc = binary_auc(y[te] == 1, (logits[:, 1] - logits[:, 0]).numpy())
    torch.save({k: v.detach().cpu() for k, v in enc.model.state_dict().items()}, weights)
    info = {
        "encoder": encoder,
        "weights": str(weights),
        "slides": slides,
        "preset": preset,
        "held_out_slides": int(len(np.unique(s[held]))),
        "held_out_tumour_patches": int(y[held].sum()),
        "seed": seed,
        "epochs": epochs,
        "mag": mag,
        "train_patches": int(len(tr)),
        "train_tumour_patches": int(len(pos)),
        "loss_per_epoch": history,
        f"held_out_patch_auc_{mag:g}x": round(float(auc), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    info_path.write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    os.environ.setdefault("WSIMIL_PROGRESS", "0")
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/wsimil_proxy_encoder")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--mag", type=float, default=20.0, help="20: the proxy teacher; 5: the 5x ceiling encoder")
    ap.add_argument("--preset", default="toy", choices=["toy", "camelyon"])
    args = ap.parse_args()
    info = train_proxy(Path(args.out), args.encoder, args.slides, args.epochs, args.seed, mag=args.mag,
                       preset=args.preset)  # fmt: skip
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
