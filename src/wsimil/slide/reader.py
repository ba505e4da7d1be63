"""Slide readers behind one interface, with an explicit backend: OpenSlide (default) or tiffslide.

All positions are level-0 pixels ``(x, y)``; reads return RGB ``uint8`` arrays ``(h, w, 3)`` with transparent
(empty) areas composited on white. The level-0 resolution (µm/px) comes from, in order: the ``mpp`` override,
the backend's normalised property (``openslide.mpp-x`` / ``tiffslide.mpp-x``), the Aperio description
(``MPP = …``), and the TIFF resolution tags.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import traceback
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

import numpy as np

from wsimil.errors import WsimilError

MPP_RANGE = (0.05, 100.0)


class SlideReader(ABC):
    """A pyramidal slide. Subclasses set ``level_dimensions`` and ``level_downsamples`` and implement
    :meth:`_read` and :meth:`properties`."""

    backend = "abstract"

    def __init__(self, path: str | Path, mpp: float | None = None, slide_id: str | None = None):
        self.path = Path(path)
        self.slide_id = slide_id or self.path.stem
        if not self.path.is_file():
            raise WsimilError(f"slide {self.slide_id!r}: file {self.path} does not exist")
        self._open()
        self.mpp = self._resolve_mpp(mpp)

    # -- backend hooks
    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray: ...

    @property
    @abstractmethod
    def properties(self) -> dict[str, str]: ...

    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    # -- common API
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level(self, target_mpp: float) -> int:
        """The coarsest level whose resolution is at least the target's (``mpp_level ≤ target``), so a read
        only ever downsamples. Falls back to level 0 when even level 0 is coarser than the target."""
        best = 0
        for lvl in range(self.level_count):
            if self.level_mpp(lvl) <= target_mpp * (1 + 1e-3):
                best = lvl
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB ``(h, w, 3)`` uint8 of ``size = (w, h)`` pixels at ``level``, top-left at level-0 ``location``."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range for slide {self.slide_id!r} ({self.level_count} levels)")
        return self._read(int(location[0]), int(location[1]), level, int(size[0]), int(size[1]))

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB thumbnail whose longer side is at most ``max_side``; returns ``(image, downsample)`` where
        ``downsample`` is level-0 pixels per thumbnail pixel."""
        from PIL import Image

        w0, h0 = self.dimensions
        ds = max(w0, h0) / max_side if max(w0, h0) > max_side else 1.0
        level = 0
        for lvl in range(self.level_count):
            if self.level_downsamples[lvl] <= ds * (1 + 1e-3):
                level = lvl
        lw, lh = self.level_dimensions[level]
        img = self._read(0, 0, level, lw, lh)
        tw, th = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        if (lw, lh) != (tw, th):
            img = np.asarray(Image.fromarray(img).resize((tw, th), Image.Resampling.BOX))
        return img, w0 / tw

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]}, "
            f"{self.level_count} levels, mpp={self.mpp:.4g})"
        )

    # -- metadata
    def _resolve_mpp(self, override: float | None) -> float:
        if override is not None:
            return _check_mpp(float(override), self, "the --mpp override")
        mpp = mpp_from_properties(self.properties, self.backend)
        if mpp is None:
            raise WsimilError(
                f"slide {self.slide_id!r} ({self.path}) has no microns-per-pixel in its metadata (no "
                f"{self.backend}.mpp-x, Aperio MPP or TIFF resolution); pass the level-0 resolution with "
                "--mpp (e.g. --mpp 0.25 for 40x, 0.5 for 20x) or an 'mpp' column in the slide table"
            )
        return _check_mpp(mpp, self, "its metadata")


def _check_mpp(mpp: float, slide: SlideReader, source: str) -> float:
    if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]) or math.isnan(mpp):
        raise WsimilError(
            f"slide {slide.slide_id!r}: microns-per-pixel {mpp} from {source} is outside "
            f"{MPP_RANGE[0]}–{MPP_RANGE[1]} µm/px; pass the right value with --mpp"
        )
    return mpp


