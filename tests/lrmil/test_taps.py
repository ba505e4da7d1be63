"""One ``forward_intermediates`` path for CNN and ViT encoders: final embedding, grids, summary tokens, the student."""

from __future__ import annotations

import pytest
import timm
import torch

from wsimil.errors import WsimilError
from wsimil.features.encoders import ClsMeanPool, Encoder, EncoderSpec, TruncatedResNet
from wsimil.lrmil.taps import check_layers, default_layers, forward_taps, make_student, n_blocks


def tiny(arch: str, dim: int, **kw) -> Encoder:
    torch.manual_seed(0)
    spec = EncoderSpec(f"tiny_{arch}", arch, dim, input_size=32, timm_kwargs=kw)
    return Encoder(spec, timm.create_model(arch, num_classes=0, **kw).eval(), "random(seed=0)", None)


def test_default_layers_first_second_last_but_one():
    assert default_layers(12) == (0, 1, 10)  # ViT-B, as in the official code
    assert default_layers(5) == (0, 1, 3)  # timm ResNet: stem, layer1, layer3
    assert default_layers(2) == (0, 1)
    assert default_layers(1) == (0,)
    assert check_layers((0, -2), 5) == (0, 3)
    with pytest.raises(WsimilError, match="has 5 blocks"):
        check_layers((5,), 5)


def test_cnn_taps_match_the_encoder():
    enc = tiny("test_resnet", 96)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t = forward_taps(enc.model, x, (3, 0))
        ref = enc.model(x)
        stem = enc.model.act1(enc.model.bn1(enc.model.conv1(x)))
    assert torch.allclose(t.final, ref, atol=1e-5)
    assert [g.shape[-1] for g in t.grids] == [4, 32]  # in the requested order; 64 px / reductions 16 and 2
    assert torch.allclose(t.grids[1], stem, atol=1e-6)
    assert torch.allclose(t.summaries[1], stem.mean((2, 3)), atol=1e-6)  # CNN summary = global average pool


def test_truncated_resnet_taps():
    net = timm.create_model("test_resnet", num_classes=0).eval()
    model = TruncatedResNet(net)
    assert n_blocks(model) == 4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t = forward_taps(model, x, (0, 1, 2))
        assert torch.allclose(t.final, model(x), atol=1e-5)


@pytest.mark.parametrize("wrap", [False, True])
def test_vit_taps_cls_summary_and_final(wrap):
    enc = tiny("test_vit", 64, img_size=32, dynamic_img_size=False)
    model = ClsMeanPool(enc.model) if wrap else enc.model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = forward_taps(model, x, (0, 4))
        ref = model(x)
        tokens = enc.model.blocks[0](enc.model._pos_embed(enc.model.patch_embed(x)))
    assert torch.allclose(t.final, ref, atol=1e-5)
    assert t.grids[0].shape == (2, 64, 2, 2)  # 32 px / patch 16
    assert torch.allclose(t.summaries[0], tokens[:, 0], atol=1e-5)  # the CLS token after block 0
    assert torch.allclose(t.grids[0].flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-5)


def test_student_is_a_copy_at_the_lr_input_size():
    teacher = tiny("test_vit", 64, img_size=32, dynamic_img_size=False)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    student = make_student(teacher, 64)
    assert student.spec.input_size == 64 and teacher.spec.input_size == 32
    # position embeddings interpolated to the 4x4 grid of a 64-px input (not sliced), teacher untouched
    assert student.model.pos_embed.shape == (1, 1 + 16, 64)
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        t = forward_taps(student.model, torch.randn(1, 3, 64, 64), (0,))
    assert t.grids[0].shape == (1, 64, 4, 4)
    shared = [k for k in before if k != "pos_embed"]
    assert all(torch.equal(student.model.state_dict()[k], before[k]) for k in shared)
    cnn = tiny("test_resnet", 96)
    s = make_student(cnn, 64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(s.model(x), cnn.model(x))
    assert s.model is not cnn.model


def test_student_input_gives_each_child_whole_token_blocks():
    from wsimil.lrmil.taps import check_student_input, student_input_size

    vit16 = tiny("test_vit", 64, img_size=32, dynamic_img_size=False)
    vit14 = tiny("test_vit", 64, img_size=28, patch_size=14, dynamic_img_size=False)
    cnn = tiny("test_resnet", 96)
    assert student_input_size(vit16.model, 256, 4) == 256  # ViT-B/16: 16x16 tokens, 4x4 per child (SPEC)
    assert student_input_size(vit14.model, 256, 4) == 280  # patch 14: 20x20 tokens, not 256 px's 18x18
    assert student_input_size(cnn.model, 256, 4) == 256
    assert check_student_input(vit16.model, 256, 4) is None and check_student_input(cnn.model, 250, 4) is None
    msg = check_student_input(vit14.model, 256, 4)
    assert "18x18" in msg and "280" in msg
    s = make_student(vit14, 280)  # every child owns a 5x5 block
    with torch.no_grad():
        t = forward_taps(s.model, torch.randn(1, 3, 280, 280), (0,))
    assert t.grids[0].shape[-2:] == (20, 20)
