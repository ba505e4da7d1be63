import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import shared_data
from wsimil.cli import app

runner = CliRunner()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("train", "evaluate", "convert", "demo", "models"):
        assert cmd in res.output


def test_models_command():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "transmil" in res.output.split()


def test_train_cli_and_user_errors(digit_cohort, tmp_path):
    feats, manifest = digit_cohort
    res = runner.invoke(
        app,
        [
            "train",
            "--features",
            str(feats),
            "--manifest",
            str(manifest),
            "--model",
            "mean",
            "--folds",
            "2",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "auc" in res.output and (tmp_path / "run" / "results.json").is_file()

    res = runner.invoke(
        app, ["train", "--features", str(tmp_path / "nope"), "--manifest", str(manifest), "--out", str(tmp_path / "r2")]
    )
    assert res.exit_code == 2
    assert "Error:" in res.output and "does not exist" in res.output and "Traceback" not in res.output

    res = runner.invoke(
        app,
        [
            "train",
            "--features",
            str(feats),
            "--manifest",
            str(manifest),
            "--model",
            "foo",
            "--out",
            str(tmp_path / "r3"),
        ],
    )
    assert res.exit_code == 2 and "unknown model 'foo'" in res.output


def test_convert_synthetic_mil_csv(tmp_path):
    rows = ["1,b1,0.5,1.0", "1,b1,0.1,2.0", "0,b2,0.3,0.0"]
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    res = runner.invoke(app, ["convert", "mil-csv", str(tmp_path / "x.csv"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    from wsimil.features.store import FeatureStore

    store = FeatureStore(tmp_path / "out" / "features")
    assert store.read("bag_b1").features.shape == (2, 2)
    (tmp_path / "bad.csv").write_text("2,b1,0.5\n")
    res = runner.invoke(app, ["convert", "mil-csv", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "row 1: bag label '2' is not 0/1" in res.output.replace("\n", " ")


def test_convert_detects_instance_label_column(tmp_path):
    rows = ["1,b1,1,0.5,1.0", "1,b1,0,0.1,2.0", "0,b2,0,0.3,0.0"]
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    from wsimil.data.mil_csv import read_mil_csv

    _, X, inst = read_mil_csv(tmp_path / "x.csv")
    assert X.shape == (3, 2) and inst.tolist() == [1, 0, 0]
    _, X, inst = read_mil_csv(tmp_path / "x.csv", instance_labels="no")
    assert X.shape == (3, 3) and inst is None


@pytest.mark.parametrize("name,n_bags,n_inst,dim", [("musk1", 92, 476, 166), ("elephant", 200, 1391, 230)])
def test_convert_shared_classic_sets(tmp_path, name, n_bags, n_inst, dim):
    csv = shared_data("mil", f"{name}.csv")
    res = runner.invoke(app, ["convert", "mil-csv", str(csv), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    from wsimil.data.manifest import load_cohort, read_manifest
    from wsimil.features.store import FeatureStore

    cohort = load_cohort(read_manifest(tmp_path / "manifest.csv"), FeatureStore(tmp_path / "features"))
    assert len(cohort.bags) == n_bags and cohort.in_dim == dim
    assert sum(len(b.features) for b in cohort.bags.values()) == n_inst


def test_classic_config_learns_musk1_quickly(tmp_path):
    """The classic protocol config on real MUSK1, cut to 2 folds and few epochs: it must learn something."""
    csv = shared_data("mil", "musk1.csv")
    runner.invoke(app, ["convert", "mil-csv", str(csv), "--out", str(tmp_path / "m")])
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "classic_mil.yaml"
    res = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(cfg),
            "--features",
            str(tmp_path / "m" / "features"),
            "--manifest",
            str(tmp_path / "m" / "manifest.csv"),
            "--folds",
            "3",
            "--repeats",
            "1",
            "--epochs",
            "15",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["config"]["standardize"] is True and r["config"]["val_fraction"] == 0.0
    assert r["metrics"]["accuracy"]["mean"] > 0.7


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--slides", "10", "--epochs", "5"])
    assert res.exit_code == 0, res.output
    for mag in ("20x", "5x"):
        r = json.loads((tmp_path / "d" / f"run_{mag}" / "results.json").read_text())
        assert r["metrics"]["auc"]["mean"] is not None and "instance_auc" in r["metrics"]
    assert (tmp_path / "d" / "job" / "links").is_dir() and (tmp_path / "d" / "job" / "qc").is_dir()
    assert str((tmp_path / "d" / "run_20x").resolve()) in res.output.replace("\n", "")
    # the demo ends with the 20x model's bundle and an HTML report, and prints where they are
    assert (tmp_path / "d" / "bundle" / "bundle.json").is_file() and (tmp_path / "d" / "report.html").is_file()
    assert str((tmp_path / "d" / "report.html").resolve()) in res.output.replace("\n", "")
    # the report shows both magnifications, and the demo says why 5x is low
    text = (tmp_path / "d" / "report.html").read_text()
    assert "<h2>Runs compared" in text and "<h2>ABMIL at 5×: run_5x</h2>" in text and "averages away" in text
    assert "near chance" in res.output


def test_feature_width_mismatch_message(tmp_path):
    from wsimil.features.store import write_bag

    for i, d in enumerate((4, 4, 4, 6)):
        write_bag(tmp_path / "f" / f"s{i}.h5", np.ones((2, d)))
    (tmp_path / "m.csv").write_text("case_id,slide_id,label\na,s0,0\nb,s1,1\nc,s2,0\nd,s3,1\n")
    res = runner.invoke(
        app,
        [
            "train",
            "--features",
            str(tmp_path / "f"),
            "--manifest",
            str(tmp_path / "m.csv"),
            "--out",
            str(tmp_path / "r"),
            "--folds",
            "2",
            "--val-fraction",
            "0",
        ],
    )
    assert res.exit_code == 2 and "feature dimension 6 in 1 slide(s) ('s3')" in res.output
