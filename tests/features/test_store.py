import h5py
import numpy as np
import pytest
import torch

from wsimil.errors import WsimilError
from wsimil.features.store import FeatureStore, write_bag


def test_trident_roundtrip_with_provenance(tmp_path):
    d = tmp_path / "20x_256px_0px_overlap" / "features_uni"
    feats = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    coords = np.arange(10).reshape(5, 2) * 256
    write_bag(
        d / "s1.h5",
        feats,
        coords,
        encoder="uni",
        attrs={"weights_sha256": "abc"},
        coords_attrs={"patch_size": 256},
        instance_labels=np.array([0, 1, -1, 0, 1]),
    )
    store = FeatureStore(d)
    assert store.layout == "flat_h5" and store.slide_ids() == ["s1"]
    bag = store.read("s1")
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    np.testing.assert_array_equal(bag.instance_labels, [0, 1, -1, 0, 1])
    assert store.shape("s1") == (5, 8)
    with h5py.File(d / "s1.h5") as f:
        assert f["features"].attrs["encoder"] == "uni"
        assert f["features"].attrs["weights_sha256"] == "abc"
        assert "wsimil_version" in f["features"].attrs
        assert f["coords"].attrs["patch_size"] == 256
    # the job's magnification folder with a single features_* folder resolves to it
    assert FeatureStore(tmp_path / "20x_256px_0px_overlap").dir == d


def test_bag_without_coords(tmp_path):
    write_bag(tmp_path / "a.h5", np.ones((3, 4)))
    bag = FeatureStore(tmp_path).read("a")
    assert bag.coords is None and bag.instance_labels is None and bag.features.dtype == np.float32


def test_clam_layouts(tmp_path):
    feats = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    (tmp_path / "h5_files").mkdir()
    with h5py.File(tmp_path / "h5_files" / "s2.h5", "w") as f:  # old CLAM files carry a batch axis
        f["features"] = feats[None]
        f["coords"] = np.zeros((6, 2), dtype=np.int64)
    store = FeatureStore(tmp_path)
    assert store.layout == "clam_h5"
    np.testing.assert_array_equal(store.read("s2").features, feats)
    assert store.shape("s2") == (6, 4)

    pt_root = tmp_path / "pt"
    (pt_root / "pt_files").mkdir(parents=True)
    torch.save(torch.from_numpy(feats), pt_root / "pt_files" / "s3.pt")
    store = FeatureStore(pt_root)
    assert store.layout == "clam_pt"
    np.testing.assert_array_equal(store.read("s3").features, feats)


def test_store_errors(tmp_path):
    with pytest.raises(WsimilError, match="does not exist"):
        FeatureStore(tmp_path / "missing")
    with pytest.raises(WsimilError, match="no feature files"):
        FeatureStore(tmp_path)
    for enc in ("uni", "conch"):
        write_bag(tmp_path / f"features_{enc}" / "s.h5", np.ones((2, 3)))
    with pytest.raises(WsimilError, match="several encoders .*features_conch, features_uni"):
        FeatureStore(tmp_path)
    d = tmp_path / "bad"
    d.mkdir()
    (d / "broken.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(WsimilError, match="slide 'broken': cannot"):
        FeatureStore(d).read("broken")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    with pytest.raises(ValueError):
        write_bag(tmp_path / "x.h5", np.ones(3))  # not (N, D)
    with pytest.raises(TypeError):
        write_bag(tmp_path / "y.h5", np.ones((2, 2)), attrs={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path):
    from wsimil.io import write_text

    (tmp_path / "plain.txt").write_text("x")
    write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_trident_pt_numpy_loads_and_pickled_code_is_refused(tmp_path):
    import os

    feats = np.random.default_rng(2).normal(size=(7, 5))
    for name, dtype in (("f32", np.float32), ("f16", np.float16)):
        torch.save(feats.astype(dtype), tmp_path / f"{name}.pt")  # TRIDENT's saveas='pt': torch.save(ndarray)
    store = FeatureStore(tmp_path)
    np.testing.assert_allclose(store.read("f32").features, feats, rtol=1e-6)
    np.testing.assert_allclose(store.read("f16").features, feats, rtol=1e-3, atol=1e-3)
    assert store.shape("f16") == (7, 5) and store.read("f16").features.dtype == np.float32

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"features": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WsimilError, match="refused to load") as e:
        store.read("evil")
    assert "\n" not in str(e.value)
    torch.save(["not", "features"], tmp_path / "odd.pt")
    with pytest.raises(WsimilError, match="holds a list, not a numeric"):
        store.read("odd")


def test_trident_job_root_finds_its_one_level(tmp_path):
    job = tmp_path / "job"
    write_bag(job / "20x_256px_0px_overlap" / "features_uni" / "s.h5", np.ones((2, 3)))
    (job / "20x_256px_0px_overlap" / "patches").mkdir()
    (job / "contours").mkdir()
    assert FeatureStore(job).dir == job / "20x_256px_0px_overlap" / "features_uni"
    write_bag(job / "10x_256px_0px_overlap" / "features_conch" / "s.h5", np.ones((2, 3)))
    with pytest.raises(WsimilError, match="10x_256px_0px_overlap/features_conch, 20x_256px_0px_overlap/features_uni"):
        FeatureStore(job)
