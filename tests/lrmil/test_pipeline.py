"""``wsimil lrmil`` end to end on tiny slides: outputs, fold policy, resume, ablations, the 5×-only bundle."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from wsimil.checkpoint import load_checkpoint
from wsimil.cli import app

CONFIG = {
    "teacher": {"epochs": 3, "min_epochs": 1, "patience": 2, "model_kwargs": {"hidden_dims": [32], "attn_dim": 16}},
    "student": {"epochs": 3, "min_epochs": 1, "patience": 2, "model_kwargs": {"hidden_dims": [32], "attn_dim": 16}},
    "stage1": {"epochs": 2, "batch_size": 8, "lr": 1e-3},
    "bootstrap": 0,
    "batch_size": 128,
}


def lrmil_cli(job, manifest, out, cfg_path, *extra) -> dict:
    args = ["lrmil", "--job", str(job), "--manifest", str(manifest), "--out", str(out), "--config", str(cfg_path)]
    args += ["--encoder", "lrmil_test_resnet", "--folds", "2", "--device", "cpu", "--timing-slides", "1", *extra]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def run(tiny_job, test_encoder, tmp_path_factory):
    job, manifest = tiny_job
    root = tmp_path_factory.mktemp("lrmil_run")
    cfg_path = root / "lrmil.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    out = root / "run"
    res = lrmil_cli(job, manifest, out, cfg_path)
    return {"job": job, "manifest": manifest, "out": out, "cfg": cfg_path, "res": res}


def folds_of(out) -> list[tuple[int, list[str], list[str]]]:
    df = pd.read_csv(out / "splits" / "all.tsv", sep="\t")
    cols = [c for c in df.columns if c.startswith("fold_")]
    return [(int(c[5:]), list(df.slide_id[df[c] == "train"]), list(df.slide_id[df[c] == "test"])) for c in cols]


def test_results_report_three_models_and_both_paths(run):
    res, out = run["res"], run["out"]
    assert set(res["metrics"]) == {"teacher_hr", "baseline_lr", "student_lr"}
    for m in res["metrics"].values():
        assert {"auc", "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted"} <= set(m)
        assert set(m["accuracy"]) == {"mean", "std"}
    assert all(len(f) == 2 for f in res["folds"].values())
    sp = res["seconds_per_slide"]
    assert sp["n_slides"] == 1 and sp["hr"] > 0 and sp["lr"] > 0
    assert sp["patches_per_slide"]["hr"] > 4 * sp["patches_per_slide"]["lr"]  # 16 HR cells per LR cell
    assert res["ablations"] == {"stage1": True, "bag_kd": True, "attention_kd": True, "instance_loss": True}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["stage1"]["layers"] == [0, 1, 3] and cfg["stage1"]["input_size"] == 64 and cfg["patch_size"] == 64
    hist = pd.read_csv(out / "student" / "history.csv")
    assert {"train_ce", "train_bag_kd", "train_attn_kd", "train_instance", "val_auc"} <= set(hist.columns)
    preds = pd.read_csv(out / "student" / "predictions.csv")
    assert sorted(preds.slide_id) == sorted(pd.read_csv(run["manifest"]).slide_id)


def test_baseline_sees_lr_patches_at_the_student_input_size(run):
    """The undistilled LR features (baseline, no-stage-1 ablation) come from the teacher's weights at the student's
    input size (64 px here, the teacher's native size is 32), i.e. from E_S before stage 1: they differ from the
    student only by distillation."""
    import torch

    from wsimil.features.extract import EncodeSettings, encode_grid, final_fn
    from wsimil.lrmil.config import LRMILConfig
    from wsimil.lrmil.job import LRMILJob
    from wsimil.lrmil.pipeline import build_teacher_encoder
    from wsimil.lrmil.taps import make_student

    with h5py.File(run["out"] / "features" / "lr_teacher" / "synth_0000.h5", "r") as f:
        got = f["features"][()]
        attrs = dict(f["features"].attrs)
    assert attrs["encoder"] == "lrmil_test_resnet@64px" and int(attrs["lrmil_input_size"]) == 64
    teacher = build_teacher_encoder(LRMILConfig(encoder="lrmil_test_resnet"))
    grid = LRMILJob(run["job"]).grid("synth_0000", 5.0)
    with torch.no_grad():
        at64 = encode_grid(final_fn(make_student(teacher, 64)), grid, EncodeSettings())["features"]
        at32 = encode_grid(final_fn(teacher), grid, EncodeSettings())["features"]
    assert np.allclose(got, at64, atol=1e-5) and not np.allclose(got, at32, atol=1e-3)


def test_hr_features_carry_summary_tokens(run):
    with h5py.File(run["out"] / "features" / "hr" / "synth_0000.h5", "r") as f:
        n = f["features"].shape[0]
        assert f["features"].shape == (n, 96) and n > 40
        assert [f[f"summary/block{i}"].shape for i in (0, 1, 3)] == [(n, 32), (n, 32), (n, 192)]
        assert f["instance_labels"].shape == (n,)


def test_teacher_dump_has_raw_and_softmax_attention(run):
    with h5py.File(run["out"] / "teacher" / "dump" / "fold0.h5", "r") as f:
        assert len(f) == 6
        g = f["synth_0000"]
        e, a = g["attention_logits"][()], g["attention"][()]
        assert g["logits"].shape == (2,)
        assert np.allclose(a, np.exp(e - e.max()) / np.exp(e - e.max()).sum(), atol=1e-6)
        assert a.sum() == pytest.approx(1.0, abs=1e-5) and np.ptp(e) > 0


def test_no_test_slide_reaches_its_own_fold(run):
    out = run["out"]
    for k, train, test in folds_of(out):
        assert not set(train) & set(test)
        ck = load_checkpoint(out / "stage1" / f"fold{k}" / "encoder.safetensors")
        assert sorted(ck["slides"]) == sorted(train)  # stage 1 saw only the fold's training slides
        for run_dir, fold in ((out / "teacher", k), (out / "student" / f"fold{k}", k)):
            res = json.loads((run_dir / "results.json").read_text())
            f = next(f for f in res["folds"] if f["fold"] == fold)
            assert f["n_test"] == len(test) and f["n_train"] == len(train)
        preds = pd.read_csv(out / "student" / f"fold{k}" / "predictions.csv")
        assert sorted(preds.slide_id) == sorted(test)


def test_rerun_reuses_every_step(run):
    out = run["out"]
    files = [
        out / "features" / "hr" / "synth_0001.h5",
        out / "teacher" / "checkpoints" / "repeat0_fold0.safetensors",
        out / "teacher" / "dump" / "fold1.h5",
        out / "stage1" / "fold0" / "encoder.safetensors",
        out / "features" / "lr_student_fold1" / "synth_0002.h5",
        out / "student" / "fold1" / "checkpoints" / "repeat0_fold1.safetensors",
        out / "timing.json",
    ]
    before = [p.stat().st_mtime_ns for p in files]
    res = lrmil_cli(run["job"], run["manifest"], out, run["cfg"])
    assert [p.stat().st_mtime_ns for p in files] == before
    assert res["metrics"] == run["res"]["metrics"]


def test_ablation_flags_reuse_the_shared_steps(run, tmp_path):
    out = tmp_path / "ablation"
    flags = ["--shared", str(run["out"]), "--no-stage1", "--no-bag-kd", "--no-attn-kd", "--no-instance-loss"]
    res = lrmil_cli(run["job"], run["manifest"], out, run["cfg"], *flags)
    assert res["ablations"] == {"stage1": False, "bag_kd": False, "attention_kd": False, "instance_loss": False}
    assert not (out / "features").exists() and not (out / "stage1").exists()
    hist = pd.read_csv(out / "student" / "history.csv")
    assert np.allclose(hist.train_loss, hist.train_ce)  # every other term has weight 0 (but is still logged)
    assert (hist.train_attn_kd > 0).any()
    ck = load_checkpoint(out / "student" / "fold0" / "checkpoints" / "repeat0_fold0.safetensors")
    assert "lr_teacher" in json.loads((out / "student" / "fold0" / "results.json").read_text())["config"]["features"]
    assert ck["method_kwargs"]["lambda_bag"] == 0.0
    assert res["metrics"]["teacher_hr"] == run["res"]["metrics"]["teacher_hr"]
    # its bundle (no distilled encoder) encodes at the size the student was trained on, so it reproduces the student
    from wsimil.lrmil.job import LRMILJob
    from wsimil.predict.pipeline import predict_slides

    k, _, test = folds_of(run["out"])[0]  # the shared run holds the splits
    predict_slides(out, [LRMILJob(run["job"]).spec(test[0])], tmp_path / "p", device="cpu", folds=[k])
    got = pd.read_csv(tmp_path / "p" / "predictions.csv")
    want = pd.read_csv(out / "student" / f"fold{k}" / "predictions.csv").set_index("slide_id")
    assert got.prob_1[0] == pytest.approx(want.loc[test[0], "prob_1"], abs=1e-4)


def test_bundle_predicts_from_5x_only(run, monkeypatch, tmp_path):
    """The saved LR pipeline reproduces the student's test predictions while never reading a level finer than 5x
    needs (the slides are 20x scans: level 0 is 0.5 µm/px, level 1 is 2 µm/px)."""
    from wsimil.lrmil.job import LRMILJob
    from wsimil.predict.bundle import load_bundle
    from wsimil.predict.pipeline import predict_slides
    from wsimil.slide import reader

    out = run["out"]
    reads: list[float] = []
    for cls in (reader.OpenSlideReader, reader.TiffSlideReader):
        orig = cls._read

        def spy(self, x, y, level, w, h, _orig=orig):
            reads.append(self.level_mpp(level))
            return _orig(self, x, y, level, w, h)

        monkeypatch.setattr(cls, "_read", spy)
    k, _, test = folds_of(out)[0]
    job = LRMILJob(run["job"])
    bundle = load_bundle(out)
    assert bundle.classes == ["0", "1"] and [m.fold for m in bundle.members] == [0, 1]
    assert all(m.encoder is not None and m.encoder.distilled for m in bundle.members)  # each fold's own encoder
    slides = tmp_path / "slides.csv"
    pd.DataFrame({"slide_id": test, "path": [job.slides[s]["path"] for s in test]}).to_csv(slides, index=False)
    pred = tmp_path / "pred"
    args = ["predict", "--bundle", str(out / "bundle"), "--slides", str(slides), "--out", str(pred)]
    res = CliRunner().invoke(app, [*args, "--fold", str(k), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    got = pd.read_csv(pred / "predictions.csv").set_index("slide_id")
    assert (pd.read_csv(pred / "status.csv").status == "ok").all()
    assert set(got.predicted.astype(str)) <= {"0", "1"} and (got.n_patches > 0).all()
    from wsimil.predict.score import read_scores

    sc = read_scores(pred / "scores" / f"{test[0]}.h5")  # 5x attention over the slide's 5x patches, for heatmaps
    assert sc["maps"]["attention"].shape == (got.loc[test[0], "n_patches"],)
    assert sc["maps"]["attention"].sum() == pytest.approx(1.0, abs=1e-4)
    assert len(sc["coords"]) == got.loc[test[0], "n_patches"] and sc["attrs"]["patch_size_level0"] > 0
    assert reads and min(reads) == pytest.approx(2.0)  # only the 2 µm/px level (and the thumbnail) was read
    want = pd.read_csv(out / "student" / f"fold{k}" / "predictions.csv").set_index("slide_id")
    assert np.allclose(got.loc[test, "prob_1"], want.loc[test, "prob_1"], atol=1e-4)

    # every fold: the mean of the fold pipelines
    def prob_1(name, folds=None):
        predict_slides(bundle, [job.spec(test[0])], tmp_path / name, device="cpu", folds=folds)
        return pd.read_csv(tmp_path / name / "predictions.csv").prob_1[0]

    one = [prob_1(f"fold{f}", [f]) for f in (0, 1)]
    assert prob_1("both") == pytest.approx(np.mean(one), abs=1e-6)
    # the instrument does see 20x reads when they happen
    reads.clear()
    from wsimil.features.extract import EncodeSettings, encode_grid, final_fn
    from wsimil.lrmil.config import LRMILConfig
    from wsimil.lrmil.pipeline import build_teacher_encoder

    enc = build_teacher_encoder(LRMILConfig(encoder="lrmil_test_resnet"))
    encode_grid(final_fn(enc), job.grid(test[0], 20.0), EncodeSettings())
    assert min(reads) == pytest.approx(0.5)


def test_predict_lrmil_bundle_isolates_a_bad_slide(run, tmp_path):
    """`wsimil predict` with an LRMIL bundle: a broken slide fails alone (exit 1, listed in status.csv), the good one
    is predicted; a feature folder is refused (each fold has its own encoder); an unknown fold is named."""
    from wsimil.lrmil.job import LRMILJob

    out = run["out"]
    k, _, test = folds_of(out)[0]
    job = LRMILJob(run["job"])
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide")
    slides = tmp_path / "slides.csv"
    pd.DataFrame({"slide_id": [test[0], "broken"], "path": [job.slides[test[0]]["path"], str(bad)]}).to_csv(
        slides, index=False
    )
    pred = tmp_path / "pred"
    base = ["predict", "--bundle", str(out), "--device", "cpu", "--fold", str(k)]
    res = CliRunner().invoke(app, [*base, "--slides", str(slides), "--out", str(pred)])
    assert res.exit_code == 1, res.output
    st = pd.read_csv(pred / "status.csv").set_index("slide_id")
    assert st.loc[test[0], "status"] == "ok" and st.loc["broken", "status"] == "failed"
    assert "broken" in st.loc["broken", "error"] or "slide" in st.loc["broken", "error"]
    assert list(pd.read_csv(pred / "predictions.csv").slide_id) == [test[0]]
    res = CliRunner().invoke(app, [*base, "--features", str(out / "features" / "lr_teacher"), "--out", str(pred)])
    assert res.exit_code != 0 and "LRMIL bundle" in res.output
    res = CliRunner().invoke(app, [*base[:-1], "7", "--slides", str(slides), "--out", str(tmp_path / "p2")])
    assert res.exit_code != 0 and "no fold 7" in res.output


def test_stage1_keeps_the_teacher_frozen(run):
    from wsimil.lrmil.config import LRMILConfig
    from wsimil.lrmil.job import LRMILJob
    from wsimil.lrmil.pipeline import build_teacher_encoder
    from wsimil.lrmil.stage1 import Stage1Patches, Stage1Settings, train_stage1

    out = run["out"]
    k, train, _ = folds_of(out)[0]
    teacher = build_teacher_encoder(LRMILConfig(encoder="lrmil_test_resnet"))
    before = {n: p.detach().clone() for n, p in teacher.model.state_dict().items()}
    data = Stage1Patches(LRMILJob(run["job"]), train, out / "features" / "hr", out / "teacher" / "dump" / "fold0.h5",
                         (0, 1, 3))  # fmt: skip
    patch, mask, final, summaries, alpha = data[0]
    assert patch.shape == (64, 64, 3) and mask.shape == (16,) and final.shape == (16, 96)
    assert [s.shape for s in summaries] == [(16, 32), (16, 32), (16, 192)]
    assert torch.all(final[~mask] == 0) and alpha[mask].sum() > 0
    st = Stage1Settings(steps=6, lr=1e-3, input_size=64, norm_stats="teacher", eval_every=3, batch_size=4)
    held = Stage1Patches(LRMILJob(run["job"]), train[:1], out / "features" / "hr",
                         out / "teacher" / "dump" / "fold0.h5", (0, 1, 3))  # fmt: skip
    student, adapters, history = train_stage1(teacher, data, st, 4, val_data=held)
    assert len(adapters) == 0  # same architecture: no adapters
    # one row per optimiser step with every loss term; evaluation rows on the held-out pairs; one kept step
    assert [r["step"] for r in history] == list(range(6))
    assert all({"loss", "layer", "attn", "lr"} <= set(r) for r in history)
    assert [r["step"] for r in history if "val_loss" in r] == [2, 5]
    assert sum(r["best"] for r in history) == 1 and history[0]["selected_on"] == "val_loss"
    assert history[0]["lr"] < history[1]["lr"] or history[0]["lr"] == st.lr  # warm-up, then cosine decay
    assert history[-1]["lr"] < st.lr
    after = teacher.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    state = student.model.state_dict()
    moved = [n for n, v in state.items() if v.is_floating_point() and not torch.equal(v, before[n])]
    assert any(state[n].dim() == 4 for n in moved)  # the student did learn (a convolution kernel moved)
    stats = [n for n in state if n.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(state[n], before[n]) for n in stats)  # batch-norm statistics stay the teacher's


def test_stage1_reestimates_batch_norm_on_lr_patches(run):
    from wsimil.lrmil.config import LRMILConfig
    from wsimil.lrmil.job import LRMILJob
    from wsimil.lrmil.pipeline import build_teacher_encoder
    from wsimil.lrmil.stage1 import Stage1Patches, reestimate_norm_statistics
    from wsimil.lrmil.taps import make_student

    out = run["out"]
    _, train, _ = folds_of(out)[0]
    teacher = build_teacher_encoder(LRMILConfig(encoder="lrmil_test_resnet"))
    data = Stage1Patches(LRMILJob(run["job"]), train, out / "features" / "hr", out / "teacher" / "dump" / "fold0.h5",
                         (0, 1, 3))  # fmt: skip
    student = make_student(teacher, 64)
    bn = next(m for m in student.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    loader = torch.utils.data.DataLoader(data, batch_size=len(data))
    assert reestimate_norm_statistics(student, loader, "cpu") == len(data)
    assert not torch.allclose(bn.running_mean, before) and not bn.training
    # the first layer's statistics are now those of the LR patches' first-layer activations
    patch = next(iter(loader))[0]
    net = student.model
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        act = first(student.preprocess(patch))
    first_bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    torch.testing.assert_close(first_bn.running_mean, act.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_augmentation_moves_children_with_the_patch():
    """Child j = b*f + a sits at row b, column a: after any flip/rotation, the child whose block holds a given
    image corner still carries that corner's targets."""
    from wsimil.lrmil.stage1 import augment_pairs

    f, size = 4, 8
    block = size // f
    img = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    for j in range(f * f):
        b, a = divmod(j, f)
        img[0, b * block : (b + 1) * block, a * block : (a + 1) * block] = 50 + 10 * j  # each block: its id
    ids = torch.arange(f * f, dtype=torch.float32)[None]
    mask = torch.ones(1, f * f, dtype=torch.bool)
    final = ids[..., None].repeat(1, 1, 3)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        pimg, pmask, pfinal, (psum,), palpha = augment_pairs(img, mask, final, [final.clone()], ids.clone(), f, gen)
        means = torch.stack([
            pimg[0, b * block : (b + 1) * block, a * block : (a + 1) * block].float().mean()
            for b, a in (divmod(j, f) for j in range(f * f))
        ])  # fmt: skip
        # brightness/contrast is one increasing map per patch (no clipping in 30..220): the order of the blocks'
        # values is the order of the ids of the children now at those positions
        assert torch.equal(torch.argsort(means), torch.argsort(pfinal[0, :, 0]))
        assert torch.equal(palpha[0], pfinal[0, :, 0]) and torch.equal(psum[0, :, 0], pfinal[0, :, 0])
        assert pmask.all()
        seen.add(tuple(pfinal[0, :, 0].int().tolist()))
    assert len(seen) == 8  # all eight flips/rotations occur


def test_stage1_slides_never_include_the_folds_test_slides_unless_asked():
    from wsimil.data.splits import Split
    from wsimil.lrmil.pipeline import stage1_slides

    sp = Split(0, 1, ["a", "b", "c"], ["v"], ["t1", "t2"])
    distil, held = stage1_slides(sp, 0, extra=["u1", "t1", "v", "u2"])
    assert distil == ["a", "b", "c", "u1", "u2"] and held == ["v"]  # no test slide, the held-out one not twice
    distil, _ = stage1_slides(sp, 0, extra=["u1", "t1"], use_test=True)
    assert distil == ["a", "b", "c", "u1", "t1"]
    no_val = Split(0, 0, [f"s{i}" for i in range(20)], [], ["t"])
    distil, held = stage1_slides(no_val, 3)
    assert len(held) == 3 and not set(held) & set(distil) and len(distil) == 17  # 15% held out for selection
    assert stage1_slides(no_val, 3) == (distil, held)  # deterministic


def test_unlabelled_stage1_slides_must_be_tiled(run, tmp_path):
    from wsimil.errors import WsimilError
    from wsimil.lrmil.job import LRMILJob
    from wsimil.lrmil.pipeline import unlabelled_slides

    j = LRMILJob(run["job"])
    ids = list(pd.read_csv(run["manifest"]).slide_id)
    table = tmp_path / "more.csv"
    pd.DataFrame({"slide_id": ids[:2] + ["not_tiled"]}).to_csv(table, index=False)
    with pytest.raises(WsimilError, match="not_tiled.*\n.*wsimil tile --slides"):
        unlabelled_slides(str(table), j, ids)
    pd.DataFrame({"slide_id": ids[:2]}).to_csv(table, index=False)
    assert unlabelled_slides(str(table), j, ids[2:]) == ids[:2]  # slides outside the manifest
    assert unlabelled_slides(str(table), j, ids) == []  # already labelled: nothing extra
    with pytest.raises(WsimilError, match="neither a slide folder nor a CSV"):
        unlabelled_slides(str(tmp_path / "nope.txt"), j, ids)


def test_threads_saved_and_other_threads_reuse_every_step(run):
    out = run["out"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["threads"] == "auto" and cfg["threads_resolved"]["work"] == "encode"
    ckpt = out / "student" / "fold0" / "checkpoints" / "repeat0_fold0.safetensors"
    before = ckpt.stat().st_mtime_ns
    try:
        lrmil_cli(run["job"], run["manifest"], out, run["cfg"], "--threads", "2")
    finally:
        torch.set_num_threads(1)  # as the module's other tests run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["threads"] == 2 and cfg["threads_resolved"]["threads"] == 2
    assert ckpt.stat().st_mtime_ns == before  # thread counts are not part of any step's key
    teacher = yaml.safe_load((out / "teacher" / "config.yaml").read_text())
    assert teacher["threads_resolved"] == {**teacher["threads_resolved"], "threads": 2, "work": "mil"}
