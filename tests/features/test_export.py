"""Interop with CLAM, TRIDENT, Patho-Bench and torchmil: files built the way each peer builds them (from their
documented formats), read by wsimil, and wsimil's files read the way each peer reads them."""

from __future__ import annotations

from importlib.util import find_spec

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from wsimil.cli import app
from wsimil.errors import WsimilError
from wsimil.features.export import choose_clam_level, export_clam
from wsimil.features.patches import PatchGrid, level0_footprint
from wsimil.features.store import FeatureStore, write_bag
from wsimil.slide.job import SlideSpec, TileSettings, patches_path, run_tiling

EXACT_0_2527 = 256 * 0.5 / 0.2527  # 506.53 level-0 px


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, rendered):
    """One patient scanned twice (0.25 and 0.2527 µm/px) plus a 20× slide, tiled at 20×, with feature bags written
    as `wsimil extract` writes them (coords attributes copied from the patch files)."""
    from wsimil.slide.synth import write_aperio_tiff

    d = tmp_path_factory.mktemp("interop")
    img = np.ascontiguousarray(rendered[0][:1536, :2048])  # a quarter of the synthetic slide keeps this quick
    write_aperio_tiff(d / "s40.svs", img, mpp=0.25, app_mag=40)
    write_aperio_tiff(d / "s20.svs", img[::2, ::2].copy(), mpp=0.5, app_mag=20, downsamples=(4,))
    specs = [
        SlideSpec("p1_a", str(d / "s40.svs")),
        SlideSpec("p1_b", str(d / "s40.svs"), mpp=0.2527),
        SlideSpec("p2_a", str(d / "s20.svs")),
    ]
    job = d / "job"
    table = run_tiling(specs, job, TileSettings(mags=[20]))
    assert (table["status"] == "ok").all(), table
    feats = d / "job" / "20x_256px_0px_overlap" / "features_toy"
    rng = np.random.default_rng(0)
    for s in specs:
        with h5py.File(patches_path(job, 20, 256, s.slide_id), "r") as f:
            coords, attrs = f["coords"][()], dict(f["coords"].attrs)
        write_bag(feats / f"{s.slide_id}.h5", rng.normal(size=(len(coords), 6)), coords, coords_attrs=attrs)
    return job, feats


def test_patho_bench_patient_rule_holds_and_wsimil_keeps_exact_geometry(cohort):
    job, feats = cohort
    # Patho-Bench's PatchEmbeddingsDataset(combine_slides_per_patient=True) asserts one patch_size_level0 per patient
    values = {}
    for sid in ("p1_a", "p1_b"):
        with h5py.File(feats / f"{sid}.h5", "r") as f:
            values[sid] = f["coords"].attrs["patch_size_level0"]
    assert values == {"p1_a": 512, "p1_b": 512}
    with h5py.File(feats / "p1_b.h5", "r") as f:
        a = dict(f["coords"].attrs)
    assert a["level0_magnification"] == 40 and a["patch_size_level0_exact"] == pytest.approx(EXACT_0_2527)
    assert a["patch_size_level0"] == a["patch_size"] * a["level0_magnification"] / a["target_magnification"]
    # wsimil's own geometry: the exact footprint (reading patches, heatmaps/scores)
    grid = PatchGrid.from_h5(patches_path(job, 20, 256, "p1_b"))
    assert grid.step0 == pytest.approx(EXACT_0_2527)
    from wsimil.predict.pipeline import patch_size_level0

    assert patch_size_level0(feats / "p1_b.h5") == pytest.approx(EXACT_0_2527)
    assert patch_size_level0(feats / "p2_a.h5") == 256


def test_export_clam_both_directions(cohort, tmp_path):
    job, feats = cohort
    out = tmp_path / "clam"
    rows = {r["slide_id"]: r for r in export_clam(job, out, patches=True)}  # a TRIDENT job root is found
    assert rows["p1_a"]["status"] == "ok" and (rows["p1_a"]["patch_level"], rows["p1_a"]["patch_size"]) == (0, 512)
    assert rows["p2_a"]["status"] == "ok" and (rows["p2_a"]["patch_level"], rows["p2_a"]["patch_size"]) == (0, 256)
    assert rows["p1_b"]["status"] == "failed" and "506.5" in rows["p1_b"]["error"]
    assert "not a whole number of pixels at any level" in rows["p1_b"]["error"]
    store = FeatureStore(feats)
    for sid in ("p1_a", "p1_b", "p2_a"):
        bag = store.read(sid)
        # CLAM's Generic_MIL_Dataset: torch.load(pt_files/{id}.pt) is a plain (N, D) tensor; h5_files the same rows
        t = torch.load(out / "pt_files" / f"{sid}.pt", weights_only=True)
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
        np.testing.assert_array_equal(t.numpy(), bag.features)
        with h5py.File(out / "h5_files" / f"{sid}.h5", "r") as f:
            np.testing.assert_array_equal(f["features"][:], bag.features)
            np.testing.assert_array_equal(f["coords"][:], bag.coords)
    back = FeatureStore(out)
    assert back.layout == "clam_h5" and back.slide_ids() == ["p1_a", "p1_b", "p2_a"]
    assert FeatureStore(out / "pt_files").read("p2_a").features.shape == store.read("p2_a").features.shape
    # CLAM's patch readers: footprint = patch_size x downsample[patch_level], level dims of that level
    for sid, exact in (("p1_a", 512.0), ("p2_a", 256.0)):
        with h5py.File(out / "patches" / f"{sid}.h5", "r") as f:
            a = dict(f["coords"].attrs)
            np.testing.assert_array_equal(f["coords"][:], store.read(sid).coords)
        assert {
            "patch_size",
            "patch_level",
            "downsample",
            "downsampled_level_dim",
            "level_dim",
            "name",
            "save_path",
        } <= set(a)
        assert a["patch_size"] * a["downsample"][0] == exact and a["name"] == sid
        assert a["save_path"] == str(out / "patches") and tuple(a["level_dim"]) == tuple(a["downsampled_level_dim"])
        assert PatchGrid.from_h5(out / "patches" / f"{sid}.h5").step0 == exact
    assert not (out / "patches" / "p1_b.h5").exists()


