"""Model bundles: everything needed to score new slides with a trained model, in one folder, loaded with one call.

Layout (``wsimil train`` writes ``RUN/bundle/``)::

    bundle.json                         what the bundle holds (below); written last, so a bundle without it is
                                        incomplete
    aggregators/repeat{r}_fold{k}.safetensors
                                        one trainer checkpoint per member (the fold models; safetensors with JSON
                                        metadata, never unpickled); a prediction is the mean of the members' class
                                        probabilities. Format 1 bundles (wsimil 0.1) hold ``.pt`` members, which are
                                        read through PyTorch's restricted loader and refused if they hold code
    encoder/<file>                      optional: custom encoder weights copied into the bundle (e.g. LRMIL's
                                        distilled encoder); their SHA-256 is recorded and checked on use

``bundle.json`` records the bundle format and the wsimil version that wrote it, the task and class names (and the
class names of extra output heads such as HMIL's ``coarse``), the aggregator (model, method and their options, input
width), the members with their checksums, the patch encoder (registry name, weights: a file, ``hub`` or a seeded
random initialisation, with the weights' SHA-256), the tiling (magnification, patch size, tissue detection, reader)
and the resolved training config. A bundle trained on features without slide provenance (e.g. a classic MIL CSV)
has no encoder/tiling and says why in ``slide_settings_missing``: it scores feature files but refuses slides.

Python API::

    from wsimil.bundle import load_bundle, write_bundle, EncoderRef, TilingRef
    b = load_bundle("runs/abmil/bundle")
    members = b.load_models("cpu")          # [(model, standardizer)]
    enc = b.build_encoder()                  # checks the weights' checksum
    settings = b.tile_settings()             # for wsimil.slide.job.run_tiling
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsimil import __version__
from wsimil.checkpoint import SUFFIX, fold_checkpoint, load_checkpoint, save_checkpoint
from wsimil.claims import remove_orphans
from wsimil.errors import WsimilError
from wsimil.io import temp_prefix

#: bundle format written by this wsimil; bundles of a newer format are refused with an "upgrade wsimil" error.
#: 2: members are safetensors checkpoints (1: ``torch.save`` files, still read through the safe loader)
BUNDLE_FORMAT = 2
BUNDLE_FILE = "bundle.json"
_RANDOM = re.compile(r"^random\(seed=(-?\d+)\)$")


@dataclass(frozen=True)
class EncoderRef:
    """The patch encoder a bundle's aggregator expects.

    ``weights``: ``None`` = random initialisation from ``seed`` (reproducible, as the demo uses), ``"hub"`` = the
    registry's hub weights, otherwise a weights file (absolute, or relative to the bundle folder when the file was
    copied into it). ``weights_sha256`` is checked whenever the file is used."""

    name: str
    weights: str | None = None
    weights_sha256: str | None = None
    seed: int = 0
    embed_dim: int | None = None
    precision: str = "fp32"
    transforms: str = ""

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
        from wsimil.slide.job import TileSettings
        from wsimil.slide.tissue import TissueParams

        known = TissueParams.__dataclass_fields__
        params = TissueParams(**{k: v for k, v in self.tissue.items() if k in known})
        return TileSettings(
            mags=[self.mag],
            patch_size=self.patch_size,
            reader=reader or self.reader,
            mpp=mpp,
            min_tissue=self.min_tissue,
            tissue=params,
        )


@dataclass(frozen=True)
class Member:
    """One aggregator checkpoint of the ensemble (``file`` relative to the bundle)."""

    file: str
    repeat: int
    fold: int
    sha256: str


@dataclass
class Bundle:
    """A loaded bundle (see the module docstring). ``path`` is the bundle folder."""

    path: Path
    classes: list[str]
    task: str
    model: str
    model_kwargs: dict[str, Any]
    method: str
    method_kwargs: dict[str, Any]
    in_dim: int
    members: list[Member]
    encoder: EncoderRef | None
    tiling: TilingRef | None
    head_classes: dict[str, list[str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    wsimil_version: str = __version__
    format_version: int = BUNDLE_FORMAT
    slide_settings_missing: str | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def scores_slides(self) -> bool:
        """True if the bundle knows how to tile and encode slides (not only score feature files)."""
        return self.encoder is not None and self.tiling is not None

    # ------------------------------------------------------------------ aggregators
    def load_models(self, device: str = "cpu", folds: list[int] | None = None) -> list[tuple[Any, Any]]:
        """Every member (of ``folds``, default all) as ``(model in eval mode on device, Standardizer | None)``;
        checksums and weights are checked, and a checkpoint this wsimil cannot rebuild fails with an error naming
        both versions."""
        from wsimil.data.batching import Standardizer
        from wsimil.features.encoders import sha256_file
        from wsimil.methods.trainer import load_model

        have = sorted({m.fold for m in self.members})
        unknown = sorted(set(folds or []) - set(have))
        if unknown:
            raise WsimilError(f"bundle {self.path} has no fold {', '.join(map(str, unknown))}; folds: {have}")
        out = []
        for m in self.members:
            if folds and m.fold not in folds:
                continue
            p = self.path / m.file
            if not p.is_file():
                raise WsimilError(f"bundle {self.path}: member {m.file} is missing")
            if sha256_file(p) != m.sha256:
                raise WsimilError(f"bundle {self.path}: {m.file} does not match its recorded checksum (modified?)")
            try:
                model, ck = load_model(p, device)
            except WsimilError as e:
                raise WsimilError(f"bundle {self.path}: cannot rebuild {m.file}: {e}") from e
            except Exception as e:  # noqa: BLE001 - torch.load / load_state_dict raise many types
                raise WsimilError(
                    f"bundle {self.path}: cannot rebuild {m.file} ({self.model}, written by wsimil "
                    f"{self.wsimil_version}, this is wsimil {__version__}): {type(e).__name__}: {e}"
                ) from e
            out.append((model, Standardizer.from_state(ck.get("standardizer"))))
        return out

    # ------------------------------------------------------------------ slides
    def require_slides(self) -> None:
        """Raise a clear error if this bundle cannot tile and encode slides."""
        if not self.scores_slides:
            why = self.slide_settings_missing or "it records no encoder or tiling"
            raise WsimilError(
                f"bundle {self.path} cannot score slides: {why}. It was trained on features without slide "
                "provenance; score feature files instead (wsimil predict --features DIR), or train on features "
                "made by `wsimil tile` + `wsimil extract`"
            )

    def tile_settings(self, mpp: float | None = None, reader: str | None = None):
        """Tiling settings for new slides (see :meth:`TilingRef.tile_settings`)."""
        self.require_slides()
        assert self.tiling is not None
        return self.tiling.tile_settings(mpp, reader)

    def encoder_weights(self, override: str | Path | None = None) -> str | None:
        """The weights argument for :func:`wsimil.features.encoders.create_encoder`: ``None`` (seeded random
        init), ``"hub"``, or an absolute file path whose SHA-256 matches the recorded one. ``override`` points to
        the same weights elsewhere (checked against the checksum)."""
        from wsimil.features.encoders import sha256_file

        self.require_slides()
        enc = self.encoder
        assert enc is not None
        if enc.weights is None or enc.weights == "hub":
            if override is not None:
                raise WsimilError(
                    f"bundle {self.path} uses {'hub' if enc.weights else 'randomly initialised'} weights for "
                    f"encoder {enc.name!r}; --encoder-weights does not apply"
                )
            return enc.weights
        path = Path(override) if override is not None else Path(enc.weights)
        if not path.is_absolute():
            path = self.path / path
        if not path.is_file():
            raise WsimilError(
                f"encoder weights {path} (encoder {enc.name!r}, recorded in bundle {self.path}) do not exist; "
                "pass their current location with --encoder-weights PATH"
            )
        if enc.weights_sha256:
            got = sha256_file(path)
            if got != enc.weights_sha256:
                raise WsimilError(
                    f"encoder weights {path} have SHA-256 {got[:12]}…, but bundle {self.path} was trained on "
                    f"features from weights {enc.weights_sha256[:12]}…: these are other weights"
                )
        return str(path.resolve())

    def build_encoder(self, weights: str | Path | None = None):
        """The bundle's patch encoder (:class:`wsimil.features.encoders.Encoder`), weights checked."""
        from wsimil.features.encoders import create_encoder

        w = self.encoder_weights(weights)
        assert self.encoder is not None
        with warnings.catch_warnings():
            # a seeded random init is the bundle's recorded choice here, not a forgotten --weights
            warnings.filterwarnings("ignore", message=".*randomly initialised.*")
            return create_encoder(self.encoder.name, w, self.encoder.seed)

    def extract_settings(self, device: str = "cpu", weights: str | Path | None = None, **kw: Any):
        """:class:`wsimil.features.extract.ExtractSettings` for this bundle (``kw``: batch_size, workers,
        precision, reader)."""
        from wsimil.features.extract import ExtractSettings

        w = self.encoder_weights(weights)
        assert self.encoder is not None and self.tiling is not None
        kw.setdefault("reader", self.tiling.reader)
        return ExtractSettings(mag=self.tiling.mag, encoder=self.encoder.name, weights=w, device=device,
                               seed=self.encoder.seed, **kw)  # fmt: skip

    # ------------------------------------------------------------------ features
    def check_features(self, slide_id: str, path: str | Path, dim: int) -> None:
        """Refuse a feature bag made by another encoder than the bundle's (name, weights checksum) or of another
        width, with an error naming the slide."""
        if dim != self.in_dim:
            raise WsimilError(
                f"slide {slide_id!r}: features in {path} are {dim}-d but bundle {self.path} expects {self.in_dim}-d "
                f"features{f' from encoder {self.encoder.name!r}' if self.encoder else ''} (wrong encoder?)"
            )
        if self.encoder is None or Path(path).suffix != ".h5":
            return
        attrs = _feature_attrs(Path(path))
        name = attrs.get("encoder")
        if name and name != "unknown" and name != self.encoder.name:
            raise WsimilError(
                f"slide {slide_id!r}: features in {path} come from encoder {name!r}, but bundle {self.path} was "
                f"trained on {self.encoder.name!r} features"
            )
        sha = attrs.get("weights_sha256")
        if sha and self.encoder.weights_sha256 and sha != self.encoder.weights_sha256:
            raise WsimilError(
                f"slide {slide_id!r}: features in {path} come from other {name!r} weights (SHA-256 {sha[:12]}…) "
                f"than bundle {self.path} was trained on ({self.encoder.weights_sha256[:12]}…)"
            )
        if not sha and self.encoder.weights_sha256 is None and "weights" in attrs:
            want = _weights_description(self.encoder)
            if want and attrs["weights"] != want:
                raise WsimilError(
                    f"slide {slide_id!r}: features in {path} come from {name!r} with weights {attrs['weights']}, "
                    f"but bundle {self.path} was trained on {want}"
                )

    def to_json(self) -> dict[str, Any]:
        d = {
            "format": "wsimil-bundle",
            "format_version": self.format_version,
            "wsimil_version": self.wsimil_version,
            "task": self.task,
            "classes": self.classes,
            "head_classes": self.head_classes,
            "aggregator": {
                "model": self.model,
                "model_kwargs": self.model_kwargs,
                "method": self.method,
                "method_kwargs": self.method_kwargs,
                "in_dim": self.in_dim,
            },
            "members": [asdict(m) for m in self.members],
            "encoder": asdict(self.encoder) if self.encoder else None,
            "tiling": asdict(self.tiling) if self.tiling else None,
            "slide_settings_missing": self.slide_settings_missing,
            "config": self.config,
        }
        return d