def mpp_from_properties(props: dict[str, str], backend: str = "openslide") -> float | None:
    """Level-0 µm/px from slide properties, or ``None``."""
    for key in (f"{backend}.mpp-x", "openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP"):
        v = _float(props.get(key))
        if v:
            return v
    desc = props.get("tiff.ImageDescription", "")
    for part in desc.split("|"):
        k, _, v = part.partition("=")
        if k.strip() == "MPP" and _float(v):
            return _float(v)
    res, unit = _float(props.get("tiff.XResolution")), props.get("tiff.ResolutionUnit", "").lower()
    if res:
        if unit in ("centimeter", "3"):
            return 1e4 / res
        if unit in ("inch", "2") and res > 1000:  # a plain 72/96/300 dpi tag is a screen default, not a scan
            return 25400 / res
    return None


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f > 0 and math.isfinite(f) else None


def _rgba_to_rgb(a: np.ndarray) -> np.ndarray:
    """Composite RGBA (OpenSlide's premultiplied output) on white. Tissue regions are fully opaque, so the
    common case is a plain channel drop (one SIMD pass); only regions with transparency pay for compositing."""
    if a.shape[-1] == 3:
        return a
    import cv2

    if a[..., 3].min() == 255:
        return cv2.cvtColor(a, cv2.COLOR_RGBA2RGB)
    rgb = a[..., :3].astype(np.uint16)
    alpha = a[..., 3:4].astype(np.uint16)
    return (rgb + (255 - alpha)).clip(0, 255).astype(np.uint8)


class OpenSlideReader(SlideReader):
    """OpenSlide via ``openslide-python`` (with the ``openslide-bin`` library)."""

    backend = "openslide"

    def _open(self) -> None:
        import openslide

        try:
            self._s = openslide.OpenSlide(str(self.path))
        except Exception as e:  # noqa: BLE001 - OpenSlideUnsupportedFormatError, OpenSlideError, OSError
            raise WsimilError(f"slide {self.slide_id!r}: OpenSlide cannot open {self.path}: {e}") from e
        self.level_dimensions = [tuple(d) for d in self._s.level_dimensions]
        self.level_downsamples = [float(d) for d in self._s.level_downsamples]

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._s.properties)

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        try:
            img = self._s.read_region((x, y), level, (w, h))
        except Exception as e:  # noqa: BLE001
            raise WsimilError(f"slide {self.slide_id!r}: read at ({x}, {y}) level {level} failed: {e}") from e
        return _rgba_to_rgb(np.asarray(img))

    def close(self) -> None:
        self._s.close()


