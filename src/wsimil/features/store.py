"""Read feature bags from TRIDENT (``features_{enc}/{id}.h5``) and CLAM (``h5_files/``, ``pt_files/``) layouts;
write TRIDENT's layout with provenance attributes.

An HDF5 bag holds ``features`` float32 ``(N, D)``, optionally ``coords`` int64 ``(N, 2)`` (level-0 x, y) and
``instance_labels`` int ``(N,)`` (−1 = unknown). Old CLAM files store ``features`` as ``(1, N, D)``; the
leading axis is dropped on read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsimil.errors import WsimilError
from wsimil.io import atomic_path

SCHEMA_VERSION = 1


@dataclass
class Bag:
    slide_id: str
    features: np.ndarray  # (N, D) float32
    coords: np.ndarray | None = None  # (N, 2) int64, level-0 (x, y)
    instance_labels: np.ndarray | None = None  # (N,) int64, -1 = unknown


class FeatureStore:
    """A directory of feature bags, one file per slide.

    ``root`` may be a TRIDENT ``features_{encoder}`` folder, a folder holding exactly one such folder, a TRIDENT
    job root whose one ``{mag}x_{ps}px_{ov}px_overlap/`` level holds features, a CLAM feature folder (with
    ``h5_files/`` or ``pt_files/``), or any folder of ``{slide_id}.h5`` / ``.pt`` files. ``.pt`` files (CLAM's
    tensors, TRIDENT's ``saveas='pt'`` numpy arrays) are read without unpickling code
    (:func:`wsimil.checkpoint.safe_torch_load`).
    """

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.is_dir():
            raise WsimilError(f"feature folder {root} does not exist")
        self.root = root
        self.dir, self.ext = self._detect(root)
        self.layout = {"h5_files": "clam_h5", "pt_files": "clam_pt"}.get(self.dir.name, f"flat_{self.ext[1:]}")

    @staticmethod
    def _detect(root: Path) -> tuple[Path, str]:
        for sub, ext in (("h5_files", ".h5"), ("pt_files", ".pt")):
            if (root / sub).is_dir() and any((root / sub).glob(f"*{ext}")):
                return root / sub, ext
        for ext in (".h5", ".pt"):
            if any(root.glob(f"*{ext}")):
                return root, ext
        enc_dirs = sorted(p for p in root.glob("features_*") if p.is_dir())
        if len(enc_dirs) == 1:
            return FeatureStore._detect(enc_dirs[0])
        if len(enc_dirs) > 1:
            names = ", ".join(p.name for p in enc_dirs)
            raise WsimilError(f"{root} holds features of several encoders ({names}); pass one of those folders")
        levels = sorted(p for p in root.glob("*x_*px_*px_overlap") if p.is_dir() and any(p.glob("features_*")))
        if len(levels) == 1:
            return FeatureStore._detect(levels[0])
        if len(levels) > 1:
            names = ", ".join(f"{p.name}/{e.name}" for p in levels for e in sorted(p.glob("features_*")))
            raise WsimilError(
                f"{root} is a TRIDENT job with features at several magnifications/patch sizes; pass one of: {names}"
            )
        raise WsimilError(
            f"no feature files in {root}: expected {{slide_id}}.h5 files (TRIDENT features_{{encoder}}/), "
            "or CLAM's h5_files/ or pt_files/"
        )

    def path(self, slide_id: str) -> Path:
        return self.dir / f"{slide_id}{self.ext}"

    def has(self, slide_id: str) -> bool:
        return self.path(slide_id).is_file()

    def slide_ids(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob(f"*{self.ext}"))

    def shape(self, slide_id: str) -> tuple[int, int]:
        """``(N, D)`` without reading the features (HDF5); ``.pt`` files are loaded."""
        if self.ext == ".pt":
            return tuple(self.read(slide_id).features.shape)  # type: ignore[return-value]
        path = self.path(slide_id)
        try:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise WsimilError(f"slide {slide_id!r}: {path} has no 'features' dataset")
                shape = f["features"].shape
        except OSError as e:
            raise WsimilError(f"slide {slide_id!r}: cannot open {path}: {e}") from e
        return _bag_shape(slide_id, path, shape)

    def read(self, slide_id: str) -> Bag:
        path = self.path(slide_id)
        if self.ext == ".pt":
            from wsimil.checkpoint import safe_torch_load

            t = safe_torch_load(path, f"feature file of slide {slide_id!r}")
            if isinstance(t, dict):
                t = t.get("features")
            if hasattr(t, "detach"):  # a tensor (CLAM); TRIDENT's saveas='pt' stores a numpy array
                t = t.detach().float().numpy()
            if not isinstance(t, np.ndarray) or t.dtype.kind not in "fiu":
                raise WsimilError(
                    f"slide {slide_id!r}: {path} holds a {type(t).__name__}, not a numeric (N, D) feature array"
                )
            feats = np.asarray(t, dtype=np.float32)
            _bag_shape(slide_id, path, feats.shape)
            return Bag(slide_id, feats.reshape(-1, feats.shape[-1]))
        try:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise WsimilError(f"slide {slide_id!r}: {path} has no 'features' dataset")
                feats = np.asarray(f["features"][()], dtype=np.float32)
                _bag_shape(slide_id, path, feats.shape)
                feats = feats.reshape(-1, feats.shape[-1])
                coords = np.asarray(f["coords"][()]).reshape(-1, 2).astype(np.int64) if "coords" in f else None
                labels = (
                    np.asarray(f["instance_labels"][()]).reshape(-1).astype(np.int64)
                    if "instance_labels" in f
                    else None
                )
        except OSError as e:
            raise WsimilError(f"slide {slide_id!r}: cannot read {path}: {e}") from e
        n = feats.shape[0]
        if coords is not None and len(coords) != n:
            raise WsimilError(f"slide {slide_id!r}: {path} has {n} feature rows but {len(coords)} coords")
        if labels is not None and len(labels) != n:
            raise WsimilError(f"slide {slide_id!r}: {path} has {n} feature rows but {len(labels)} instance_labels")
        return Bag(slide_id, feats, coords, labels)


def _bag_shape(slide_id: str, path: Path, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise WsimilError(f"slide {slide_id!r}: features in {path} have shape {tuple(shape)}, expected (N, D)")
    return int(shape[0]), int(shape[1])


def write_bag(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray | None = None,
    *,
    instance_labels: np.ndarray | None = None,
    encoder: str | None = None,
    attrs: dict[str, Any] | None = None,
    coords_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write one bag in TRIDENT's layout, atomically. ``attrs`` go on ``features`` (provenance: encoder,
    weights checksum, transforms, dtype; the wsimil version is added); ``coords_attrs`` on ``coords``."""
    from wsimil import __version__

    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got {features.shape}")
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("features", data=features)
        meta = {
            "encoder": encoder or "unknown",
            "dtype": "float32",
            "wsimil_version": __version__,
            "schema_version": SCHEMA_VERSION,
            **(attrs or {}),
        }
        for k, v in meta.items():
            ds.attrs[k] = v
        if coords is not None:
            c = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
            for k, v in (coords_attrs or {}).items():
                c.attrs[k] = v
        if instance_labels is not None:
            f.create_dataset("instance_labels", data=np.asarray(instance_labels, dtype=np.int64).reshape(-1))
    return path
