"""No file wsimil reads can run code: checkpoints are safetensors + JSON; older ``torch.save`` files are read with
PyTorch's restricted unpickler (tensors, containers, numpy arrays) and anything else is refused in one line."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsimil.checkpoint import fold_checkpoint, fold_checkpoints, load_checkpoint, safe_torch_load, save_checkpoint
from wsimil.cli import app
from wsimil.errors import WsimilError
from wsimil.features.encoders import sha256_file
from wsimil.predict.bundle import BUNDLE_FORMAT, load_bundle
from wsimil.predict.digest import bundle_digest
from wsimil.predict.write import bundle_from_run

SRC = Path(__file__).resolve().parents[1] / "src" / "wsimil"


class _Payload:
    """Unpickling this runs ``touch MARKER``: what an attacker would hide in a shared checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def run(digit_abmil_run):
    """A 2-fold ABMIL run on digit bags and its bundle (conftest's ``digit_abmil_run``)."""
    return digit_abmil_run


def _legacy(ck: dict, path: Path) -> None:
    """Write ``ck`` as wsimil 0.1 did: ``torch.save`` of a dict (tensors, numpy, plain values)."""
    torch.save(ck, path)


def _poison_member(bundle: Path, marker: Path, name: str | None = None) -> Path:
    """Replace member 0 with a pickle carrying a payload and update its checksum in bundle.json, as an attacker
    who can edit the folder would (the checksum sits beside the file it protects)."""
    meta = json.loads((bundle / "bundle.json").read_text())
    m = meta["members"][0]
    ck = load_checkpoint(bundle / m["file"])
    ck["extra"] = _Payload(marker)
    target = bundle / (name or m["file"])
    torch.save(ck, target)
    m["file"], m["sha256"] = target.relative_to(bundle).as_posix(), sha256_file(target)
    (bundle / "bundle.json").write_text(json.dumps(meta))
    return target


def test_checkpoint_round_trip_keeps_every_value(tmp_path):
    ck = {
        "state_dict": {"w": torch.randn(3, 4), "b": torch.zeros(3, dtype=torch.float64)},
        "standardizer": {"mean": np.arange(4, dtype=np.float32)},
        "history": [{"epoch": np.int64(1), "loss": np.float32(0.5), "best": True}],
        "model_kwargs": {"hidden_dims": (32, 16)},
        "classes": ["a", "b"],
        "none": None,
    }
    save_checkpoint(tmp_path / "c.safetensors", ck)
    back = load_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(back["state_dict"]["w"], ck["state_dict"]["w"])
    assert back["state_dict"]["b"].dtype == torch.float64
    assert isinstance(back["standardizer"]["mean"], np.ndarray)
    np.testing.assert_array_equal(back["standardizer"]["mean"], ck["standardizer"]["mean"])
    assert back["history"] == [{"epoch": 1, "loss": 0.5, "best": True}]
    assert back["model_kwargs"] == {"hidden_dims": [32, 16]} and back["classes"] == ["a", "b"] and back["none"] is None
    # the file is plain safetensors: no pickle opcodes anywhere
    assert (tmp_path / "c.safetensors").read_bytes()[8:9] == b"{"
    with pytest.raises(TypeError, match="cannot store a object"):
        save_checkpoint(tmp_path / "d.safetensors", {"x": object()})


def test_payload_in_a_legacy_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, path)
    with pytest.raises(WsimilError, match="refused to load checkpoint .*evil.pt.*could run code") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value) and not marker.exists()
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(WsimilError, match="junk.pt is not a PyTorch file"):
        safe_torch_load(tmp_path / "junk.pt", "weights")
    with pytest.raises(WsimilError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_legacy_checkpoints_of_wsimil_01_still_load(run, tmp_path):
    runs, _, _ = run
    new = fold_checkpoint(runs / "checkpoints", 0, 0)
    assert new.suffix == ".safetensors" and len(fold_checkpoints(runs / "checkpoints")) == 2
    ck = load_checkpoint(new)
    ck["standardizer"] = {k: v.numpy() for k, v in ck["standardizer"].items()}  # 0.1 could hold numpy too
    old = tmp_path / "checkpoints"
    old.mkdir()
    _legacy(ck, old / "repeat0_fold0.pt")
    assert fold_checkpoint(old, 0, 0) == old / "repeat0_fold0.pt"
    back = load_checkpoint(old / "repeat0_fold0.pt")
    assert back["config_hash"] == ck["config_hash"]
    for k, v in ck["state_dict"].items():
        assert torch.equal(back["state_dict"][k], v)


def test_bundle_with_a_payload_member_is_refused_and_nothing_runs(run, tmp_path):
    runs, feats, _ = run
    for name in (None, "aggregators/repeat0_fold0.pt"):  # disguised as safetensors, and as a 0.1 .pt member
        bundle = bundle_from_run(runs, tmp_path / f"b_{name is None}")
        marker = tmp_path / f"pwned_{name is None}"
        _poison_member(bundle, marker, name)
        res = CliRunner().invoke(app, ["predict", "--bundle", str(bundle), "--features", str(feats), "--out",
                                       str(tmp_path / "p")])  # fmt: skip
        assert res.exit_code == 2, res.output
        why = "could run code" if name else "not a safetensors file"
        assert "refused to load" in res.output and why in res.output, res.output
        assert "Traceback" not in res.output and not marker.exists()
        assert not (tmp_path / "p" / "predictions.csv").exists()


def test_payload_is_refused_by_every_loader(run, tmp_path):
    """evaluate --run, --teacher-init and the LRMIL distilled-encoder loader use the same safe path."""
    runs, feats, manifest = run
    marker = tmp_path / "pwned"
    bad = tmp_path / "badrun"
    (bad / "checkpoints").mkdir(parents=True)
    (bad / "config.yaml").write_text((runs / "config.yaml").read_text())
    for k in (0, 1):
        ck = load_checkpoint(fold_checkpoint(runs / "checkpoints", 0, k))
        torch.save({**ck, "x": _Payload(marker)}, bad / "checkpoints" / f"repeat0_fold{k}.pt")
    res = CliRunner().invoke(app, ["evaluate", "--run", str(bad), "--features", str(feats), "--manifest",
                                   str(manifest), "--out", str(tmp_path / "ev")])  # fmt: skip
    assert res.exit_code == 2 and "could run code" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["train", "--features", str(feats), "--manifest", str(manifest), "--model",
                                   "abmil", "--method", "mhim_v1", "--teacher-init", str(bad), "--folds", "2",
                                   "--epochs", "1", "--out", str(tmp_path / "mh")])  # fmt: skip
    assert res.exit_code == 2 and "could run code" in res.output and "Traceback" not in res.output
    from wsimil.features.encoders import create_encoder
    from wsimil.lrmil.stage1 import load_student

    enc = tmp_path / "lrmil_encoder.pt"
    torch.save({"state_dict": {}, "input_size": 64, "x": _Payload(marker)}, enc)
    with pytest.raises(WsimilError, match="refused to load distilled encoder"):
        load_student(enc, create_encoder("resnet18", None, 0))
    assert not marker.exists()


