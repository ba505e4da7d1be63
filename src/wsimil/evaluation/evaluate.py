"""Score an external test set with a trained run's fold models, each alone and as an ensemble (mean of
probabilities), with bootstrap 95% confidence intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from wsimil.config import resolve_device
from wsimil.data.batching import BagTensors, Standardizer
from wsimil.data.manifest import load_cohort, read_manifest
from wsimil.errors import WsimilError
from wsimil.evaluation.metrics import bootstrap_ci, instance_auc, nan_to_none
from wsimil.evaluation.predict import predict
from wsimil.features.store import FeatureStore
from wsimil.io import write_csv, write_json
from wsimil.progress import track
from wsimil.run import RunDir, load_model
from wsimil.threads import apply_threads, mil_step_elements


def evaluate_run(
    run: str | Path,
    features: str | Path,
    manifest: str | Path,
    out: str | Path,
    device: str = "auto",
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 8,
    threads: int | str | None = None,
) -> dict:
    rd, out = RunDir(run), Path(out)
    run = rd.path
    cfg = rd.read_config()
    ckpts = rd.checkpoints()
    if not ckpts:
        raise WsimilError(f"run {run} has no checkpoints in {rd.checkpoints_dir}")
    classes = cfg["classes"]
    man = read_manifest(manifest, classes, cfg.get("label_column", "label"))
    cohort = load_cohort(man, FeatureStore(features))
    if cohort.in_dim != cfg["in_dim"]:
        raise WsimilError(
            f"features in {features} have dimension {cohort.in_dim} but run {run} was trained on "
            f"{cfg['in_dim']}-d features (encoder mismatch?)"
        )
    dev = resolve_device(device)
    apply_threads(threads, "mil", elements=mil_step_elements(cohort.lengths.values(), cohort.in_dim, batch_size))
    bags = BagTensors(cohort, man.slide_ids)
    y = man.labels
    has_inst = cohort.has_instance_labels
    models_out, probs_all, rows = [], [], []
    for ck_path in track(ckpts, "Scoring with fold models"):
        model, ck = load_model(ck_path, dev)
        std = Standardizer.from_state(ck.get("standardizer"))
        pred = predict(model, bags, dev, y, std, batch_size, with_instances=has_inst)
        probs_all.append(pred.probs)
        entry = {
            "checkpoint": ck_path.name,
            "repeat": ck["repeat"],
            "fold": ck["fold"],
            "metrics": bootstrap_ci(y, pred.probs, n_boot, seed),
        }
        if pred.instance_scores is not None:
            entry["instance_auc"] = instance_auc(
                pred.instance_scores, [cohort.bags[s].instance_labels for s in man.slide_ids]
            )
        models_out.append(entry)
    ens = np.mean(probs_all, axis=0)
    for i, sid in enumerate(man.slide_ids):
        rows.append(
            {
                "slide_id": sid,
                "label": classes[y[i]],
                **{f"prob_{c}": float(p) for c, p in zip(classes, ens[i], strict=True)},
                "predicted": classes[int(ens[i].argmax())],
            }
        )
    result = nan_to_none(
        {
            "ensemble": {"metrics": bootstrap_ci(y, ens, n_boot, seed)},
            "models": models_out,
            "run": str(run.resolve()),
            "n_slides": len(y),
            "ci_level": 0.95,
            "n_bootstrap": n_boot,
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    write_csv(out / "predictions.csv", pd.DataFrame(rows))
    return result