class TiffSlideReader(SlideReader):
    """tiffslide (pure Python on tifffile)."""

    backend = "tiffslide"

    def _open(self) -> None:
        import tiffslide

        _quiet_zarr_async()
        try:
            with _slide_log_prefix(self.slide_id):
                self._s = tiffslide.TiffSlide(str(self.path))
                # tiffslide parses lazily: a damaged file fails here, not in the constructor
                self.level_dimensions = [tuple(d) for d in self._s.level_dimensions]
                self.level_downsamples = [float(d) for d in self._s.level_downsamples]
        except Exception as e:  # noqa: BLE001
            raise WsimilError(f"slide {self.slide_id!r}: tiffslide cannot open {self.path}: {_one_line(e)}") from e

    @property
    def properties(self) -> dict[str, str]:
        return {k: str(v) for k, v in self._s.properties.items() if v is not None}

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        tiles = self._tiles(level)
        if tiles is not None:
            ds = self.level_downsamples[level]
            return tiles.read(int(np.floor(x / ds)), int(np.floor(y / ds)), w, h)
        try:
            with _slide_log_prefix(self.slide_id):
                img = self._s.read_region((x, y), level, (w, h), as_array=True)
        except Exception as e:  # noqa: BLE001
            _drain_zarr_tasks()
            raise WsimilError(
                f"slide {self.slide_id!r}: read at ({x}, {y}) level {level} failed: {_one_line(e)} "
                "(damaged or truncated file?)"
            ) from e
        img = _rgba_to_rgb(np.asarray(img))
        # outside the image tiffslide returns black, OpenSlide transparent (= white here): match OpenSlide
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        x0, y0 = int(np.floor(x / ds)), int(np.floor(y / ds))
        inside_w, inside_h = max(0, min(w, lw - x0)), max(0, min(h, lh - y0))
        if inside_w < w or inside_h < h or x0 < 0 or y0 < 0:
            img = np.array(img, copy=True)
            img[inside_h:, :] = 255
            img[:, inside_w:] = 255
            img[: max(0, -y0), :] = 255
            img[:, : max(0, -x0)] = 255
        return img

    def _tiles(self, level: int) -> _JpegTiles | None:
        """The direct tile reader of ``level`` when its page is tiled 8-bit RGB JPEG, else None (tiffslide reads)."""
        cache = self.__dict__.setdefault("_tile_readers", {})
        if level not in cache:
            cache[level] = None
            try:
                tif = self._s.ts_tifffile
                series = tif.series[int(self._s.properties.get("tiffslide.series-index", 0))]
                page = series.levels[level].keyframe
                jpeg = page.is_tiled and page.compression == 7 and page.samplesperpixel == 3 and page.bitspersample == 8
                if jpeg and min(page.databytecounts) > 0:  # sparse files (empty tiles) go through tiffslide
                    cache[level] = _JpegTiles(tif.filehandle, page, self.slide_id)
            except Exception:  # noqa: BLE001 - any doubt: the general tiffslide path
                cache[level] = None
        return cache[level]

    def close(self) -> None:
        self._s.close()


