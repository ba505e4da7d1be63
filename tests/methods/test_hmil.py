import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from wsimil.config import load_config
from wsimil.data.manifest import read_manifest
from wsimil.errors import WsimilError
from wsimil.methods.base import Batch, create_method
from wsimil.methods.hmil import (
    attention_matching_loss,
    bag_alignment_loss,
    beta_schedule,
    build_hierarchy,
    contrast_temperature,
    read_hierarchy_file,
    supcon_loss,
)
from wsimil.methods.trainer import run_training
from wsimil.models.hmil import HMILNet, mapping_matrix, marginal_log_probs
from wsimil.run import load_model

SMALL = {"mlp_dim": 16, "coarse_dim": 16, "fine_dim": 8, "coarse_attn_dim": 8, "fine_attn_dim": 4}


def _manifest(tmp_path, rows, header="slide_id,fine_label,coarse_label"):
    p = tmp_path / "m.csv"
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return read_manifest(p, label_column="fine_label")


# ------------------------------------------------------------------------------------------------ hierarchy
def test_hierarchy_from_manifest(tmp_path):
    man = _manifest(tmp_path, ["a,DCIS,malignant", "b,N,benign", "c,IC,malignant", "d,UDH,benign", "e,N,benign"])
    h = build_hierarchy(man)
    assert h.fine == ["DCIS", "IC", "N", "UDH"] and h.coarse == ["benign", "malignant"]
    assert h.parents == [1, 1, 0, 0]
    np.testing.assert_array_equal(h.coarse_labels(man.labels), [1, 0, 1, 0, 0])
    torch.testing.assert_close(h.matrix(), torch.tensor([[0.0, 0, 1, 1], [1, 1, 0, 0]]))


def test_hierarchy_errors_name_class_and_rows(tmp_path):
    man = _manifest(tmp_path, ["a,N,benign", "b,N,malignant", "c,IC,malignant", "d,N,benign"])
    with pytest.raises(
        WsimilError, match=r"fine class 'N' has 2 parents.*'benign' in rows 2, 5; 'malignant' in rows 3"
    ):
        build_hierarchy(man)
    man = _manifest(tmp_path, ["a,N,benign", "b,IC,", "c,IC,malignant"])
    with pytest.raises(WsimilError, match=r"coarse_label is empty for 1 slide\(s\) \(rows 3: 'b'\)"):
        build_hierarchy(man)
    man = _manifest(tmp_path, ["a,N", "b,IC"], header="slide_id,fine_label")
    with pytest.raises(WsimilError, match="no column 'coarse_label'.*--method-opt hierarchy=PATH"):
        build_hierarchy(man)
    man = _manifest(tmp_path, ["a,N,benign", "b,UDH,benign"])
    with pytest.raises(WsimilError, match="single coarse class"):
        build_hierarchy(man)


def test_hierarchy_from_yaml_both_forms_and_errors(tmp_path):
    # with a file, a partly filled coarse_label column is fine where it agrees
    man = _manifest(tmp_path, ["a,N,benign", "b,IC,", "c,ADH,"])
    by_parent = tmp_path / "h1.yaml"
    by_parent.write_text("benign: [N, PB, UDH]\natypical: [FEA, ADH]\nmalignant: [DCIS, IC]\n")
    by_child = tmp_path / "h2.yaml"
    by_child.write_text("N: benign\nADH: atypical\nIC: malignant\n")
    for f in (by_parent, by_child):
        h = build_hierarchy(man, f)
        assert h.fine == ["ADH", "IC", "N"] and h.coarse == ["atypical", "benign", "malignant"]
        assert h.parents == [0, 2, 1]

    twice = tmp_path / "twice.yaml"
    twice.write_text("benign: [N, ADH]\natypical: [ADH]\nmalignant: [IC]\n")
    with pytest.raises(
        WsimilError, match="fine class 'ADH' is listed under two coarse classes: 'benign' and 'atypical'"
    ):
        read_hierarchy_file(twice)
    dup = tmp_path / "dup.yaml"
    dup.write_text("N: benign\nIC: malignant\nN: malignant\n")
    with pytest.raises(WsimilError, match="key 'N' appears twice"):
        read_hierarchy_file(dup)
    missing = tmp_path / "missing.yaml"
    missing.write_text("N: benign\nIC: malignant\n")
    with pytest.raises(WsimilError, match=r"fine class 'ADH' \(rows 4\) has no parent in"):
        build_hierarchy(man, missing)
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("benign: [N]\nIC: malignant\n")
    with pytest.raises(WsimilError, match="mixes"):
        read_hierarchy_file(mixed)
    # a manifest coarse_label column that disagrees with the file is reported row by row
    man2 = _manifest(tmp_path, ["a,N,benign", "b,IC,benign", "c,ADH,atypical"])
    with pytest.raises(WsimilError, match=r"fine class 'IC': coarse_label \['benign'\] in rows 3 disagrees"):
        build_hierarchy(man2, by_child)