def test_export_clam_cli_reports_the_refused_slide(cohort, tmp_path):
    _, feats = cohort
    res = CliRunner().invoke(app, ["export", "clam", "--features", str(feats), "--out", str(tmp_path), "--patches"])
    assert res.exit_code == 1, res.output
    assert "failed p1_b" in res.output and "Exported 2" in res.output
    status = pd.read_csv(tmp_path / "export_status.csv").set_index("slide_id")
    assert status.loc["p1_a", "status"] == "ok" and status.loc["p1_b", "status"] == "failed"
    res = CliRunner().invoke(app, ["export", "clam", "--features", str(feats), "--out", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "plain" / "patches").exists() and (tmp_path / "plain" / "pt_files" / "p1_b.pt").is_file()


def test_choose_clam_level():
    dims = [(4096, 3072), (1024, 768), (256, 192)]
    ds = [1.0, 4.0, 16.0]
    assert (choose_clam_level(1024, 256, dims, ds).level, choose_clam_level(1024, 256, dims, ds).patch_size) == (1, 256)
    assert choose_clam_level(2048, 256, dims, ds).patch_size == 512  # the smallest above the target size
    assert choose_clam_level(512, 256, dims, ds).level == 0
    c = choose_clam_level(2048, 256, [(4096, 3072), (1023, 767)], [1.0, 4.0039])  # CLAM's per-axis downsample
    assert c.level == 0 and c.downsample == (1.0, 1.0)
    with pytest.raises(WsimilError, match=r"slide 'x'.*506\.529.*downsamples 1, 4, 16"):
        choose_clam_level(EXACT_0_2527, 256, dims, ds, "x")


def test_clam_made_patch_file_reads_with_its_true_footprint(tmp_path):
    """A CLAM patch file (save_hdf5 of coords with its attribute dict): patch_size counts pixels at patch_level."""
    p = tmp_path / "slide1.h5"
    with h5py.File(p, "w") as f:
        d = f.create_dataset("coords", data=np.array([[0, 0], [1024, 0]], dtype=np.int64))
        attrs = {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0]), "name": "slide1"}
        attrs.update(downsampled_level_dim=np.array([1024, 768]), level_dim=np.array([1024, 768]), save_path="x")
        for k, v in attrs.items():
            d.attrs[k] = v
    grid = PatchGrid.from_h5(p)
    assert grid.step0 == 1024 and grid.slide_id == "slide1" and grid.cells.tolist() == [[0, 0], [1, 0]]
    assert level0_footprint({"patch_size": 256, "patch_size_level0": 512}) == 512  # TRIDENT's own files


@pytest.mark.peer
@pytest.mark.skipif(find_spec("torchmil") is None, reason="torchmil is an optional peer: pip install torchmil")
def test_torchmil_reads_wsimil_trident_layout(cohort, tmp_path):
    from torchmil.datasets import TridentWSIDataset

    job, feats = cohort
    base = job / "20x_256px_0px_overlap"
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide": ["p1_a", "p2_a"], "label": [1, 0]}).to_csv(labels, index=False)
    ds = TridentWSIDataset(
        str(base) + "/",
        str(labels),
        "toy",
        wsi_names=["p1_a", "p2_a"],
        bag_keys=["X", "Y", "coords"],
        patch_size=512,
        wsi_name_col="slide",
        wsi_label_col="label",
    )
    bag = ds[0]
    ref = FeatureStore(feats).read("p1_a")
    np.testing.assert_allclose(bag["X"].numpy(), ref.features, rtol=1e-6)
    np.testing.assert_array_equal(bag["coords"].numpy(), (ref.coords / 512).astype(int))
    assert int(bag["Y"]) == 1
