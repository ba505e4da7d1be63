from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WSIMIL_PROGRESS", "0")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data; skip the test (with the reason) when it is absent, as in a user's clone."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not available: {p} (only present beside the development checkout)")
    return p


@pytest.fixture
def digit_cohort(tmp_path):
    """60 digit bags written in TRIDENT layout; returns (features dir, manifest path)."""
    from wsimil.data.synthetic import make_digit_bags, write_bags

    manifest = write_bags(make_digit_bags(60, seed=3), tmp_path / "cohort")
    return tmp_path / "cohort" / "features", manifest


@pytest.fixture(scope="session")
def rendered():
    from wsimil.slide.synth import render_slide

    """One positive 4096×3072 synthetic slide at 0.25 µm/px: (image, tissue mask, tumour mask)."""
    return render_slide(7, 4096, 3072, mpp=0.25, positive=True, tumor_fraction=0.05)


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory, rendered):
    """Aperio 40x, Aperio 20x, generic TIFF with resolution tags, generic TIFF without MPP, truncated file."""
    from wsimil.slide.synth import write_aperio_tiff

    d = tmp_path_factory.mktemp("slides")
    img = rendered[0]
    write_aperio_tiff(d / "s40.svs", img, mpp=0.25, app_mag=40)
    write_aperio_tiff(d / "s20.svs", img[::2, ::2].copy(), mpp=0.5, app_mag=20, downsamples=(4,))
    write_aperio_tiff(d / "generic.tif", img, mpp=0.25, aperio=False)
    write_aperio_tiff(d / "nompp.tif", img, mpp=None, aperio=False)
    data = (d / "s40.svs").read_bytes()
    (d / "truncated.svs").write_bytes(data[: len(data) // 3])
    return d


def tissue_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="session")
def digit_abmil_run(tmp_path_factory):
    """A 2-fold ABMIL run on 24 digit bags (features without slide provenance), with its bundle: ``(run folder,
    features, manifest)``. Shared: tests must not write into it."""
    from wsimil.config import load_config
    from wsimil.data.synthetic import make_digit_bags, write_bags
    from wsimil.methods.trainer import run_training
    from wsimil.predict.write import bundle_from_run

    d = tmp_path_factory.mktemp("digits")
    manifest = write_bags(make_digit_bags(24, seed=5), d / "cohort")
    cfg = load_config(model="abmil", folds=2, epochs=2, bootstrap=0, model_kwargs={"hidden_dims": [32]})
    run_training(cfg, d / "cohort" / "features", manifest, d / "run")
    bundle_from_run(d / "run")  # as `wsimil train` does
    return d / "run", d / "cohort" / "features", manifest
