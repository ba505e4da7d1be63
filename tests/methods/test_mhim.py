"""MHIM-MIL (SPEC §2): masks, schedules, EMA, consistency loss, recycle network, backbone hooks and full runs."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from wsimil.checkpoint import load_checkpoint, save_checkpoint
from wsimil.cli import app
from wsimil.config import load_config
from wsimil.errors import WsimilError
from wsimil.evaluation.survival import nll_survival_loss
from wsimil.methods.base import Batch, create_method
from wsimil.methods.mhim import (
    RecycleNetwork,
    consistency_loss,
    cosine_schedule,
    ema_update_,
    rank_instances,
    ratio_count,
    select_masked,
)
from wsimil.methods.trainer import Trainer, run_training
from wsimil.models import create_model

SCORES = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8, 0.4, 0.6, 0.0])  # rank: 1 6 3 8 4 7 2 5 0 9
KW = {
    "abmil": {"hidden_dims": [16], "attn_dim": 8, "dropout": 0.0},
    "transmil": {"hidden_dims": [16], "heads": 2, "num_landmarks": 4, "dropout": 0.0},
    "dsmil": {"hidden_dims": [16], "q_dim": 8, "dropout": 0.0},
}
FAST = dict(epochs=2, folds=2, lr=1e-3, bootstrap=0, min_epochs=1, patience=2)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _idx(t):
    return sorted(t.tolist())


# ------------------------------------------------------------------------------------------------ masks
def test_counts_are_ceilings_without_float_error():
    assert ratio_count(0.3, 10) == 3 and ratio_count(0.01, 10) == 1 and ratio_count(0.2, 7) == 2
    assert ratio_count(1 - 0.8, 10) == 2 and ratio_count(0.8, 10) == 8 and ratio_count(2.0, 5) == 5
    assert ratio_count(0.0, 10) == 0


def test_high_low_random_masks_pick_exactly_the_right_instances():
    sel = select_masked(SCORES, high=0.2)
    assert _idx(sel.high) == [1, 6] and _idx(torch.nonzero(sel.masked)[:, 0]) == [1, 6]
    sel = select_masked(SCORES, low=0.3)
    assert _idx(sel.low) == [0, 5, 9] and sel.high.numel() == 0 and int(sel.masked.sum()) == 3
    expected_random = torch.randperm(10, generator=torch.Generator().manual_seed(5))[:2]
    sel = select_masked(SCORES, random=0.15, gen=torch.Generator().manual_seed(5))
    assert _idx(sel.random) == _idx(expected_random)
    # the union of all three, ⌈0.01·10⌉ = 1 high instance
    sel = select_masked(SCORES, high=0.01, low=0.2, random=0.3, gen=torch.Generator().manual_seed(1))
    union = {1, 0, 9} | set(sel.random.tolist())
    assert len(sel.random) == 3 and set(torch.nonzero(sel.masked)[:, 0].tolist()) == union


def test_randomised_high_mask_masks_half_of_the_top_two_beta():
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        sel = select_masked(SCORES, high=0.2, high_random_fraction=0.5, gen=gen)
        assert len(sel.high) == 2 and set(sel.high.tolist()) <= {1, 6, 3, 8}  # top ⌈0.4·10⌉ = 4, mask ⌈4/2⌉
        seen |= set(sel.high.tolist())
    assert seen == {1, 6, 3, 8}
    # more candidates than instances: every instance is a candidate and ⌈β_h n⌉ are masked
    sel = select_masked(SCORES, high=0.6, high_random_fraction=0.5, gen=gen)
    assert len(sel.high) == 6 and len(set(sel.high.tolist())) == 6


def test_head_voting_and_ties():
    # 3 heads, 5 instances, k = 2: votes 0:1, 1:3, 2:1, 3:1, 4:0; tie among 0/2/3 broken by mean score (3 highest)
    s = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.0], [0.0, 0.7, 0.9, 0.1, 0.0], [0.0, 0.6, 0.0, 0.95, 0.5]])
    assert rank_instances(s, 2, largest=True).tolist() == [1, 3]
    # bottom-2 per head: h0 {3,4}, h1 {0,4}, h2 {0,2}: votes 0:2, 4:2 → both
    assert _idx(rank_instances(s, 2, largest=False)) == [0, 4]
    assert rank_instances(torch.tensor([1.0, 2.0, 2.0, 0.0]), 1, largest=True).tolist() == [1]  # tie → lower index
    sel = select_masked(s, high=0.4)
    assert _idx(sel.high) == [1, 3]


def test_a_bag_is_never_masked_completely():
    s = torch.tensor([0.3, 0.9, 0.5])
    sel = select_masked(s, high=0.3, low=0.6)  # high {1}, low {0, 2}: everything
    assert sel.masked.tolist() == [True, True, False]  # the best instance outside the high mask stays
    sel = select_masked(s, high=1.0)
    assert sel.masked.tolist() == [False, True, True]  # all high: the lowest stays


def _method(model="abmil", method="mhim", epochs=4, task="classification", **opts):
    cfg = load_config(model=model, method=method, method_kwargs=opts, model_kwargs=KW[model], epochs=epochs, task=task)
    return create_method(cfg)


def _ctx(teacher, in_dim, n_train=8, seed=0):
    """The parts of a FoldContext that MHIM's setup reads, with a given baseline model."""
    return SimpleNamespace(
        device="cpu",
        seed=seed,
        train=np.arange(n_train),
        in_dim=in_dim,
        baseline=lambda **kw: (teacher, None),
    )


