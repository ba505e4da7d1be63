import json

import pandas as pd
import pytest
import torch
import yaml

from wsimil.config import load_config
from wsimil.errors import WsimilError
from wsimil.evaluation.evaluate import evaluate_run
from wsimil.methods.trainer import run_training
from wsimil.run import load_model

FAST = dict(
    epochs=4,
    folds=3,
    lr=1e-3,
    model_kwargs={"hidden_dims": [32], "attn_dim": 16},
    bootstrap=50,
    min_epochs=1,
    patience=2,
)


def test_train_writes_the_run_contract(digit_cohort, tmp_path):
    feats, manifest = digit_cohort
    cfg = load_config(model="abmil", **FAST)
    res = run_training(cfg, feats, manifest, tmp_path / "run")
    run = tmp_path / "run"
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == res
    assert set(res["metrics"]) >= {"auc", "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "instance_auc"}
    assert all(set(v) == {"mean", "std"} for v in res["metrics"].values())
    assert len(res["folds"]) == 3 and {"repeat", "fold", "metrics", "ci"} <= set(res["folds"][0])
    assert res["config"]["model"] == "abmil" and res["config"]["classes"] == ["0", "1"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["seed"] == 0 and saved["in_dim"] == 64 and saved["epochs"] == 4
    pred = pd.read_csv(run / "predictions.csv")
    assert list(pred.columns) == ["slide_id", "repeat", "fold", "label", "prob_0", "prob_1"]
    assert len(pred) == 60 and pred.slide_id.is_unique
    assert ((pred.prob_0 + pred.prob_1 - 1).abs() < 1e-5).all()
    hist = pd.read_csv(run / "history.csv")
    assert {"train_loss", "train_bag", "val_loss", "val_auc"} <= set(hist.columns)
    assert len(sorted((run / "checkpoints").glob("*.safetensors"))) == 3


def test_same_seed_same_results_and_resume(digit_cohort, tmp_path):
    feats, manifest = digit_cohort
    fast = {**FAST, "epochs": 2, "folds": 2}
    cfg = load_config(model="gated_abmil", **fast)
    a = run_training(cfg, feats, manifest, tmp_path / "a")
    b = run_training(cfg, feats, manifest, tmp_path / "b")
    assert a["folds"] == b["folds"]
    ck = tmp_path / "a" / "checkpoints" / "repeat0_fold0.safetensors"
    mtime = ck.stat().st_mtime_ns
    again = run_training(cfg, feats, manifest, tmp_path / "a")  # resume: reuses every fold
    assert ck.stat().st_mtime_ns == mtime and again["folds"] == a["folds"]
    other = run_training(load_config(model="gated_abmil", **{**fast, "seed": 1}), feats, manifest, tmp_path / "a")
    assert ck.stat().st_mtime_ns != mtime and other["folds"] != a["folds"]  # a changed config retrains


@pytest.mark.parametrize("model", ["clam_sb", "dsmil", "transmil", "max"])
def test_other_models_train_in_batches(digit_cohort, tmp_path, model):
    feats, manifest = digit_cohort
    kw = {"hidden_dims": [32]} if model != "transmil" else {"hidden_dims": [32], "heads": 2, "num_landmarks": 8}
    cfg = load_config(model=model, **{**FAST, "model_kwargs": kw, "batch_size": 4, "epochs": 2})
    res = run_training(cfg, feats, manifest, tmp_path / model)
    assert res["metrics"]["auc"]["mean"] is not None
    hist = pd.read_csv(tmp_path / model / "history.csv")
    if model == "clam_sb":
        assert "train_instance" in hist.columns
    if model == "dsmil":
        assert {"train_bag_stream", "train_max_instance"} <= set(hist.columns)


def test_standardizer_fits_training_fold_only(digit_cohort, tmp_path):
    feats, manifest = digit_cohort
    cfg = load_config(
        model="mean",
        **{**FAST, "standardize": True, "val_fraction": 0.0, "epochs": 1, "model_kwargs": {"hidden_dims": [8]}},
    )
    res = run_training(cfg, feats, manifest, tmp_path / "run")
    from wsimil.data.manifest import read_manifest
    from wsimil.features.store import FeatureStore

    store, man = FeatureStore(feats), read_manifest(manifest)
    test_ids = set(pd.read_csv(tmp_path / "run" / "predictions.csv").query("fold == 0").slide_id)
    train_x = torch.cat([torch.from_numpy(store.read(s).features) for s in man.slide_ids if s not in test_ids])
    _, ck = load_model(tmp_path / "run" / "checkpoints" / "repeat0_fold0.safetensors")
    torch.testing.assert_close(ck["standardizer"]["mean"], train_x.mean(0))
    assert res["folds"][0]["n_val"] == 0


def test_evaluate_external_set(digit_cohort, tmp_path):
    from wsimil.data.synthetic import make_digit_bags, write_bags

    feats, manifest = digit_cohort
    run_training(load_config(model="abmil", **FAST), feats, manifest, tmp_path / "run")
    ext = write_bags(make_digit_bags(30, seed=11), tmp_path / "ext")
    res = evaluate_run(tmp_path / "run", tmp_path / "ext" / "features", ext, tmp_path / "eval", n_boot=50)
    assert len(res["models"]) == 3 and "instance_auc" in res["models"][0]
    auc = res["ensemble"]["metrics"]["auc"]
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert list(pred.columns) == ["slide_id", "label", "prob_0", "prob_1", "predicted"] and len(pred) == 30


def test_evaluate_rejects_wrong_feature_width(digit_cohort, tmp_path):
    import numpy as np

    from wsimil.features.store import write_bag

    feats, manifest = digit_cohort
    cfg = load_config(model="mean", **{**FAST, "epochs": 1, "model_kwargs": {"hidden_dims": [8]}})
    run_training(cfg, feats, manifest, tmp_path / "run")
    for i in range(2):
        write_bag(tmp_path / "other" / f"s{i}.h5", np.ones((3, 10)))
    (tmp_path / "m.csv").write_text("case_id,slide_id,label\na,s0,0\nb,s1,1\n")
    with pytest.raises(WsimilError, match="dimension 10 but run .* was trained on 64-d features"):
        evaluate_run(tmp_path / "run", tmp_path / "other", tmp_path / "m.csv", tmp_path / "e")
    with pytest.raises(WsimilError, match="not a wsimil run"):
        evaluate_run(tmp_path, tmp_path / "other", tmp_path / "m.csv", tmp_path / "e")


def test_config_errors(tmp_path):
    with pytest.raises(WsimilError, match="model: Value error, unknown model 'nope'"):
        load_config(model="nope")
    p = tmp_path / "c.yaml"
    p.write_text("epochs: -1\nfoo: 1\n")
    with pytest.raises(WsimilError) as e:
        load_config(p)
    assert "epochs" in str(e.value) and "foo" in str(e.value) and str(p) in str(e.value)


def test_cohorts_beyond_the_memory_budget_stream_from_disk(digit_cohort, tmp_path):
    from wsimil.data.manifest import load_cohort, read_manifest
    from wsimil.features.store import FeatureStore

    feats, manifest = digit_cohort
    cohort = load_cohort(read_manifest(manifest), FeatureStore(feats), max_memory_gb=0)
    assert not cohort.in_memory and cohort.bags["digits_0000"].features.shape[0] == 0
    assert cohort.features("digits_0000").shape == (cohort.lengths["digits_0000"], 64)
    fast = {**FAST, "epochs": 2, "folds": 2, "standardize": True}
    mem = run_training(load_config(model="abmil", **fast), feats, manifest, tmp_path / "mem")
    disk = run_training(load_config(model="abmil", **fast, max_memory_gb=0), feats, manifest, tmp_path / "disk")
    assert mem["folds"] == disk["folds"]


def test_padded_standardisation_in_place_matches_out_of_place():
    from wsimil.data.batching import Standardizer, pad_batch

    bags = [torch.randn(5, 3), torch.randn(2, 3)]
    std = Standardizer.fit(bags)
    x, mask = pad_batch(bags)
    expected = std(x) * mask[..., None]
    got = std.apply_padded(x.clone(), mask, owned=True)
    torch.testing.assert_close(got, expected)
    single, m1 = pad_batch(bags[:1])
    before = bags[0].clone()
    std.apply_padded(single, m1, owned=False)
    torch.testing.assert_close(bags[0], before)  # a batch of one is a view of the stored bag: never modified


def test_method_interface_extra_heads_options_and_baseline_fold(digit_cohort, tmp_path):
    """A method plugs in through the registry: its options are validated, its setup can train the same fold's
    supervised baseline, and every extra output head is scored as metrics_<head>."""
    from dataclasses import replace

    from wsimil.methods.base import TrainingMethod, register_method
    from wsimil.methods.options import MethodSpec, Option

    seen = {}

    @register_method("_test_heads", MethodSpec("_test_heads", (Option("scale", float, 1.0, "head scale"),)))
    class Heads(TrainingMethod):
        """Test method: supervised loss, plus a second head that is the negated logits."""

        def build(self, in_dim, n_classes):
            model = super().build(in_dim, n_classes)
            forward = model.forward

            def with_head(x, mask=None):
                out = forward(x, mask)
                return replace(out, extra_logits={"flipped": -out.logits * self.opts["scale"]})

            model.forward = with_head
            return model

        def setup(self, model, ctx):
            base, _ = ctx.baseline(epochs=1)
            seen[ctx.split.fold] = (len(ctx.train), type(base).__name__)

        def losses(self, model, out, batch, epoch):
            loss = self.bag_loss(out.logits, batch)
            return {"loss": loss, "ce": loss.detach()}

    feats, manifest = digit_cohort
    with pytest.raises(WsimilError, match="has no option.*bogus.*known options: scale"):
        run_training(load_config(method="_test_heads", method_kwargs={"bogus": 1}, **FAST), feats, manifest, tmp_path)
    cfg = load_config(method="_test_heads", method_kwargs={"scale": 2.0}, **{**FAST, "folds": 2, "epochs": 2})
    res = run_training(cfg, feats, manifest, tmp_path / "run")
    assert set(seen) == {0, 1} and seen[0][1] == "ABMIL"
    assert len(list((tmp_path / "run" / "baseline" / "checkpoints").glob("*.safetensors"))) == 2
    # the flipped head ranks every slide in reverse: its AUC is 1 − the main AUC, fold by fold
    for f in res["folds"]:
        assert f["metrics_flipped"]["auc"] == pytest.approx(1 - f["metrics"]["auc"])
    assert set(res["metrics_flipped"]) >= {"auc", "accuracy"} and "ci_flipped" in res["folds"][0]
    assert "train_ce" in pd.read_csv(tmp_path / "run" / "history.csv").columns


def test_kept_epoch_has_trained_min_epochs(digit_cohort, tmp_path):
    """Early stopping selects among epochs min_epochs and later: with lr 0.5 the validation loss is worst after the
    first epochs, yet the kept model is never one trained fewer than min_epochs epochs."""
    feats, manifest = digit_cohort
    cfg = load_config(model="abmil", **{**FAST, "epochs": 6, "folds": 2, "min_epochs": 4, "patience": 1, "lr": 0.5})
    run_training(cfg, feats, manifest, tmp_path / "run")
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    for _, h in hist.groupby("fold"):
        assert h.best.sum() == 1 and int(h.epoch[h.best].iloc[0]) >= 3
        assert len(h) >= 4  # no stop before min_epochs


def test_each_fold_builds_its_method_once(digit_cohort, tmp_path, monkeypatch):
    """One method object per fold, passed along from option checks to training, evaluation and the checkpoint
    (no extra objects for the label column, the option check or the primary head)."""
    from wsimil.methods.supervised import Supervised

    built = []
    init = Supervised.__init__

    def counting(self, cfg):
        built.append(self)
        init(self, cfg)

    monkeypatch.setattr(Supervised, "__init__", counting)
    feats, manifest = digit_cohort
    run_training(load_config(model="abmil", **{**FAST, "epochs": 1}), feats, manifest, tmp_path / "run")
    assert len(built) == FAST["folds"] and len({id(m) for m in built}) == FAST["folds"]
    built.clear()  # a re-run reuses the checkpoints and still builds one method per fold
    run_training(load_config(model="abmil", **{**FAST, "epochs": 1}), feats, manifest, tmp_path / "run")
    assert len(built) == FAST["folds"]


def test_bad_method_options_fail_before_any_data_is_read(tmp_path):
    cfg = load_config(method="weno", method_kwargs={"warmup": "soon"})
    with pytest.raises(WsimilError, match="option warmup must be an int"):
        run_training(cfg, tmp_path / "no_features", tmp_path / "no_manifest.csv", tmp_path / "run")
    assert not (tmp_path / "run").exists()
