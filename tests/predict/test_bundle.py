"""Model bundles: written by training, loaded with one call, refused clearly when they do not fit."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import yaml

from wsimil.errors import WsimilError
from wsimil.features.store import write_bag
from wsimil.predict.bundle import BUNDLE_FORMAT, load_bundle
from wsimil.predict.refs import EncoderRef, TilingRef
from wsimil.predict.write import bundle_from_run, provenance_from_features, write_bundle
from wsimil.slide.tissue import TissueParams


@pytest.fixture
def digit_run(digit_abmil_run):
    """A 2-fold ABMIL run on 24 digit bags: ``(run folder, features)`` (conftest's ``digit_abmil_run``)."""
    return digit_abmil_run[:2]


def test_training_writes_a_loadable_bundle(digit_run):
    run, feats = digit_run
    b = load_bundle(run / "bundle")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert b.classes == cfg["classes"] and b.model == "abmil" and b.in_dim == cfg["in_dim"]
    assert [(m.repeat, m.fold) for m in b.members] == [(0, 0), (0, 1)]
    assert b.config["features"] == cfg["features"] and b.format_version == BUNDLE_FORMAT
    # a run folder or the bundle.json itself load the same bundle
    assert load_bundle(run).path == load_bundle(run / "bundle" / "bundle.json").path == run / "bundle"
    # members are the fold checkpoints: same weights, same standardiser
    from wsimil.run import load_model

    (m0, std0), _ = b.load_models()
    ref, ck = load_model(run / "checkpoints" / "repeat0_fold0.safetensors")
    for k, v in ref.state_dict().items():
        assert torch.equal(m0.state_dict()[k], v)
    assert torch.equal(std0.mean, ck["standardizer"]["mean"])


def test_feature_only_bundle_refuses_slides_but_scores_features(digit_run, tmp_path):
    run, feats = digit_run
    b = load_bundle(run / "bundle")
    assert not b.scores_slides and "no encoder provenance" in b.slide_settings_missing
    with pytest.raises(WsimilError, match="cannot score slides.*--features"):
        b.require_slides()
    from wsimil.predict.pipeline import predict_features, predict_slides

    with pytest.raises(WsimilError, match="cannot score slides"):
        predict_slides(b, tmp_path, tmp_path / "out", device="cpu")
    table = predict_features(b, feats, tmp_path / "pred", device="cpu")
    assert (table["status"] == "ok").all()
    pred = __import__("pandas").read_csv(tmp_path / "pred" / "predictions.csv", dtype={"slide_id": str})
    assert list(pred.columns) == ["slide_id", *[f"prob_{c}" for c in b.classes], "predicted"]
    # the ensemble probability is the mean of both fold models' softmax on standardised features
    from wsimil.features.store import FeatureStore

    sid = pred["slide_id"].iloc[0]
    x = torch.from_numpy(FeatureStore(feats).read(sid).features)[None]
    ps = [torch.softmax(m(s(x)).logits, -1)[0] for m, s in b.load_models()]
    want = torch.stack(ps).mean(0).detach().numpy()
    got = pred.loc[0, [f"prob_{c}" for c in b.classes]].to_numpy(dtype=float)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert str(pred.loc[0, "predicted"]) == b.classes[int(np.argmax(want))]
    # --fold 1: that fold's model alone; an unknown fold is named
    predict_features(b, feats, tmp_path / "pred1", device="cpu", folds=[1])
    one = __import__("pandas").read_csv(tmp_path / "pred1" / "predictions.csv", dtype={"slide_id": str})
    m1, s1 = b.load_models(folds=[1])[0]
    np.testing.assert_allclose(one.loc[0, f"prob_{b.classes[1]}"], torch.softmax(m1(s1(x)).logits, -1)[0, 1].item(),
                               atol=1e-6)  # fmt: skip
    with pytest.raises(WsimilError, match="no fold 5"):
        b.load_models(folds=[5])


def test_wrong_features_and_versions_fail_clearly(digit_run, tmp_path):
    run, _ = digit_run
    b = load_bundle(run / "bundle")
    write_bag(tmp_path / "f" / "s1.h5", np.zeros((3, b.in_dim + 1), np.float32), encoder="uni")
    with pytest.raises(WsimilError, match=r"slide 's1'.*expects \d+-d features"):
        b.check_features("s1", tmp_path / "f" / "s1.h5", b.in_dim + 1)

    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "bundle.json").write_text(json.dumps({**meta, "format_version": BUNDLE_FORMAT + 1}))
    with pytest.raises(WsimilError, match=f"format version {BUNDLE_FORMAT + 1}.*install a matching wsimil"):
        load_bundle(newer)
    with pytest.raises(WsimilError, match="not a wsimil model bundle"):
        load_bundle(tmp_path / "f")
    (newer / "bundle.json").write_text(json.dumps({**meta, "aggregator": {**meta["aggregator"], "method": "nope"}}))
    with pytest.raises(WsimilError, match="training method 'nope'"):
        load_bundle(newer)