class _JpegTiles:
    """A region read of one tiled JPEG page without zarr: the raw bytes of each tile it touches, decoded by
    tifffile's own decoder (imagecodecs, the one tiffslide goes through, so pixels are identical) straight into
    the output array; outside the image is white, as OpenSlide returns it. Skips tiffslide's per-read event
    loop round trip, which cost ~60% of a 20× block read."""

    #: decoded tiles kept for the next region: blocks in row-major order share the tiles on their borders
    cache_bytes = 64 * 2**20

    def __init__(self, fh, page, slide_id: str):
        self.fh, self.page, self.slide_id = fh, page, slide_id
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.tw, self.th = page.tilewidth, page.tilelength
        self.width, self.height = page.imagewidth, page.imagelength
        self.per_row = -(-self.width // self.tw)
        self.decode = page.decode

    def read(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 of the level's pixels ``[y0, y0 + h) × [x0, x0 + w)``."""
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, self.width), min(y0 + h, self.height)
        inside = (xa, ya, xb, yb) == (x0, y0, x0 + w, y0 + h)
        out = np.empty((h, w, 3), dtype=np.uint8) if inside else np.full((h, w, 3), 255, dtype=np.uint8)
        if xa >= xb or ya >= yb:
            return out
        for r in range(ya // self.th, (yb - 1) // self.th + 1):
            for c in range(xa // self.tw, (xb - 1) // self.tw + 1):
                tx, ty = c * self.tw, r * self.th
                tile = self._tile(r * self.per_row + c, tx, ty)
                sx, sy = max(xa, tx), max(ya, ty)
                ex, ey = min(xb, tx + self.tw), min(yb, ty + self.th)
                out[sy - y0 : ey - y0, sx - x0 : ex - x0] = tile[sy - ty : ey - ty, sx - tx : ex - tx, :3]
        return out

    def _tile(self, i: int, tx: int, ty: int) -> np.ndarray:
        tile = self.cache.get(i)
        if tile is not None:
            self.cache.move_to_end(i)
            return tile
        page, fh = self.page, self.fh
        try:
            with fh.lock:
                fh.seek(page.dataoffsets[i])
                data = fh.read(page.databytecounts[i])
            tile = self.decode(data, i, jpegtables=page.jpegtables)[0]
        except Exception as e:  # noqa: BLE001
            raise WsimilError(
                f"slide {self.slide_id!r}: tile {i} at level pixel ({tx}, {ty}) cannot be decoded: "
                f"{_one_line(e)} (damaged or truncated file?)"
            ) from e
        tile = tile.reshape(tile.shape[-3:])
        self.cache[i] = tile
        if len(self.cache) * tile.nbytes > self.cache_bytes:
            self.cache.popitem(last=False)
        return tile


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class _ZarrTaskNoise(logging.Filter):
    """Drops asyncio's reports about zarr's read tasks ("Task was destroyed but it is pending!", "... exception was
    never retrieved", each with a traceback): the failed read itself is reported once, per slide."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "zarr" in record.getMessage():
            return False
        tb = record.exc_info[2] if record.exc_info else None
        return not (tb and any("zarr" in f.filename for f in traceback.extract_tb(tb)))


_ZARR_QUIET = False


def _quiet_zarr_async() -> None:
    """Install the filter above (once per process, so also in worker processes)."""
    global _ZARR_QUIET
    if _ZARR_QUIET:
        return
    logging.getLogger("asyncio").addFilter(_ZarrTaskNoise())
    warnings.filterwarnings("ignore", r"coroutine 'concurrent_map.* was never awaited", RuntimeWarning)
    _ZARR_QUIET = True


def _drain_zarr_tasks() -> None:
    """After a failed tiffslide read, cancel and await the tile reads zarr left pending on its event loop.

    zarr decodes a region's tiles in concurrent tasks and raises the first error; the others stay pending and, when
    collected or at exit, print hundreds of lines ("Task was destroyed but it is pending!", "Event loop is closed").
    wsimil reads one region at a time per process, so every pending task on that loop belongs to the failed read."""
    try:
        from zarr.core import sync as zarr_sync

        loop = zarr_sync.loop[0]
    except (ImportError, AttributeError, IndexError):
        return
    if loop is None or loop.is_closed():
        return

    async def drain() -> None:
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    with contextlib.suppress(Exception):  # best effort: the read error is what gets reported
        asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout=30)


class _SlidePrefix(logging.Filter):
    def __init__(self, slide_id: str):
        super().__init__()
        self.slide_id = slide_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = f"slide {self.slide_id!r}: tifffile: {record.getMessage()}", None
        return True


@contextlib.contextmanager
def _slide_log_prefix(slide_id: str):
    """Name the slide in tifffile's one-line log messages (e.g. ``invalid page offset`` in a truncated file)."""
    log = logging.getLogger("tifffile")
    f = _SlidePrefix(slide_id)
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


READERS: dict[str, type[SlideReader]] = {"openslide": OpenSlideReader, "tiffslide": TiffSlideReader}
#: reader choices: ``auto`` resolves per slide (see :func:`open_slide`)
READER_CHOICES = ("auto", *READERS)
#: formats ``auto`` reads with tiffslide: plain TIFF containers whose tiles tiffslide decodes pixel-identically to
#: OpenSlide at level-aligned positions (tested), ~4x faster for block reads (benchmarks/pipeline.py)
TIFF_SUFFIXES = (".svs", ".tif", ".tiff")


def open_slide(
    path: str | Path, backend: str = "auto", mpp: float | None = None, slide_id: str | None = None
) -> SlideReader:
    """Open a slide with the named backend: ``openslide``, ``tiffslide``, or ``auto`` — tiffslide for SVS/TIFF
    files it can open, OpenSlide for every other format (and for TIFFs tiffslide rejects). ``reader.backend``
    names the backend that was used."""
    if backend not in READER_CHOICES:
        raise WsimilError(f"unknown slide reader {backend!r}; choose from {', '.join(READER_CHOICES)}")
    if backend == "auto":
        if Path(path).suffix.lower() in TIFF_SUFFIXES:
            try:
                return TiffSlideReader(path, mpp=mpp, slide_id=slide_id)
            except WsimilError:
                pass  # OpenSlide may still read it (or gives its own, clearer error)
        backend = "openslide"
    return READERS[backend](path, mpp=mpp, slide_id=slide_id)