# ------------------------------------------------------------------------------------------------ losses
M = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # fine 0,1 → coarse 0; fine 2 → coarse 1


def test_mapping_and_bag_alignment_hand_computed():
    torch.testing.assert_close(mapping_matrix([0, 0, 1]), M)
    z = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    p = z.softmax(-1)
    torch.testing.assert_close(marginal_log_probs(z, M).exp(), p @ M.T)
    y_c = torch.tensor([1, 0])
    e = math.exp
    p1 = e(-1) / (e(1) + e(0) + e(-1))  # bag 0: coarse 1 holds only fine 2
    p2 = (e(0.5) + e(2)) / (e(0.5) + e(2) + e(0))  # bag 1: coarse 0 holds fine 0 and 1
    expected = -(math.log(p1) + math.log(p2)) / 2
    torch.testing.assert_close(bag_alignment_loss(z, y_c, M), torch.tensor(expected))


def test_attention_matching_hand_computed_and_ignores_padding():
    # one bag, 3 instances of which the last is padding
    a_f = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.3, 0.7, 0.0]]])  # (1, K_f=3, N=3)
    a_c = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # (1, K_c=2, N)
    mask = torch.tensor([[True, True, False]])
    # (M A_f)[:, 0] = (0.7, 0.3), (M A_f)[:, 1] = (1.3, 0.7)
    cos0 = 0.7 / math.hypot(0.7, 0.3)
    cos1 = 0.7 / math.hypot(1.3, 0.7)
    expected = ((1 - cos0) + (1 - cos1)) / 2
    torch.testing.assert_close(attention_matching_loss(a_c, a_f, M, mask), torch.tensor(expected))
    # a second bag with perfectly matching attention halves the batch mean
    a_c2 = torch.cat([a_c, torch.einsum("cf,bfn->bcn", M, a_f)])
    got = attention_matching_loss(a_c2, torch.cat([a_f, a_f]), M, torch.cat([mask, mask]))
    torch.testing.assert_close(got, torch.tensor(expected / 2))


def test_supcon_hand_computed():
    f = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]]])  # (B=3, V=1, 2)
    y = torch.tensor([0, 0, 1])
    tau = 0.5
    # anchor 0: positive row 1 (sim 0), negatives row 2 (sim -1): -log(e^0 / (e^0 + e^-2))
    # anchor 1: positive row 0 (sim 0), other row 2 (sim 0): -log(1/2); anchor 2 has no positive
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    torch.testing.assert_close(supcon_loss(f, y, tau, tau), torch.tensor(expected))
    torch.testing.assert_close(supcon_loss(f, y, tau, 0.1), torch.tensor(expected * tau / 0.1))
    # two views per sample: each row's other view is also a positive (the K_f rows of one bag)
    f2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one bag, two orthogonal rows
    torch.testing.assert_close(supcon_loss(f2, torch.tensor([0]), 1.0, 1.0), torch.tensor(0.0))
    assert supcon_loss(f[2:], y[2:], 0.1).item() == 0.0  # no positives at all


