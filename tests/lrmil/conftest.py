"""A tiny LRMIL cohort: 6 synthetic slides scanned at 20× (0.5 µm/px, so 5× reads come from the 2 µm/px level),
tiled at 20× and 5× with 64-px patches (about 90 HR and 8 LR patches per slide), and a tiny timm encoder."""

from __future__ import annotations

import pytest

from wsimil.features.encoders import ENCODERS, EncoderSpec, register_encoder

TEST_ENCODER = "lrmil_test_resnet"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from a second intra-op thread, and on a busy shared machine OpenMP threads
    waiting for each other made them ~10x slower; restored after each module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def test_encoder():
    """Register a 0.4 M-parameter timm ResNet (random weights, 32-px input) under ``lrmil_test_resnet`` for the
    session's LRMIL tests; removed afterwards so other tests see the real registry."""
    added = TEST_ENCODER not in ENCODERS
    if added:
        register_encoder(EncoderSpec(TEST_ENCODER, "test_resnet", 96, input_size=32, note="LRMIL tests"))
    yield TEST_ENCODER
    if added:
        ENCODERS.pop(TEST_ENCODER, None)


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory):
    """``(job dir, manifest)`` of 6 slides (3 with tumour foci covering 15% of the tissue)."""
    from wsimil.slide.job import TileSettings, run_tiling
    from wsimil.slide.synth import make_cohort

    root = tmp_path_factory.mktemp("lrmil_cohort")
    make_cohort(root / "cohort", 6, seed=1, width=1024, height=768, mpp=0.5, app_mag=20, tumor_fraction=0.15)
    manifest = root / "cohort" / "manifest.csv"
    table = run_tiling(manifest, root / "job", TileSettings(mags=[20, 5], patch_size=64))
    assert (table["status"] == "ok").all(), table
    return root / "job", manifest