def test_modified_member_is_refused(digit_run, tmp_path):
    run, _ = digit_run
    out = bundle_from_run(run, tmp_path / "b")
    with open(out / "aggregators" / "repeat0_fold1.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(WsimilError, match="repeat0_fold1.safetensors does not match its recorded checksum"):
        load_bundle(out).load_models()


def _slide_features(d, name, encoder="resnet18", weights="random(seed=3)", mag=20.0, key="abc"):
    write_bag(
        d / f"{name}.h5",
        np.ones((2, 512), np.float32),
        np.zeros((2, 2), np.int64),
        encoder=encoder,
        attrs={"weights": weights, "weights_sha256": "", "embed_dim": 512, "precision": "fp32"},
        coords_attrs={"target_magnification": mag, "patch_size": 256, "settings_key": key},
    )


def test_provenance_from_feature_attributes_and_tiling_yaml(tmp_path):
    feats = tmp_path / "job" / "20x_256px_0px_overlap" / "features_resnet18"
    for s in ("a", "b"):
        _slide_features(feats, s)
    (tmp_path / "job" / "tiling.yaml").write_text(
        yaml.safe_dump({"settings_key": "abc", "min_tissue": 0.3, "reader": "openslide", "tissue": {"open_um": 8.0}})
    )
    enc, tiling, why = provenance_from_features(feats)
    assert why is None
    assert enc == EncoderRef("resnet18", None, None, seed=3, embed_dim=512, precision="fp32")
    # the job's settings in full: what tiling.yaml left out takes TissueParams' defaults, as tiling did
    assert tiling == TilingRef(20.0, 256, 0.3, asdict(TissueParams(open_um=8.0)), "openslide")
    assert tiling.tile_settings().tissue.open_um == 8.0 and tiling.tile_settings().mags == [20.0]

    _slide_features(feats, "c", mag=5.0)
    enc, tiling, why = provenance_from_features(feats)
    assert enc is None and tiling is None and "disagree" in why and "5.0x" in why
    other = tmp_path / "other"
    _slide_features(other, "a", encoder="uni_v1")
    assert "not in wsimil's registry" in provenance_from_features(other)[2]
    hub = tmp_path / "hub"
    _slide_features(hub, "a", weights="hub:timm/resnet18.a1_in1k")
    assert provenance_from_features(hub)[0].weights == "hub"


def test_encoder_weights_are_copied_and_checked(digit_run, tmp_path):
    """A custom weights file (e.g. LRMIL's distilled encoder) is copied into the bundle with its checksum; a changed
    file is refused, as are features from another encoder."""
    run, _ = digit_run
    b0 = load_bundle(run / "bundle")
    w = tmp_path / "student.pt"
    w.write_bytes(b"weights v1")
    enc = EncoderRef("resnet18", str(w), embed_dim=None)
    ckpts = [run / "bundle" / m.file for m in b0.members]
    out = write_bundle(tmp_path / "b", ckpts, encoder=enc, tiling=TilingRef(5.0), copy_encoder_weights=True)
    b = load_bundle(out)
    assert b.encoder.weights == "encoder/student.pt" and (out / "encoder" / "student.pt").read_bytes() == b"weights v1"
    assert b.encoder_weights() == str((out / "encoder" / "student.pt").resolve())
    assert b.tile_settings().mags == [5.0]
    w.write_bytes(b"weights v2")
    with pytest.raises(WsimilError, match="other weights"):
        b.encoder_weights(w)
    write_bag(tmp_path / "f" / "s.h5", np.zeros((2, b.in_dim), np.float32), encoder="uni")
    with pytest.raises(WsimilError, match="come from encoder 'uni'.*'resnet18'"):
        b.check_features("s", tmp_path / "f" / "s.h5", b.in_dim)
    with pytest.raises(WsimilError, match="both encoder and tiling"):
        write_bundle(tmp_path / "c", ckpts, encoder=enc, tiling=None)


def test_survival_bundle_predicts_risk_and_reports_c_index(tmp_path):
    """Survival bundles predict the risk −Σ_k S_k (members averaged), not a class; the report shows each fold's
    c-index with its bootstrap interval."""
    import pandas as pd

    from wsimil.config import load_config
    from wsimil.data.synthetic import make_digit_bags, write_bags
    from wsimil.evaluation.survival import risk_from_logits
    from wsimil.features.store import FeatureStore
    from wsimil.methods.trainer import run_training
    from wsimil.predict.pipeline import predict_features
    from wsimil.report import build_report

    m = write_bags(make_digit_bags(16, seed=2), tmp_path / "c")
    df = pd.read_csv(m)
    df["time"], df["event"] = np.arange(len(df)) + 1.0, np.arange(len(df)) % 2
    df.to_csv(m, index=False)
    cfg = load_config(model="mean", folds=2, epochs=1, task="survival", bootstrap=20, val_fraction=0.0)
    run_training(cfg, tmp_path / "c" / "features", m, tmp_path / "run")
    b = load_bundle(bundle_from_run(tmp_path / "run"))
    predict_features(b, tmp_path / "c" / "features", tmp_path / "p", device="cpu")
    pred = pd.read_csv(tmp_path / "p" / "predictions.csv", dtype={"slide_id": str})
    assert list(pred.columns) == ["slide_id", "risk"]
    x = torch.from_numpy(FeatureStore(tmp_path / "c" / "features").read(pred["slide_id"][0]).features)[None]
    risks = [risk_from_logits(mod(s(x)).logits.detach().numpy())[0] for mod, s in b.load_models()]
    assert pred["risk"][0] == pytest.approx(np.mean(risks), abs=1e-5)
    text = build_report(tmp_path / "run", max_heatmaps=0).read_text()
    f0 = json.loads((tmp_path / "run" / "results.json").read_text())["folds"][0]
    ci = f0["ci"]["c_index"]
    assert f"{f0['metrics']['c_index']:.3f} <span class='sub'>[{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]" in text
    assert '<th class="">risk</th>' in text and "ROC" not in text


def test_predict_names_the_bundle_with_bundle_and_keeps_model_as_a_deprecated_alias(digit_run, tmp_path):
    from typer.testing import CliRunner

    from wsimil.cli import app

    run, feats = digit_run
    runner = CliRunner()
    args = ["--features", str(feats), "--device", "cpu"]
    res = runner.invoke(app, ["predict", "--bundle", str(run), *args, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0 and "deprecated" not in res.output, res.output
    res = runner.invoke(app, ["predict", "--model", str(run), *args, "--out", str(tmp_path / "b")])
    assert res.exit_code == 0 and "--model is deprecated here" in res.output and "use --bundle" in res.output
    assert (tmp_path / "a" / "predictions.csv").read_text() == (tmp_path / "b" / "predictions.csv").read_text()
    res = runner.invoke(
        app, ["predict", "--bundle", str(run), "--model", str(run), *args, "--out", str(tmp_path / "c")]
    )
    assert res.exit_code == 2 and "give --bundle once" in res.output
    res = runner.invoke(app, ["predict", *args, "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "missing option --bundle" in res.output
    for command in ("predict", "heatmap"):  # the alias is hidden from help
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--bundle" in text and "--model" not in text
