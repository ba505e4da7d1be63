import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from wsimil.config import load_config
from wsimil.data.batching import pad_batch
from wsimil.errors import WsimilError
from wsimil.methods.base import Batch, create_method
from wsimil.methods.trainer import run_training
from wsimil.methods.weno import hard_positive_keep, pseudo_labels, student_loss
from wsimil.models.weno import WENONet
from wsimil.run import load_model

SMALL = {"embed_dim": 16, "teacher_dims": [24], "attn_dim": 8, "student_dims": [32, 32]}


def test_pseudo_labels_min_max_normalised_clamped_and_zero_in_negative_bags():
    scores = torch.tensor([-1.0, 0.0, 1.0, 3.0, 5.0, -2.0])
    positive = torch.tensor([True, True, False, True, True, True])
    y = pseudo_labels(scores, positive, lo=-1.0, hi=3.0)
    # (s + 1) / 4 = [0, .25, .5, 1, 1.5, -.25] -> clamp to [1e-5, 1 - 1e-5]; the third is in a negative bag
    torch.testing.assert_close(y, torch.tensor([1e-5, 0.25, 0.0, 1 - 1e-5, 1 - 1e-5, 1e-5]))
    assert pseudo_labels(torch.tensor([2.0]), torch.tensor([True]), lo=2.0, hi=2.0).item() == pytest.approx(1e-5)


def test_student_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])  # p1 = 0.75, then p1 = 0.2
    y = torch.tensor([0.5, 0.0])
    w = 0.1
    row0 = w * 0.5 * math.log(0.25) + (1 - w) * 0.5 * math.log(0.75)
    row1 = w * 1.0 * math.log(0.8)
    assert student_loss(logits, y, w).item() == pytest.approx(-(row0 + row1) / 2, rel=1e-6)


