"""ReLUDropout: the fused ReLU + dropout of the instance projection."""

import pytest
import torch

from wsimil.models import create_model
from wsimil.models.layers import ReLUDropout, keep_mask


def test_keep_mask_rate_and_seeding():
    torch.manual_seed(0)
    m = keep_mask((400, 500), 0.25)
    assert m.dtype == torch.bool and m.shape == (400, 500)
    assert abs(m.float().mean().item() - 0.75) < 0.005
    torch.manual_seed(0)
    assert torch.equal(keep_mask((400, 500), 0.25), m)  # torch.manual_seed makes it reproducible
    assert abs(keep_mask((1000, 100), 0.6).float().mean().item() - 0.4) < 0.01
    assert keep_mask((3, 5), 0.0).all()


def test_relu_dropout_forward_backward():
    layer = ReLUDropout(0.25)
    x = torch.randn(300, 200, requires_grad=True)
    torch.testing.assert_close(layer.eval()(x), torch.relu(x))
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    kept = y != 0
    assert not kept[x <= 0].any()  # the ReLU part
    torch.testing.assert_close(y[kept], x[kept] / 0.75)  # inverted dropout scaling
    share = kept.float().sum() / (x > 0).float().sum()
    assert abs(share.item() - 0.75) < 0.02
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    with pytest.raises(ValueError, match="dropout must be in"):
        ReLUDropout(1.0)


def test_projection_keeps_checkpoint_names():
    model = create_model("abmil", 16, 2, hidden_dims=[8, 4])
    assert {"proj.0.weight", "proj.3.weight"} <= set(model.state_dict())
    assert isinstance(model.proj[1], ReLUDropout)


def test_abmil_with_fused_dropout_still_learns():
    """A quick fit on a tiny problem: bags are positive when one instance carries the signal."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(40, 20, 16, generator=g)
    y = torch.arange(40) % 2
    xs[y == 1, 0, :4] += 3.0
    torch.manual_seed(0)
    model = create_model("abmil", 16, 2, hidden_dims=[32], attn_dim=16, dropout=0.25)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        model.train()
        for i in range(40):
            loss = torch.nn.functional.cross_entropy(model(xs[i : i + 1]).logits, y[i : i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xs).logits.argmax(1) == y).float().mean().item()
    assert acc >= 0.95
