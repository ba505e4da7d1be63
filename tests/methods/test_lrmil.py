"""The stage-2 student: model outputs, side data from the teacher dump and the links, the loss terms per batch."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from wsimil.config import TrainConfig
from wsimil.errors import WsimilError
from wsimil.methods.base import Batch, create_method
from wsimil.methods.lrmil_losses import attention_kd_loss, bag_kd_loss, children_attention, topk_instance_loss
from wsimil.models.lrmil_student import StudentABMIL


def test_student_abmil_instance_head_and_padding():
    torch.manual_seed(0)
    m = StudentABMIL(6, 2, hidden_dims=(8,), attn_dim=4, dropout=0.0).eval()
    x = torch.randn(1, 5, 6)
    out = m(x)
    assert out.instance_logits.shape == (1, 5, 2)
    assert torch.allclose(out.instance_logits, m.instance_head(m.proj(x)))
    padded = torch.cat([x, torch.randn(1, 3, 6)], 1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    out_p = m(padded, mask)
    assert torch.allclose(out_p.logits, out.logits, atol=1e-6)
    assert torch.isinf(out_p.attention_logits[0, 5:]).all()


@pytest.fixture
def side_data(tmp_path):
    """Teacher dump and links of two slides: a has 3 LR patches (the last without children), b has 2."""
    dump, links = tmp_path / "fold0.h5", tmp_path / "links"
    links.mkdir()
    e = {"a": np.array([0.0, 1.0, 2.0, 3.0, 4.0]), "b": np.array([5.0, -1.0])}
    lk = {
        "a": np.array([[0, 1, -1, -1], [2, 3, 4, -1], [-1, -1, -1, -1]]),
        "b": np.array([[0, -1, -1, -1], [-1, 1, -1, -1]]),
    }
    with h5py.File(dump, "w") as f:
        for sid in ("a", "b"):
            g = f.create_group(sid)
            g["logits"] = np.array([1.0, -1.0]) if sid == "a" else np.array([0.0, 2.0])
            g["attention_logits"] = e[sid]
            g["attention"] = np.exp(e[sid]) / np.exp(e[sid]).sum()
    for sid in ("a", "b"):
        with h5py.File(links / f"{sid}_links.h5", "w") as f:
            f["links_5x_20x"] = lk[sid]
    return dump, links, e, lk


def test_losses_of_a_padded_batch_match_the_pure_functions(side_data):
    dump, links, e, lk = side_data
    opts = {"teacher_dump": str(dump), "links_dir": str(links), "topk": 1, "instance_targets": "paper"}
    method = create_method(TrainConfig(method="lrmil", method_kwargs=opts))
    method._ids = ["a", "b"]
    torch.manual_seed(0)
    model = method.build(4, 2)
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    batch = Batch(x * mask[..., None], mask, torch.tensor([1, 0]), np.array([0, 1]), [None, None])
    out = model(batch.x, mask)
    terms = method.losses(model, out, batch, 0)
    g = torch.zeros(2, 3)
    g[0] = torch.from_numpy(children_attention(e["a"], lk["a"]))  # [0.5, 3.0, 0.0]
    g[1, :2] = torch.from_numpy(children_attention(e["b"], lk["b"]))  # [5.0, -1.0]
    assert torch.allclose(g[0], torch.tensor([0.5, 3.0, 0.0]))
    y_t = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    assert terms["bag_kd"].item() == pytest.approx(bag_kd_loss(out.logits, y_t).item(), rel=1e-6)
    assert terms["attn_kd"].item() == pytest.approx(attention_kd_loss(out.attention_logits, g, mask).item(), rel=1e-6)
    inst = topk_instance_loss(out.instance_logits, g, mask, 1)
    assert terms["instance"].item() == pytest.approx(inst.item(), rel=1e-6)
    ce = torch.nn.functional.cross_entropy(out.logits, batch.y)
    expected = ce + terms["bag_kd"] + terms["attn_kd"] + terms["instance"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # the default targets fit the bag: bag a (label 1) -> its top instance 1 is tumour, instance 2 is not; bag b
    # (label 0) -> its top instance 0 is a hard negative, and nothing in it is called tumour
    fit = create_method(TrainConfig(method="lrmil", method_kwargs={"teacher_dump": str(dump), "links_dir": str(links)}))
    fit._ids = ["a", "b"]
    z = out.instance_logits
    want = (
        torch.nn.functional.cross_entropy(z[0, [1, 2]], torch.tensor([1, 0]))
        + torch.nn.functional.cross_entropy(z[1, [0]], torch.tensor([0]))
    ) / 2
    assert fit.losses(model, out, batch, 0)["instance"].item() == pytest.approx(want.item(), rel=1e-6)


def test_subsampled_bag_uses_the_kept_rows(side_data):
    dump, links, e, lk = side_data
    cfg = TrainConfig(method="lrmil", method_kwargs={"teacher_dump": str(dump), "links_dir": str(links)})
    method = create_method(cfg)
    method._ids = ["a", "b"]
    x = torch.randn(1, 2, 4)
    batch = Batch(x, torch.ones(1, 2, dtype=torch.bool), torch.tensor([1]), np.array([0]), [torch.tensor([1, 2])])
    _, g, use = method.guidance(batch)
    assert torch.allclose(g, torch.tensor([[3.0, 0.0]])) and use.tolist() == [True]
    only_childless = Batch(x[:, :1], torch.ones(1, 1, dtype=torch.bool), batch.y, batch.index, [torch.tensor([2])])
    assert method.guidance(only_childless)[2].tolist() == [False]  # no guidance: only CE and bag KD count
    wrong = Batch(torch.randn(1, 4, 4), torch.ones(1, 4, dtype=torch.bool), batch.y, batch.index, [None])
    with pytest.raises(WsimilError, match="4 LR features but 3 LR patches"):
        method.guidance(wrong)


def test_options_are_checked():
    with pytest.raises(WsimilError, match="teacher_agg"):
        create_method(TrainConfig(method="lrmil", method_kwargs={"teacher_agg": "median"}))
    with pytest.raises(WsimilError, match="no option"):
        create_method(TrainConfig(method="lrmil", method_kwargs={"lambda": 1}))
    with pytest.raises(WsimilError, match="ABMIL student"):
        create_method(TrainConfig(method="lrmil", model="transmil")).build(4, 2)
