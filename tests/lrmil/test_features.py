"""LRMIL's features come from the shared extraction engine with the taps as its hook."""

import h5py
import numpy as np
import torch

from wsimil.features.encoders import create_encoder
from wsimil.features.extract import EncodeSettings, encode_grid, final_fn
from wsimil.features.patches import SlidePatchBlocks
from wsimil.lrmil.features import extract, taps_fn
from wsimil.lrmil.job import LRMILJob
from wsimil.lrmil.taps import forward_taps


def _all_patches(grid) -> torch.Tensor:
    """Every patch of ``grid`` in its order, read without the engine: ``(N, ps, ps, 3)`` uint8."""
    ds = SlidePatchBlocks(grid)
    out = torch.empty((len(grid.coords), grid.patch_size, grid.patch_size, 3), dtype=torch.uint8)
    for k in range(len(ds)):
        x, i = ds[k]
        out[i] = x
    return out


def test_taps_hook_gives_the_direct_forward_at_any_batch_size(tiny_job, test_encoder):
    job = LRMILJob(tiny_job[0])
    enc = create_encoder(test_encoder, None, 0)
    enc.model.eval()
    grid = job.grid("synth_0000", 20)
    layers = (0, 1, 2)
    with torch.inference_mode():
        ref = forward_taps(enc.model, enc.preprocess(_all_patches(grid)), layers)
    for bs in (5, 64):
        got = encode_grid(taps_fn(enc, layers), grid, EncodeSettings(batch_size=bs))
        assert sorted(got) == ["features", "summary/block0", "summary/block1", "summary/block2"]
        np.testing.assert_allclose(got["features"], ref.final.numpy(), rtol=1e-4, atol=1e-5)
        for layer, s in zip(layers, ref.summaries, strict=True):
            assert got[f"summary/block{layer}"].shape == (len(grid.coords), s.shape[1])
            np.testing.assert_allclose(got[f"summary/block{layer}"], s.numpy(), rtol=1e-4, atol=1e-5)
    plain = encode_grid(final_fn(enc), grid, EncodeSettings(batch_size=7))
    np.testing.assert_allclose(plain["features"], ref.final.numpy(), rtol=1e-4, atol=1e-5)


def test_lrmil_extract_writes_summaries_and_its_job(tiny_job, test_encoder, tmp_path):
    job = LRMILJob(tiny_job[0])
    enc = create_encoder(test_encoder, None, 0)
    out = extract(job, ["synth_0001"], 20, taps_fn(enc, (0, 2)), enc, tmp_path / "hr", "k1", EncodeSettings(), "HR")
    with h5py.File(out / "synth_0001.h5", "r") as f:
        n = len(job.grid("synth_0001", 20).coords)
        assert f["features"].shape == (n, enc.embed_dim) and f["summary/block2"].shape[0] == n
        assert f["features"].attrs["lrmil_key"] == "k1" and f["features"].attrs["tiling_job"] == str(job.root.resolve())
    mtime = (out / "synth_0001.h5").stat().st_mtime_ns
    extract(job, ["synth_0001"], 20, taps_fn(enc, (0, 2)), enc, out, "k1", EncodeSettings(), "HR")
    assert (out / "synth_0001.h5").stat().st_mtime_ns == mtime  # same key: reused
