"""Per-step mechanics of training: standardisation folded into the input layer, the bag cache, padding."""

import numpy as np
import pandas as pd
import pytest
import torch

from wsimil.data.batching import BagTensors, Standardizer, folded_standardizer, pad_batch
from wsimil.models import create_model, list_models

FOLDING = [m for m in list_models() if create_model(m, 12, 2).input_linear() is not None]


def _bags(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # features far from zero mean / unit variance, as encoder outputs are
    return [torch.randn(n, 12, generator=g) * torch.linspace(0.2, 5, 12) + 3 for n in (7, 4)]


def test_models_with_a_projection_fold_their_input():
    assert {"abmil", "gated_abmil", "transmil", "dsmil"} <= set(FOLDING)
    assert create_model("abmil", 12, 2, hidden_dims=[]).input_linear() is None  # no layer to fold into


@pytest.mark.parametrize("name", FOLDING)
def test_folding_matches_standardised_inputs(name):
    torch.manual_seed(0)
    model = create_model(name, 12, 2).eval()
    bags = _bags()
    std = Standardizer.fit(bags)
    x, mask = pad_batch(bags)
    ref = model(std.apply_padded(x.clone(), mask, owned=True), mask)
    ref.logits.sum().backward()
    layer = model.input_linear()
    ref_grad = layer.weight.grad.clone()
    layer.weight.grad = None
    keys = list(model.state_dict())
    with folded_standardizer(std, [model]) as folded:
        assert folded
        out = model(x, mask)  # raw features, zero padding
        out.logits.sum().backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    if ref.attention_logits is not None:
        valid = torch.isfinite(ref.attention_logits)
        torch.testing.assert_close(out.attention_logits[valid], ref.attention_logits[valid], atol=1e-4, rtol=1e-4)
    # the gradient reaches W, the weights on standardised features that checkpoints hold
    torch.testing.assert_close(layer.weight.grad, ref_grad, atol=1e-4, rtol=1e-4)
    assert "forward" not in vars(layer) and list(model.state_dict()) == keys  # nothing left behind
    torch.testing.assert_close(model(std(x[:1, :7]), mask[:1, :7]).logits, ref.logits[:1], atol=1e-5, rtol=1e-5)


def test_folding_needs_every_model_to_fold():
    std = Standardizer.fit(_bags())
    plain = create_model("abmil", 12, 2, hidden_dims=[])
    folding = create_model("abmil", 12, 2)
    with folded_standardizer(std, [folding, plain]) as folded:
        assert not folded and "forward" not in vars(folding.input_linear())
    with folded_standardizer(None, [folding]) as folded:
        assert not folded


def test_standardizer_fit_in_chunks_matches_float64():
    bags = _bags(1)
    std = Standardizer.fit(bags, chunk=3)
    x = torch.cat(bags).double()
    torch.testing.assert_close(std.mean, x.mean(0).float())
    torch.testing.assert_close(std.std, x.std(0, unbiased=False).float())


def test_training_with_folding_equals_training_on_standardised_bags(digit_cohort, tmp_path, monkeypatch):
    """The trainer folds the standardiser for ABMIL: same folds, metrics and checkpoint meaning as the explicit path."""
    from wsimil.config import load_config
    from wsimil.methods.trainer import run_training
    from wsimil.models.base import MILModel
    from wsimil.run import load_model

    feats, manifest = digit_cohort
    fast = dict(epochs=2, folds=2, lr=1e-3, model_kwargs={"hidden_dims": [32], "attn_dim": 16}, bootstrap=0)
    folded = run_training(load_config(model="abmil", **fast), feats, manifest, tmp_path / "folded")
    monkeypatch.setattr(MILModel, "input_linear", lambda self: None)  # the explicit, per-step standardisation
    explicit = run_training(load_config(model="abmil", **fast), feats, manifest, tmp_path / "explicit")
    for a, b in zip(folded["folds"], explicit["folds"], strict=True):
        assert a["metrics"]["auc"] == pytest.approx(b["metrics"]["auc"], abs=1e-6)
    ma, _ = load_model(tmp_path / "folded" / "checkpoints" / "repeat0_fold0.safetensors")
    mb, _ = load_model(tmp_path / "explicit" / "checkpoints" / "repeat0_fold0.safetensors")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, atol=1e-4, rtol=1e-4, msg=k)


def test_batch_of_one_is_a_view_of_the_stored_bag():
    bag = torch.randn(9, 4)
    x, mask = pad_batch([bag])
    assert x.data_ptr() == bag.data_ptr() and mask.all() and x.shape == (1, 9, 4)


def _store(tmp_path, n_bags=4):
    from wsimil.data.manifest import Manifest
    from wsimil.features.store import FeatureStore, write_bag

    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(n_bags)]
    for i, s in enumerate(ids):
        write_bag(tmp_path / f"{s}.h5", rng.standard_normal((5 + i, 6), dtype=np.float32))
    df = pd.DataFrame({"case_id": ids, "slide_id": ids, "label": ["0", "1"] * (n_bags // 2)})
    df["y"] = df.label.astype(int)
    return Manifest(df, ["0", "1"]), FeatureStore(tmp_path), ids


def test_bag_cache_holds_each_bag_once_within_its_budget(tmp_path):
    from wsimil.data.manifest import load_cohort

    man, store, ids = _store(tmp_path)
    cached = load_cohort(man, store, max_memory_gb=1.0)
    bags = BagTensors(cached, ids)
    assert cached.in_memory
    for i, s in enumerate(ids):
        np.testing.assert_array_equal(bags[i].numpy(), store.read(s).features)
        # the cohort's array itself, every epoch: no re-read and no second copy in memory
        assert bags[i] is bags[i] and bags[i].data_ptr() == cached.bags[s].features.ctypes.data
    total = sum(len(store.read(s).features) * 6 * 4 for s in ids)
    over = load_cohort(man, store, max_memory_gb=(total - 1) / 2**30)  # one byte short: streamed from disk
    assert not over.in_memory and all(b.features.size == 0 for b in over.bags.values())
    streamed = BagTensors(over, ids)
    for i in range(len(ids)):
        torch.testing.assert_close(streamed[i], bags[i], rtol=0, atol=0)
    assert streamed.lengths == bags.lengths == [5, 6, 7, 8]