def test_high_ratio_decay_and_momentum_schedules():
    m = _method(high_ratio=0.04, high_decay=True, momentum=0.99, cosine_momentum=True)
    m.setup(m.build(6, 2), _ctx(create_model("abmil", 6, 2, **KW["abmil"]), 6, n_train=8))  # 4 epochs × 8 steps
    assert [m.high_ratio(s) for s in (0, 16, 32)] == pytest.approx([0.04, 0.02, 0.0])
    assert m.high_ratio(8) == pytest.approx(0.02 * (1 + math.cos(math.pi / 4)))
    assert [m.momentum(s) for s in (0, 16, 32)] == pytest.approx([0.99, 0.995, 1.0])
    flat = _method(high_ratio=0.04, momentum=0.99)
    assert flat.high_ratio(20) == 0.04 and flat.momentum(20) == 0.99
    assert cosine_schedule(1.0, 0.0, 0, 0) == 1.0


# ------------------------------------------------------------------------------------------------ losses and EMA
def test_consistency_loss_hand_computed():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.2, 0.0]])
    pt = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]  # softmax(t / 0.1)
    ls = [1 - math.log(math.e + 1), -math.log(math.e + 1)]  # log softmax(s)
    expected = -(pt[0] * ls[0] + pt[1] * ls[1])
    assert float(consistency_loss(s, t, 0.1)) == pytest.approx(expected)
    # two rows (DSMIL: one per class) are compared separately and averaged
    s2, t2 = torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.2, 0.0, 0.0, 0.0]])
    assert float(consistency_loss(s2, t2, 0.1, rows=2)) == pytest.approx((expected + math.log(2)) / 2)
    grad = torch.tensor([[1.0, 0.0]], requires_grad=True)
    consistency_loss(grad, t.requires_grad_()).backward()
    assert t.grad is None  # the teacher side is a target


def test_ema_arithmetic_on_a_tiny_module():
    t, s = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        t.weight.copy_(torch.tensor([[1.0, 2.0]]))
        t.bias.fill_(0.5)
        s.weight.copy_(torch.tensor([[3.0, -2.0]]))
        s.bias.fill_(1.5)
    ema_update_(t, s, 0.9)
    torch.testing.assert_close(t.weight, torch.tensor([[1.2, 1.6]]))
    torch.testing.assert_close(t.bias, torch.tensor([0.6]))
    torch.testing.assert_close(s.weight, torch.tensor([[3.0, -2.0]]))  # the source is untouched


def test_recycle_network_tokens_and_query_ema():
    torch.manual_seed(0)
    net = RecycleNetwork(8, tokens=5, heads=8, momentum=0.9).train()
    h, mask = torch.randn(2, 7, 8), torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    q0 = net.queries.clone()
    z = net(h, mask)
    assert z.shape == (2, 5, 8) and "queries" not in dict(net.named_parameters())
    z.sum().backward()
    torch.testing.assert_close(net.queries, q0)  # no gradient step can move the queries
    net.commit()
    torch.testing.assert_close(net.queries, 0.9 * q0 + 0.1 * z.detach().mean(0))
    net.eval()
    # padding does not leak: bag 1 alone (4 instances) gives its batch tokens
    torch.testing.assert_close(net(h[1:, :4], mask[1:, :4]), net(h, mask)[1:])


