import numpy as np
import pytest

from tests.conftest import shared_data
from wsimil.errors import WsimilError
from wsimil.slide import open_slide
from wsimil.slide.reader import mpp_from_properties

BACKENDS = ["openslide", "tiffslide", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_aperio_pyramid_opens_in_both_readers(slide_dir, backend):
    with open_slide(slide_dir / "s40.svs", backend) as s:
        assert s.dimensions == (4096, 3072)
        assert s.level_downsamples == [1.0, 4.0, 16.0]
        assert s.mpp == pytest.approx(0.25)
        assert s.best_level(0.5) == 0 and s.best_level(2.0) == 1 and s.best_level(4.0) == 2
        assert s.best_level(0.1) == 0  # never upsample past level 0
        region = s.read_region((1024, 512), 1, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8


@pytest.mark.parametrize("name", ["s40.svs", "s20.svs", "generic.tif"])
def test_both_readers_return_identical_pixels_at_level_aligned_positions(slide_dir, name):
    """What ``--reader auto`` relies on: tiffslide decodes exactly OpenSlide's pixels on every level, at the
    level-snapped positions the tiler and the block reader use."""
    with open_slide(slide_dir / name, "openslide") as o, open_slide(slide_dir / name, "tiffslide") as t:
        assert o.level_downsamples == t.level_downsamples
        for level, ds in enumerate(o.level_downsamples):
            ds = int(round(ds))
            for x, y in [(0, 0), (37, 21), (211, 150)]:
                loc = (x * ds, y * ds)
                a = o.read_region(loc, level, (96, 80))
                b = t.read_region(loc, level, (96, 80))
                assert np.array_equal(a, b), (name, level, loc)


def test_pixels_match_the_rendered_image(slide_dir, rendered):
    a = open_slide(slide_dir / "s40.svs", "openslide").read_region((1000, 800), 0, (300, 200))
    assert np.abs(a.astype(int) - rendered[0][800:1000, 1000:1300].astype(int)).mean() < 6  # JPEG Q80


def test_auto_reader_picks_tiffslide_for_tiff_family_and_openslide_otherwise(slide_dir, tmp_path):
    assert open_slide(slide_dir / "s40.svs").backend == "tiffslide"
    assert open_slide(slide_dir / "generic.tif", "auto").backend == "tiffslide"
    other = tmp_path / "s40.vendor"  # unknown suffix: OpenSlide detects the format itself
    other.write_bytes((slide_dir / "s40.svs").read_bytes())
    with open_slide(other, "auto") as s:
        assert s.backend == "openslide" and s.mpp == pytest.approx(0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpp_sources(slide_dir, backend):
    assert open_slide(slide_dir / "s20.svs", backend).mpp == pytest.approx(0.5)
    assert open_slide(slide_dir / "generic.tif", backend).mpp == pytest.approx(0.25)
    with pytest.raises(WsimilError) as e:
        open_slide(slide_dir / "nompp.tif", backend)
    assert "slide 'nompp'" in str(e.value) and "--mpp" in str(e.value)
    assert open_slide(slide_dir / "nompp.tif", backend, mpp=0.25).mpp == 0.25
    with pytest.raises(WsimilError, match="outside"):
        open_slide(slide_dir / "nompp.tif", backend, mpp=1000)


def test_mpp_from_properties_fallbacks():
    assert mpp_from_properties({"aperio.MPP": "0.2527"}) == pytest.approx(0.2527)
    assert mpp_from_properties({"tiff.ImageDescription": "Aperio|AppMag = 40|MPP = 0.26"}) == pytest.approx(0.26)
    assert mpp_from_properties({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}) == 0.25
    assert mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_fail_clearly(slide_dir, tmp_path, backend):
    with pytest.raises(WsimilError, match="slide 'truncated'"):
        s = open_slide(slide_dir / "truncated.svs", backend)
        s.read_region((0, 0), 0, (4096, 3072))
    with pytest.raises(WsimilError, match="does not exist"):
        open_slide(tmp_path / "missing.svs", backend)
    with pytest.raises(WsimilError, match="unknown slide reader"):
        open_slide(slide_dir / "s40.svs", "bioformats")


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_svs(backend):
    path = shared_data("slides", "cmu_small_region.svs")
    with open_slide(path, backend) as s:
        assert s.dimensions == (2220, 2967) and s.mpp == pytest.approx(0.499)
        thumb, ds = s.thumbnail(512)
        assert max(thumb.shape[:2]) == 512 and ds == pytest.approx(2967 / 512, rel=1e-3)
        assert thumb.mean() < 240  # there is tissue, not a blank page


@pytest.mark.parametrize("name", ["s40.svs", "generic.tif"])
def test_direct_jpeg_tile_reads_match_tiffslide(slide_dir, name):
    """The tiffslide reader decodes tiled JPEG levels itself (no zarr): the same pixels as tiffslide's own
    read_region, at unaligned positions, across tile borders and off the image edge (white, as OpenSlide)."""
    with open_slide(slide_dir / name, "tiffslide") as t:
        for level, ds in enumerate(t.level_downsamples):
            assert t._tiles(level) is not None
            lw, lh = t.level_dimensions[level]
            for x, y, w, h in [(0, 0, 96, 80), (250, 131, 300, 270), (lw - 40, lh - 30, 100, 90), (-20, -10, 50, 40)]:
                loc = (int(x * ds), int(y * ds))
                got = t.read_region(loc, level, (w, h))
                t._tile_readers[level] = None  # force tiffslide's path for the reference
                ref = t.read_region(loc, level, (w, h))
                del t._tile_readers[level]
                assert got.shape == (h, w, 3) and np.array_equal(got, ref), (name, level, (x, y, w, h))
