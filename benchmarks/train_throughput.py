"""Training throughput (bags/s) of abmil and transmil on bags of 8,000 × 1,024 features, batch 1 vs batched.

Two numbers per setting, measured in the same run:
- ``trainer_bags_per_s``: one epoch through wsimil's trainer (sampling, padding, loss terms, optimiser, logging);
- ``model_only_bags_per_s``: the bare forward + backward + optimiser step on a pre-built batch tensor.
Their ratio (``overhead_fraction`` = 1 − trainer/model_only) is the cost of everything that is not the model's
arithmetic. Prints JSON.

    python benchmarks/train_throughput.py [--bags 16] [--instances 8000] [--dim 1024] [--batch-sizes 1,4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pandas as pd
import torch


def main() -> None:
    os.environ.setdefault("WSIMIL_PROGRESS", "0")
    from wsimil.config import load_config
    from wsimil.data.batching import pad_batch
    from wsimil.data.manifest import Cohort, Manifest
    from wsimil.data.splits import Split
    from wsimil.features.store import Bag
    from wsimil.methods import create_method
    from wsimil.methods.trainer import Trainer
    from wsimil.progress import make_progress

    ap = argparse.ArgumentParser()
    ap.add_argument("--bags", type=int, default=16)
    ap.add_argument("--instances", type=int, default=8000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--models", default="abmil,transmil")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="timed epochs per setting (best is reported)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(args.bags)]
    # bag sizes vary ±10% around the target, as real slides do, so batching has padding to pay for
    sizes = rng.integers(int(args.instances * 0.9), int(args.instances * 1.1) + 1, args.bags)
    bags = {s: Bag(s, rng.standard_normal((n, args.dim), dtype=np.float32)) for s, n in zip(ids, sizes, strict=True)}
    df = pd.DataFrame(
        {
            "case_id": ids,
            "slide_id": ids,
            "label": [str(i % 2) for i in range(args.bags)],
            "y": [i % 2 for i in range(args.bags)],
        }
    )
    cohort = Cohort(Manifest(df, ["0", "1"]), bags, args.dim)
    split = Split(0, 0, ids, [], [])
    rows = []
    for model in args.models.split(","):
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            cfg = load_config(model=model, batch_size=bs, epochs=1, device=args.device, balanced_sampling=False)
            trainer = Trainer(cfg, cohort, out_dir=None, device=args.device)  # type: ignore[arg-type]
            method = create_method(cfg)
            torch.manual_seed(0)
            model_ = method.build(args.dim, 2).to(args.device)
            tr = np.arange(args.bags)
            best_trainer = np.inf
            with make_progress() as progress:
                task = progress.add_task("bench", total=None, info="")
                trainer._fit(method, model_, tr, np.array([], dtype=int), None, 0, split, progress, task)  # warm-up
                for _ in range(args.repeats):
                    _sync(args.device)
                    t0 = time.perf_counter()
                    trainer._fit(method, model_, tr, np.array([], dtype=int), None, 0, split, progress, task)
                    _sync(args.device)
                    best_trainer = min(best_trainer, time.perf_counter() - t0)
            # bare model steps on pre-built batches of the same bags
            opt = torch.optim.Adam(model_.parameters(), lr=1e-4)
            batches = []
            for i in range(0, args.bags, bs):
                x, m = pad_batch([torch.from_numpy(bags[s].features).to(args.device) for s in ids[i : i + bs]])
                batches.append(
                    (x, m, torch.tensor([j % 2 for j in range(i, min(i + bs, args.bags))], device=args.device))
                )
            best_model = np.inf
            for _ in range(args.repeats + 1):
                _sync(args.device)
                t0 = time.perf_counter()
                for x, m, y in batches:
                    out = model_(x, m)
                    loss = torch.nn.functional.cross_entropy(out.logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                _sync(args.device)
                best_model = min(best_model, time.perf_counter() - t0)
            row = {
                "model": model,
                "batch_size": bs,
                "bags": args.bags,
                "instances": args.instances,
                "dim": args.dim,
                "trainer_bags_per_s": round(args.bags / best_trainer, 3),
                "model_only_bags_per_s": round(args.bags / best_model, 3),
                "overhead_fraction": round(1 - best_model / best_trainer, 3),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "device": args.device,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "results": rows,
            },
            indent=2,
        )
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