# ------------------------------------------------------------------------------------------------ backbone hooks
def test_abmil_class_aware_probability_by_hand_and_extra_tokens():
    torch.manual_seed(1)
    m = create_model("abmil", 6, 3, hidden_dims=[8], attn_dim=4).eval()
    x = torch.randn(1, 5, 6)
    out, s = m.score_instances(x, kind="class_aware")
    h = m.proj(x)[0]
    a = torch.softmax(m.attention(h).squeeze(-1), 0)
    expected = torch.softmax((a[:, None] * h) @ m.classifier.weight.T, -1).amax(-1)
    torch.testing.assert_close(s[0], expected)
    _, e = m.score_instances(x, kind="attention")
    torch.testing.assert_close(e, out.attention_logits)
    tok = torch.randn(1, 2, 8)
    torch.testing.assert_close(m.aggregate(h[None], None, tok).logits, m.aggregate(torch.cat([h[None], tok], 1)).logits)
    with pytest.raises(ValueError, match="unknown instance score kind"):
        m.score_instances(x, kind="nope")


def test_transmil_first_layer_scores_by_hand():
    torch.manual_seed(2)
    m = create_model("transmil", 6, 2, hidden_dims=[8], heads=2, num_landmarks=4).eval().double()
    x = torch.randn(1, 9, 6, dtype=torch.float64)  # 9 instances: a square, so no token is repeated
    out, att = m.score_instances(x, kind="attention")
    _, s = m.score_instances(x, kind="class_aware")
    seq = torch.cat([m.cls_token.double(), m.proj(x)], 1)
    lengths = torch.tensor([10])
    normed = m.layer1.norm(seq)
    _, cls = m.layer1.attn(normed, lengths, cls_attention=True)
    assert att.shape == (1, 2, 9)
    torch.testing.assert_close(att, cls[:, :, 1:])
    v = m.layer1.attn.to_qkv(normed).chunk(3, -1)[2].view(1, 10, 2, 4)[:, 1:]  # (1, 9, heads, d)
    feats = m.layer1.attn.to_out((cls[:, :, 1:].transpose(1, 2)[..., None] * v).flatten(2))
    expected = torch.softmax(feats @ m.classifier.weight.T, -1).amax(-1)
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(out.logits, m(x).logits)


@pytest.mark.parametrize("name", ["abmil", "transmil", "dsmil"])
@pytest.mark.parametrize("kind", ["attention", "class_aware"])
def test_scores_ignore_padding(name, kind):
    torch.manual_seed(3)
    m = create_model(name, 6, 2, **KW[name]).eval().double()
    xs = [torch.randn(n, 6, dtype=torch.float64) for n in (3, 11)]
    x = torch.zeros(2, 11, 6, dtype=torch.float64)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    for i, b in enumerate(xs):
        x[i, : len(b)], mask[i, : len(b)] = b, True
    x[~mask] = 1e3
    _, batch = m.score_instances(x, mask, kind)
    for i, b in enumerate(xs):
        _, alone = m.score_instances(b[None], None, kind)
        torch.testing.assert_close(batch[i][..., : len(b)], alone[0])
        assert torch.isneginf(batch[i][..., len(b) :]).all()
    if name == "dsmil":
        out, s = m.score_instances(xs[1][None], None, kind)
        torch.testing.assert_close(s, out.instance_logits.amax(-1))


# ------------------------------------------------------------------------------------------------ training steps
def _batch(x, mask, y=(0, 1)):
    return Batch(x, mask, torch.tensor(y), np.arange(len(x)), [None] * len(x))


def test_masked_instances_are_removed_from_a_padded_batch():
    m = _method(high_ratio=0.5, recycle_ratio=0.0, alpha=0.0)
    model = m.build(4, 2)
    m.setup(model, _ctx(create_model("abmil", 4, 2, **KW["abmil"]), 4))
    x = torch.zeros(2, 6, 4)
    x[0, :, 0] = torch.arange(6.0)
    x[1, :4, 0] = 10 + torch.arange(4.0)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.8, 0.2, 0.7], [0.3, 0.1, 0.4, 0.2, -math.inf, -math.inf]])
    t_out = m.teacher(x, mask)
    m.teacher.score_instances = lambda x_, m_, kind: (t_out, scores)
    seen = {}
    forward = model.forward

    def spy(xs, ms=None):
        seen["x"], seen["mask"] = xs, ms
        return forward(xs, ms)

    model.forward = spy
    terms = m.train_step(model, _batch(x, mask), 0)
    # bag 0: top ⌈3⌉ = {1, 3, 5} masked; bag 1: top ⌈2⌉ = {2, 0} masked; kept in their order, compacted
    assert seen["x"][:, :, 0].tolist() == [[0.0, 2.0, 4.0], [11.0, 13.0, 0.0]]
    assert seen["mask"].tolist() == [[True, True, True], [True, True, False]]
    assert float(terms["masked"]) == pytest.approx(0.5)


