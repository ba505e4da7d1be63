"""Baseline vs each teacher–student method on the same folds, seeds and features. Prints JSON.

For every dataset the plain supervised model of each backbone is trained first; MHIM runs then take their teacher
from that very run (``teacher_init``: same splits, same seed), so "baseline → method" differs only in the method.
Reported per run: bag AUC/accuracy mean ± std over folds, instance AUC where the bags carry instance labels
(attention for the baseline, the student's instance scores for WENO), training seconds per epoch (mean of
``history.csv``'s ``seconds``, validation included), and the teacher head for WENO.

Datasets: ``digits`` (digit bags with instance labels, built in), ``musk1``/``elephant`` (../shared/data/mil),
``synthetic`` (features of a synthetic slide cohort: ``--synthetic-features DIR --synthetic-manifest CSV``, e.g.
the 5× resnet18 features of ``wsimil synth`` + ``tile`` + ``extract``), ``hier`` (hierarchical digit bags: HMIL vs
abmil on fine labels).

    python benchmarks/methods.py [--datasets digits,musk1,elephant] [--folds 5] [--epochs 40]
        [--runs abmil,mhim_v1,mhim_v2,weno] [--out /tmp/wsimil_methods]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import pandas as pd

#: run name → (method, model, method_kwargs); MHIM runs take their teacher from the same backbone's baseline
RUNS = {
    "abmil": ("supervised", "abmil", {}),
    "mhim_v1": ("mhim_v1", "abmil", {}),
    "mhim_v2": ("mhim_v2", "abmil", {}),
    "weno": ("weno", "abmil", {}),
    "dsmil": ("supervised", "dsmil", {}),
    "mhim_v2_dsmil": ("mhim_v2", "dsmil", {}),
    "weno_dsmil": ("weno", "dsmil", {}),
    "transmil": ("supervised", "transmil", {}),
    "mhim_v1_transmil": ("mhim_v1", "transmil", {}),
    "mhim_v2_transmil": ("mhim_v2", "transmil", {}),
}
LR = {"musk1": 5e-4, "elephant": 1e-4}


def _dataset(name: str, args, out: Path) -> tuple[Path, Path, dict]:
    """(features, manifest, config overrides) of a dataset."""
    root = Path(__file__).resolve().parents[1]
    if name == "digits":
        from wsimil.data.synthetic import make_digit_bags, write_bags

        manifest = write_bags(make_digit_bags(200, seed=0), out / "digits")
        return out / "digits" / "features", manifest, {}
    if name == "hier":
        from wsimil.data.synthetic import make_hierarchical_digit_bags, write_bags

        manifest = write_bags(make_hierarchical_digit_bags(240, seed=0), out / "hier")
        return out / "hier" / "features", manifest, {}
    if name in ("musk1", "elephant"):
        from wsimil.data.mil_csv import convert_mil_csv

        manifest = convert_mil_csv(root.parent / "shared" / "data" / "mil" / f"{name}.csv", out / name)
        return out / name / "features", manifest, {"lr": LR[name]}
    if name == "synthetic":
        if not args.synthetic_features or not args.synthetic_manifest:
            raise SystemExit("--datasets synthetic needs --synthetic-features DIR and --synthetic-manifest CSV")
        return Path(args.synthetic_features), Path(args.synthetic_manifest), {}
    raise SystemExit(f"unknown dataset {name!r}")


def _summary(res: dict, run_dir: Path, seconds: float) -> dict:
    hist = pd.read_csv(run_dir / "history.csv")
    m = res["metrics"]
    row = {
        "auc": f"{m['auc']['mean']:.3f} ± {m['auc']['std']:.3f}",
        "accuracy": f"{m['accuracy']['mean']:.3f} ± {m['accuracy']['std']:.3f}",
        "auc_mean": m["auc"]["mean"],
        "seconds_per_epoch": round(float(hist["seconds"].mean()), 3),
        "epochs_run_mean": round(float(hist.groupby(["repeat", "fold"]).size().mean()), 1),
        "wall_seconds": round(seconds, 1),
    }
    if "instance_auc" in m and m["instance_auc"]["mean"] is not None:
        row["instance_auc"] = f"{m['instance_auc']['mean']:.3f} ± {m['instance_auc']['std']:.3f}"
    for head in ("teacher", "coarse", "fine"):
        if f"metrics_{head}" in res:
            h = res[f"metrics_{head}"]["auc"]
            row[f"{head}_auc"] = f"{h['mean']:.3f} ± {h['std']:.3f}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="digits,musk1,elephant")
    ap.add_argument("--runs", default="abmil,mhim_v1,mhim_v2,weno")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic-features")
    ap.add_argument("--synthetic-manifest")
    ap.add_argument("--out", default="/tmp/wsimil_methods")
    args = ap.parse_args()
    os.environ.setdefault("WSIMIL_PROGRESS", "0")
    warnings.simplefilter("ignore", UserWarning)

    from wsimil.config import load_config
    from wsimil.methods.base import list_methods
    from wsimil.methods.trainer import run_training

    out = Path(args.out)
    table = []
    for ds in args.datasets.split(","):
        feats, manifest, over = _dataset(ds, args, out / "data")
        runs = ["abmil", "hmil"] if ds == "hier" else args.runs.split(",")
        for run in runs:
            method, model, kw = ("hmil", "abmil", {}) if run == "hmil" else RUNS[run]
            if method not in list_methods():
                print(json.dumps({"dataset": ds, "run": run, "skipped": f"method {method!r} is not available"}))
                continue
            kw = dict(kw)
            if method.startswith("mhim"):
                base = next(r for r, (me, mo, _) in RUNS.items() if me == "supervised" and mo == model)
                kw["teacher_init"] = str(out / ds / base)  # the same-backbone baseline of this very benchmark
                if not (out / ds / base / "results.json").is_file():
                    print(json.dumps({"dataset": ds, "run": run, "note": f"training baseline {base} first"}))
                    cfg_b = load_config(model=model, folds=args.folds, epochs=args.epochs, seed=args.seed, **over)
                    run_training(cfg_b, feats, manifest, out / ds / base)
            cfg = load_config(
                model=model,
                method=method,
                method_kwargs=kw,
                folds=args.folds,
                epochs=args.epochs,
                seed=args.seed,
                **over,
            )
            t0 = time.perf_counter()
            res = run_training(cfg, feats, manifest, out / ds / run)
            wall = time.perf_counter() - t0
            row = {"dataset": ds, "run": run, "method": method, "model": model, **_summary(res, out / ds / run, wall)}
            table.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"benchmark": "methods", "folds": args.folds, "epochs": args.epochs, "results": table}, indent=2))


if __name__ == "__main__":
    main()
