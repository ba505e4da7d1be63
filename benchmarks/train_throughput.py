"""MIL training step time against its arithmetic floor, and the peak memory of a training run. Prints JSON.

In one run, on random bags of ``N × D`` float32 features (D = 1,024):

- ``floor_ms[N]``: the 1,024 → 512 projection's forward GEMM plus its weight-gradient GEMM on an ``N``-row bag —
  the arithmetic every ABMIL-style step must do (min over repeats);
- ``step_ms[model][N]``: one optimiser step of wsimil's trainer path (``FoldContext.make_batch`` → the method's
  ``fit_epoch`` on a one-bag training fold: padding, standardisation, forward, backward, optimiser, teacher EMA),
  min over repeats, for supervised ABMIL / gated ABMIL / TransMIL and MHIM v1, MHIM v2 and WENO (ABMIL backbone);
- ``ratios``: ``abmil / floor`` and ``mhim_v2 / abmil`` per ``N``;
- ``rss``: peak resident memory of a real ``run_training`` (subprocess) on a cohort written to HDF5, against
  ``1.2 × feature bytes + 1 GiB``.

A model whose step exceeded ``--max-step-s`` at one ``N`` is skipped at larger ones (reported as ``null``).

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py --threads 2
    python benchmarks/train_throughput.py --quick          # tiny sizes: a smoke test, figures meaningless
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: benchmarked settings: name -> (method, model, extra config overrides)
SETTINGS = {
    "abmil": ("supervised", "abmil", {}),
    "gated_abmil": ("supervised", "gated_abmil", {}),
    "transmil": ("supervised", "transmil", {}),
    "mhim_v1": ("mhim_v1", "abmil", {"method_kwargs": {"baseline_epochs": 1}}),
    "mhim_v2": ("mhim_v2", "abmil", {"method_kwargs": {"baseline_epochs": 1}}),
    "weno": ("weno", "abmil", {}),
}


def floor_ms(n: int, dim: int, width: int, repeats: int) -> float:
    """Min time of ``x W^T`` (forward) plus ``g^T x`` (weight gradient) for ``x (n, dim)``, ``W (width, dim)``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(width, dim, generator=g)
    grad = torch.randn(n, width, generator=g)
    best = np.inf
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.mm(x, w.t())
        torch.mm(grad.t(), x)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _cohort(n: int, dim: int):
    import pandas as pd

    from wsimil.data.manifest import Cohort, Manifest
    from wsimil.features.store import Bag

    rng = np.random.default_rng(n)
    ids = ["s0", "s1"]
    bags = {s: Bag(s, rng.standard_normal((n, dim), dtype=np.float32) * 2 + 1) for s in ids}
    df = pd.DataFrame({"case_id": ids, "slide_id": ids, "label": ["0", "1"], "y": [0, 1]})
    return Cohort(Manifest(df, ["0", "1"]), bags, dim)


