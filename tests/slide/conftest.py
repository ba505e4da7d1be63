import numpy as np
import pytest

from wsimil.slide.synth import render_slide, write_aperio_tiff


@pytest.fixture(scope="session")
def rendered():
    """One positive 4096×3072 synthetic slide at 0.25 µm/px: (image, tissue mask, tumour mask)."""
    return render_slide(7, 4096, 3072, mpp=0.25, positive=True, tumor_fraction=0.05)


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory, rendered):
    """Aperio 40x, Aperio 20x, generic TIFF with resolution tags, generic TIFF without MPP, truncated file."""
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