def test_recycled_instances_become_tokens():
    m = _method(high_ratio=0.1, recycle_ratio=0.5, recycle_tokens=3, alpha=0.0)
    model = m.build(4, 2)
    m.setup(model, _ctx(create_model("abmil", 4, 2, **KW["abmil"]), 4))
    x, mask = torch.randn(2, 10, 4), torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    seen = {}
    aggregate = model.aggregate

    def spy(h, ms=None, extra_tokens=None):
        seen.update(h=h, mask=ms, tokens=extra_tokens)
        return aggregate(h, ms, extra_tokens)

    model.aggregate = spy
    terms = m.train_step(model, _batch(x, mask), 0)
    # bag 0: 1 masked, 9 left, ⌈4.5⌉ = 5 recycled, 4 kept; bag 1: 1 masked, 5 left, 3 recycled, 2 kept
    assert seen["mask"].sum(1).tolist() == [4, 2] and seen["tokens"].shape == (2, 3, 16)
    assert float(terms["recycled"]) == pytest.approx((5 / 10 + 3 / 6) / 2)
    h_all = model.embed(x)  # dropout is off: kept tokens are projections of real instances
    for b in range(2):
        for row in seen["h"][b][seen["mask"][b]]:
            assert (h_all[b, mask[b]] - row).abs().sum(-1).min() < 1e-6


def test_teacher_gets_no_gradient_and_moves_only_by_ema():
    torch.manual_seed(4)
    m = _method(momentum=0.9, recycle_ratio=0.5, recycle_momentum=0.8, high_ratio=0.2)
    model = m.build(4, 2)
    base = create_model("abmil", 4, 2, **KW["abmil"])
    m.setup(model, _ctx(base, 4))
    assert m.teacher is not base and not any(p.requires_grad for p in m.teacher.parameters())
    params = m.parameters(model)
    ids = {id(p) for p in params}
    assert not ids & {id(p) for p in m.teacher.parameters()}
    assert {id(p) for p in m.recycle.parameters()} <= ids and {id(p) for p in model.parameters()} <= ids
    assert set(model.state_dict()) == set(create_model("abmil", 4, 2, **KW["abmil"]).state_dict())
    opt = torch.optim.SGD(params, lr=0.5)
    x, mask = torch.randn(2, 8, 4), torch.ones(2, 8, dtype=torch.bool)
    before = copy.deepcopy(m.teacher.state_dict())
    q0 = m.recycle.queries.clone()
    terms = m.train_step(model, _batch(x, mask), 0)
    opt.zero_grad()
    terms["loss"].backward()
    opt.step()
    assert all(p.grad is None for p in m.teacher.parameters())
    for k, v in m.teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])  # backward and the optimiser step leave the teacher alone
    student = copy.deepcopy(model.state_dict())
    pending = m.recycle._pending.clone()
    m.on_step_end(model)
    for k, v in m.teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * student[k])
    torch.testing.assert_close(m.recycle.queries, 0.8 * q0 + 0.2 * pending)
    assert float(terms["momentum"]) == 0.9 and m._step == 1


