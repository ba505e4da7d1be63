"""End to end on a tiny synthetic cohort: train → bundle → ``wsimil predict`` (synthetic and real slides) →
``wsimil heatmap`` → ``wsimil report``, and the report in headless Chromium."""

import base64
import json
import re
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import shared_data
from wsimil.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    """4 synthetic slides (2 with tumour) tiled at 20x, ResNet-18 (seeded random) features, 2-fold ABMIL."""
    from wsimil.config import load_config
    from wsimil.features.extract import ExtractSettings, features_dir, run_extraction
    from wsimil.methods.trainer import run_training
    from wsimil.predict.write import bundle_from_run
    from wsimil.slide.job import TileSettings, run_tiling
    from wsimil.slide.synth import make_cohort

    d = tmp_path_factory.mktemp("e2e")
    make_cohort(d / "cohort", 4, 0, 2560, 2048)
    run_tiling(d / "cohort" / "manifest.csv", d / "job", TileSettings(mags=[20]))
    st = ExtractSettings(mag=20, encoder="resnet18", batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run_extraction(d / "job", st)
    cfg = load_config(model="abmil", folds=2, epochs=3, val_fraction=0.0, bootstrap=50, model_kwargs={"attn_dim": 32})
    feats = features_dir(d / "job", st, 256)
    run_training(cfg, feats, d / "cohort" / "manifest.csv", d / "run")
    bundle_from_run(d / "run")  # as `wsimil train` does
    return d, feats


def test_bundle_records_slide_settings(synth_run):
    from wsimil.predict.bundle import load_bundle

    d, _ = synth_run
    b = load_bundle(d / "run" / "bundle")
    assert b.scores_slides and b.encoder.name == "resnet18" and b.encoder.weights is None and b.encoder.seed == 0
    assert b.tiling.mag == 20.0 and b.tiling.patch_size == 256


def test_predict_matches_training_features_and_reports_bad_slides(synth_run, tmp_path):
    """Predicting a training slide from its file recomputes the same tiles and features, so the probabilities equal
    the ensemble applied to the training features; a truncated slide fails alone (exit 1, listed in status.csv)."""
    from wsimil.features.store import FeatureStore
    from wsimil.predict.bundle import load_bundle

    d, feats = synth_run
    good = d / "cohort" / "slides" / "synth_0000.svs"
    bad = tmp_path / "broken.svs"
    bad.write_bytes(good.read_bytes()[:5000])
    mask = d / "cohort" / "masks" / "synth_0000_tumor.png"
    pd.DataFrame({"path": [str(good), str(bad)], "label": ["0", "1"], "tumor_mask": [str(mask), ""]}).to_csv(
        tmp_path / "slides.csv", index=False
    )
    args = ["predict", "--bundle", str(d / "run" / "bundle"), "--slides", str(tmp_path / "slides.csv")]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "p"), "--device", "cpu"])
    assert res.exit_code == 1, res.output
    assert "failed broken" in res.output.replace("\n", " ")
    status = pd.read_csv(tmp_path / "p" / "status.csv").set_index("slide_id")
    assert status.loc["synth_0000", "status"] == "ok" and status.loc["broken", "stage"] == "tile"
    pred = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert pred["slide_id"].tolist() == ["synth_0000"]

    b = load_bundle(d / "run" / "bundle")
    bag = FeatureStore(feats).read("synth_0000")
    x = torch.from_numpy(bag.features)[None]
    want = torch.stack([torch.softmax(m(s(x)).logits, -1)[0] for m, s in b.load_models()]).mean(0).detach().numpy()
    np.testing.assert_allclose(pred[["prob_0", "prob_1"]].to_numpy()[0], want, atol=1e-4)
    from wsimil.predict.score import read_scores

    sc = read_scores(tmp_path / "p" / "scores" / "synth_0000.h5")
    assert sc["coords"].tolist() == bag.coords.tolist() and abs(sc["maps"]["attention"].sum() - 1) < 1e-4

    # heatmaps of the predictions find the label and the tumour mask in the prediction's job table
    from wsimil.viz.heatmap import heatmaps_for_predictions, slide_truth

    truth = slide_truth(tmp_path / "p" / "job" / "slides.csv")["synth_0000"]
    assert truth["label"] == "0" and truth["tumor_mask"] == str(mask)
    pngs, failed = heatmaps_for_predictions(tmp_path / "p", tmp_path / "h", size=400, k=2)
    assert [p.name for p in pngs] == ["synth_0000__attention.png", "synth_0000__evidence-1.png"] and not failed

    # a second run reuses the cached tiles and features
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "p"), "--device", "cpu"])
    assert res.exit_code == 1
    ext = pd.read_csv(next((tmp_path / "p" / "job").glob("20x_*/features_resnet18/status.csv"))).set_index("slide_id")
    assert ext.loc["synth_0000", "status"] == "skipped"


