"""LRMIL losses against values computed by hand on tiny tensors (SPEC §1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsimil.lrmil.losses import attention_feature_loss, attention_weights, layer_distill_loss, pool_children
from wsimil.methods.lrmil_losses import (
    attention_kd_loss,
    bag_kd_loss,
    children_attention,
    instance_count,
    instance_loss,
    instance_targets,
    topk_instance_loss,
)


def kl(q: list[float], p: list[float]) -> float:
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))


@pytest.mark.parametrize(("size", "factor"), [(8, 4), (16, 4), (4, 2)])
def test_pool_children_gives_each_child_its_own_block(size, factor):
    # channel 0 holds, at every grid cell, the index b*f + a of the child block the cell lies in
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    block = size // factor
    owner = (yy // block) * factor + xx // block
    grid = torch.stack([owner.float(), torch.full_like(owner, 5).float()])[None]  # (1, 2, G, G)
    pooled = pool_children(grid, factor)
    assert pooled.shape == (1, factor * factor, 2)
    assert torch.equal(pooled[0, :, 0], torch.arange(factor * factor).float())
    assert torch.equal(pooled[0, :, 1], torch.full((factor * factor,), 5.0))


def test_layer_distill_loss_by_hand():
    s1 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [7.0, 7.0, 7.0, 7.0]])[..., None]  # (B=2, f²=4, C=1)
    t1 = torch.zeros(2, 4, 1)
    s2, t2 = torch.ones(2, 4, 3), torch.zeros(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    # patch 0: layer 1 = (1² + 2²)/2 = 2.5 (children 2, 3 absent), layer 2 = 1; patch 1 has no child: left out
    assert layer_distill_loss([s1], [t1], mask).item() == pytest.approx(2.5)
    assert layer_distill_loss([s1, s2], [t1, t2], mask).item() == pytest.approx((2.5 + 1.0) / 2)
    assert layer_distill_loss([s1], [t1], torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0


def test_attention_feature_loss_by_hand():
    s = torch.tensor([[1.0, 1.0]])
    t = torch.tensor([[[0.0, 0.0], [3.0, 3.0], [1.0, 1.0], [9.0, 9.0]]])  # per-child MSE: 1, 4, 0, (64)
    mask = torch.tensor([[True, True, True, False]])
    alpha = torch.tensor([[0.1, 0.3, 0.0, 0.6]])  # child 3 is no tissue patch: its attention is ignored
    assert torch.allclose(attention_weights(alpha, mask), torch.tensor([[0.25, 0.75, 0.0, 0.0]]))
    assert attention_feature_loss(s, t, alpha, mask).item() == pytest.approx(0.25 * 1 + 0.75 * 4)
    # all children at zero attention: uniform weights over the real children
    zero = torch.zeros(1, 4)
    assert attention_feature_loss(s, t, zero, mask).item() == pytest.approx((1 + 4 + 0) / 3)


def test_children_attention_mean_max_and_childless():
    e = np.array([1.0, 2.0, 3.0, 10.0])
    links = np.array([[0, 1, -1, -1], [-1, -1, -1, 3], [-1, -1, -1, -1]])
    assert np.allclose(children_attention(e, links, "mean"), [1.5, 10.0, 0.0])
    assert np.allclose(children_attention(e, links, "max"), [2.0, 10.0, 0.0])
    with pytest.raises(ValueError, match="mean.*max"):
        children_attention(e, links, "sum")


def test_bag_kd_loss_by_hand_with_temperature():
    ys, yt = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    assert bag_kd_loss(ys, yt, 1.0).item() == pytest.approx(kl([0.75, 0.25], [0.5, 0.5]), rel=1e-5)
    r3 = math.sqrt(3.0)  # softmax([ln 3 / 2, 0]) = [√3, 1] / (√3 + 1)
    expected = 4 * kl([r3 / (r3 + 1), 1 / (r3 + 1)], [0.5, 0.5])
    assert bag_kd_loss(ys, yt, 2.0).item() == pytest.approx(expected, rel=1e-5)
    assert bag_kd_loss(yt, yt, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_kd_loss_ignores_padding_and_unused_bags():
    e_s = torch.tensor([[0.0, 0.0, float("-inf")], [3.0, 1.0, 2.0]])  # bag 0 has 2 real instances
    g = torch.tensor([[math.log(3.0), 0.0, 50.0], [0.0, 1.0, 2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    use = torch.tensor([True, False])
    expected = kl([0.75, 0.25], [0.5, 0.5])
    assert attention_kd_loss(e_s, g, mask, 1.0, use).item() == pytest.approx(expected, rel=1e-5)
    alone = attention_kd_loss(e_s[:1, :2], g[:1, :2], mask[:1, :2])
    assert alone.item() == pytest.approx(expected, rel=1e-5)
    assert attention_kd_loss(e_s, g, mask, 1.0, torch.tensor([False, False])).item() == 0.0


def test_topk_instance_loss_by_hand():
    # 5 real instances -> k = min(4, 5 // 2) = 2: top by g = {0, 2} (target 1), bottom = {1, 3} (target 0)
    g = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 99.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5 + [False], [True] + [False] * 5])  # bag 1: one instance, k = 0, skipped
    z = torch.zeros(2, 6, 2)
    z[0, 0] = torch.tensor([0.0, math.log(3.0)])  # p(1) = 0.75
    z[0, 1] = torch.tensor([math.log(3.0), 0.0])  # p(0) = 0.75
    z[0, 5] = torch.tensor([100.0, -100.0])  # padding: must not be picked although its g is the largest
    expected = (2 * -math.log(0.75) + 2 * math.log(2.0)) / 4  # instances 2 and 3 have logits (0, 0)
    assert topk_instance_loss(z, g, mask, 4).item() == pytest.approx(expected, rel=1e-5)
    # k = 1: top {0}, bottom {1}
    assert topk_instance_loss(z, g, mask, 1).item() == pytest.approx(-math.log(0.75), rel=1e-5)
    assert topk_instance_loss(z, g, mask, 4, torch.tensor([False, True])).item() == 0.0
    # ties (e.g. patches without HR children all get g = 0): no instance may be both a positive and a negative
    gt = torch.zeros(1, 2)  # two tied instances, k = 1: one is top, the other bottom
    zt = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p(1) = 0.75 and 0.5
    # stable ranking: instance 0 is the positive, instance 1 the negative (not instance 0 twice: -log .75 - log .25)
    want = (-math.log(0.75) - math.log(0.5)) / 2
    assert topk_instance_loss(zt, gt, torch.ones(1, 2, dtype=torch.bool), 4).item() == pytest.approx(want, rel=1e-5)


def _ids(t: torch.Tensor) -> list[int]:
    return t.tolist()


def test_instance_targets_fit_a_5_patch_bag():
    # softmax(g) = [.563, .207, .126, .028, .076] (by hand: e^2, 1, e, e^-1, e^0.5 over their sum 13.12): the top
    # instance alone holds half the mass -> k = 1 (cap max(1, floor(0.1*5)) = 1); ranking 0, 2, 4, 1, 3
    g = torch.tensor([2.0, 0.0, 1.0, -1.0, 0.5])
    assert instance_count(g) == 1
    pos, neg = instance_targets(g, positive=True)
    assert _ids(pos) == [0] and _ids(neg) == [3]
    pos, neg = instance_targets(g, positive=False)  # a negative bag: no tumour; its hard negative is labelled 0
    assert _ids(pos) == [] and _ids(neg) == [0]
    pos, neg = instance_targets(g, positive=False, mode="fixed", positive_only=False, k=4)  # the paper: k = 2
    assert _ids(pos) == [0, 2] and _ids(neg) == [1, 3]


def test_instance_targets_fit_a_50_patch_bag():
    # three tumour-like patches (g = 5) among 47 (g = 0): each holds e^5 / (3 e^5 + 47) = 0.3015 of the mass, so
    # two reach half of it -> k = 2 (cap floor(0.1*50) = 5); the bottom of the stable ranking is 48, 49
    g = torch.zeros(50)
    g[[10, 20, 30]] = 5.0
    assert instance_count(g) == 2
    pos, neg = instance_targets(g, positive=True)
    assert _ids(pos) == [10, 20] and _ids(neg) == [48, 49]
    pos, neg = instance_targets(g, positive=False)
    assert _ids(pos) == [] and _ids(neg) == [10, 20]
    # the paper's k = 4 would call 4 patches tumour where the teacher points at 3
    assert len(instance_targets(g, True, "fixed", False, k=4)[0]) == 4


def test_instance_targets_fit_a_500_patch_bag():
    # a macro-metastasis: 100 patches at g = 3, 400 at 0; each tumour patch holds e^3 / (100 e^3 + 400) = 0.00834,
    # so 60 reach half the mass, capped at floor(0.1*500) = 50; bottom 50 of the ranking = 450..499
    g = torch.zeros(500)
    g[:100] = 3.0
    assert instance_count(g) == 50 and instance_count(g, max_frac=0.2) == 60
    pos, neg = instance_targets(g, positive=True)
    assert _ids(pos) == list(range(50)) and _ids(neg) == list(range(450, 500))
    pos, neg = instance_targets(g, positive=False)
    assert _ids(pos) == [] and _ids(neg) == list(range(50))
    assert instance_count(g, mode="fraction") == 10  # round(0.02*500)
    assert instance_count(torch.zeros(1)) == 0 and instance_count(torch.zeros(2), mode="fraction") == 1
    with pytest.raises(ValueError, match="mode"):
        instance_count(g, mode="nope")


def test_instance_loss_by_hand():
    # bag 0 positive (5 instances, k = 1: instance 0 -> 1, instance 3 -> 0), bag 1 negative (4 real instances,
    # k = 1: its top instance 1 -> 0), bag 2 without guidance (use = False)
    g = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5], [0.0, 3.0, 1.0, 0.0, 9.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    mask = torch.tensor([[True] * 5, [True] * 4 + [False], [True] * 5])
    z = torch.zeros(3, 5, 2)
    z[0, 0] = torch.tensor([0.0, math.log(3.0)])  # p(1) = 0.75
    z[0, 3] = torch.tensor([math.log(3.0), 0.0])  # p(0) = 0.75
    z[1, 1] = torch.tensor([0.0, math.log(3.0)])  # p(0) = 0.25: a confident false positive in a negative bag
    z[1, 4] = torch.tensor([-100.0, 100.0])  # padding with the largest g: never picked
    use = torch.tensor([True, True, False])
    positive = torch.tensor([True, False, True])
    want = (-math.log(0.75) + -math.log(0.25)) / 2  # bag 0: mean of two CEs of .75 each; bag 1: -log .25
    assert instance_loss(z, g, mask, positive, use).item() == pytest.approx(want, rel=1e-5)
    assert instance_loss(z, g, mask, positive, torch.zeros(3, dtype=torch.bool)).item() == 0.0