def test_loss_is_ce_plus_alpha_consistency_and_follows_the_task():
    torch.manual_seed(5)
    x, mask = torch.randn(2, 6, 4), torch.ones(2, 6, dtype=torch.bool)
    for name in ("abmil", "dsmil"):
        m = _method(name, high_ratio=0.0, recycle_ratio=0.0, alpha=0.3)
        model = m.build(4, 2)
        m.setup(model, _ctx(create_model(name, 4, 2, **KW[name]), 4))
        terms = m.train_step(model, _batch(x, mask), 0)
        out, t_out = model(x, mask), m.teacher(x, mask)
        y = torch.tensor([0, 1])
        if name == "dsmil":  # the backbone's own supervised mix: 0.5 bag stream + 0.5 max-instance stream
            aux = model.aux_losses(out, y, mask)
            ce = 0.5 * aux["bag_stream"] + 0.5 * aux["max_instance"]
            con = consistency_loss(out.bag_embedding, t_out.bag_embedding, 0.1, rows=2)
            assert {"bag_stream", "max_instance"} <= set(terms)
        else:
            ce = F.cross_entropy(out.logits, y)
            con = consistency_loss(out.bag_embedding, t_out.bag_embedding, 0.1)
        torch.testing.assert_close(terms["ce"], ce.detach())
        torch.testing.assert_close(terms["con"], con.detach())
        torch.testing.assert_close(terms["loss"], ce + 0.3 * con)
    m = _method("abmil", task="survival", high_ratio=0.0, recycle_ratio=0.0)
    model = m.build(4, 4)
    m.setup(model, _ctx(create_model("abmil", 4, 4, **KW["abmil"]), 4))
    batch = _batch(x, mask, y=(2, 0))
    batch.event = torch.tensor([1.0, 0.0])
    terms = m.train_step(model, batch, 0)
    torch.testing.assert_close(terms["ce"], nll_survival_loss(model(x, mask).logits, batch.y, batch.event).detach())


# ------------------------------------------------------------------------------------------------ options
def test_presets_options_and_errors(digit_cohort, tmp_path):
    v1 = _method("abmil", "mhim_v1")
    assert v1.opts["score"] == "attention" and v1.opts["random_ratio"] == 0.5 and v1.opts["recycle_ratio"] == 0
    assert v1.opts["high_random_fraction"] == 0.5 and v1.opts["high_decay"] and v1.opts["init_student_projection"]
    t1 = _method("transmil", "mhim_v1")
    assert t1.opts["low_ratio"] == 0.8 and t1.opts["high_ratio"] == 0.03 and t1.opts["cosine_momentum"]
    assert _method("transmil", "mhim_v1", low_ratio=0.1).opts["low_ratio"] == 0.1  # the user's value wins
    v2 = _method("abmil", "mhim_v2")
    assert v2.opts["score"] == "class_aware" and v2.opts["recycle_ratio"] == 0.8 and v2.opts["momentum"] == 0.9997
    assert load_config(method="mhim_v2").scheduler == "cosine"  # the official cosine LR, unless the user sets one
    assert load_config(method="mhim_v1", scheduler="none").scheduler == "none"
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("mhim_v1", "mhim_v2"):
        cfg = load_config(root / f"{name}.yaml")
        assert cfg.method == name and cfg.scheduler == "cosine" and cfg.lr == 2e-4 and cfg.model == "abmil"
    with pytest.raises(WsimilError, match="has no option.*bogus"):
        _method(bogus=1)
    with pytest.raises(WsimilError, match="score must be one of.*\n.*high_ratio must be a number in \\[0, 1\\]"):
        _method(high_ratio=1.5, score="entropy")
    feats, manifest = digit_cohort
    cfg = load_config(model="mean", method="mhim", model_kwargs={"hidden_dims": [8]}, **FAST)
    with pytest.raises(WsimilError, match="model 'mean' lacks embed, aggregate, score_instances"):
        run_training(cfg, feats, manifest, tmp_path / "mean")


# ------------------------------------------------------------------------------------------------ full runs
@pytest.mark.parametrize(
    "model,method,batch_size", [("abmil", "mhim_v1", 1), ("transmil", "mhim_v2", 4), ("dsmil", "mhim_v2", 2)]
)
def test_runs_through_the_trainer(digit_cohort, tmp_path, model, method, batch_size):
    feats, manifest = digit_cohort
    kw = {**KW[model], "dropout": 0.25}
    cfg = load_config(
        model=model,
        method=method,
        model_kwargs=kw,
        method_kwargs={"baseline_epochs": 1},
        batch_size=batch_size,
        **FAST,
    )
    res = run_training(cfg, feats, manifest, tmp_path / "run")
    assert res["metrics"]["auc"]["mean"] is not None
    assert len(list((tmp_path / "run" / "baseline" / "checkpoints").glob("*.safetensors"))) == 2
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    cols = {"train_loss", "train_ce", "train_con", "train_masked", "train_high_ratio", "train_momentum"}
    assert cols <= set(hist.columns) and len(hist) == 4
    assert ("train_recycled" in hist.columns) == (method == "mhim_v2")
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "repeat0_fold0.safetensors")
    assert set(ck["state_dict"]) == set(create_model(model, 64, 2, **kw).state_dict())  # the student only
    assert len(pd.read_csv(tmp_path / "run" / "predictions.csv")) == 60


