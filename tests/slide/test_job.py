import h5py
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import shared_data
from wsimil.cli import app
from wsimil.slide.job import TileSettings, collect_slides, links_path, patches_path, run_tiling

runner = CliRunner()


def test_tile_batch_with_failures_and_resume(slide_dir, tmp_path):
    job = tmp_path / "job"
    res = runner.invoke(app, ["tile", "--slides", str(slide_dir), "--out", str(job), "--mag", "20", "--mag", "5"])
    assert res.exit_code == 1, res.output  # some slides failed, the others were done
    status = pd.read_csv(job / "status.csv").set_index("slide_id")
    assert status.loc["s40", "status"] == "ok" and status.loc["s20", "status"] == "ok"
    assert status.loc["generic", "status"] == "ok"
    assert status.loc["nompp", "status"] == "failed" and "--mpp" in status.loc["nompp", "error"]
    assert status.loc["truncated", "status"] == "failed"
    assert "failed truncated" in res.output and "failed nompp" in res.output
    assert pd.read_csv(job / "slides.csv").path.str.endswith(".svs").sum() == 3

    with h5py.File(patches_path(job, 20, 256, "s40"), "r") as f:
        a = dict(f["coords"].attrs)
        n20 = len(f["coords"])
    assert a["patch_size"] == 256 and a["patch_size_level0"] == 512 and a["target_mpp"] == 0.5
    assert a["mpp_level0"] == 0.25 and a["read_level"] == 0 and a["level0_width"] == 4096
    assert a["target_magnification"] == 20 and a["paired_grids"] == "5x_256px_0px_overlap"
    with h5py.File(patches_path(job, 5, 256, "s40"), "r") as f:
        assert f["coords"].attrs["read_level"] == 1 and f["coords"].attrs["patch_size_level0"] == 2048
    with h5py.File(patches_path(job, 20, 256, "s20"), "r") as f:  # a 20x scan: same physical footprint
        assert f["coords"].attrs["patch_size_level0"] == 256 and abs(len(f["coords"]) - n20) <= 4
    with h5py.File(links_path(job, "s40"), "r") as f:
        lk = f["links"][()]
        assert lk.shape[1] == 16 and lk.max() < n20 and (lk >= 0).any()
    assert (job / "qc" / "s40.png").is_file()

    # resume: valid outputs are skipped, failures are retried; new settings redo everything
    res = runner.invoke(app, ["tile", "--slides", str(slide_dir), "--out", str(job), "--mag", "20", "--mag", "5"])
    status = pd.read_csv(job / "status.csv").set_index("slide_id")
    assert status.loc["s40", "status"] == "skipped" and status.loc["truncated", "status"] == "failed"
    table = run_tiling(slide_dir / "s40.svs", job, TileSettings(mags=[20, 5], min_tissue=0.5))
    assert table.status.tolist() == ["ok"]


def test_mpp_override_from_slide_table(slide_dir, tmp_path):
    (tmp_path / "slides.csv").write_text(f"slide_id,path,mpp\nx,{slide_dir / 'nompp.tif'},0.25\n")
    specs = collect_slides(tmp_path / "slides.csv")
    assert specs[0].slide_id == "x" and specs[0].mpp == 0.25
    table = run_tiling(tmp_path / "slides.csv", tmp_path / "job", TileSettings(mags=[20]))
    assert table.status.tolist() == ["ok"]


def test_blank_slide_reports_no_tissue(tmp_path):
    import numpy as np

    from wsimil.slide.synth import write_aperio_tiff

    write_aperio_tiff(tmp_path / "blank.svs", np.full((2048, 2048, 3), 243, np.uint8))
    table = run_tiling(tmp_path / "blank.svs", tmp_path / "job", TileSettings(mags=[20]))
    assert table.status.tolist() == ["failed"] and "no tissue found" in table.error[0]


@pytest.mark.parametrize("reader", ["openslide", "tiffslide"])
def test_real_svs_tiles(tmp_path, reader):
    path = shared_data("slides", "cmu_small_region.svs")
    table = run_tiling(path, tmp_path / "job", TileSettings(mags=[20, 5], reader=reader))
    row = table.iloc[0]
    assert row.status == "ok" and row.patches_20x > 20 and row.patches_5x >= 1
    with h5py.File(patches_path(tmp_path / "job", 20, 256, "cmu_small_region"), "r") as f:
        assert f["coords"].attrs["patch_size_level0_exact"] == pytest.approx(256 * 0.5 / 0.499)
