"""What a bundle records about how slides become its aggregators' input: the patch encoder (:class:`EncoderRef`),
the tiling (:class:`TilingRef`) and each ensemble member (:class:`Member`, which may carry its own encoder)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py

from wsimil.errors import WsimilError

_RANDOM = re.compile(r"^random\(seed=(-?\d+)\)$")


@dataclass(frozen=True)
class EncoderRef:
    """The patch encoder a bundle's aggregator expects.

    ``weights``: ``None`` = random initialisation from ``seed`` (reproducible, as the demo uses), ``"hub"`` = the
    registry's hub weights, otherwise a weights file (absolute, or relative to the bundle folder when the file was
    copied into it). ``weights_sha256`` is checked whenever the file is used.

    ``input_size``: the pixels the encoder works at when not the registry's (LRMIL's 5x encoders). ``distilled``:
    the weights file is a distilled encoder (LRMIL stage 1: the whole network, rebuilt on the architecture of
    registry encoder ``name``), not weights for the registry encoder."""

    name: str
    weights: str | None = None
    weights_sha256: str | None = None
    seed: int = 0
    embed_dim: int | None = None
    precision: str = "fp32"
    transforms: str = ""
    input_size: int | None = None
    distilled: bool = False

    @property
    def describe(self) -> str:
        """A short description for messages: ``resnet18``, ``resnet18@64px``, ``distilled resnet18@64px``."""
        size = f"@{self.input_size}px" if self.input_size else ""
        return f"{'distilled ' if self.distilled else ''}{self.name}{size}"

    @classmethod
    def from_feature_attrs(cls, attrs: dict[str, Any]) -> EncoderRef:
        """Parse the provenance attributes that ``wsimil extract`` writes on ``features`` (``encoder``, ``weights``
        = ``random(seed=N)`` / ``hub:<id>`` / a file path, ``weights_sha256``, ``embed_dim``, ``precision``,
        ``transforms``)."""
        desc = str(attrs.get("weights", "") or "")
        weights: str | None
        seed = 0
        if m := _RANDOM.match(desc):
            weights, seed = None, int(m.group(1))
        elif desc.startswith("hub:"):
            weights = "hub"
        elif desc:
            weights = desc
        else:
            raise WsimilError("the feature files record no encoder weights ('weights' attribute)")
        dim = attrs.get("embed_dim")
        return cls(
            name=str(attrs["encoder"]),
            weights=weights,
            weights_sha256=str(attrs.get("weights_sha256") or "") or None,
            seed=seed,
            embed_dim=int(dim) if dim is not None else None,
            precision=str(attrs.get("precision", "fp32")),
            transforms=str(attrs.get("transforms", "")),
        )


@dataclass(frozen=True)
class TilingRef:
    """How slides are tiled for the bundle's encoder: the magnification the features are at (``mag``), the patch
    size in pixels at that magnification, the tissue detection (:class:`wsimil.slide.tissue.TissueParams` fields)
    and the least tissue share of a patch, and the slide reader backend."""

    mag: float
    patch_size: int = 256
    min_tissue: float = 0.1
    tissue: dict[str, float] = field(default_factory=dict)
    reader: str = "auto"

    def tile_settings(self, mpp: float | None = None, reader: str | None = None):
        """The :class:`wsimil.slide.job.TileSettings` that reproduce the training tiling (one magnification:
        grids at different magnifications do not depend on each other, see :mod:`wsimil.slide.tiling`)."""
        from wsimil.slide.tiling_job import TileSettings

        return TileSettings.from_dict(asdict(self), mpp=mpp, reader=reader or self.reader)


@dataclass(frozen=True)
class Member:
    """One aggregator checkpoint of the ensemble (``file`` relative to the bundle). ``encoder``: the member's own
    patch encoder (LRMIL: each fold's distilled encoder); ``None``: the bundle's encoder."""

    file: str
    repeat: int
    fold: int
    sha256: str
    encoder: EncoderRef | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Member:
        enc = d.get("encoder")
        return cls(**{**d, "encoder": EncoderRef(**enc) if enc else None})


def weights_description(enc: EncoderRef) -> str | None:
    """What ``wsimil extract`` records as ``weights`` for these weights (``None`` for a file: path-dependent)."""
    if enc.weights is None:
        return f"random(seed={enc.seed})"
    return None


def feature_attrs(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                return {}
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f["features"].attrs.items()}
    except OSError:
        return {}


def coords_attrs(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                return {}
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f["coords"].attrs.items()}
    except OSError:
        return {}