def test_threshold_mining_drops_confident_instances_of_positive_bags_only():
    p = torch.tensor(
        [
            [0.9, 0.2, 0.6, 0.4, 0.0],  # positive, last is padding
            [0.9, 0.2, 0.6, 0.4, 0.7],  # negative: keeps everything
            [0.7, 0.95, 0.8, 0.1, 0.99],  # positive, padding scored 0.1 must not count
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    positive = torch.tensor([True, False, True])
    keep = hard_positive_keep(p, mask, positive, "threshold", 0.5)
    expected = torch.tensor([[0, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    # bag 3: every real instance is above 0.5, so only the most positive real one (0.95) stays
    assert torch.equal(keep, expected)
    assert torch.equal(hard_positive_keep(p, mask, positive, "none"), mask)


def test_lowest_k_mining_keeps_the_k_lowest_real_instances():
    p = torch.tensor([[0.9, 0.2, 0.6, 0.4, 0.0], [0.3, 0.1, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    keep = hard_positive_keep(p, mask, torch.tensor([True, True]), "lowest", keep_k=3)
    expected = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)  # a 2-instance bag keeps both
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("teacher", ["abmil", "dsmil"])
def test_forward_contract_and_padding_invariance(teacher):
    torch.manual_seed(0)
    net = WENONet(12, 2, teacher=teacher, **SMALL, init_std=None).eval()
    a, b = torch.randn(5, 12), torch.randn(9, 12)
    x, mask = pad_batch([a, b])
    out = net(x, mask)
    assert out.logits.shape == (2, 2) and out.instance_logits.shape == (2, 9, 2)
    assert out.attention_logits.shape == (2, 9) and torch.isinf(out.attention_logits[0, 5:]).all()
    assert set(out.extra_logits) == {"teacher"} and out.extra_logits["teacher"].shape == (2, 2)
    assert net.instance_score == "instance"
    # bag probability = the largest student positive probability among real instances
    p_inst = out.instance_logits.softmax(-1)[..., 1].masked_fill(~mask, 0)
    torch.testing.assert_close(out.logits.softmax(-1)[:, 1], p_inst.amax(1))
    alone = net(a.unsqueeze(0))
    torch.testing.assert_close(alone.logits[0], out.logits[0])
    torch.testing.assert_close(alone.extra_logits["teacher"][0], out.extra_logits["teacher"][0])
    torch.testing.assert_close(alone.attention_logits[0], out.attention_logits[0, :5])
    torch.testing.assert_close(alone.bag_embedding[0], out.bag_embedding[0])
    # training mode: BatchNorm statistics come from real instances only, so padding still changes nothing
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    h_pad = net.encoder(x[1:], mask[1:])
    h = net.encoder(b.unsqueeze(0), torch.ones(1, 9, dtype=torch.bool))
    torch.testing.assert_close(h_pad, h)
    short = torch.zeros_like(mask[1:])
    short[0, :6] = True
    t_pad = net.teacher(h, short)
    t = net.teacher(h[:, :6], short[:, :6])
    torch.testing.assert_close(t_pad.logits, t.logits)
    torch.testing.assert_close(t_pad.scores[:, :6], t.scores)
    # the per-instance score used for pseudo-labels equals the score inside the bag forward
    torch.testing.assert_close(net.teacher.instance_scores(h[0, :6]), t.scores[0])


class _Fold:
    """The two things WENO's phases read from a fold context: bag mini-batches and single bags."""

    def __init__(self, bags, labels):
        self.bags, self.labels, self.train = bags, np.asarray(labels), np.arange(len(bags))

    def make_batch(self, idx, gen=None):
        x, mask = pad_batch([self.bags[i] for i in idx])
        return Batch(x, mask, torch.as_tensor(self.labels[idx]), np.asarray(idx), [None] * len(idx))

    def train_batches(self, epoch, gen):
        for start in range(0, len(self.bags), 2):
            yield self.make_batch(np.arange(start, min(start + 2, len(self.bags))))


def _method_and_fold(teacher="abmil", **opts):
    torch.manual_seed(0)
    cfg = load_config(method="weno", model=teacher, model_kwargs=SMALL, method_kwargs=opts, lr=0.1)
    method = create_method(cfg)
    model = method.build(6, 2)
    gen = torch.Generator().manual_seed(0)
    bags = [torch.randn(int(n), 6, generator=gen) for n in (4, 7, 3, 6, 5, 8)]
    return method, model, _Fold(bags, [1, 0, 1, 0, 1, 0]), gen


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(module, before):
    return any(not torch.equal(p, before[k]) for k, p in module.named_parameters())


@pytest.mark.parametrize("teacher", ["abmil", "dsmil"])
def test_both_phases_update_the_shared_encoder(teacher):
    method, model, fold, gen = _method_and_fold(teacher)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    enc, tea, stu = _snapshot(model.encoder), _snapshot(model.teacher), _snapshot(model.student)
    loss, mined, lo, hi = method._teacher_phase(model, opt, fold, 0, gen)
    assert _changed(model.encoder, enc) and _changed(model.teacher, tea) and not _changed(model.student, stu)
    assert mined == 0.0 and lo < hi and loss > 0
    enc, tea, stu = _snapshot(model.encoder), _snapshot(model.teacher), _snapshot(model.student)
    method._student_phase(model, opt, fold, gen, lo, hi)
    assert _changed(model.encoder, enc) and _changed(model.student, stu) and not _changed(model.teacher, tea)


def test_after_warmup_the_teacher_sees_only_mined_instances():
    method, model, fold, gen = _method_and_fold(warmup=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.no_grad():
        model.student[-1].bias.copy_(torch.tensor([-20.0, 20.0]))  # the student calls every instance positive
    model.train()
    assert method._teacher_phase(model, opt, fold, 0, gen)[1] == 0.0  # still warming up
    # each positive bag (4, 3 and 5 instances) keeps only its single most positive instance
    assert method._teacher_phase(model, opt, fold, 1, gen)[1] == pytest.approx((3 + 2 + 4) / 12)


def test_options_and_binary_only():
    with pytest.raises(WsimilError, match="mining must be one of"):
        create_method(load_config(method="weno", method_kwargs={"mining": "random"}))
    with pytest.raises(WsimilError, match="needs keep_k"):
        create_method(load_config(method="weno", method_kwargs={"mining": "lowest"}))
    with pytest.raises(WsimilError, match="binary"):
        create_method(load_config(method="weno")).build(8, 3)
    with pytest.raises(WsimilError, match="--model abmil or dsmil"):
        create_method(load_config(method="weno", model="transmil")).build(8, 2)
    with pytest.raises(WsimilError, match="bad model options for weno"):
        create_method(load_config(method="weno", model_kwargs={"hidden_dims": [8]})).build(8, 2)
    cfg = load_config(method="weno")
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.monitor) == ("sgd", 1e-3, 0.0, 0.0, "val_auc")
    assert load_config(method="weno", optimizer="adam", lr=0.01).optimizer == "adam"
    assert load_config().optimizer == "adam"


@pytest.mark.parametrize("teacher", ["abmil", "dsmil"])
def test_weno_run_reports_student_instance_auc_and_teacher_metrics(digit_cohort, tmp_path, teacher):
    feats, manifest = digit_cohort
    cfg = load_config(
        method="weno",
        model=teacher,
        model_kwargs=SMALL,
        method_kwargs={"warmup": 1, "instance_batch": 64},
        epochs=3,
        folds=2,
        bootstrap=20,
        min_epochs=1,
        lr=0.01,
    )
    res = run_training(cfg, feats, manifest, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == res
    assert res["metrics"]["instance_auc"]["mean"] is not None
    assert {"auc", "accuracy"} <= set(res["metrics_teacher"]) and "metrics_teacher" in res["folds"][0]
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert {"train_teacher", "train_student", "train_mined", "train_attention_min", "train_attention_max"} <= set(
        hist.columns
    )
    assert (hist.query("epoch == 0").train_mined == 0).all()
    model, ck = load_model(tmp_path / "run" / "checkpoints" / "repeat0_fold0.safetensors")
    assert isinstance(model, WENONet) and ck["method"] == "weno"
    assert res["config"]["optimizer"] == "sgd"


def test_student_phase_sees_every_instance_once_in_bounded_pools():
    method, model, fold, gen = _method_and_fold(pool_instances=8, instance_batch=4)
    sizes = []
    model.student.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    model.train()
    method._student_phase(model, torch.optim.SGD(model.parameters(), lr=0.1), fold, gen, -1.0, 1.0)
    assert sum(sizes) == 33 and min(sizes) >= 2 and max(sizes) <= 5  # 4+7+3+6+5+8 instances; no 1-instance batch