def test_beta_and_temperature_schedules():
    assert beta_schedule(0, 10) == 1.0 and beta_schedule(5, 10) == 0.75 and beta_schedule(10, 10) == 0.0
    assert beta_schedule(5, 10, "linear") == 0.5 and beta_schedule(2, 10, "linear") == 0.8
    with pytest.raises(WsimilError, match="beta_schedule"):
        beta_schedule(1, 10, "cubic")
    assert contrast_temperature(3, 10) == 0.1
    assert contrast_temperature(0, 10, "cosine", 0.1, 1.0) == pytest.approx(1.0)
    assert contrast_temperature(5, 10, "cosine", 0.1, 1.0) == pytest.approx(0.1)
    assert contrast_temperature(10, 10, "cosine", 0.1, 1.0) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ model
def _padded(xs):
    n = max(len(x) for x in xs) + 3
    xb = torch.full((len(xs), n, xs[0].shape[1]), 1e3, dtype=xs[0].dtype)
    mask = torch.zeros(len(xs), n, dtype=torch.bool)
    for i, x in enumerate(xs):
        xb[i, : len(x)] = x
        mask[i, : len(x)] = True
    return xb, mask


def test_model_outputs_padding_permutation_and_hierarchy_consistency():
    torch.manual_seed(0)
    net = HMILNet(6, 3, [0, 0, 1], **SMALL).eval().double()
    xs = [torch.randn(n, 6, dtype=torch.float64) for n in (2, 9)]
    xb, mask = _padded(xs)
    out = net(xb, mask)
    assert out.logits.shape == (2, 3) and out.attention_logits.shape == (2, 3, xb.shape[1])
    assert out.bag_embedding.shape == (2, 3 * SMALL["fine_dim"])
    assert set(out.extra_logits) == {"coarse", "coarse_from_fine"} and out.extra_logits["coarse"].shape == (2, 2)
    # the marginalised head is the fine prediction summed onto the hierarchy
    torch.testing.assert_close(out.extra_logits["coarse_from_fine"].softmax(-1), out.logits.softmax(-1) @ M.double().T)
    maps = net.attention_maps(xb, mask)
    assert maps["coarse"].shape == (2, 2, xb.shape[1]) and torch.isneginf(maps["coarse"][0, :, 2:]).all()
    for i, x in enumerate(xs):  # padding never changes a result
        alone = net.forward_hierarchy(x[None])
        batch = net.forward_hierarchy(xb, mask)
        torch.testing.assert_close(batch.fine_logits[i], alone.fine_logits[0])
        torch.testing.assert_close(batch.coarse_logits[i], alone.coarse_logits[0])
        torch.testing.assert_close(batch.coarse_attention[i, :, : len(x)], alone.coarse_attention[0])
    perm = torch.randperm(9)
    a, b = net(xs[1][None]), net(xs[1][perm][None])
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.attention_logits[..., perm], b.attention_logits)


def test_total_loss_composition_and_gradients():
    torch.manual_seed(1)
    cfg = load_config(method="hmil", epochs=10, model_kwargs=SMALL, method_kwargs={"lambda_ia": 2.0, "lambda_ba": 0.5})
    method = create_method(cfg)
    method.restore({"fine": ["a", "b", "c"], "coarse": ["x", "y"], "parents": [0, 0, 1]})
    net = method.build(5, 3).eval()  # no dropout: the coarse head can be recomputed below
    x, mask = torch.randn(4, 7, 5), torch.ones(4, 7, dtype=torch.bool)
    mask[0, 4:] = False
    batch = Batch(x, mask, torch.tensor([0, 1, 2, 2]), np.arange(4), [None] * 4)
    t = method.train_step(net, batch, epoch=5)
    beta = 0.75
    expected = t["ce_fine"] + beta * (t["ce_coarse"] + 2.0 * t["attention_match"] + 0.5 * t["bag_align"])
    expected = expected + (1 - beta) * t["contrastive"]
    torch.testing.assert_close(t["loss"].detach(), expected)
    assert float(t["beta"]) == beta and float(t["temperature"]) == pytest.approx(0.1)
    torch.testing.assert_close(
        t["ce_coarse"], F.cross_entropy(net(x, mask).extra_logits["coarse"], torch.tensor([0, 0, 1, 1]))
    )
    t["loss"].backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_plateau_lowers_the_learning_rate():
    class Ctx:
        def train_batches(self, epoch, gen):
            torch.manual_seed(0)
            x = torch.randn(4, 6, 5)
            yield Batch(x, torch.ones(4, 6, dtype=torch.bool), torch.tensor([0, 1, 2, 0]), np.arange(4), [None] * 4)

    cfg = load_config(
        method="hmil", epochs=50, model_kwargs={**SMALL, "dropout": 0.0}, method_kwargs={"plateau_patience": 1}
    )
    method = create_method(cfg)
    method.restore({"fine": ["a", "b", "c"], "coarse": ["x", "y"], "parents": [0, 0, 1]})
    net = method.build(5, 3)
    opt = torch.optim.SGD(net.parameters(), lr=1e-12)  # the loss cannot improve: every epoch is "bad"
    lrs = []
    for _ in range(4):  # epoch 0 each time: a constant beta keeps the loss constant
        method.fit_epoch(net, opt, Ctx(), 0, torch.Generator())
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == lrs[1] == 1e-12 and lrs[2] == pytest.approx(1e-13)


