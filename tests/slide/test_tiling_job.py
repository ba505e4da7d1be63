"""TilingJob: one object owns a tiling job folder (settings, slides, grids, links, status, feature folders)."""

import h5py
import numpy as np
import pytest

from wsimil.errors import WsimilError
from wsimil.slide.job import collect_slides, run_tiling
from wsimil.slide.mag import mag_name, native_mag, parse_mag
from wsimil.slide.tiling_job import TileSettings, TilingJob, check_nesting, links_dataset
from wsimil.slide.tissue import TissueParams

#: ``tiling.yaml`` exactly as wsimil 0.2.0 (before TilingJob) wrote it for ``tile --mag 20 --mag 5 --patch-size 64``
OLD_TILING_YAML = """\
mags:
- 20.0
- 5.0
patch_size: 64
reader: auto
mpp: null
min_tissue: 0.1
tissue:
  thumb_mpp: 8.0
  min_saturation: 15
  max_brightness: 235
  blur_um: 40.0
  close_um: 64.0
  open_um: 32.0
  min_area_um2: 50000.0
  max_hole_um2: 20000.0
settings_key: 5acf3e0fad6d912f
wsimil_version: 0.2.0
"""


@pytest.fixture(scope="module")
def job(slide_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tj") / "job"
    table = run_tiling(collect_slides(slide_dir / "s20.svs"), root, TileSettings(mags=["20x", 5], patch_size=64))
    assert (table["status"] == "ok").all(), table
    return root


@pytest.mark.parametrize(("value", "mag"), [(20, 20.0), (20.0, 20.0), ("20", 20.0), ("20x", 20.0), (" 2.5X", 2.5)])
def test_parse_mag_reads_every_spelling(value, mag):
    assert parse_mag(value) == mag and mag_name(parse_mag(value)) == f"{mag:g}x"


@pytest.mark.parametrize(("value", "message"), [("0", "--mag 0 is not"), ("x20", "'x20' is not"), ("nan", "not")])
def test_parse_mag_refuses_non_magnifications(value, message):
    with pytest.raises(WsimilError, match=message):
        parse_mag(value)


def test_native_mag_of_a_scan():
    assert native_mag(0.25) == 40 and native_mag(0.5) == 20 and native_mag(0.2527) == 40


def test_nesting_check_and_links_name():
    assert check_nesting(20, 5) == 4 and links_dataset(5, 20) == "links_5x_20x"
    with pytest.raises(WsimilError, match="--mag 20 and --mag 7 do not nest"):
        check_nesting(20, 7)
    with pytest.raises(WsimilError, match="must be higher"):
        check_nesting(5, 20)


def test_settings_round_trip_through_a_dict():
    s = TileSettings(mags=[20, "5x"], patch_size=128, reader="tiffslide", mpp=0.25, min_tissue=0.3,
                     tissue=TissueParams(min_saturation=20))  # fmt: skip
    back = TileSettings.from_dict({**s.to_dict(), "settings_key": s.key(), "wsimil_version": "x"})
    assert back == s and back.key() == s.key() and back.mags == [20.0, 5.0]
    # a bundle's one-magnification record, with a tissue field this version does not know
    one = TileSettings.from_dict({"mag": 5, "patch_size": 64, "tissue": {"min_saturation": 20, "future": 1}})
    assert one.mags == [5.0] and one.tissue.min_saturation == 20 and one.reader == "auto" and one.min_tissue == 0.1


def test_open_gives_settings_slides_grids_and_links(job):
    tj = TilingJob.open(job)
    assert tj.settings.mags == [20.0, 5.0] and tj.patch_size == 64 and tj.settings_key == tj.settings.key()
    assert tj.grids() == [(20.0, 64), (5.0, 64)]
    assert tj.grid_dir(5).name == "5x_64px_0px_overlap"
    assert tj.patches_path(20, "s20") == job / "20x_64px_0px_overlap" / "patches" / "s20_patches.h5"
    assert tj.patches_path(20, "s20").is_file() and tj.links_path("s20").is_file()
    assert tj.features_dir("5x", "uni") == job / "5x_64px_0px_overlap" / "features_uni"
    assert list(tj.slides()) == ["s20"] and tj.spec("s20").path.endswith("s20.svs") and tj.mpp("s20") is None
    assert tj.status().set_index("slide_id").loc["s20", "status"] == "ok"
    lk = tj.links("s20", 5, 20)
    with h5py.File(tj.patches_path(5, "s20"), "r") as f:
        n_lo = len(f["coords"])
    with h5py.File(tj.patches_path(20, "s20"), "r") as f:
        n_hi = len(f["coords"])
    assert lk.shape == (n_lo, 16) and lk.max() < n_hi and (lk >= -1).all()
    one = tj.tile_settings([5])
    assert one.mags == [5.0] and one.patch_size == 64 and one.tissue == tj.settings.tissue


def test_check_tiled_and_patch_size_name_what_the_job_has(job):
    tj = TilingJob.open(job)
    tj.check_tiled(5)
    with pytest.raises(WsimilError, match=r"has no 10x patches of 64 px: it holds 20x \(64 px\), 5x \(64 px\)"):
        tj.check_tiled(10)
    tj.check_patch_size(None)
    tj.check_patch_size(64)
    with pytest.raises(WsimilError, match="--patch-size 256 disagrees with the job: .* tiled with 64 px"):
        tj.check_patch_size(256)


def test_open_refuses_folders_that_are_not_jobs(tmp_path):
    with pytest.raises(WsimilError, match="does not exist"):
        TilingJob.open(tmp_path / "nope")
    with pytest.raises(WsimilError, match="is not a tiling job: .*tiling.yaml is missing"):
        TilingJob.open(tmp_path)


def test_a_job_written_by_the_previous_version_opens_and_resumes(job, tmp_path, slide_dir):
    """The previous version wrote the same layout and this tiling.yaml; its settings key must not change, so a
    re-run skips its slides and extraction finds its grids."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(job, old)
    (old / "tiling.yaml").write_text(OLD_TILING_YAML)
    tj = TilingJob.open(old)
    assert tj.settings.key() == "5acf3e0fad6d912f" == tj.settings_key  # the key the previous version computed
    assert tj.patch_size == 64 and tj.grids() == [(20.0, 64), (5.0, 64)]
    table = run_tiling(collect_slides(slide_dir / "s20.svs"), old, TileSettings(mags=[20, 5], patch_size=64))
    assert table["status"].tolist() == ["skipped"]  # outputs validate against the same settings


def test_find_for_features_uses_what_the_files_record(job, tmp_path):
    from wsimil.features.store import write_bag

    tj = TilingJob.open(job)
    with h5py.File(tj.patches_path(5, "s20"), "r") as f:
        coords_attrs = dict(f["coords"].attrs)
        coords = f["coords"][()]
    feats = np.zeros((len(coords), 4), np.float32)
    # features written by the previous version (no tiling_job attribute) inside the job: found via the layout
    inside = tj.features_dir(5, "toy")
    write_bag(inside / "s20.h5", feats, coords, encoder="toy", coords_attrs=coords_attrs)
    assert TilingJob.find_for_features(inside).root == job
    # features moved elsewhere but recording their job: found from the attribute
    moved = tmp_path / "moved" / "features_toy"
    write_bag(moved / "s20.h5", feats, coords, encoder="toy", attrs={"tiling_job": str(job)}, coords_attrs=coords_attrs)
    assert TilingJob.find_for_features(moved).root == job
    # moved without the attribute: no parent folder is guessed
    bare = tmp_path / "bare" / "5x_64px_0px_overlap" / "features_toy"
    write_bag(bare / "s20.h5", feats, coords, encoder="toy", coords_attrs=coords_attrs)
    assert TilingJob.find_for_features(bare) is None
    # a job tiled again with other settings since: its tiling.yaml no longer fits the files
    stale = {**coords_attrs, "settings_key": "0" * 16}
    write_bag(inside / "s20.h5", feats, coords, encoder="toy", coords_attrs=stale)
    assert TilingJob.find_for_features(inside) is None
