"""Every user mistake gets one clear line, found before any slide or fold is processed, and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from wsimil.cli import app
from wsimil.errors import one_line_warnings
from wsimil.features.store import write_bag
from wsimil.slide.job import TileSettings, collect_slides, run_tiling

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _fails(args: list[str], *messages: str, code: int = 2) -> str:
    res = runner.invoke(app, args)
    out = " ".join(res.output.split())  # undo console line wrapping
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    for m in messages:
        assert m in out, res.output
    return out


def _bags(folder: Path, n: int, dim: int = 4) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        write_bag(folder / f"s{i}.h5", rng.normal(size=(3, dim)).astype(np.float32))


def _manifest(path: Path, n: int, extra: str = "") -> Path:
    rows = "".join(f"c{i},s{i},{i % 2}\n" for i in range(n))
    path.write_text("case_id,slide_id,label\n" + rows + extra)
    return path


# ---------------------------------------------------------------- train
def test_train_four_slides_two_folds(tmp_path):
    """4 slides, --folds 2: each training part has one case per class, too few for a validation part."""
    _bags(tmp_path / "f", 4)
    base = ["train", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "r"), "--epochs", "1"]
    m = _manifest(tmp_path / "m.csv", 4)
    _fails(
        [*base, "--manifest", str(m)],
        "cannot make 5 stratified folds: class '0' has only 2 case(s); use --folds 2 or fewer with --val-fraction 0",
    )
    _fails(
        [*base, "--manifest", str(m), "--folds", "2"],
        "with 2 folds, fold 0's training part has 2 case(s), at most one per class",
        "--val-fraction 0",
    )
    assert not (tmp_path / "r").exists()
    # following the advice works
    res = runner.invoke(app, [*base, "--manifest", str(m), "--folds", "2", "--val-fraction", "0", "--model", "mean"])
    assert res.exit_code == 0, res.output


def test_train_reports_a_missing_slide_before_the_split(tmp_path):
    _bags(tmp_path / "f", 4)
    m = _manifest(tmp_path / "m.csv", 4, extra="c9,s9,1\n")
    args = ["train", "--features", str(tmp_path / "f"), "--manifest", str(m), "--out", str(tmp_path / "r")]
    out = _fails([*args, "--folds", "2"], "1 of 5 slides in the manifest have no features", "slide 's9'")
    assert "fold" not in out


def test_unknown_device_is_one_line(tmp_path):
    _bags(tmp_path / "f", 4)
    m = _manifest(tmp_path / "m.csv", 4)
    args = ["train", "--features", str(tmp_path / "f"), "--manifest", str(m), "--out", str(tmp_path / "r")]
    _fails([*args, "--device", "foo"], "--device 'foo' is not a device")


# ---------------------------------------------------------------- tile
@pytest.mark.parametrize(
    ("mags", "message"),
    [
        (["0"], "--mag 0 is not a magnification"),
        (["-5"], "--mag -5 is not a magnification"),
        (["20", "7"], "--mag 20 and --mag 7 do not nest: 20/7 = 2.86 is not a whole number"),
    ],
)
def test_bad_magnifications_are_refused_before_any_slide(slide_dir, tmp_path, mags, message):
    args = ["tile", "--slides", str(slide_dir / "s20.svs"), "--out", str(tmp_path / "job")]
    _fails([*args, *[a for m in mags for a in ("--mag", m)]], message)
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--patch-size", "0"], "--patch-size must be at least 16 pixels"),
        (["--min-tissue", "2"], "--min-tissue is a share of the patch in [0, 1]"),
        (["--reader", "foo"], "unknown slide reader 'foo'"),
        (["--mpp", "-1"], "--mpp -1 is outside"),
    ],
)
def test_bad_tile_options_are_refused_before_any_slide(slide_dir, tmp_path, option, message):
    args = ["tile", "--slides", str(slide_dir / "s20.svs"), "--out", str(tmp_path / "job"), "--mag", "20"]
    _fails([*args, *option], message)
    assert not (tmp_path / "job").exists()


def test_magnification_above_the_scan_is_refused_per_slide(slide_dir, tmp_path):
    """80x of a 40x scan (0.25 µm/px) would upsample: the slide fails with its native resolution named."""
    args = ["tile", "--slides", str(slide_dir / "s40.svs"), "--out", str(tmp_path / "job"), "--mag", "80"]
    _fails(
        args,
        "failed s40: slide 's40': --mag 80 needs 0.125 µm/px but the slide was scanned at 0.25 µm/px (40x)",
        "use --mag 40 or lower",
        code=1,
    )
    assert not (tmp_path / "job" / "80x_256px_0px_overlap").exists()


# ---------------------------------------------------------------- damaged slides
def test_truncated_slide_read_prints_one_line(slide_dir):
    """A failed tiffslide read leaves no pending zarr tasks behind: no asyncio/zarr tracebacks at exit."""
    code = (
        "import sys\nfrom wsimil.errors import WsimilError\nfrom wsimil.slide.reader import open_slide\n"
        "try:\n    open_slide(sys.argv[1]).thumbnail(1024)\nexcept WsimilError as e:\n    print('ERR', e)\n"
        "import gc; gc.collect()\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", code, str(slide_dir / "truncated.svs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    out = res.stdout + res.stderr
    # the slide, where the read failed and why (tiled JPEG levels decoded by wsimil name the tile)
    assert "ERR slide 'truncated': " in out and "truncated file?" in out, out
    assert "read at (0, 0) level 0 failed" in out or "cannot be decoded" in out, out
    for noise in ("Traceback", "Task was destroyed", "never retrieved", "Event loop is closed", "never awaited"):
        assert noise not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) <= 2, out  # tifffile's note (naming the slide) and the error
    assert all(ln.startswith(("ERR slide 'truncated'", "slide 'truncated': tifffile:")) for ln in lines), out


def test_truncated_slide_in_a_tiling_batch(slide_dir, tmp_path):
    """Through the CLI, in a fresh process: one failure line for the bad slide, the good one is tiled."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "WSIMIL_PROGRESS": "0", "COLUMNS": "200"}
    table = tmp_path / "slides.csv"
    pd.DataFrame({"path": [str(slide_dir / "truncated.svs"), str(slide_dir / "s20.svs")]}).to_csv(table, index=False)
    res = subprocess.run(
        [sys.executable, "-m", "wsimil.cli", "tile", "--slides", str(table), "--out", str(tmp_path / "job")]
        + ["--mag", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "Tiled 1, skipped 0 (already done), failed 1" in out and "failed truncated: slide 'truncated'" in out
    assert "Traceback" not in out and "Task was destroyed" not in out
    assert len([ln for ln in out.splitlines() if ln.strip()]) <= 5, out


# ---------------------------------------------------------------- extract
@pytest.fixture(scope="module")
def small_job(slide_dir, tmp_path_factory):
    job = tmp_path_factory.mktemp("job")
    run_tiling(collect_slides(slide_dir / "s20.svs"), job, TileSettings(mags=[5]))
    return job


def _weights_case(tmp_path: Path, kind: str) -> Path:
    import timm

    p = tmp_path / "w.pt"
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    if kind == "text":
        p.write_text("these are not weights\n")
    elif kind == "pickle":
        torch.save({"epoch": 3, "note": "not a state dict"}, p)
    elif kind == "keys":
        torch.save({"foo.weight": torch.zeros(2)}, p)
    elif kind == "shapes":
        state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
        torch.save(state, p)
    elif kind == "safetensors":
        p = tmp_path / "w.safetensors"
        p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    return p


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text", "are not a PyTorch checkpoint (torch.save) or a safetensors file"),
        ("pickle", "hold a dict, not a state dict (names → tensors)"),
        ("keys", "do not fit encoder 'resnet18' (resnet18): 120 missing keys"),
        ("shapes", "1 tensors have other shapes (e.g. conv1.weight: (32, 3, 7, 7) in the file, (64, 3, 7, 7)"),
        ("safetensors", "are not a readable safetensors file"),
    ],
)
def test_bad_encoder_weights_are_one_line(small_job, tmp_path, kind, message):
    w = _weights_case(tmp_path, kind)
    args = ["extract", "--job", str(small_job), "--mag", "5", "--encoder", "resnet18", "--encoder-weights", str(w)]
    out = _fails(args, message)
    assert len(out) < 400 and not (small_job / "5x_256px_0px_overlap" / "features_resnet18").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--loader-workers", "-1"], "--loader-workers must be 0"),
        (["--precision", "fp8"], "--precision must be one of"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    ],
)
def test_bad_extract_options_are_refused_before_the_encoder(small_job, option, message):
    args = ["extract", "--job", str(small_job), "--mag", "5", "--encoder", "resnet18"]
    _fails([*args, *option], message)
    assert not (small_job / "5x_256px_0px_overlap" / "features_resnet18").exists()


