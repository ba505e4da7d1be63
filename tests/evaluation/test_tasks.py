"""The task objects: labels, bag loss, validation and test scores of classification and survival."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from wsimil.errors import WsimilError
from wsimil.evaluation.predict import Predictions
from wsimil.evaluation.survival import concordance_index, nll_survival_loss, risk_from_logits
from wsimil.evaluation.tasks import get_task, list_tasks


def _pred(logits: np.ndarray, labels: np.ndarray) -> Predictions:
    z = torch.as_tensor(logits)
    return Predictions(z.softmax(-1).numpy(), float(F.cross_entropy(z, torch.as_tensor(labels))), None, logits)


def test_registry():
    assert list_tasks() == ["classification", "survival"]
    with pytest.raises(WsimilError, match="unknown task 'x'"):
        get_task("x")


def test_classification():
    task = get_task("classification")
    df = pd.DataFrame({"label": ["a", "b", "a", "b"]})
    t = task.targets(df, np.array([0, 1, 0, 1]))
    assert t.events is None and task.batch_extras(t, np.arange(2), "cpu") == {}
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    torch.testing.assert_close(task.loss(logits, y), F.cross_entropy(logits, y))
    z = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.5, 0.0]], dtype=np.float32)
    idx = np.arange(4)
    val = task.validation(t, idx, _pred(z, t.labels))
    assert val["val_auc"] == pytest.approx(0.75) and val["val_loss"] > 0
    s = task.test_scores(t, idx, _pred(z, t.labels), n_boot=20, seed=0)
    assert s.metrics["auc"] == pytest.approx(0.75) and s.risk is None and s.ci is not None
    assert task.test_scores(t, idx, _pred(z, t.labels), n_boot=0, seed=0).ci is None
    assert task.prediction_row(t, 1, ["a", "b"], None) == {"label": "b"}
    assert task.primary_metric == "auc" and task.uses_model_aux_losses
    assert task.label_columns("grade") == ("grade",)
    df = pd.DataFrame({"slide_id": ["s1", "s2", "s3"], "grade": ["10", "2", "2"]})
    out, classes = task.read_labels(df, "grade", None, 4, "m.csv", [])
    assert classes == ["2", "10"] and out["y"].tolist() == [1, 0, 0]  # numeric labels sort as numbers
    with pytest.raises(WsimilError, match="unknown grade '10'"):
        task.read_labels(df, "grade", ["2", "3"], 4, "m.csv", [])


def test_survival():
    task = get_task("survival")
    with pytest.raises(WsimilError, match="needs manifest columns time,event; missing event"):
        task.targets(pd.DataFrame({"time": [1.0]}), np.array([0]))
    df = pd.DataFrame({"time": [1.0, 2.0, 3.0, 4.0], "event": [1, 1, 0, 1]})
    t = task.targets(df, np.array([0, 1, 2, 3]))
    extras = task.batch_extras(t, np.array([1, 3]), "cpu")
    assert extras["event"].tolist() == [1.0, 1.0] and extras["time"].tolist() == [2.0, 4.0]
    logits = torch.randn(4, 4)
    y, ev = torch.as_tensor(t.labels), torch.as_tensor(t.events)
    torch.testing.assert_close(task.loss(logits, y, ev), nll_survival_loss(logits, y, ev))
    with pytest.raises(ValueError, match="event"):
        task.loss(logits, y)
    z = logits.numpy()
    risk = risk_from_logits(z)
    idx = np.arange(4)
    val = task.validation(t, idx, _pred(z, t.labels))
    assert val["val_auc"] == pytest.approx(concordance_index(t.times, t.events, risk))  # c-index rides val_auc
    assert val["val_loss"] == pytest.approx(float(nll_survival_loss(logits, y, ev)))
    s = task.test_scores(t, idx, _pred(z, t.labels), n_boot=20, seed=0)
    assert set(s.metrics) == {"c_index"} and set(s.ci) == {"c_index"}
    np.testing.assert_allclose(s.risk, risk)
    assert task.prediction_row(t, 2, [], 0.5) == {"time": 3.0, "event": 0, "risk": 0.5}
    assert task.pooled(t, idx, np.zeros((4, 4)), np.zeros(4), 20, 0) is None
    assert task.primary_metric == "c_index" and not task.uses_model_aux_losses
    assert task.label_columns("label") == ("time", "event")
