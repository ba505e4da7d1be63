"""Bundles written by wsimil before bundle format 3 — ordinary format-2 bundles and LRMIL ``lrmil.json`` bundles —
load through :func:`wsimil.predict.bundle.load_bundle` (upgraded in memory), predict exactly as the same models
written in the current format, and ``wsimil convert bundle`` rewrites them in the current format.

The old layouts are written here by small generators that reproduce, file for file and key for key, what
``wsimil.bundle.write_bundle`` and ``wsimil.lrmil.bundle.save_bundle`` wrote (wsimil at ``b1d419d``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from wsimil.checkpoint import load_checkpoint, save_checkpoint
from wsimil.cli import app
from wsimil.features.encoders import ENCODERS, EncoderSpec, create_encoder, register_encoder, sha256_file
from wsimil.predict.bundle import BUNDLE_FORMAT, load_bundle
from wsimil.predict.pipeline import predict_features, predict_slides
from wsimil.predict.write import bundle_from_distilled, bundle_from_run, upgrade_bundle

ENCODER = "predict_test_resnet"


# ---------------------------------------------------------------------- the old layouts, as the old code wrote them
def write_format2_bundle(out: Path, checkpoints: list[Path], config: dict, slide_settings_missing: str) -> Path:
    """A feature-only bundle exactly as ``wsimil.bundle.write_bundle`` (format 2) wrote it."""
    out.mkdir(parents=True)
    members = []
    first = None
    for i, c in enumerate(checkpoints):
        ck = load_checkpoint(c)
        first = first or ck
        r, k = int(ck.get("repeat", 0)), int(ck.get("fold", i))
        rel = f"aggregators/repeat{r}_fold{k}.safetensors"
        save_checkpoint(out / rel, {key: v for key, v in ck.items() if key != "history"})
        members.append({"file": rel, "repeat": r, "fold": k, "sha256": sha256_file(out / rel)})
    meta = {
        "format": "wsimil-bundle",
        "format_version": 2,
        "wsimil_version": "0.2.0",
        "task": first.get("task", "classification"),
        "classes": list(first["classes"]),
        "head_classes": {},
        "aggregator": {
            "model": first["model"],
            "model_kwargs": first.get("model_kwargs") or {},
            "method": first.get("method", "supervised"),
            "method_kwargs": first.get("method_kwargs") or {},
            "in_dim": int(first["in_dim"]),
        },
        "members": members,
        "encoder": None,
        "tiling": None,
        "slide_settings_missing": slide_settings_missing,
        "config": config,
    }
    (out / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def write_lrmil_format2_bundle(out: Path, folds, *, classes, encoder, seed, student_input, tiling, config) -> Path:
    """An LRMIL bundle exactly as ``wsimil.lrmil.bundle.save_bundle`` (format 2) wrote it: ``lrmil.json`` and per fold
    an ordinary format-2 bundle ``fold{k}/`` holding the student, beside ``fold{k}/lrmil_encoder.safetensors``."""
    entries = []
    for k, ckpt, enc_file in folds:
        d = out / f"fold{k}"
        msg = (f"an LRMIL student: score slides with `wsimil predict --model {out}` (fold {k}'s distilled encoder is "
               f"in {d.name}/lrmil_encoder.safetensors)")  # fmt: skip
        write_format2_bundle(d, [ckpt], config, msg)
        rel = sha = None
        if enc_file is not None:
            rel = f"fold{k}/lrmil_encoder.safetensors"
            shutil.copyfile(enc_file, out / rel)
            sha = sha256_file(out / rel)
        entries.append({"fold": k, "bundle": f"fold{k}", "encoder": rel, "encoder_sha256": sha})
    weights = None if encoder.weights.startswith("random(") else encoder.weights
    meta = {
        "format": "wsimil-lrmil-bundle",
        "format_version": 2,
        "wsimil_version": "0.2.0",
        "classes": list(classes),
        "encoder": {
            "name": encoder.name,
            "teacher_weights": encoder.weights,
            "weights": weights.removeprefix("hub:") if weights and weights.startswith("hub:") else weights,
            "hub": bool(weights and weights.startswith("hub:")),
            "weights_sha256": encoder.weights_sha256,
            "seed": seed,
            "input_size": student_input,
        },
        "tiling": {
            "mag": float(tiling.mags[0]),
            "patch_size": tiling.patch_size,
            "min_tissue": tiling.min_tissue,
            "tissue": tiling.tissue.to_dict(),
            "reader": tiling.reader,
        },
        "folds": entries,
    }
    (out / "lrmil.json").write_text(json.dumps(meta, indent=2))
    return out


# ---------------------------------------------------------------------- ordinary bundles
def _outputs(folder: Path) -> tuple[pd.DataFrame, dict]:
    pred = pd.read_csv(folder / "predictions.csv", dtype={"slide_id": str})
    maps = {}
    for p in sorted((folder / "scores").glob("*.h5")):
        with h5py.File(p, "r") as f:
            maps[p.stem] = (f["maps"][()], f["probs"][()], f["member_probs"][()])
    return pred, maps


def _same_outputs(a: Path, b: Path) -> None:
    pa, ma = _outputs(a)
    pb, mb = _outputs(b)
    pd.testing.assert_frame_equal(pa, pb)
    assert ma.keys() == mb.keys() and ma
    for k in ma:
        for x, y in zip(ma[k], mb[k], strict=True):
            np.testing.assert_array_equal(x, y)


def test_format2_bundle_loads_and_predicts_as_the_current_format(digit_abmil_run, tmp_path):
    run, feats, _ = digit_abmil_run
    new = bundle_from_run(run, tmp_path / "new")
    b_new = load_bundle(new)
    old = write_format2_bundle(tmp_path / "old", [new / m.file for m in b_new.members], b_new.config,
                               b_new.slide_settings_missing)  # fmt: skip
    b_old = load_bundle(old)
    assert b_new.format_version == BUNDLE_FORMAT == 3 and b_old.format_version == 2
    assert not b_old.member_encoders and [(m.repeat, m.fold) for m in b_old.members] == [(0, 0), (0, 1)]
    predict_features(old, feats, tmp_path / "p_old", device="cpu")
    predict_features(new, feats, tmp_path / "p_new", device="cpu")
    _same_outputs(tmp_path / "p_old", tmp_path / "p_new")
    # on disk: `wsimil convert bundle` writes the current format, which predicts the same
    res = CliRunner().invoke(app, ["convert", "bundle", str(old), "--out", str(tmp_path / "conv")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "conv" / "bundle.json").read_text())["format_version"] == BUNDLE_FORMAT
    predict_features(tmp_path / "conv", feats, tmp_path / "p_conv", device="cpu")
    _same_outputs(tmp_path / "p_old", tmp_path / "p_conv")


# ---------------------------------------------------------------------- LRMIL bundles
@pytest.fixture(scope="module")
def tiny_encoder():
    """A 0.4 M-parameter timm ResNet (96-d, 32-px input) registered for this module."""
    added = ENCODER not in ENCODERS
    if added:
        register_encoder(EncoderSpec(ENCODER, "test_resnet", 96, input_size=32, note="predict tests"))
    yield ENCODER
    if added:
        ENCODERS.pop(ENCODER, None)


@pytest.fixture(scope="module")
def lrmil_parts(tiny_encoder, tmp_path_factory):
    """What `wsimil lrmil` hands its bundle writer, made by hand: two fold students (ABMIL on 96-d features) and
    fold 0's distilled encoder (the teacher at 64 px with moved weights); fold 1 ablates stage 1 (no file)."""
    from wsimil.lrmil.stage1 import save_student
    from wsimil.lrmil.taps import make_student
    from wsimil.models import create_model
    from wsimil.slide.job import TileSettings
    from wsimil.slide.synth import make_cohort

    root = tmp_path_factory.mktemp("lrmil_parts")
    make_cohort(root / "cohort", 2, seed=1, width=1024, height=768, mpp=0.5, app_mag=20, tumor_fraction=0.15)
    teacher = create_encoder(tiny_encoder, None, 3)
    student = make_student(teacher, 64)
    with torch.no_grad():
        for p in student.model.parameters():
            p.mul_(0.9).add_(0.01)
    enc_file = root / "stage1" / "encoder.safetensors"
    enc_file.parent.mkdir(parents=True)
    save_student(enc_file, student, torch.nn.ModuleDict(), {"layers": [1]})
    folds = []
    for k in (0, 1):
        torch.manual_seed(10 + k)
        model = create_model("abmil", 96, 2, hidden_dims=[16])
        ckpt = root / "student" / f"fold{k}" / f"repeat0_fold{k}.safetensors"
        save_checkpoint(ckpt, {
            "model": "abmil", "model_kwargs": {"hidden_dims": [16]}, "method": "supervised", "method_kwargs": {},
            "method_state": {}, "task": "classification", "in_dim": 96, "n_classes": 2, "classes": ["0", "1"],
            "state_dict": model.state_dict(), "standardizer": None, "repeat": 0, "fold": k, "history": [],
        })  # fmt: skip
        folds.append((k, ckpt, enc_file if k == 0 else None))
    kw = {"classes": ["0", "1"], "encoder": teacher, "seed": 3, "student_input": 64,
          "tiling": TileSettings(mags=[5.0], patch_size=64), "config": {"lr_mag": 5.0}}  # fmt: skip
    return root, folds, kw