def test_predict_real_svs_and_heatmap(synth_run, tmp_path):
    svs = shared_data("slides", "cmu_small_region.svs")
    d, _ = synth_run
    res = runner.invoke(
        app,
        ["predict", "--bundle", str(d / "run" / "bundle"), "--slides", str(svs), "--out", str(tmp_path / "p"),
         "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    pred = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert pred["slide_id"].tolist() == ["cmu_small_region"] and pred["predicted"].astype(str).isin(["0", "1"]).all()
    assert abs(pred["prob_0"].iloc[0] + pred["prob_1"].iloc[0] - 1) < 1e-5
    from wsimil.predict.score import read_scores

    sc = read_scores(tmp_path / "p" / "scores" / "cmu_small_region.h5")
    n = len(sc["coords"])
    # 2220×2967 px at 0.499 µm/px: at most 8×11 cells of 256 px at 0.5 µm/px, most of them tissue
    assert 20 <= n <= 88 and sc["coords"][:, 0].max() < 2220 and sc["coords"][:, 1].max() < 2967

    res = runner.invoke(
        app, ["heatmap", "--predictions", str(tmp_path / "p"), "--out", str(tmp_path / "h"), "--size", "700"]
    )
    assert res.exit_code == 0, res.output
    from PIL import Image

    png = Image.open(tmp_path / "h" / "cmu_small_region__attention.png")
    assert png.size[0] == 700 and png.size[1] > 700  # portrait slide + strip


def test_heatmap_of_a_run(synth_run, tmp_path):
    d, _ = synth_run
    res = runner.invoke(app, ["heatmap", "--run", str(d / "run"), "--out", str(tmp_path), "--size", "400"])
    assert res.exit_code == 0, res.output
    want = [f"synth_000{i}__{m}.png" for i in range(4) for m in ("attention", "evidence-1")]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == want  # ABMIL: attention and patch evidence
    res = runner.invoke(app, ["heatmap", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "exactly one of --bundle" in res.output


def _report(synth_run):
    d, _ = synth_run
    out = d / "run" / "report.html"
    if not out.is_file():
        res = runner.invoke(app, ["report", str(d / "run"), "--heatmap-size", "600"])
        assert res.exit_code == 0, res.output
    return out


def test_report_contents(synth_run):
    d, _ = synth_run
    text = _report(synth_run).read_text()
    res = json.loads((d / "run" / "results.json").read_text())
    # 2-slide folds (and 4 slides pooled) are too small for a bootstrap CI: the report says so instead of [1, 1]
    ci = res["folds"][1]["ci"]["accuracy"]
    assert ci["too_small"] and ci["ci_low"] is None
    assert text.count("<span class='sub'>n/a (fold too small)</span></td></tr>") == 2  # one per fold row
    assert "<h3>Pooled out-of-fold" in text and res["pooled"][0]["n"] == 4
    assert "<span class='sub'>n/a (too few slides)</span>" in text
    auc = res["metrics"]["auc"]
    assert f"{auc['mean']:.3f} ± {auc['std']:.3f}" in text
    for section in ("Out-of-fold predictions", "Training curves", "Per-slide predictions", "Configuration"):
        assert f"<h2>{section}" in text
    for alt in ("ROC curves", "precision-recall curves", "confusion matrix", "calibration", "heatmap synth_0003",
                "heatmap synth_0003 evidence"):  # fmt: skip
        assert f'alt="{alt}"' in text
    imgs = re.findall(r'src="data:image/(png|jpeg);base64,([^"]+)"', text)
    assert len(imgs) == 4 + 1 + 8  # ROC, PR, confusion, calibration; training curves; 2 heatmaps per slide
    for kind, data in imgs:
        raw = base64.b64decode(data)
        assert raw[:4] == (b"\x89PNG" if kind == "png" else b"\xff\xd8\xff\xe0")
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained


def test_report_lrmil_comparison_and_heads(synth_run, tmp_path):
    """An LRMIL run as `wsimil lrmil` writes it: metrics and folds per arm, seconds per slide of both paths, the LR
    student's run folder for curves and slides."""
    d, _ = synth_run
    run = tmp_path / "lrmil"
    shutil.copytree(d / "run", run / "student")
    plain = json.loads((d / "run" / "results.json").read_text())
    auc = {"teacher_hr": (0.951, 0.011), "baseline_lr": (0.702, 0.05), "student_lr": (0.903, 0.021)}
    res = {
        "metrics": {k: {"auc": {"mean": m, "std": s}} for k, (m, s) in auc.items()},
        "folds": {k: plain["folds"] for k in auc},
        "seconds_per_slide": {"hr": 12.5, "lr": 0.75, "speedup": 16.7, "patches_per_slide": {"hr": 900, "lr": 60}},
        "runs": {"teacher_hr": "teacher", "baseline_lr": "baseline_lr", "student_lr": "student"},
        "metrics_teacher": {"auc": {"mean": 0.812, "std": 0.004}},
    }
    (run / "results.json").write_text(json.dumps(res))
    from wsimil.report import build_report
    from wsimil.report.html import lrmil_arms

    text = build_report(run, max_heatmaps=0).read_text()
    assert "LRMIL: high vs. low resolution" in text and "<h2>Metrics" not in text
    for name, v in (("HR teacher (20×)", "0.951 ± 0.011"), ("LR student (5×)", "0.903 ± 0.021")):
        assert re.search(re.escape(name) + r"</td><td[^>]*>" + re.escape(v), text)
    assert "LR baseline (5×) per fold (95% CI)" in text
    assert "n/a (fold too small)" in text.split("LR baseline (5×) per fold (95% CI)")[1]
    assert "patches_per_slide / lr</td><td" in text and "12.500" in text and 'alt="seconds per slide"' in text
    assert "Head <code>teacher</code>" in text and "0.812 ± 0.004" in text
    assert 'alt="ROC curves"' in text and "synth_0003</td>" in text  # the student's out-of-fold predictions
    # the same arms given as top-level entries
    top = {k: {"metrics": v} for k, v in res["metrics"].items()}
    assert lrmil_arms(top)["student_lr"]["metrics"]["auc"]["mean"] == 0.903


def test_report_renders_in_headless_chromium(synth_run):
    from tests.browser import load_page

    path = _report(synth_run)
    page = load_page(path)
    assert page.console_errors == []
    n_img = len(re.findall(r"<img ", path.read_text()))
    assert len(page.images) == n_img == 13
    assert all(i["complete"] and i["width"] > 100 and i["height"] > 100 for i in page.images), page.images
    from io import BytesIO

    from PIL import Image

    shot = np.asarray(Image.open(BytesIO(page.screenshot)).convert("RGB"))
    assert shot.shape[1] >= 1200 and shot.shape[0] > 2000  # the whole page (less a scroll bar)
    assert shot.std() > 30 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000  # not blank: plots and slides
    assert page.title.startswith("wsimil report")


def test_predict_leaves_claimed_slides_to_other_workers(synth_run, tmp_path):
    """Two runs sharing OUT: a slide another run is tiling is neither encoded nor scored here (``claimed``), and each
    run's predictions are merged into one predictions.csv."""
    from wsimil.claims import try_claim

    d, _ = synth_run
    pd.DataFrame({"path": [str(d / "cohort" / "slides" / f"synth_000{i}.svs") for i in (0, 1)]}).to_csv(
        tmp_path / "slides.csv", index=False
    )
    out = tmp_path / "p"
    args = ["predict", "--bundle", str(d / "run" / "bundle"), "--slides", str(tmp_path / "slides.csv"), "--out",
            str(out), "--device", "cpu"]  # fmt: skip
    with try_claim(out / "job", "synth_0001"):  # another worker tiles synth_0001
        res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Predicted 1, skipped 0 (already done), left 1 to other workers, failed 0" in res.output
    status = pd.read_csv(out / "status.csv").set_index("slide_id")
    assert status.loc["synth_0001", "status"] == "claimed" and status.loc["synth_0001", "stage"] == "tile"
    assert pd.read_csv(out / "predictions.csv")["slide_id"].tolist() == ["synth_0000"]
    assert not next((out / "job").glob("20x_*/features_resnet18")).joinpath("synth_0001.h5").exists()
    first = pd.read_csv(out / "predictions.csv").iloc[0]

    with try_claim(out, "synth_0000"):  # now synth_0000 is being scored elsewhere: this run does synth_0001
        res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Predicted 1, skipped 0 (already done), left 1 to other workers" in res.output
    status = pd.read_csv(out / "status.csv").set_index("slide_id")  # the rows on disk are kept for claimed slides
    assert status.status.to_dict() == {"synth_0000": "ok", "synth_0001": "ok"}
    pred = pd.read_csv(out / "predictions.csv")
    assert pred["slide_id"].tolist() == ["synth_0000", "synth_0001"]  # the first run's row is kept
    assert pred.iloc[0]["prob_1"] == first["prob_1"]


def test_report_compares_runs_with_notes(synth_run, tmp_path):
    """A second run beside the first (the demo's 5× beside its 20×): one comparison row each, with the pooled
    out-of-fold AUC, then the other run's curves and heatmaps; notes under the title; per-slide heatmaps titled
    with probability, prediction and label."""
    d, _ = synth_run
    other = tmp_path / "other"
    shutil.copytree(d / "run", other)
    res = json.loads((other / "results.json").read_text())
    res["metrics"]["auc"] = {"mean": 0.123, "std": 0.045}
    res["pooled"] = [{"repeat": 0, "n": 40, "metrics": {"auc": {"value": 0.61, "ci_low": 0.42, "ci_high": 0.78}}}]
    (other / "results.json").write_text(json.dumps(res))
    from wsimil.report import build_report

    out = build_report(d / "run", tmp_path / "r.html", max_heatmaps=1, heatmap_size=400, label="20×",
                       compare={"5×": other}, notes=["the 5× result is low by design"])  # fmt: skip
    text = out.read_text()
    assert "<b>Note:</b> the 5× result is low by design" in text
    rows = re.findall(
        r"<tr><td class=\"l\">(20×|5×)</td><td[^>]*>(\d+)</td><td[^>]*>([^<]+)</td><td[^>]*>([^<]+)", text
    )
    assert [r[0] for r in rows] == ["20×", "5×"]
    assert rows[1][1:] == ("40", "0.123 ± 0.045", "0.610 ")
    assert "0.610 <span class='sub'>[0.420, 0.780]</span>" in text
    assert "<h2>5×: other</h2>" in text and text.count('alt="ROC curves"') == 2
    assert 'alt="heatmap synth_0000"' in text and text.count('alt="heatmap synth_0000"') == 2  # one per run
    with pytest.raises(Exception, match="not a finished wsimil run"):
        build_report(d / "run", tmp_path / "r2.html", max_heatmaps=0, compare={"x": tmp_path / "nothing"})