def test_method_option_errors():
    with pytest.raises(WsimilError, match="classification only"):
        create_method(load_config(method="hmil", task="survival"))
    with pytest.raises(WsimilError, match="beta_schedule must be one of quadratic, linear"):
        create_method(load_config(method="hmil", method_kwargs={"beta_schedule": "cubic"}))
    with pytest.raises(WsimilError, match="has no option"):
        create_method(load_config(method="hmil", method_kwargs={"lambda": 1}))
    m = create_method(load_config(method="hmil", model="transmil"))
    m.restore({"fine": ["a", "b"], "coarse": ["x", "y"], "parents": [0, 1]})
    with pytest.raises(WsimilError, match="leave --model at abmil"):
        m.build(4, 2)
    with pytest.raises(WsimilError, match="no label hierarchy"):
        create_method(load_config(method="hmil")).build(4, 2)
    m = create_method(load_config(method="hmil", model_kwargs={"hidden_dims": [8]}))
    m.restore({"fine": ["a", "b"], "coarse": ["x", "y"], "parents": [0, 1]})
    with pytest.raises(WsimilError, match="bad model options for hmil"):
        m.build(4, 2)


# ------------------------------------------------------------------------------------------------ end to end
def test_run_training_on_hierarchical_digit_bags(tmp_path):
    from wsimil.data.synthetic import make_hierarchical_digit_bags, write_bags

    manifest = write_bags(make_hierarchical_digit_bags(32, seed=0), tmp_path / "cohort")
    cfg = load_config(
        method="hmil", epochs=2, folds=2, batch_size=8, bootstrap=0, min_epochs=1, patience=2, model_kwargs=SMALL
    )
    res = run_training(cfg, tmp_path / "cohort" / "features", manifest, tmp_path / "run")
    assert res["metrics_fine"] == res["metrics"] and res["metrics"]["auc"]["mean"] is not None
    assert {"auc", "accuracy"} <= set(res["metrics_coarse"]) and "instance_auc" not in res["metrics_coarse"]
    assert {"auc", "accuracy"} <= set(res["metrics_coarse_from_fine"])
    assert res["config"]["label_column"] == "fine_label" and res["config"]["classes"] == ["d3", "d4", "d8", "d9"]
    assert res["folds"][0]["metrics_coarse"]["accuracy"] is not None
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == res
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert {
        f"train_{k}" for k in ("ce_fine", "ce_coarse", "bag_align", "attention_match", "contrastive", "beta")
    } <= set(hist.columns)
    np.testing.assert_allclose(hist.query("fold == 0").train_beta, [1.0, 0.75])
    # the checkpoint carries the hierarchy, so load_model rebuilds the same two-level model
    model, ck = load_model(tmp_path / "run" / "checkpoints" / "repeat0_fold0.safetensors")
    assert ck["method_state"] == {"fine": ["d3", "d4", "d8", "d9"], "coarse": ["c38", "c49"], "parents": [0, 1, 0, 1]}
    assert isinstance(model, HMILNet) and model.n_coarse == 2
    pred = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert list(pred.columns[4:]) == ["prob_d3", "prob_d4", "prob_d8", "prob_d9"] and len(pred) == 32
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"] == "hmil" and saved["label_column"] == "fine_label"
