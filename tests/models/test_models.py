import pytest
import torch

from wsimil.errors import WsimilError
from wsimil.models import MILOutput, create_model, list_models
from wsimil.models.clam import clam_instance_loss
from wsimil.models.nystrom import iterative_pinv

ALL = list_models()


def test_registry_lists_the_zoo():
    assert set(ALL) >= {"mean", "max", "abmil", "gated_abmil", "clam_sb", "clam_mb", "dsmil", "transmil"}


def test_unknown_model_is_a_clear_error():
    with pytest.raises(WsimilError, match="unknown model 'nope'.*abmil"):
        create_model("nope", 8, 2)
    with pytest.raises(WsimilError, match="bad options for model 'abmil'"):
        create_model("abmil", 8, 2, not_an_option=3)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n_classes", [2, 3])
def test_output_contract(name, n_classes):
    torch.manual_seed(0)
    m = create_model(name, 16, n_classes).eval()
    out = m(torch.randn(2, 7, 16))
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (2, n_classes)
    assert out.bag_embedding.shape[0] == 2 and out.bag_embedding.dim() == 2
    if out.attention_logits is not None:
        assert out.attention_logits.shape[0] == 2 and out.attention_logits.shape[-1] == 7
    if out.instance_logits is not None:
        assert out.instance_logits.shape == (2, 7, n_classes)
    assert torch.isfinite(out.logits).all()


def _padded(xs):
    n = max(x.shape[0] for x in xs) + 5
    xb = torch.zeros(len(xs), n, xs[0].shape[1], dtype=xs[0].dtype)
    mask = torch.zeros(len(xs), n, dtype=torch.bool)
    for i, x in enumerate(xs):
        xb[i, : len(x)] = x
        mask[i, : len(x)] = True
    xb[~mask] = 1e3  # padding content must not leak into results
    return xb, mask


@pytest.mark.parametrize("name", ALL)
def test_padding_does_not_change_outputs(name):
    torch.manual_seed(1)
    # 32 landmarks: the bags below fall on both sides of the landmark count (segments of 1 and of 3 tokens)
    kw = {"num_landmarks": 32} if name == "transmil" else {}
    m = create_model(name, 12, 3, **kw).eval().double()
    xs = [torch.randn(n, 12, dtype=torch.float64) for n in (3, 17, 70)]
    alone = [m(x[None]) for x in xs]
    xb, mask = _padded(xs)
    batch = m(xb.double(), mask)
    for i, (x, o) in enumerate(zip(xs, alone, strict=True)):
        torch.testing.assert_close(batch.logits[i], o.logits[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(batch.bag_embedding[i], o.bag_embedding[0], rtol=1e-9, atol=1e-9)
        if o.attention_logits is not None:
            torch.testing.assert_close(
                batch.attention_logits[i][..., : len(x)], o.attention_logits[0], rtol=1e-8, atol=1e-9
            )
            assert torch.isneginf(batch.attention_logits[i][..., len(x) :]).all()
        if o.instance_logits is not None:
            torch.testing.assert_close(batch.instance_logits[i, : len(x)], o.instance_logits[0])


@pytest.mark.parametrize("name", [n for n in ALL if create_model(n, 4, 2).permutation_invariant])
def test_permutation_invariance(name):
    torch.manual_seed(2)
    m = create_model(name, 12, 2).eval().double()
    x = torch.randn(1, 40, 12, dtype=torch.float64)
    perm = torch.randperm(40)
    a, b = m(x), m(x[:, perm])
    torch.testing.assert_close(a.logits, b.logits)
    if a.attention_logits is not None:
        torch.testing.assert_close(a.attention_logits[..., perm], b.attention_logits)


def test_transmil_depends_on_order():
    torch.manual_seed(3)
    m = create_model("transmil", 12, 2).eval().double()
    x = torch.randn(1, 40, 12, dtype=torch.float64)
    assert not torch.allclose(m(x).logits, m(x[:, torch.randperm(40)]).logits)


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(4)
    m = create_model(name, 12, 2)
    x, y = torch.randn(2, 30, 12), torch.tensor([0, 1])
    mask = torch.ones(2, 30, dtype=torch.bool)
    out = m(x, mask)
    terms = {"bag": torch.nn.functional.cross_entropy(out.logits, y), **m.aux_losses(out, y, mask)}
    sum(m.loss_weights.get(k, 0) * v for k, v in terms.items()).backward()
    by_method = getattr(m, "trained_by_method", ())  # e.g. the LRMIL student's instance head
    missing = [n for n, p in m.named_parameters() if p.grad is None and not n.startswith(by_method)]
    assert not missing, missing


def test_max_pool_cannot_use_negative_evidence():
    """Binary max pooling scores a bag by its most positive instance: adding instances never lowers it."""
    torch.manual_seed(5)
    m = create_model("max", 6, 2).eval()
    x = torch.randn(1, 10, 6)
    extra = torch.cat([x, 5 * torch.randn(1, 20, 6)], dim=1)
    p = lambda t: m(t).logits.softmax(-1)[0, 1]  # noqa: E731
    assert p(extra) >= p(x) - 1e-6


def test_clam_instance_loss_hand_computed():
    # one bag, 4 instances, k=1; class 1: top attention is instance 2, bottom is instance 0
    att = torch.tensor([[0.1, 0.5, 3.0, 0.2]])
    inst = torch.tensor([[[0.0, -1.0], [0.0, 0.3], [0.0, 2.0], [0.0, 0.7]]])
    y = torch.tensor([1])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss = clam_instance_loss(att, inst, y, mask, k=1, subtyping=False)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, expected)
    # subtyping adds class 0's top instance (by its own branch) with target 0, and divides by C
    att_mb = torch.stack([torch.tensor([[0.0, 4.0, 0.0, 0.0]]), att], dim=1)  # (1, 2, 4)
    inst2 = inst.clone()
    inst2[0, 1, 0] = 1.5
    loss_mb = clam_instance_loss(att_mb, inst2, y, mask, k=1, subtyping=True)
    torch.testing.assert_close(loss_mb, (expected + bce(torch.tensor([1.5]), torch.tensor([0.0]))) / 2)


def test_dsmil_output_is_mean_of_streams():
    torch.manual_seed(6)
    m = create_model("dsmil", 8, 2).eval()
    x = torch.randn(1, 9, 8)
    out = m(x)
    max_stream = out.instance_logits.amax(1)
    aux = m.aux_losses(out, torch.tensor([1]), torch.ones(1, 9, dtype=torch.bool))
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(aux["max_instance"], ce(max_stream, torch.tensor([1])))
    torch.testing.assert_close(aux["bag_stream"], ce(2 * out.logits - max_stream, torch.tensor([1])))


def test_iterative_pinv_inverts_a_softmax_matrix():
    torch.manual_seed(7)
    a = torch.randn(3, 16, 16, dtype=torch.float64).softmax(-1)
    z = iterative_pinv(a, iters=20)
    torch.testing.assert_close(a @ z @ a, a, rtol=1e-6, atol=1e-6)
