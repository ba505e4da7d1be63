"""Per-patch maps and ensemble scores of ``wsimil.predict.score.score_bag`` against hand computations."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wsimil.models import create_model
from wsimil.predict.score import read_scores, score_bag, write_scores


def _bundle(classes, head_classes=None, task="classification"):
    return SimpleNamespace(classes=classes, head_classes=head_classes or {}, task=task)


def _models(name, d, c, n=2, **kw):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append((create_model(name, d, c, **kw).eval(), None))
    return out


def test_attention_map_is_member_mean_of_softmax_weights():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    members = _models("abmil", 5, 2)
    s = score_bag(members, x.numpy(), _bundle(["neg", "pos"]))
    assert list(s.maps) == ["attention", "evidence:pos"] and s.kind == "attention"
    outs = [m(x[None]) for m, _ in members]
    want = torch.stack([torch.softmax(o.attention_logits[0], -1) for o in outs]).mean(0)
    np.testing.assert_allclose(s.maps["attention"], want.detach().numpy(), rtol=1e-5)
    assert abs(s.maps["attention"].sum() - 1) < 1e-5
    probs = torch.stack([torch.softmax(o.logits[0], -1) for o in outs])
    np.testing.assert_allclose(s.member_probs, probs.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(s.probs, probs.mean(0).detach().numpy(), rtol=1e-5)


def test_standardiser_is_applied_before_the_model():
    from wsimil.data.batching import Standardizer

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    (model, _), = _models("abmil", 4, 2, n=1)  # fmt: skip
    std = Standardizer(torch.full((4,), 2.0), torch.full((4,), 3.0))
    s = score_bag([(model, std)], x.numpy(), _bundle(["a", "b"]))
    want = torch.softmax(model(((x - 2) / 3)[None]).logits[0], -1).detach().numpy()
    np.testing.assert_allclose(s.probs, want, rtol=1e-5)


def test_one_attention_map_per_class_for_multi_branch_models():
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(2))
    s = score_bag(_models("clam_mb", 6, 3, n=1), x.numpy(), _bundle(["a", "b", "c"]))
    att = [k for k in s.maps if k.startswith("attention")]
    assert att == ["attention:a", "attention:b", "attention:c"]
    for k in att:
        assert abs(s.maps[k].sum() - 1) < 1e-5
    assert [k for k in s.maps if k.startswith("instance")] == ["instance:a", "instance:b", "instance:c"]


def test_heads_that_are_not_classes_are_averaged():
    """TransMIL's 8 CLS-attention heads are not one per class: one map, the mean over heads."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    members = _models("transmil", 8, 2, n=1)
    s = score_bag(members, x.numpy(), _bundle(["a", "b"]))
    out = members[0][0](x[None])
    assert out.attention_logits.shape[1] == 8 and list(s.maps) == ["attention"]
    want = torch.softmax(out.attention_logits[0], -1).mean(0).detach().numpy()
    np.testing.assert_allclose(s.maps["attention"], want, rtol=1e-5)


def test_instance_models_map_the_positive_class_probability():
    """Max pooling has only instance logits: the map is P(positive) of each instance, ``sigmoid(s_i)`` here since the
    binary instance logits are ``[0, s_i]``."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    members = _models("max", 3, 2, n=1)
    s = score_bag(members, x.numpy(), _bundle(["neg", "tumour"]))
    assert list(s.maps) == ["instance:tumour"] and s.kind == "instance"
    z = members[0][0](x[None]).instance_logits[0]
    np.testing.assert_allclose(s.maps["instance:tumour"], torch.sigmoid(z[:, 1]).detach().numpy(), rtol=1e-5)


def test_hierarchical_models_give_both_levels():
    from wsimil.models.hmil import HMILNet

    torch.manual_seed(0)
    model = HMILNet(6, 4, parents=[0, 0, 1, 1]).eval()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(5))
    coarse = ["benign", "malignant"]
    b = _bundle(["n", "h", "lo", "hi"], {"coarse": coarse, "coarse_from_fine": coarse})
    s = score_bag([(model, None)], x.numpy(), b)
    assert list(s.maps) == [f"fine:{c}" for c in b.classes] + ["coarse:benign", "coarse:malignant"]
    maps = model.attention_maps(x[None])
    np.testing.assert_allclose(s.maps["coarse:malignant"], torch.softmax(maps["coarse"][0, 1], -1).detach(), rtol=1e-5)
    assert set(s.extra_probs) == {"coarse", "coarse_from_fine"}
    # marginalising the fine prediction onto the hierarchy sums the children's probabilities
    np.testing.assert_allclose(s.extra_probs["coarse_from_fine"], [s.probs[:2].sum(), s.probs[2:].sum()], rtol=1e-5)


def test_scores_file_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    s = score_bag(_models("abmil", 4, 2, n=1), x, _bundle(["a", "b"]))
    coords = np.array([[0, 0], [256, 0], [0, 256]])
    write_scores(tmp_path / "s.h5", "s", coords, s, {"patch_size_level0": 256.0, "slide_path": None})
    r = read_scores(tmp_path / "s.h5")
    assert r["coords"].tolist() == coords.tolist() and r["kind"] == "attention"
    np.testing.assert_array_equal(r["maps"]["attention"], s.maps["attention"])
    assert r["attrs"]["patch_size_level0"] == 256.0 and "slide_path" not in r["attrs"]


@pytest.mark.parametrize("name", ["abmil", "dsmil"])
def test_maps_cover_every_patch(name):
    x = np.random.default_rng(1).normal(size=(11, 5)).astype(np.float32)
    s = score_bag(_models(name, 5, 2, n=2), x, _bundle(["a", "b"]))
    assert all(v.shape == (11,) and np.isfinite(v).all() for v in s.maps.values())


def test_abmil_patch_evidence_decomposes_the_bag_logit():
    """ABMIL's bag logit is the attention-weighted mean of its patch logits W h_i + b, and the evidence map is the
    members' mean of softmax(W h_i + b) for the positive class (one map per class for multi-class models)."""
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    members = _models("abmil", 5, 2)
    for m, _ in members:
        out = m(x[None])
        a = torch.softmax(out.attention_logits[0], -1)
        torch.testing.assert_close((a[:, None] * m.patch_logits(x[None])[0]).sum(0), out.logits[0])
    s = score_bag(members, x.numpy(), _bundle(["neg", "pos"]))
    want = torch.stack([torch.softmax(m.patch_logits(x[None])[0], -1)[:, 1] for m, _ in members]).mean(0)
    np.testing.assert_allclose(s.maps["evidence:pos"], want.detach().numpy(), rtol=1e-5)
    s3 = score_bag(_models("abmil", 5, 3), x.numpy(), _bundle(["a", "b", "c"]))
    assert [k for k in s3.maps if k.startswith("evidence")] == ["evidence:a", "evidence:b", "evidence:c"]
    np.testing.assert_allclose(sum(s3.maps[f"evidence:{c}"] for c in "abc"), 1, rtol=1e-5)
