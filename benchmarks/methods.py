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

``--suite slide`` compares on slide-sized feature bags (:mod:`wsimil.data.slide_bags`: 1,000–10,000 instances,
macro/micro/ITC foci, hard negatives, batch shifts), one cohort per seed (``--seeds 0,1,2``): ``slide`` (binary,
with instance labels), ``slide_hier`` (HMIL against flat ABMIL on the fine and on the coarse labels) and
``slide_surv`` (survival, c-index). Per run and seed: bag AUC (fold mean, std; pooled out of fold with a bootstrap
CI), instance AUC, ``metrics_fine``/``metrics_coarse``, c-index, seconds per epoch; per run over seeds: the paired
difference to its baseline (same seed, folds and features) with a CI from a bootstrap over slides within seeds.

    python benchmarks/methods.py --suite slide [--seeds 0,1,2] [--bags 100] [--dim 256] [--folds 5] [--epochs 40]
        [--runs abmil,mhim_v1,mhim_v2,weno,transmil,mhim_v1_transmil,mhim_v2_transmil] [--datasets slide,slide_hier]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
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


#: runs of the hierarchical and survival slide datasets: name → (method, model, task, label column)
HIER_RUNS = {"abmil_fine": ("supervised", "abmil"), "abmil_coarse": ("supervised", "abmil"), "hmil": ("hmil", "abmil")}
SURV_RUNS = {
    "abmil": ("supervised", "abmil", {}),
    "mhim_v1": ("mhim_v1", "abmil", {}),
    "mhim_v2": ("mhim_v2", "abmil", {}),
}


