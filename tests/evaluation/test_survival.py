import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from wsimil.config import load_config
from wsimil.errors import WsimilError
from wsimil.evaluation.survival import (
    add_survival_columns,
    assign_bins,
    bootstrap_cindex,
    concordance_index,
    nll_survival_loss,
    risk_from_logits,
    time_bins,
)
from wsimil.methods.trainer import run_training


def _sig(v):
    return 1 / (1 + math.exp(-v))


def test_nll_matches_hand_computation():
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, -0.5, 0.3]])
    y = torch.tensor([1, 2])
    event = torch.tensor([1.0, 0.0])
    h0 = [_sig(v) for v in (0.0, 1.0, -1.0)]
    h1 = [_sig(v) for v in (2.0, -0.5, 0.3)]
    # patient 0: event in bin 1 → survived bin 0, event in bin 1
    l0 = -(math.log(1 - h0[0]) + math.log(h0[1]))
    # patient 1: censored in bin 2 → survived bins 0..2
    l1 = -(math.log(1 - h1[0]) + math.log(1 - h1[1]) + math.log(1 - h1[2]))
    got = nll_survival_loss(logits, y, event)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # alpha up-weights the uncensored part only
    got_a = nll_survival_loss(logits, y, event, alpha=0.4)
    assert got_a.item() == pytest.approx((0.6 * (l0 + l1) + 0.4 * l0) / 2, rel=1e-6)


def test_nll_is_stable_for_extreme_logits():
    logits = torch.tensor([[80.0, -80.0], [-80.0, 80.0]], requires_grad=True)
    loss = nll_survival_loss(logits, torch.tensor([0, 1]), torch.tensor([0.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_concordance_index_by_hand():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.array([1, 1, 0, 1])
    # comparable pairs (i event, t_i < t_j): (0,1) (0,2) (0,3) (1,2) (1,3); (3,·) none since nobody later
    risk = np.array([4.0, 3.0, 2.0, 1.0])  # perfectly ordered
    assert concordance_index(t, e, risk) == 1.0
    assert concordance_index(t, e, -risk) == 0.0
    risk = np.array([4.0, 1.0, 2.0, 1.0])  # (0,·) 3 wins; (1,2) loss; (1,3) tie → (3 + 0.5) / 5
    assert concordance_index(t, e, risk) == pytest.approx(3.5 / 5)
    assert math.isnan(concordance_index(t, np.zeros(4), risk))


def test_risk_orders_by_expected_survival():
    # higher hazard logits everywhere → higher risk
    low, high = np.full((1, 4), -2.0), np.full((1, 4), 2.0)
    r = risk_from_logits(np.vstack([low, high]))
    assert r[1] > r[0]


def test_bootstrap_cindex_brackets_the_estimate():
    rng = np.random.default_rng(0)
    t = rng.exponential(size=80)
    e = (rng.random(80) < 0.7).astype(int)
    risk = -t + rng.normal(scale=0.5, size=80)
    c = concordance_index(t, e, risk)
    ci = bootstrap_cindex(t, e, risk, 200, seed=1)
    assert ci["ci_low"] < c < ci["ci_high"] and ci["ci_low"] > 0.5


def test_quantile_bins_use_uncensored_times():
    t = np.array([1, 2, 3, 4, 5, 6, 7, 8, 100.0])
    e = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0])
    edges = time_bins(t, e, 4)
    b = assign_bins(t, edges)
    assert list(np.bincount(b, minlength=4)) == [2, 2, 2, 3]  # the censored 100 lands in the last bin
    with pytest.raises(WsimilError, match="distinct event times"):
        time_bins(t, np.array([1, 1, 0, 0, 0, 0, 0, 0, 0]), 4)


def test_bad_survival_columns_are_named():
    df = pd.DataFrame({"slide_id": ["a", "b", "c"], "time": ["1", "x", "3"], "event": ["1", "0", "2"]})
    with pytest.raises(WsimilError) as e:
        add_survival_columns(df, 2, "m.csv")
    assert "row 3 (b): time 'x'" in str(e.value) and "row 4 (c): event '2'" in str(e.value)


def test_survival_training_learns_burden_hazard(digit_cohort, tmp_path):
    """Digit bags: positive bags (more evidence) get shorter times; the c-index must be well above 0.5."""
    feats, manifest = digit_cohort
    man = pd.read_csv(manifest)
    rng = np.random.default_rng(0)
    man["time"] = np.where(man["label"] == 1, rng.uniform(1, 3, len(man)), rng.uniform(4, 8, len(man)))
    man["event"] = (rng.random(len(man)) < 0.8).astype(int)
    surv = tmp_path / "surv.csv"
    man.drop(columns=["label"]).to_csv(surv, index=False)
    cfg = load_config(
        task="survival",
        model="abmil",
        epochs=6,
        folds=3,
        lr=1e-3,
        model_kwargs={"hidden_dims": [32], "attn_dim": 16},
        bootstrap=50,
        min_epochs=1,
        patience=3,
    )
    res = run_training(cfg, feats, surv, tmp_path / "run")
    assert res["metrics"]["c_index"]["mean"] > 0.6  # a sign error gives < 0.5; abmil reaches AUC ~0.77 here
    assert "ci" in res["folds"][0] and set(res["folds"][0]["ci"]["c_index"]) == {"ci_low", "ci_high"}
    pred = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert {"time", "event", "risk", "prob_bin0"} <= set(pred.columns) and len(pred) == 60
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert hist["val_loss"].notna().all()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["task"] == "survival"