def _weights_description(enc: EncoderRef) -> str | None:
    """What ``wsimil extract`` records as ``weights`` for these weights (``None`` for a file: path-dependent)."""
    if enc.weights is None:
        return f"random(seed={enc.seed})"
    return None


def _feature_attrs(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                return {}
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f["features"].attrs.items()}
    except OSError:
        return {}


def _coords_attrs(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                return {}
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f["coords"].attrs.items()}
    except OSError:
        return {}


# ---------------------------------------------------------------------- loading
def load_bundle(path: str | Path) -> Bundle:
    """Load a bundle folder (or its ``bundle.json``; a run folder with a ``bundle/`` inside also works).

    Fails with a clear error for a folder that is not a bundle, a bundle of a newer format than this wsimil reads,
    or an aggregator this wsimil does not know."""
    p = bundle_folder(path)
    meta_path = p / BUNDLE_FILE
    if not meta_path.is_file() and (p / "lrmil.json").is_file():
        raise WsimilError(
            f"{p} is an LRMIL pipeline bundle (lrmil.json: one distilled encoder per fold), not a single-encoder model "
            "bundle; score slides with the LRMIL pipeline's own predict (wsimil.lrmil)"
        )
    if not meta_path.is_file():
        raise WsimilError(
            f"{path} is not a wsimil model bundle: {meta_path} is missing (`wsimil train` writes RUN/bundle/)"
        )
    try:
        d = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise WsimilError(f"{meta_path} is not valid JSON: {e}") from e
    if d.get("format") != "wsimil-bundle":
        raise WsimilError(f"{meta_path} is not a wsimil bundle description (format {d.get('format')!r})")
    fv = int(d.get("format_version", 0))
    if fv > BUNDLE_FORMAT or fv < 1:
        raise WsimilError(
            f"bundle {p} has format version {fv} (written by wsimil {d.get('wsimil_version', '?')}); this is wsimil "
            f"{__version__}, which reads bundle format 1 to {BUNDLE_FORMAT}: install a matching wsimil version"
        )
    agg = d["aggregator"]
    from wsimil.methods.base import list_methods

    if agg["method"] not in list_methods():
        raise WsimilError(
            f"bundle {p} needs training method {agg['method']!r} (wsimil {d.get('wsimil_version')}), which this "
            f"wsimil {__version__} does not have; available: {', '.join(list_methods())}"
        )
    return Bundle(
        path=p,
        classes=list(d["classes"]),
        task=d.get("task", "classification"),
        model=agg["model"],
        model_kwargs=agg.get("model_kwargs") or {},
        method=agg.get("method", "supervised"),
        method_kwargs=agg.get("method_kwargs") or {},
        in_dim=int(agg["in_dim"]),
        members=[Member(**m) for m in d["members"]],
        encoder=EncoderRef(**d["encoder"]) if d.get("encoder") else None,
        tiling=TilingRef(**d["tiling"]) if d.get("tiling") else None,
        head_classes={k: list(v) for k, v in (d.get("head_classes") or {}).items()},
        config=d.get("config") or {},
        wsimil_version=d.get("wsimil_version", "?"),
        format_version=fv,
        slide_settings_missing=d.get("slide_settings_missing"),
    )