def _pooled_score(pred: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(labels, scores, slide ids)`` of out-of-fold predictions: binary → P(class 1); survival → risk; several
    classes → the probability matrix (macro one-vs-rest AUC)."""
    pred = pred.sort_values("slide_id")
    cols = [c for c in pred.columns if c.startswith("prob_")]
    if "risk" in pred.columns:
        return pred[["time", "event"]].to_numpy(), pred["risk"].to_numpy(), list(pred.slide_id)
    score = pred[cols[-1]].to_numpy() if len(cols) == 2 else pred[cols].to_numpy()
    return pred["label"].to_numpy(), score, list(pred.slide_id)


def _metric(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    from wsimil.evaluation.survival import concordance_index

    if y.ndim == 2:  # survival: (time, event)
        return float(concordance_index(y[:, 0], y[:, 1], s))
    if s.ndim == 1:
        return float(roc_auc_score(y, s)) if len(set(y)) == 2 else float("nan")
    if len(set(y)) < s.shape[1]:
        return float("nan")
    return float(roc_auc_score(y, s, multi_class="ovr", average="macro", labels=list(range(s.shape[1]))))


def _label_codes(pred: pd.DataFrame) -> pd.DataFrame:
    """Class names → indices in the order of the ``prob_`` columns (multi-class)."""
    cols = [c.removeprefix("prob_") for c in pred.columns if c.startswith("prob_")]
    if len(cols) > 2 and "risk" not in pred.columns:
        pred = pred.assign(label=pred["label"].astype(str).map({c: i for i, c in enumerate(cols)}))
    return pred


def _bootstrap(pairs: list[tuple], n_boot: int = 1000, seed: int = 0) -> dict:
    """Point and 95% CI of the mean over seeds of ``metric(a) − metric(b)`` (``b`` None: of ``metric(a)``), each
    seed's slides resampled with replacement. ``pairs``: per seed ``(y, score_a, score_b | None)``."""
    rng = np.random.default_rng(seed)

    def stat(idx_per_seed):
        vals = []
        for (y, a, b), i in zip(pairs, idx_per_seed, strict=True):
            m = _metric(y[i], a[i]) - (_metric(y[i], b[i]) if b is not None else 0.0)
            vals.append(m)
        return float(np.nanmean(vals))

    point = stat([np.arange(len(p[0])) for p in pairs])
    boots = [stat([rng.integers(0, len(p[0]), len(p[0])) for p in pairs]) for _ in range(n_boot)]
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return {"value": round(point, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}


def _slide_data(name: str, seed: int, args, out: Path) -> tuple[Path, dict[str, Path], str]:
    """Write one seed's cohort of a slide dataset; returns ``(features, {label view: manifest}, task)``."""
    from wsimil.data.slide_bags import (
        SlideBagSpec,
        make_hierarchical_slide_bags,
        make_slide_bags,
        make_survival_slide_bags,
    )
    from wsimil.data.synthetic import write_bags

    spec = SlideBagSpec(dim=args.dim, min_instances=args.min_instances, max_instances=args.max_instances)
    d = out / f"{name}_seed{seed}"
    make = {
        "slide": make_slide_bags,
        "slide_hier": make_hierarchical_slide_bags,
        "slide_surv": make_survival_slide_bags,
    }
    if not (d / "manifest.csv").is_file():
        write_bags(make[name](args.bags, spec, seed=seed), d)
    manifest = d / "manifest.csv"
    views = {"label": manifest}
    if name == "slide_hier":  # a flat model on the coarse labels needs its own manifest
        coarse = pd.read_csv(manifest).assign(label=lambda m: m["coarse_label"])
        views["coarse"] = d / "manifest_coarse.csv"
        coarse.to_csv(views["coarse"], index=False)
    return d / "features", views, "survival" if name == "slide_surv" else "classification"


def run_slide_suite(args) -> dict:
    """The ``--suite slide`` comparison (module docstring)."""
    from wsimil.config import load_config
    from wsimil.methods.trainer import run_training

    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = (args.datasets or "slide,slide_hier").split(",")
    report: dict = {"benchmark": "methods", "suite": "slide", "seeds": seeds, "folds": args.folds,
                    "epochs": args.epochs, "bags": args.bags, "dim": args.dim, "datasets": {}}  # fmt: skip
    for ds in datasets:
        if ds == "slide_hier":
            runs = {k: (*v, {}) for k, v in HIER_RUNS.items()}
        elif ds == "slide_surv":
            runs = SURV_RUNS
        else:
            runs = {r: RUNS[r] for r in args.runs.split(",")}
        per_run: dict[str, dict] = {r: {"seeds": {}} for r in runs}
        preds: dict[str, list] = {r: [] for r in runs}
        for seed in seeds:
            feats, views, task = _slide_data(ds, seed, args, out / "data")
            for run, (method, model, kw) in runs.items():
                kw = dict(kw)
                base = _baseline(run, ds)
                if method.startswith("mhim"):
                    kw["teacher_init"] = str(out / ds / f"seed{seed}" / base)
                manifest = views["coarse"] if run == "abmil_coarse" else views["label"]
                cfg = load_config(model=model, method=method, method_kwargs=kw, folds=args.folds, epochs=args.epochs,
                                  seed=seed, task=task)  # fmt: skip
                run_dir = out / ds / f"seed{seed}" / run
                t0 = time.perf_counter()
                res = run_training(cfg, feats, manifest, run_dir)
                row = _summary(res, run_dir, time.perf_counter() - t0) if task == "classification" else {
                    "c_index": res["metrics"]["c_index"]["mean"],
                    "seconds_per_epoch": round(float(pd.read_csv(run_dir / "history.csv")["seconds"].mean()), 3),
                }  # fmt: skip
                pred = _label_codes(pd.read_csv(run_dir / "predictions.csv", dtype={"slide_id": str}))
                y, score, _ = _pooled_score(pred)
                preds[run].append((y, score))
                row["pooled"] = _bootstrap([(y, score, None)], args.n_boot)
                per_run[run]["seeds"][seed] = row
                print(json.dumps({"dataset": ds, "seed": seed, "run": run, **row}), flush=True)
        for run in runs:
            vals = [r["pooled"]["value"] for r in per_run[run]["seeds"].values()]
            per_run[run]["pooled_mean"], per_run[run]["pooled_std"] = round(np.mean(vals), 4), round(np.std(vals), 4)
            base = _baseline(run, ds)
            if base and base != run and base in preds:
                pairs = [(y, a, b) for (y, a), (_, b) in zip(preds[run], preds[base], strict=True)]
                per_run[run][f"minus_{base}"] = _bootstrap(pairs, args.n_boot)
        report["datasets"][ds] = per_run
    return report


def _baseline(run: str, ds: str) -> str | None:
    """The run a method is compared to: its backbone's plain model (HMIL: flat ABMIL on the fine labels)."""
    if ds == "slide_hier":
        return "abmil_fine" if run == "hmil" else None
    if ds == "slide_surv":
        return "abmil"
    _, model, _ = RUNS[run]
    return next(r for r, (me, mo, _) in RUNS.items() if me == "supervised" and mo == model)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default=None, help="classic: digits,musk1,elephant; slide: slide,slide_hier")
    ap.add_argument("--runs", default="abmil,mhim_v1,mhim_v2,weno")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic-features")
    ap.add_argument("--synthetic-manifest")
    ap.add_argument("--out", default="/tmp/wsimil_methods")
    ap.add_argument("--suite", default="classic", choices=["classic", "slide"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bags", type=int, default=100)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--min-instances", type=int, default=1000)
    ap.add_argument("--max-instances", type=int, default=10000)
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    os.environ.setdefault("WSIMIL_PROGRESS", "0")
    warnings.simplefilter("ignore", UserWarning)
    if args.suite == "slide":
        print(json.dumps(run_slide_suite(args), indent=2))
        return

    from wsimil.config import load_config
    from wsimil.methods.base import list_methods
    from wsimil.methods.trainer import run_training

    out = Path(args.out)
    table = []
    for ds in (args.datasets or "digits,musk1,elephant").split(","):
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
