import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from wsimil.cli import app
from wsimil.features.patches import PatchGrid, plan_blocks, read_block, read_patch_naive
from wsimil.features.store import FeatureStore
from wsimil.slide import open_slide
from wsimil.slide.job import TileSettings, collect_slides, patches_path, run_tiling

runner = CliRunner()


@pytest.fixture(scope="module")
def job(slide_dir, tmp_path_factory):
    j = tmp_path_factory.mktemp("job")
    specs = collect_slides(slide_dir / "s40.svs") + collect_slides(slide_dir / "s20.svs")
    run_tiling(specs, j, TileSettings(mags=[20, 5]))
    return j


@pytest.mark.parametrize("mag", [20, 5])
def test_block_reads_match_per_patch_reads(job, slide_dir, mag):
    g = PatchGrid.from_h5(patches_path(job, mag, 256, "s40"))
    with open_slide(slide_dir / "s40.svs") as s:
        for idx in plan_blocks(g.cells, 4)[:2]:
            block = read_block(s, g, idx)
            assert block.shape == (len(idx), 256, 256, 3)
            for j, i in enumerate(idx[:3]):
                naive = read_patch_naive(s, g.coords[i], g.step0, 256)
                tol = 1.0 if mag == 20 else 8.0  # 5x reads the 4x pyramid level, the baseline level 0
                assert np.abs(block[j].astype(int) - naive.astype(int)).mean() < tol


def test_blocks_cover_every_patch_once(job):
    g = PatchGrid.from_h5(patches_path(job, 20, 256, "s40"))
    blocks = plan_blocks(g.cells, 3)
    assert sorted(np.concatenate(blocks).tolist()) == list(range(len(g.coords)))
    for b in blocks:
        assert np.ptp(g.cells[b] // 3, axis=0).max() == 0


def test_extract_cli_writes_trident_features_and_resumes(job, tmp_path):
    args = ["extract", "--job", str(job), "--mag", "5", "--encoder", "resnet18", "--batch-size", "7"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    fdir = job / "5x_256px_0px_overlap" / "features_resnet18"
    store = FeatureStore(fdir)
    assert store.slide_ids() == ["s20", "s40"]
    bag = store.read("s40")
    with h5py.File(patches_path(job, 5, 256, "s40"), "r") as f:
        coords = f["coords"][()]
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.features.shape == (len(coords), 512) and np.isfinite(bag.features).all()
    with h5py.File(fdir / "s40.h5", "r") as f:
        a = f["features"].attrs
        assert a["encoder"] == "resnet18" and a["weights"] == "random(seed=0)" and "normalize" in a["transforms"]
        assert f["coords"].attrs["target_mpp"] == 2.0
    mtime = (fdir / "s40.h5").stat().st_mtime_ns
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "skipped 2" in res.output and (fdir / "s40.h5").stat().st_mtime_ns == mtime
    # batch size and workers do not change the features
    res = runner.invoke(app, [*args, "--batch-size", "64", "--loader-workers", "2", "--overwrite"])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(store.read("s40").features, bag.features, rtol=1e-4, atol=1e-5)


def test_extract_reports_missing_magnification(job):
    """A magnification the job was not tiled at is refused up front, naming the grids it has; nothing is written."""
    res = runner.invoke(app, ["extract", "--job", str(job), "--mag", "10", "--encoder", "resnet18"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "has no 10x patches of 256 px: it holds 20x (256 px), 5x (256 px)" in res.output.replace("\n", "")
    assert "Warning" not in res.output  # the encoder was never built
    assert not (job / "10x_256px_0px_overlap").exists()
    res = runner.invoke(app, ["extract", "--job", str(job.parent), "--mag", "5", "--encoder", "resnet18"])
    assert res.exit_code == 2 and "is not a tiling job" in res.output


def test_ray_backend_gives_the_local_features(job, tmp_path):
    pytest.importorskip("ray", reason="Ray is installed with the [test] extra")
    base = ["extract", "--job", str(job), "--mag", "5", "--encoder", "resnet18", "--overwrite"]
    assert runner.invoke(app, base).exit_code == 0
    fdir = job / "5x_256px_0px_overlap" / "features_resnet18"
    local = {s: FeatureStore(fdir).read(s).features for s in ("s20", "s40")}
    res = runner.invoke(app, [*base, "--backend", "ray"])
    assert res.exit_code == 0, res.output
    for s, f in local.items():
        np.testing.assert_allclose(FeatureStore(fdir).read(s).features, f, rtol=1e-5, atol=1e-6)
    status = (fdir / "status.csv").read_text()
    assert status.count(",ok,") == 2


def test_synthetic_cohort_gives_instance_labels(tmp_path):
    from wsimil.slide.synth import make_cohort

    slides = make_cohort(tmp_path / "coh", 2, seed=1, width=4096, height=3072, tumor_fraction=0.1, pos_fraction=0.5)
    assert sorted(s.label for s in slides) == [0, 1]
    man = (tmp_path / "coh" / "manifest.csv").read_text().splitlines()
    assert man[0] == "case_id,slide_id,label,path,tumor_mask,mask_downsample"
    run_tiling(tmp_path / "coh" / "manifest.csv", tmp_path / "job", TileSettings(mags=[20]))
    res = runner.invoke(app, ["extract", "--job", str(tmp_path / "job"), "--mag", "20", "--encoder", "resnet18"])
    assert res.exit_code == 0, res.output
    store = FeatureStore(tmp_path / "job" / "20x_256px_0px_overlap" / "features_resnet18")
    for s in slides:
        labels = store.read(s.slide_id).instance_labels
        assert labels is not None and len(labels) == len(store.read(s.slide_id).features)
        if s.label:
            assert (labels == 1).sum() >= 1 and (labels == 0).sum() > (labels == 1).sum()
        else:
            assert (labels == 0).all()


def test_extract_reads_the_patch_size_from_the_job_and_keeps_old_spellings(job, tmp_path):
    """--patch-size is read from the job (the hidden old flag must agree with it); --weights and --workers still
    work for one release, with a warning, and mean --encoder-weights and --loader-workers."""
    base = ["extract", "--job", str(job), "--mag", "5x", "--encoder", "resnet18"]
    res = runner.invoke(app, [*base, "--patch-size", "64"])
    assert res.exit_code == 2 and "--patch-size 64 disagrees with the job" in res.output.replace("\n", " ")
    assert not (job / "5x_64px_0px_overlap").exists()
    bad = tmp_path / "w.pt"
    bad.write_text("not weights")
    with pytest.warns(FutureWarning, match="--weights is deprecated .* use --encoder-weights"):
        res = runner.invoke(app, [*base, "--weights", str(bad)])
    assert res.exit_code == 2 and "not a PyTorch checkpoint" in res.output
    res = runner.invoke(app, [*base, "--loader-workers", "1", "--workers", "2"])
    assert res.exit_code == 2 and "--loader-workers 1 and the deprecated --workers 2 disagree" in res.output
    with pytest.warns(FutureWarning, match="--workers is deprecated"):
        res = runner.invoke(app, [*base, "--workers", "-1", "--patch-size", "256"])
    assert res.exit_code == 2 and "--loader-workers must be 0" in res.output