def test_teacher_init_from_a_previous_run(digit_cohort, tmp_path):
    feats, manifest = digit_cohort
    fast = {**FAST, "epochs": 1}
    base_cfg = load_config(model="abmil", model_kwargs=KW["abmil"], **fast)
    run_training(base_cfg, feats, manifest, tmp_path / "base")
    res = CliRunner().invoke(
        app,
        [
            "train", "--features", str(feats), "--manifest", str(manifest), "--out", str(tmp_path / "mhim"),
            "--model", "abmil", "--method", "mhim_v1", "--folds", "2", "--epochs", "1",
            "--model-opt", "hidden_dims=[16]", "--model-opt", "attn_dim=8", "--model-opt", "dropout=0.0",
            "--teacher-init", str(tmp_path / "base"),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mhim" / "results.json").is_file() and not (tmp_path / "mhim" / "baseline").exists()

    # the fold's teacher is the baseline checkpoint; v1 copies its projection into the student
    cfg = load_config(
        model="abmil",
        method="mhim_v1",
        model_kwargs=KW["abmil"],
        method_kwargs={"teacher_init": str(tmp_path / "base")},
        **fast,
    )
    from wsimil.data.manifest import load_cohort, read_manifest
    from wsimil.data.splits import kfold_splits
    from wsimil.features.store import FeatureStore

    man = read_manifest(manifest)
    cohort = load_cohort(man, FeatureStore(feats))
    trainer = Trainer(cfg, cohort, tmp_path / "x", "cpu", man)
    split = kfold_splits(man, 2, 1, cfg.val_fraction, cfg.seed)[1]
    ctx = trainer._context(split, None)
    method = trainer.new_method()
    student = method.build(64, 2)
    method.setup(student, ctx)
    ck = load_checkpoint(tmp_path / "base" / "checkpoints" / "repeat0_fold1.safetensors")
    for k, v in method.teacher.state_dict().items():
        torch.testing.assert_close(v, ck["state_dict"][k])
    torch.testing.assert_close(student.proj[0].weight, ck["state_dict"]["proj.0.weight"])

    bad = tmp_path / "bad" / "checkpoints"
    bad.mkdir(parents=True)
    wrong = {**ck, "model": "dsmil", "classes": ["a", "b"]}
    wrong["standardizer"] = {k: v + 1 for k, v in ck["standardizer"].items()}
    save_checkpoint(bad / "repeat0_fold1.safetensors", wrong)
    method.opts["teacher_init"] = str(tmp_path / "bad")
    with pytest.raises(WsimilError) as e:
        method.setup(student, ctx)
    msg = str(e.value)
    assert "model: teacher has 'dsmil', this run 'abmil'" in msg and "classes" in msg
    assert "different training fold" in msg
    method.opts["teacher_init"] = str(tmp_path / "base" / "nothing")
    with pytest.raises(WsimilError, match="is not a folder"):
        method.setup(student, ctx)
    method.opts["teacher_init"] = str(tmp_path / "mhim" / "checkpoints")
    with pytest.raises(WsimilError, match="no checkpoint for repeat 0 fold 1"):
        method.setup(student, ctx)


def test_survival_run(digit_cohort, tmp_path):
    feats, manifest = digit_cohort
    man = pd.read_csv(manifest)
    rng = np.random.default_rng(0)
    man["time"] = np.where(man["label"] == 1, rng.uniform(1, 3, len(man)), rng.uniform(4, 8, len(man)))
    man["event"] = (rng.random(len(man)) < 0.8).astype(int)
    man.drop(columns=["label"]).to_csv(tmp_path / "surv.csv", index=False)
    cfg = load_config(
        task="survival",
        model="abmil",
        method="mhim_v2",
        model_kwargs=KW["abmil"],
        method_kwargs={"baseline_epochs": 1},
        **FAST,
    )
    res = run_training(cfg, feats, tmp_path / "surv.csv", tmp_path / "run")
    assert res["metrics"]["c_index"]["mean"] is not None
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert hist["train_ce"].notna().all() and hist["train_con"].notna().all()