# ---------------------------------------------------------------- predict
def test_predict_refuses_features_of_another_width_before_writing(tmp_path):
    _bags(tmp_path / "f", 8)
    m = _manifest(tmp_path / "m.csv", 8)
    args = ["train", "--features", str(tmp_path / "f"), "--manifest", str(m), "--out", str(tmp_path / "run")]
    res = runner.invoke(app, [*args, "--model", "mean", "--folds", "2", "--epochs", "1", "--val-fraction", "0"])
    assert res.exit_code == 0, res.output
    _bags(tmp_path / "wide", 3, dim=6)
    out = tmp_path / "pred"
    bundle = str(tmp_path / "run" / "bundle")
    printed = _fails(
        ["predict", "--bundle", bundle, "--features", str(tmp_path / "wide"), "--out", str(out)],
        "are 6-d (3 bags), but bundle",
        "expects 4-d features",
    )
    assert "Predictions:" not in printed and not out.exists()


# ---------------------------------------------------------------- warnings
def test_warnings_print_as_one_line():
    import warnings as w

    old = w.formatwarning
    try:
        one_line_warnings()
        text = w.formatwarning("encoder 'x' has no weights:\n  random init", UserWarning, "/a/b.py", 12, "code")
        assert text == "Warning: encoder 'x' has no weights: random init\n"
        text = w.formatwarning("few samples", RuntimeWarning, "/a/b.py", 3)
        assert text == "Warning (RuntimeWarning): few samples\n"
    finally:
        w.formatwarning = old
    assert warnings.formatwarning is old


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--slides", "0"], "--slides must be at least 2"),
        (["--width", "10"], "--width and --height must be at least 256 pixels"),
        (["--mpp", "0"], "--mpp must be in 0.1–2.0 µm/px"),
        (["--tumor-fraction", "2"], "--tumor-fraction is a share of the tissue in [0, 0.3]"),
        (["--task", "segmentation"], "--task must be one of classification, hierarchical, survival"),
    ],
)
def test_bad_synth_options_are_refused(tmp_path, option, message):
    _fails(["synth", "--out", str(tmp_path / "c"), *option], message)
    assert not (tmp_path / "c").exists()


def test_slide_table_with_a_bad_mpp(slide_dir, tmp_path):
    (tmp_path / "s.csv").write_text(f"path,mpp\n{slide_dir / 's20.svs'},abc\n")
    args = ["tile", "--slides", str(tmp_path / "s.csv"), "--out", str(tmp_path / "job"), "--mag", "20"]
    _fails(args, "'mpp' of s20.svs is 'abc', not a number")
    assert not (tmp_path / "job").exists()
