"""LRMIL on a synthetic cohort (SPEC §1): HR teacher vs. LR baseline vs. LR student, k-fold, and seconds per slide of
both inference paths measured end to end in the same run. Prints JSON.

The synthetic cohort's tumour evidence is fine nuclear texture: clear at 20×, faint at 5× (see wsimil.slide.synth).
Targets: student pooled AUC ≥ the 5× ceiling − 0.02 and ≥ the teacher's − 0.03, the student − baseline paired CI
above 0, and the LR path ≥ 12× faster end to end.

    python benchmarks/lrmil.py [--cohort /tmp/coh40 --job /tmp/job40] [--slides 40] [--folds 5] [--out DIR]
                               [--ablations] [--threads 1] [--stage1-steps 500] [--proxy-teacher | --weights W]
                               [--no-ceiling]

**The 5× ceiling** (``ceiling_lr``, when the cohort has tumour masks): a resnet18 trained at 5× with patch labels on
a disjoint synthetic cohort (``benchmarks/proxy_encoder.py --mag 5``), then ABMIL with the student's settings on its
5× features, on the same folds: the best a 5×-only model can reach on this data. Every arm is reported pooled
out of fold with a bootstrap CI, and per size class (macro/micro/ITC against all negatives) when the manifest has a
``size_class`` column.

``--proxy-teacher`` makes E_T a resnet18 trained at 20× on a disjoint synthetic cohort (benchmarks/proxy_encoder.py):
offline there are no pretrained weights, and a randomly initialised ResNet knows nothing for stage 1 to distil.
Without ``--cohort``/``--job`` it synthesises ``--slides`` slides and tiles them at 20× and 5× under ``--out``. Steps
are resumable (re-running reuses finished ones). ``--ablations`` adds the four ablations (no stage 1, no bag KD, no
attention KD, no instance loss), sharing the features, teacher, baseline and stage 1 of the main run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import pandas as pd

ABLATIONS = {
    "no_stage1": {"stage1.enabled": False},
    "no_bag_kd": {"stage2.lambda_bag": 0.0},
    "no_attention_kd": {"stage2.lambda_soft": 0.0},
    "no_instance_loss": {"stage2.lambda_hard": 0.0},
}


def summary(res: dict) -> dict:
    def ms(m: dict, k: str) -> list[float | None]:  # [mean, std] across folds
        v = m.get(k) or {}
        return [None if v.get(s) is None else round(v[s], 4) for s in ("mean", "std")]

    return {name: {k: ms(m, k) for k in ("auc", "balanced_accuracy", "f1_weighted", "instance_auc")}
            for name, m in res["metrics"].items()}  # fmt: skip


PREDICTIONS = {
    "teacher_hr": "teacher",
    "baseline_lr": "baseline_lr",
    "student_lr": "student",
    "ceiling_lr": "ceiling_lr",
}


def pooled(run: Path, names=tuple(PREDICTIONS), n_boot: int = 2000, keep=None) -> dict:
    """Out-of-fold AUC over all slides (each scored by the fold that held it out) with a 95% bootstrap CI, and paired
    bootstrap CIs of the student's AUC minus the teacher's and the baseline's: with 8 test slides per fold the
    fold-mean AUC moves in steps of 1/16, so the pooled figure is the steadier one."""
    import numpy as np
    import pandas as pd

    from wsimil.evaluation.metrics import binary_auc

    preds = {}
    for name in names:
        p = run / PREDICTIONS[name] / "predictions.csv"
        if p.is_file():
            preds[name] = pd.read_csv(p, dtype={"slide_id": str}).set_index("slide_id").sort_index()
    if not preds:
        return {}
    ids = sorted(set.intersection(*(set(p.index) for p in preds.values())))
    if keep is not None:
        ids = [i for i in ids if i in keep]
    y = preds[next(iter(preds))].loc[ids, "label"].to_numpy() == 1
    score = {k: p.loc[ids, "prob_1"].to_numpy() for k, p in preds.items()}
    rng = np.random.default_rng(0)
    boots = {k: [] for k in score}
    for _ in range(n_boot):
        i = rng.integers(0, len(ids), len(ids))
        if y[i].all() or not y[i].any():
            continue
        for k, v in score.items():
            boots[k].append(binary_auc(y[i], v[i]))
    out = {"n_slides": len(ids)}
    for k, v in score.items():
        b = np.array(boots[k])
        out[k] = {
            "auc": round(binary_auc(y, v), 4),
            "ci95": [round(float(x), 4) for x in np.percentile(b, [2.5, 97.5])],
        }
    if "student_lr" in score:
        for other in ("teacher_hr", "baseline_lr", "ceiling_lr"):
            if other in score:
                d = np.array(boots["student_lr"]) - np.array(boots[other])
                point = binary_auc(y, score["student_lr"]) - binary_auc(y, score[other])
                out[f"student_minus_{other}"] = {
                    "auc": round(point, 4),
                    "ci95": [round(float(x), 4) for x in np.percentile(d, [2.5, 97.5])],
                }
    return out


def by_size_class(run: Path, manifest: Path) -> dict:
    """Pooled AUC per metastasis size class: the positives of one class against every negative slide."""
    import pandas as pd

    man = pd.read_csv(manifest, dtype={"slide_id": str})
    if "size_class" not in man.columns:
        return {}
    neg = set(man.slide_id[man.size_class == "negative"])
    return {c: pooled(run, keep=neg | set(man.slide_id[man.size_class == c]))
            for c in sorted(set(man.size_class) - {"negative"})}  # fmt: skip


def preset_of(manifest: Path) -> str:
    """The synthetic preset a cohort was made with (camelyon manifests carry ``size_class``)."""
    return "camelyon" if "size_class" in pd.read_csv(manifest, nrows=1).columns else "toy"


def ceiling_run(cfg, job: Path, manifest: Path, out: Path, encoder: str, ceiling_slides: int = 32) -> dict:
    """The 5× ceiling arm: an encoder trained at 5× with patch labels on a disjoint cohort, its 5× features of this
    cohort, ABMIL with the student's settings on the run's folds → ``RUN/ceiling_lr/``. Returns the encoder's
    summary."""
    import sys

    from wsimil.features.encoders import create_encoder, sha256_file
    from wsimil.features.extract import EncodeSettings, final_fn
    from wsimil.lrmil.features import extract
    from wsimil.lrmil.job import LRMILJob
    from wsimil.lrmil.pipeline import key_of, train_config
    from wsimil.methods.trainer import run_training

    sys.path.insert(0, str(Path(__file__).parent))
    from proxy_encoder import train_proxy

    # its own disjoint cohort (seed 1001), larger than the teacher's: a 5x bag holds few tumour patches
    info = train_proxy(out / "ceiling_proxy", encoder, slides=ceiling_slides, epochs=6, mag=cfg.lr_mag, seed=1001,
                       preset=preset_of(manifest))  # fmt: skip
    enc = create_encoder(encoder, info["weights"], 0)
    j = LRMILJob(job, cfg.hr_mag, cfg.lr_mag, cfg.patch_size)
    ids = list(pd.read_csv(manifest, dtype={"slide_id": str}).slide_id)
    st = EncodeSettings(device="cpu", batch_size=cfg.batch_size, workers=cfg.workers, precision=cfg.precision)
    key = key_of("ceiling", sha256_file(info["weights"]), cfg.lr_mag, cfg.patch_size)
    feats = extract(j, ids, cfg.lr_mag, final_fn(enc), enc, out / "ceiling_features", key, st,
                    f"ceiling: {cfg.lr_mag:g}x features of the patch-supervised encoder")  # fmt: skip
    classes = sorted(map(str, pd.read_csv(manifest).label.unique()))
    tc = train_config(cfg.student, cfg, classes, out / "run" / "splits" / "all.tsv")
    run_training(tc, feats, manifest, out / "run" / "ceiling_lr")
    return info


def main() -> None:
    os.environ.setdefault("WSIMIL_PROGRESS", "0")
    warnings.simplefilter("ignore", UserWarning)
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohort", default=None, help="a cohort made by `wsimil synth` (its manifest.csv is used)")
    ap.add_argument("--job", default=None, help="its tiling job at 20x and 5x")
    ap.add_argument("--slides", type=int, default=40)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--weights", default=None)
    ap.add_argument(
        "--proxy-teacher",
        action="store_true",
        help="E_T = a resnet18 trained at 20x on a disjoint synthetic cohort (benchmarks/proxy_encoder.py), standing "
        "in for a pathology foundation model offline; without it and without --weights E_T is randomly initialised",
    )
    ap.add_argument("--config", default=None, help="LRMIL YAML (default: the built-in defaults)")
    ap.add_argument("--stage1-epochs", type=int, default=None)
    ap.add_argument("--stage1-steps", type=int, default=None)
    ap.add_argument("--no-ceiling", action="store_true", help="skip the 5x ceiling arm")
    ap.add_argument("--ceiling-slides", type=int, default=32, help="slides of the ceiling encoder's own cohort")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthesised cohort (without --cohort)")
    ap.add_argument("--timing-slides", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 helps on a busy machine)")
    ap.add_argument("--out", default="/tmp/wsimil_lrmil_bench")
    ap.add_argument("--ablations", action="store_true")
    args = ap.parse_args()

    import torch

    from wsimil.lrmil.config import load_lrmil_config
    from wsimil.lrmil.pipeline import run_lrmil
    from wsimil.slide.job import TileSettings, run_tiling
    from wsimil.slide.synth import make_cohort

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.cohort:
        manifest = Path(args.cohort) / "manifest.csv"
        job = Path(args.job) if args.job else out / "job"
    else:
        make_cohort(out / "cohort", args.slides, seed=args.seed)
        manifest, job = out / "cohort" / "manifest.csv", out / "job"
    if not (job / "tiling.yaml").is_file():
        run_tiling(manifest, job, TileSettings(mags=[20, 5]))
    proxy = None
    if args.proxy_teacher:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from proxy_encoder import train_proxy

        proxy = train_proxy(out / "proxy", args.encoder, preset=preset_of(manifest))
        args.weights = proxy["weights"]
    base = {
        "encoder": args.encoder,
        "weights": args.weights,
        "folds": args.folds,
        "device": "cpu",
        "timing_slides": args.timing_slides,
        "stage1.epochs": args.stage1_epochs,
        "stage1.steps": args.stage1_steps,
    }
    t0 = time.perf_counter()
    cfg = load_lrmil_config(args.config, **base)
    res = run_lrmil(cfg, job, manifest, out / "run")
    ceiling = None
    if not args.no_ceiling and "tumor_mask" in pd.read_csv(manifest, nrows=1).columns:
        ceiling = ceiling_run(cfg, job, manifest, out, args.encoder, args.ceiling_slides)
    report = {
        "cohort": str(manifest),
        "folds": args.folds,
        "encoder": args.encoder,
        "encoder_weights": args.weights or "random init",
        "proxy_teacher": proxy,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "metrics": summary(res),
        "seconds_per_slide": res["seconds_per_slide"],
        "ceiling_encoder": ceiling,
        "pooled_out_of_fold": pooled(out / "run"),
        "pooled_by_size_class": by_size_class(out / "run", manifest),
        "run_seconds": round(time.perf_counter() - t0, 1),
        "run": str(out / "run"),
    }
    po = report["pooled_out_of_fold"]
    auc = {k: v["auc"] for k, v in po.items() if isinstance(v, dict) and k in PREDICTIONS}
    sp = res["seconds_per_slide"]
    report["targets"] = {
        "student_ge_ceiling_minus_0.02": None
        if "ceiling_lr" not in auc
        else auc["student_lr"] >= auc["ceiling_lr"] - 0.02,
        "student_ge_teacher_minus_0.03": auc["student_lr"] >= auc["teacher_hr"] - 0.03,
        "student_minus_baseline_ci_above_0": po["student_minus_baseline_lr"]["ci95"][0] > 0,
        "lr_speedup": None if sp.get("speedup") is None else round(sp["speedup"], 2),
        "lr_path_12x_faster": bool(sp.get("speedup") and sp["speedup"] >= 12),
    }
    if args.ablations:
        report["ablations"] = {}
        for name, over in ABLATIONS.items():
            cfg = load_lrmil_config(args.config, **base, shared=str(out / "run"), **over)
            r = run_lrmil(cfg, job, manifest, out / name)
            report["ablations"][name] = {
                **summary(r)["student_lr"],
                "pooled_auc": pooled(out / name, ("student_lr",)).get("student_lr", {}).get("auc"),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
