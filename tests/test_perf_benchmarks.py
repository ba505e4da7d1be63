"""The performance benchmarks' smoke modes run and print the JSON their docs promise (figures are not checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 300) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "WSIMIL_PROGRESS": "0"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


@pytest.mark.slow
def test_train_throughput_quick_prints_floor_steps_ratios_and_rss():
    out = _run("train_throughput.py", "--quick", "--models", "abmil,mhim_v2", "--rss-bags", "6", "--threads", "1")
    assert out["benchmark"] == "train_throughput" and out["threads"] == 1
    sizes = [str(n) for n in out["sizes"]]
    assert set(out["floor_ms"]) == set(sizes) and all(v > 0 for v in out["floor_ms"].values())
    for model in ("abmil", "mhim_v2"):
        assert set(out["step_ms"][model]) == set(sizes) and all(v > 0 for v in out["step_ms"][model].values())
    for n in sizes:
        assert out["ratios"][n]["abmil_over_floor"] > 0 and out["ratios"][n]["mhim_v2_over_abmil"] > 0
    rss = out["rss"]
    assert rss["bags"] == 6 and rss["peak_rss_bytes"] > rss["feature_bytes"] > 0
    assert rss["within_target"] == (rss["peak_rss_bytes"] <= rss["target_bytes"])


@pytest.mark.slow
def test_pipeline_quick_reports_reads_against_the_decode_limit(tmp_path):
    out = _run("pipeline.py", "--quick", "--mpp", "0.25", "--out", str(tmp_path), timeout=600)
    read = out["cohorts"]["mpp_0.25"]["read"]
    for mag in ("20x", "5x"):
        r = read[mag]
        assert r["patches"] > 0 and r["decode_limit_patches_per_s"] > 0 and r["jpeg_tiles"] > 0
        assert r["ours_fraction_of_decode_limit"] > 0 and r["tile_decodes_per_tile"] >= 1
