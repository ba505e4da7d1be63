import pytest
import torch

from wsimil.errors import WsimilError
from wsimil.features.encoders import ENCODERS, _build, create_encoder, list_encoders


def test_registry_holds_the_foundation_models():
    assert {
        "resnet18",
        "resnet50_trunc",
        "uni",
        "uni2-h",
        "virchow2",
        "h-optimus-0",
        "prov-gigapath",
        "phikon-v2",
    } <= set(list_encoders())


@pytest.mark.parametrize("name", list_encoders())
def test_declared_embedding_width_matches_the_architecture(name):
    """Build on the meta device (no memory, no download) and check the output width against the spec."""
    spec = ENCODERS[name]
    with torch.device("meta"):
        out = _build(spec, pretrained_hub=False)(torch.empty(2, 3, spec.input_size, spec.input_size))
    assert tuple(out.shape) == (2, spec.embed_dim)


def test_random_init_is_reproducible_and_warns():
    with pytest.warns(UserWarning, match="randomly initialised"):
        a = create_encoder("resnet18", seed=3)
    with pytest.warns(UserWarning):
        b = create_encoder("resnet18", seed=3)
    x = torch.randint(0, 255, (2, 256, 256, 3), dtype=torch.uint8)
    with torch.no_grad():
        fa, fb = a.model(a.preprocess(x)), b.model(b.preprocess(x))
    assert fa.shape == (2, 512) and torch.equal(fa, fb)
    assert a.preprocess(x).shape == (2, 3, 224, 224)


def test_weights_file_roundtrip_and_mismatch(tmp_path):
    with pytest.warns(UserWarning):
        src = create_encoder("resnet50_trunc", seed=1)
    state = {k: v for k, v in src.model.net.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    enc = create_encoder("resnet50_trunc", tmp_path / "w.pth")
    assert len(enc.weights_sha256) == 64 and enc.weights.endswith("w.pth")
    x = torch.randint(0, 255, (1, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(enc.model(enc.preprocess(x)), src.model(src.preprocess(x)))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WsimilError, match="do not fit encoder 'resnet18'.*missing keys"):
        create_encoder("resnet18", tmp_path / "bad.pth")
    with pytest.raises(WsimilError, match="does not exist"):
        create_encoder("resnet18", tmp_path / "nope.pth")
    with pytest.raises(WsimilError, match="unknown encoder 'nope'"):
        create_encoder("nope")