# ---------------------------------------------------------------------- pinning
def bundle_digest(path: str | Path) -> str:
    """SHA-256 of a bundle folder as a whole: of the ``sha256sum``-style list of every file in it (its SHA-256 and
    path relative to the folder, sorted by path). It pins ``bundle.json`` and every member and copied encoder, so
    a sender can publish one value and a receiver check it with ``wsimil predict --expect-sha256``."""
    import hashlib

    from wsimil.features.encoders import sha256_file

    root = Path(path)
    if not root.is_dir():
        raise WsimilError(f"bundle {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    lines = "".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def bundle_folder(path: str | Path) -> Path:
    """The folder a ``--model`` argument names: the bundle itself, the folder of a given ``bundle.json`` or
    ``lrmil.json``, or ``RUN/bundle`` for a run folder."""
    p = Path(path)
    if p.is_file() and p.name in (BUNDLE_FILE, "lrmil.json"):
        return p.parent
    if not any((p / f).is_file() for f in (BUNDLE_FILE, "lrmil.json")) and (p / "bundle").is_dir():
        return p / "bundle"
    return p


def verify_bundle_digest(path: str | Path, expected: str) -> str:
    """Check the bundle at ``path`` against ``expected`` (a hex SHA-256, or a file whose first word is one, as
    ``wsimil digest`` prints it); returns the digest or raises a one-line :class:`WsimilError`."""
    want = expected.strip()
    if Path(want).is_file():
        words = Path(want).read_text().split()
        want = words[0] if words else ""
    want = want.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise WsimilError(f"--expect-sha256 {expected!r} is not a SHA-256 (64 hex digits) nor a file holding one")
    folder = bundle_folder(path)
    got = bundle_digest(folder)
    if got != want:
        raise WsimilError(
            f"bundle {folder} has SHA-256 {got}, not the expected {want}: it is not the bundle you were given "
            "(modified or another one); nothing was loaded"
        )
    return got


def upgrade_bundle(src: str | Path, out: str | Path) -> Path:
    """Rewrite a bundle (format 1: ``torch.save`` members) at ``out`` in the current format (safetensors members).
    Members are read through :func:`wsimil.checkpoint.load_checkpoint`, so a member that holds code is refused,
    and their recorded checksums are checked first."""
    from wsimil.features.encoders import sha256_file
    from wsimil.lrmil.bundle import is_lrmil_bundle

    if is_lrmil_bundle(src):
        raise WsimilError(
            f"{src} is an LRMIL bundle: wsimil reads its format-1 files through the safe loader as they are; "
            "re-run `wsimil lrmil` (finished steps are reused) to write the current format"
        )
    b = load_bundle(src)
    files = []
    for m in b.members:
        p = b.path / m.file
        if not p.is_file() or sha256_file(p) != m.sha256:
            raise WsimilError(f"bundle {b.path}: {m.file} is missing or does not match its recorded checksum")
        files.append(p)
    encoder, copy = b.encoder, False
    if encoder is not None and encoder.weights not in (None, "hub") and not Path(encoder.weights).is_absolute():
        encoder, copy = EncoderRef(**{**asdict(encoder), "weights": str(b.path / encoder.weights)}), True
    return write_bundle(
        out,
        files,
        encoder=encoder,
        tiling=b.tiling,
        config=b.config,
        copy_encoder_weights=copy,
        slide_settings_missing=b.slide_settings_missing,
    )


# ---------------------------------------------------------------------- writing
def write_bundle(
    out: str | Path,
    checkpoints: list[str | Path],
    *,
    encoder: EncoderRef | None,
    tiling: TilingRef | None,
    config: dict[str, Any] | None = None,
    copy_encoder_weights: bool = False,
    slide_settings_missing: str | None = None,
) -> Path:
    """Write a bundle folder from trainer checkpoints (``checkpoints/repeat{r}_fold{k}.pt`` as written by
    :class:`wsimil.methods.trainer.Trainer`, all of one model: the ensemble members).

    ``encoder``/``tiling`` say how slides become features (both ``None`` for a feature-only bundle; give
    ``slide_settings_missing`` to tell users why). With ``copy_encoder_weights`` a weights file is copied into
    ``encoder/`` (recorded relative to the bundle, so the folder moves as one); otherwise its absolute path and
    checksum are recorded. The folder is replaced atomically: readers never see a half-written bundle."""
    from wsimil.features.encoders import sha256_file

    out = Path(out)
    checkpoints = [Path(c) for c in checkpoints]
    if not checkpoints:
        raise WsimilError("a bundle needs at least one aggregator checkpoint")
    cks = []
    for c in checkpoints:
        ck = load_checkpoint(c)
        if "state_dict" not in ck or "model" not in ck:
            raise WsimilError(f"{c} is not a wsimil trainer checkpoint (no model/state_dict)")
        cks.append(ck)
    first = cks[0]
    for c, ck in zip(checkpoints, cks, strict=True):
        for key in ("model", "method", "in_dim", "classes", "task"):
            if ck.get(key) != first.get(key):
                raise WsimilError(
                    f"checkpoints disagree on {key}: {checkpoints[0]} has {first.get(key)!r}, {c} has {ck.get(key)!r}"
                )
    if (encoder is None) != (tiling is None):
        raise WsimilError("give both encoder and tiling (a bundle that scores slides) or neither (features only)")
    if encoder is not None and encoder.embed_dim is not None and encoder.embed_dim != first["in_dim"]:
        raise WsimilError(
            f"encoder {encoder.name!r} gives {encoder.embed_dim}-d features, the aggregator takes {first['in_dim']}-d"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out.parent, recursive=False)  # temporary folders of a killed write
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        members = []
        for i, ck in enumerate(cks):
            r, k = int(ck.get("repeat", 0)), int(ck.get("fold", i))
            rel = f"aggregators/repeat{r}_fold{k}{SUFFIX}"
            if any(m.file == rel for m in members):
                rel = f"aggregators/member{len(members)}{SUFFIX}"
            save_checkpoint(tmp / rel, {key: v for key, v in ck.items() if key != "history"})
            members.append(Member(rel, r, k, sha256_file(tmp / rel)))
        if encoder is not None and encoder.weights not in (None, "hub"):
            encoder = _record_weights(encoder, tmp if copy_encoder_weights else None)
        bundle = Bundle(
            path=out,
            classes=list(first["classes"]),
            task=first.get("task", "classification"),
            model=first["model"],
            model_kwargs=first.get("model_kwargs") or {},
            method=first.get("method", "supervised"),
            method_kwargs=first.get("method_kwargs") or {},
            in_dim=int(first["in_dim"]),
            members=members,
            encoder=encoder,
            tiling=tiling,
            head_classes=_head_classes(checkpoints[0], list(first["classes"])),
            config=config or {},
            slide_settings_missing=None if encoder is not None else slide_settings_missing,
        )
        (tmp / BUNDLE_FILE).write_text(json.dumps(_jsonable(bundle.to_json()), indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _record_weights(encoder: EncoderRef, bundle_dir: Path | None) -> EncoderRef:
    """Record a weights file by absolute path and SHA-256, or (``bundle_dir`` given) copy it into
    ``bundle_dir/encoder/`` and record it relative to the bundle. A checksum already recorded (by ``wsimil
    extract``) is trusted unless the file is copied; a file that has moved since keeps its recorded checksum, so
    ``--encoder-weights`` can point to it later."""
    from wsimil.features.encoders import sha256_file

    src = Path(str(encoder.weights))
    sha = encoder.weights_sha256
    if bundle_dir is not None or (sha is None and src.is_file()):
        if not src.is_file():
            raise WsimilError(f"encoder weights {src} do not exist")
        got = sha256_file(src)
        if sha and got != sha:
            raise WsimilError(f"encoder weights {src} have SHA-256 {got[:12]}…, not the recorded {sha[:12]}…")
        sha = got
    if sha is None:
        raise WsimilError(f"encoder weights {src} do not exist and no checksum was recorded for them")
    if bundle_dir is not None:
        (bundle_dir / "encoder").mkdir(exist_ok=True)
        shutil.copyfile(src, bundle_dir / "encoder" / src.name)
        return EncoderRef(**{**asdict(encoder), "weights": f"encoder/{src.name}", "weights_sha256": sha})
    weights = str(src.resolve()) if src.exists() else str(src)
    return EncoderRef(**{**asdict(encoder), "weights": weights, "weights_sha256": sha})


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` onto ``out``; an existing ``out`` is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = out.with_name(f"{temp_prefix(out.name)}old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return o


def _head_classes(ckpt: str | Path, classes: list[str]) -> dict[str, list[str]]:
    """Class names of the model's extra output heads (``MILOutput.extra_logits``), asked of the training method
    (``head_labels``; HMIL maps fine classes to coarse ones) with one forward pass on a dummy bag."""
    import torch

    from wsimil.config import TrainConfig
    from wsimil.methods.base import create_method
    from wsimil.methods.trainer import load_model

    model, ck = load_model(ckpt)
    with torch.no_grad():
        out = model(torch.zeros(1, 2, int(ck["in_dim"])), torch.ones(1, 2, dtype=torch.bool))
    heads = {}
    if out.extra_logits:
        cfg = TrainConfig(
            model=ck["model"],
            model_kwargs=ck.get("model_kwargs") or {},
            method=ck.get("method", "supervised"),
            method_kwargs=ck.get("method_kwargs") or {},
            task=ck.get("task", "classification"),
        )
        method = create_method(cfg)
        method.restore(ck.get("method_state") or {})
        for head, z in out.extra_logits.items():
            names: list[str] | None = None
            try:
                _, names = method.head_labels(head, [], np.zeros(0, dtype=np.int64), classes)
            except Exception:  # noqa: BLE001 - a method may need real labels; fall back to indices
                names = None
            if names is None or len(names) != z.shape[-1]:
                names = [str(i) for i in range(z.shape[-1])]
            heads[head] = [str(n) for n in names]
    return heads


# ---------------------------------------------------------------------- from a training run
def provenance_from_features(features: str | Path) -> tuple[EncoderRef | None, TilingRef | None, str | None]:
    """Encoder and tiling of a feature folder, read from its HDF5 attributes (``features``: encoder, weights and
    checksum; ``coords``: magnification, patch size, tiling settings key) and, for tissue detection and reader, from
    the tiling job's ``tiling.yaml`` (``JOB/{grid}/features_{encoder}/`` → ``JOB/tiling.yaml``).

    Returns ``(encoder, tiling, None)``, or ``(None, None, reason)`` when the features cannot be reproduced from
    slides (no provenance, files that disagree, an encoder wsimil does not know)."""
    import yaml

    from wsimil.features.encoders import ENCODERS
    from wsimil.features.store import FeatureStore

    try:
        store = FeatureStore(features)
    except WsimilError as e:
        return None, None, str(e)
    if store.ext != ".h5":
        return None, None, f"the features in {store.dir} are .pt files, which carry no encoder or tiling provenance"
    files = sorted(store.dir.glob("*.h5"))
    seen: dict[tuple, list[str]] = {}
    first_f: dict[str, Any] = {}
    first_c: dict[str, Any] = {}
    for p in files:
        fa, ca = _feature_attrs(p), _coords_attrs(p)
        key = (
            fa.get("encoder"),
            fa.get("weights"),
            fa.get("weights_sha256"),
            ca.get("target_magnification"),
            ca.get("patch_size"),
            ca.get("settings_key"),
        )
        if not seen:
            first_f, first_c = fa, ca
        seen.setdefault(key, []).append(p.stem)
    if len(seen) > 1:
        parts = [f"{k[0]}/{k[1]}/{k[3]}x/{k[4]}px ({len(v)} slides, e.g. {v[0]})" for k, v in seen.items()]
        return None, None, "the feature files disagree on encoder or tiling: " + "; ".join(parts)
    if not first_f.get("encoder") or first_f.get("encoder") == "unknown" or "weights" not in first_f:
        return None, None, f"the feature files in {store.dir} record no encoder provenance (not made by wsimil extract)"
    if first_f["encoder"] not in ENCODERS:
        return None, None, f"the features come from encoder {first_f['encoder']!r}, which is not in wsimil's registry"
    if "target_magnification" not in first_c or "patch_size" not in first_c:
        return None, None, f"the feature files in {store.dir} record no tiling (coords without magnification)"
    try:
        enc = EncoderRef.from_feature_attrs(first_f)
    except (WsimilError, KeyError, ValueError) as e:
        return None, None, f"cannot read the encoder provenance: {e}"
    tissue: dict[str, float] = {}
    min_tissue, reader = 0.1, "auto"
    job_yaml = store.dir.parent.parent / "tiling.yaml"
    if job_yaml.is_file():
        job = yaml.safe_load(job_yaml.read_text()) or {}
        if job.get("settings_key") == first_c.get("settings_key"):
            tissue = dict(job.get("tissue") or {})
            min_tissue = float(job.get("min_tissue", 0.1))
            reader = str(job.get("reader", "auto"))
    tiling = TilingRef(
        mag=float(first_c["target_magnification"]),
        patch_size=int(first_c["patch_size"]),
        min_tissue=min_tissue,
        tissue=tissue,
        reader=reader,
    )
    return enc, tiling, None


def bundle_from_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN/bundle/`` (or ``out``) from a finished training run: its fold checkpoints (the folds in
    ``results.json``), resolved config and the provenance of its features (:func:`provenance_from_features`)."""
    import yaml

    run = Path(run)
    cfg_path, res_path = run / "config.yaml", run / "results.json"
    if not cfg_path.is_file() or not res_path.is_file():
        raise WsimilError(f"{run} is not a finished wsimil run (config.yaml and results.json are needed)")
    cfg = yaml.safe_load(cfg_path.read_text())
    res = json.loads(res_path.read_text())
    ckpts = [fold_checkpoint(run / "checkpoints", f["repeat"], f["fold"]) for f in res.get("folds", [])]
    missing = [str(c) for c in ckpts if not c.is_file()]
    if missing or not ckpts:
        raise WsimilError(f"run {run}: missing checkpoints {', '.join(missing) or '(no folds in results.json)'}")
    encoder, tiling, why = provenance_from_features(cfg["features"]) if cfg.get("features") else (None, None, None)
    if encoder is not None and encoder.embed_dim is not None and encoder.embed_dim != int(cfg["in_dim"]):
        why = f"encoder width {encoder.embed_dim} differs from the features' ({cfg['in_dim']})"
        encoder, tiling = None, None
    return write_bundle(
        Path(out) if out is not None else run / "bundle",
        ckpts,
        encoder=encoder,
        tiling=tiling,
        config=cfg,
        slide_settings_missing=why or ("no feature folder recorded" if encoder is None else None),
    )