def step_ms(name: str, n: int, dim: int, repeats: int, tmp: Path) -> float:
    """Min time of one training step of setting ``name`` on a one-bag fold of ``n`` instances."""
    from wsimil.config import load_config
    from wsimil.data.splits import Split
    from wsimil.methods import create_method
    from wsimil.methods.trainer import Trainer
    from wsimil.progress import make_progress

    method_name, model, extra = SETTINGS[name]
    preset = Path(__import__("wsimil").__file__).parent / "configs" / f"{method_name}.yaml"
    cfg = load_config(
        preset if preset.is_file() else None,
        method=method_name,
        model=model,
        epochs=1000,  # schedules (MHIM's cosine decays) plan over many steps, as in a real run
        batch_size=1,
        balanced_sampling=False,
        early_stopping=False,
        device="cpu",
        **extra,
    )
    cohort = _cohort(n, dim)
    trainer = Trainer(cfg, cohort, tmp / f"{name}_{n}", "cpu")
    split = Split(0, 0, ["s0"], [], [])
    method = trainer.method if hasattr(trainer, "method") else create_method(cfg)
    with make_progress() as progress:
        ctx = trainer._context(split, progress)
        torch.manual_seed(0)
        model_ = method.build(dim, 2)
        method.setup(model_, ctx)
        model_.train()
        opt = torch.optim.Adam(method.parameters(model_), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        best = np.inf
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            method.fit_epoch(model_, opt, ctx, 0, gen)
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


_RSS_CHILD = """
import json, sys
from wsimil.config import load_config
from wsimil.methods.trainer import run_training
d = sys.argv[1]
cfg = load_config(model="abmil", epochs=int(sys.argv[2]), folds=2, repeats=1, val_fraction=0.1, bootstrap=0,
                  early_stopping=False, device="cpu", threads=int(sys.argv[3]))
run_training(cfg, d + "/features", d + "/manifest.csv", d + "/run")
# VmHWM is this process's own high-water mark (ru_maxrss would carry the parent's RSS over fork + exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_bytes": hwm * 1024}))
"""


def rss_run(bags: int, n: int, dim: int, epochs: int, threads: int, tmp: Path) -> dict:
    """Peak RSS of ``run_training`` (ABMIL, 2 folds) in a fresh process on ``bags`` HDF5 bags of ``n × dim``."""
    import pandas as pd

    from wsimil.features.store import write_bag

    d = tmp / "rss"
    (d / "features").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    ids = [f"slide_{i:03d}" for i in range(bags)]
    for i, s in enumerate(ids):
        m = int(n * rng.uniform(0.9, 1.1))
        x = rng.standard_normal((m, dim), dtype=np.float32) + (0.3 if i % 2 else 0.0)
        write_bag(d / "features" / f"{s}.h5", x, np.zeros((m, 2), dtype=np.int64))
    pd.DataFrame({"slide_id": ids, "label": [str(i % 2) for i in range(bags)]}).to_csv(d / "manifest.csv", index=False)
    feature_bytes = sum((d / "features" / f"{s}.h5").stat().st_size for s in ids)
    env = {**os.environ, "WSIMIL_PROGRESS": "0"}
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(d), str(epochs), str(threads)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if res.returncode != 0:
        raise SystemExit(f"training run for RSS failed:\n{res.stderr[-3000:]}")
    peak = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    limit = 1.2 * feature_bytes + 2**30
    return {
        "bags": bags,
        "instances": n,
        "feature_bytes": feature_bytes,
        "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / 2**30, 3),
        "target_bytes": int(limit),
        "rss_over_feature_bytes": round(peak / feature_bytes, 3),
        "within_target": bool(peak <= limit),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    os.environ.setdefault("WSIMIL_PROGRESS", "0")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,8000,32000", help="bag sizes N")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--models", default=",".join(SETTINGS))
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per cell (min is reported)")
    ap.add_argument("--max-step-s", type=float, default=8.0, help="skip larger N for a model slower than this")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--rss-bags", type=int, default=24, help="bags of the RSS run (0: no RSS run)")
    ap.add_argument("--rss-instances", type=int, default=8000)
    ap.add_argument("--rss-epochs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    ap.add_argument("--json-out", default=None, help="also write the JSON here, rewritten after every cell")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.dim, args.repeats = "64,256", 32, 1
        args.rss_bags, args.rss_instances, args.rss_epochs = min(args.rss_bags, 6), 50, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    models = args.models.split(",")
    unknown = sorted(set(models) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown model setting(s) {unknown}; choose from {sorted(SETTINGS)}")
    width = 512
    result: dict = {
        "benchmark": "train_throughput",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "dim": args.dim,
        "sizes": sizes,
        "repeats": args.repeats,
        "floor_ms": {},
        "step_ms": {m: {} for m in models},
    }
    with tempfile.TemporaryDirectory(prefix="wsimil_tt_") as tmp_:
        tmp = Path(tmp_)
        for n in sizes:
            result["floor_ms"][n] = round(floor_ms(n, args.dim, width, args.repeats), 2)
        for m in models:
            too_slow = False
            for n in sizes:
                if too_slow:
                    result["step_ms"][m][n] = None
                    continue
                t = step_ms(m, n, args.dim, args.repeats, tmp)
                result["step_ms"][m][n] = round(t, 2)
                too_slow = t > args.max_step_s * 1e3
                print(f"# {m} N={n}: {t:.1f} ms", file=sys.stderr, flush=True)
                _save(result, args.json_out)
        result["ratios"] = _ratios(result, sizes)
        if args.rss_bags:
            threads = args.threads or torch.get_num_threads()
            result["rss"] = rss_run(args.rss_bags, args.rss_instances, args.dim, args.rss_epochs, threads, tmp)
    _save(result, args.json_out)
    print(json.dumps(result, indent=2))


def _save(result: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2))


def _ratios(result: dict, sizes: list[int]) -> dict:
    steps, floor = result["step_ms"], result["floor_ms"]
    out: dict = {}
    for n in sizes:
        a = steps.get("abmil", {}).get(n)
        row = {}
        if a:
            row["abmil_over_floor"] = round(a / floor[n], 3)
            for m in ("gated_abmil", "transmil", "mhim_v1", "mhim_v2", "weno"):
                v = steps.get(m, {}).get(n)
                if v:
                    row[f"{m}_over_abmil"] = round(v / a, 3)
        out[n] = row
    return out


if __name__ == "__main__":
    main()
