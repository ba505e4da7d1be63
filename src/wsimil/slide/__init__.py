"""Whole-slide images: readers (OpenSlide, tiffslide), tissue detection, tiling at exact µm/px, synthetic slides."""

from wsimil.slide.reader import READERS, SlideReader, open_slide

__all__ = ["READERS", "SlideReader", "open_slide"]