def test_expect_sha256_pins_the_bundle(run, tmp_path):
    runs, feats, _ = run
    bundle = bundle_from_run(runs, tmp_path / "b")
    digest = bundle_digest(bundle)
    out = CliRunner().invoke(app, ["digest", str(bundle)]).output
    assert out.split()[0] == digest
    (tmp_path / "b.sha256").write_text(out)
    for pin in (digest, str(tmp_path / "b.sha256")):
        res = CliRunner().invoke(app, ["predict", "--bundle", str(bundle), "--features", str(feats), "--out",
                                       str(tmp_path / "ok"), "--expect-sha256", pin])  # fmt: skip
        assert res.exit_code == 0, res.output
    # any change to any file of the bundle changes the digest; predict refuses before loading anything
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["classes"] = meta["classes"][::-1]
    (bundle / "bundle.json").write_text(json.dumps(meta))
    res = CliRunner().invoke(app, ["predict", "--bundle", str(bundle), "--features", str(feats), "--out",
                                   str(tmp_path / "no"), "--expect-sha256", digest])  # fmt: skip
    assert res.exit_code == 2 and "not the expected" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "no").exists()
    res = CliRunner().invoke(app, ["predict", "--bundle", str(bundle), "--features", str(feats), "--out",
                                   str(tmp_path / "no"), "--expect-sha256", "abc"])  # fmt: skip
    assert res.exit_code == 2 and "not a SHA-256" in res.output


def test_format_1_bundle_loads_safely_and_converts(run, tmp_path):
    """A bundle as wsimil 0.1 wrote it (torch.save members, format 1) predicts the same as its conversion."""
    runs, feats, _ = run
    bundle = bundle_from_run(runs, tmp_path / "new")
    old = tmp_path / "old"
    (old / "aggregators").mkdir(parents=True)
    meta = json.loads((bundle / "bundle.json").read_text())
    for m in meta["members"]:
        target = old / m["file"].replace(".safetensors", ".pt")
        _legacy(load_checkpoint(bundle / m["file"]), target)
        m["file"], m["sha256"] = target.relative_to(old).as_posix(), sha256_file(target)
    meta["format_version"] = 1
    (old / "bundle.json").write_text(json.dumps(meta))
    assert load_bundle(old).format_version == 1
    res = CliRunner().invoke(app, ["convert", "bundle", str(old), "--out", str(tmp_path / "conv")])
    assert res.exit_code == 0, res.output
    conv = load_bundle(tmp_path / "conv")
    assert conv.format_version == BUNDLE_FORMAT and all(m.file.endswith(".safetensors") for m in conv.members)
    from wsimil.predict.pipeline import predict_features

    a = predict_features(old, feats, tmp_path / "pa")
    b = predict_features(conv, feats, tmp_path / "pb")
    assert (a.status == "ok").all() and (b.status == "ok").all()
    pa = (tmp_path / "pa" / "predictions.csv").read_text()
    assert pa == (tmp_path / "pb" / "predictions.csv").read_text()


def test_no_module_unpickles():
    """Static guard: only wsimil.checkpoint calls torch.load (always weights_only=True); nobody imports pickle
    for loading, and nothing passes weights_only=False."""
    offenders = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                base = node.func.value
                if isinstance(base, ast.Name) and base.id in ("torch", "pickle"):
                    kw = {k.arg: k.value for k in node.keywords}
                    safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    if base.id == "pickle" or not safe or path.name != "checkpoint.py":
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
            bad_kw = isinstance(node, ast.keyword) and node.arg == "weights_only"
            if bad_kw and isinstance(node.value, ast.Constant) and node.value.value is not True:
                offenders.append(f"{path.relative_to(SRC)}:{node.value.lineno} weights_only=False")
    assert offenders == []


def test_refusal_holds_in_a_fresh_process(tmp_path):
    """Nothing in the test process (imports, allow-lists set up earlier) is what blocks the payload."""
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, tmp_path / "w.pt")
    code = "from wsimil.checkpoint import load_checkpoint; load_checkpoint(r'%s')" % (tmp_path / "w.pt")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode != 0 and "WsimilError: refused to load" in p.stderr and not marker.exists()