def test_lrmil_format2_bundle_loads_and_predicts_as_the_current_format(lrmil_parts, tmp_path):
    root, folds, kw = lrmil_parts
    slides = root / "cohort" / "manifest.csv"
    new = bundle_from_distilled(tmp_path / "new", folds, **kw)
    old = write_lrmil_format2_bundle(tmp_path / "old", folds, **kw)
    b_new, b_old = load_bundle(new), load_bundle(old)
    # upgraded in memory: one member per fold, each with its own encoder, at the LR tiling
    for b in (b_new, b_old):
        assert b.member_encoders and b.encoder is None and b.tiling.mag == 5.0 and b.tiling.patch_size == 64
        e0, e1 = (m.encoder for m in b.members)
        assert e0.distilled and e0.input_size == 64 and not e1.distilled and e1.input_size == 64 and e1.seed == 3
        assert [m.fold for m in b.members] == [0, 1] and b.classes == ["0", "1"]
    assert b_old.members[0].file == "fold0/aggregators/repeat0_fold0.safetensors"
    assert b_old.members[0].encoder.weights == "fold0/lrmil_encoder.safetensors"
    assert b_new.members[0].encoder.weights == "encoders/repeat0_fold0.safetensors"
    # both encoders are rebuilt with the weights they were saved with, at 64 px
    student = b_old.build_encoder(member=b_old.members[0])
    want = load_checkpoint(folds[0][2])["state_dict"]
    assert student.spec.input_size == 64
    assert all(torch.equal(v, want[k]) for k, v in student.model.state_dict().items())
    assert b_old.build_encoder(member=b_old.members[1]).spec.input_size == 64

    table = predict_slides(old, slides, tmp_path / "p_old", device="cpu")
    assert (table.status == "ok").all(), table
    predict_slides(new, slides, tmp_path / "p_new", device="cpu")
    _same_outputs(tmp_path / "p_old", tmp_path / "p_new")
    pred = pd.read_csv(tmp_path / "p_old" / "predictions.csv")
    assert list(pred.columns) == ["slide_id", "prob_0", "prob_1", "predicted", "n_patches"]
    assert not (tmp_path / "p_old" / "job").exists()  # tiled in memory: no tiling cache
    # the ensemble is the mean of the fold pipelines
    one = []
    for k in (0, 1):
        predict_slides(old, slides, tmp_path / f"f{k}", device="cpu", folds=[k])
        one.append(pd.read_csv(tmp_path / f"f{k}" / "predictions.csv").prob_1.to_numpy())
    np.testing.assert_allclose(pred.prob_1.to_numpy(), np.mean(one, 0), atol=1e-6)
    assert not np.allclose(one[0], one[1])  # the folds' encoders and students differ

    conv = upgrade_bundle(old, tmp_path / "conv")
    assert json.loads((conv / "bundle.json").read_text())["format_version"] == BUNDLE_FORMAT
    assert not (conv / "lrmil.json").exists() and (conv / "encoders" / "repeat0_fold0.safetensors").is_file()
    predict_slides(conv, slides, tmp_path / "p_conv", device="cpu")
    _same_outputs(tmp_path / "p_old", tmp_path / "p_conv")
    # a feature folder is refused: each member has its own encoder
    with pytest.raises(Exception, match="LRMIL bundle"):
        predict_features(old, root, tmp_path / "pf", device="cpu")
