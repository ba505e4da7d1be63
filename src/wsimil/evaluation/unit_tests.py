"""MIL algorithmic unit tests (after Raff & Holt, NeurIPS 2023): train on one distribution, test on a shifted
one that only a model respecting the standard MIL assumption can handle. See
:func:`wsimil.data.synthetic.make_unit_test_bags` for the tests themselves."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from wsimil.config import load_config
from wsimil.data.synthetic import make_unit_test_bags, write_bags
from wsimil.io import write_csv
from wsimil.methods.trainer import run_training

PASS_AUC = 0.75


def run_unit_test(
    model: str,
    test: str,
    seed: int = 0,
    epochs: int = 30,
    n_bags: int = 200,
    model_kwargs: dict | None = None,
    out: str | Path | None = None,
) -> dict:
    """Train ``model`` on the test's training bags (10% held out for early stopping), score its test bags.
    Returns ``{"model", "test", "auc", "passed"}``; passing means test AUC ≥ 0.75."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out) if out else Path(tmp)
        train = make_unit_test_bags(test, "train", n_bags, seed=seed)
        test_bags = make_unit_test_bags(test, "test", n_bags, seed=seed)
        manifest = write_bags(train + test_bags, root / "data")
        n_val = n_bags // 10
        split = ["val" if i < n_val else "train" for i in range(n_bags)] + ["test"] * len(test_bags)
        write_csv(
            root / "split.csv", pd.DataFrame({"slide_id": [b.slide_id for b in train + test_bags], "split": split})
        )
        kw = {"hidden_dims": [64]} if model_kwargs is None else model_kwargs
        cfg = load_config(
            model=model,
            model_kwargs=kw,
            epochs=epochs,
            lr=1e-3,
            batch_size=8,
            seed=seed,
            splits=str(root / "split.csv"),
            patience=8,
            min_epochs=10,
            bootstrap=0,
        )
        res = run_training(cfg, root / "data" / "features", manifest, root / "run")
    auc = res["folds"][0]["metrics"]["auc"]
    return {"model": model, "test": test, "auc": auc, "passed": auc is not None and auc >= PASS_AUC}
