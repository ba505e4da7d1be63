"""Model bundles: everything needed to score new slides with a trained model, in one folder, loaded with one call.

Layout (``wsimil train`` and ``wsimil lrmil`` write ``RUN/bundle/``)::

    bundle.json                         what the bundle holds (below); written last, so a bundle without it is
                                        incomplete
    aggregators/repeat{r}_fold{k}.safetensors
                                        one trainer checkpoint per member (the fold models; safetensors with JSON
                                        metadata, never unpickled); a prediction is the mean of the members' class
                                        probabilities. Format 1 bundles (wsimil 0.1) hold ``.pt`` members, which are
                                        read through PyTorch's restricted loader and refused if they hold code
    encoder/<file>                      optional: custom encoder weights copied into the bundle; their SHA-256 is
                                        recorded and checked on use
    encoders/repeat{r}_fold{k}.<ext>    optional: a member's own encoder (LRMIL: each fold's distilled 5x encoder)

``bundle.json`` records the bundle format and the wsimil version that wrote it, the task and class names (and the
class names of extra output heads such as HMIL's ``coarse``), the aggregator (model, method and their options, input
width), the members with their checksums, the patch encoder (registry name, weights: a file, ``hub`` or a seeded
random initialisation, with the weights' SHA-256), the tiling (magnification, patch size, tissue detection, reader)
and the resolved training config. Either every member shares the bundle's encoder (``encoder``) or every member
carries its own (``members[i].encoder``, with ``input_size`` and ``distilled``: an LRMIL bundle); all members share
the tiling, so their per-patch maps average patch by patch. A bundle trained on features without slide provenance
(e.g. a classic MIL CSV) has no encoder/tiling and says why in ``slide_settings_missing``: it scores feature files
but refuses slides. Bundles of the older layouts (format 1 and 2, and LRMIL's ``lrmil.json`` of format 1 and 2) are
read by :mod:`wsimil.predict.legacy`, upgraded in memory.

Python API::

    from wsimil.predict import load_bundle
    b = load_bundle("runs/abmil/bundle")
    members = b.load_models("cpu")          # [(model, standardizer)]
    enc = b.build_encoder()                  # checks the weights' checksum
    settings = b.tile_settings()             # for wsimil.slide.job.run_tiling
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsimil import __version__
from wsimil.errors import WsimilError
from wsimil.predict.members import build_encoder, load_member
from wsimil.predict.refs import EncoderRef, Member, TilingRef, feature_attrs, weights_description

#: bundle format written by this wsimil; bundles of a newer format are refused with an "upgrade wsimil" error.
#: 3: a member may carry its own encoder (LRMIL bundles are ordinary bundles); 2: members are safetensors
#: checkpoints; 1: ``torch.save`` members, still read through the safe loader
BUNDLE_FORMAT = 3
BUNDLE_FILE = "bundle.json"
LRMIL_FILE = "lrmil.json"  # the old LRMIL layout (wsimil.predict.legacy)


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
    def member_encoders(self) -> bool:
        """True if the members carry their own encoders (an LRMIL bundle), so features differ member by member."""
        return any(m.encoder is not None for m in self.members)

    @property
    def scores_slides(self) -> bool:
        """True if the bundle knows how to tile and encode slides (not only score feature files)."""
        if self.member_encoders:
            return self.tiling is not None and all(m.encoder is not None for m in self.members)
        return self.encoder is not None and self.tiling is not None

    # ------------------------------------------------------------------ aggregators
    def select(self, folds: list[int] | None = None) -> list[Member]:
        """The members of ``folds`` (default: all); an unknown fold is named."""
        have = sorted({m.fold for m in self.members})
        unknown = sorted(set(folds or []) - set(have))
        if unknown:
            raise WsimilError(f"bundle {self.path} has no fold {', '.join(map(str, unknown))}; folds: {have}")
        return [m for m in self.members if not folds or m.fold in folds]

    def load_models(self, device: str = "cpu", folds: list[int] | None = None) -> list[tuple[Any, Any]]:
        """Every member (of ``folds``, default all; in :meth:`select`'s order) as ``(model in eval mode on device,
        Standardizer | None)``; checksums and weights are checked, and a checkpoint this wsimil cannot rebuild fails
        with an error naming both versions."""
        from wsimil.data.batching import Standardizer
        from wsimil.features.encoders import sha256_file

        out = []
        for m in self.select(folds):
            p = self.path / m.file
            if not p.is_file():
                raise WsimilError(f"bundle {self.path}: member {m.file} is missing")
            if sha256_file(p) != m.sha256:
                raise WsimilError(f"bundle {self.path}: {m.file} does not match its recorded checksum (modified?)")
            try:
                model, ck = load_member(p, device)
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

    def encoder_weights(self, override: str | Path | None = None, member: Member | None = None) -> str | None:
        """The weights argument for :func:`wsimil.features.encoders.create_encoder` of the bundle's encoder (or
        ``member``'s own): ``None`` (seeded random init), ``"hub"``, or an absolute file path whose SHA-256 matches
        the recorded one. ``override`` points to the same weights elsewhere (checked against the checksum); it does
        not apply to a distilled encoder, whose file is in the bundle."""
        from wsimil.features.encoders import sha256_file

        self.require_slides()
        enc = member.encoder if member is not None and member.encoder is not None else self.encoder
        assert enc is not None
        if enc.distilled:
            override = None
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

    def build_encoder(self, weights: str | Path | None = None, member: Member | None = None):
        """The bundle's patch encoder (or ``member``'s own) as a :class:`wsimil.features.encoders.Encoder`,
        weights checked."""
        w = self.encoder_weights(weights, member)
        enc = member.encoder if member is not None and member.encoder is not None else self.encoder
        assert enc is not None
        return build_encoder(enc, w)

    def extract_settings(self, device: str = "cpu", weights: str | Path | None = None, **kw: Any):
        """:class:`wsimil.features.extract.ExtractSettings` for this bundle's shared encoder (``kw``: batch_size,
        workers, precision, reader)."""
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
        attrs = feature_attrs(Path(path))
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
            want = weights_description(self.encoder)
            if want and attrs["weights"] != want:
                raise WsimilError(
                    f"slide {slide_id!r}: features in {path} come from {name!r} with weights {attrs['weights']}, "
                    f"but bundle {self.path} was trained on {want}"
                )

    def to_json(self) -> dict[str, Any]:
        return {
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


# ---------------------------------------------------------------------- loading
def load_bundle(path: str | Path) -> Bundle:
    """Load a bundle folder (or its ``bundle.json``; a run folder with a ``bundle/`` inside also works), of any
    format this wsimil reads: the current one, and the older layouts (:mod:`wsimil.predict.legacy`, upgraded in
    memory: an LRMIL ``lrmil.json`` bundle loads as a bundle whose members carry their distilled encoders).

    Fails with a clear error for a folder that is not a bundle, a bundle of a newer format than this wsimil reads,
    or an aggregator this wsimil does not know."""
    p = bundle_folder(path)
    meta_path = p / BUNDLE_FILE
    if not meta_path.is_file() and (p / LRMIL_FILE).is_file():
        from wsimil.predict.legacy import lrmil_bundle_json

        return bundle_from_json(p, lrmil_bundle_json(p), p / LRMIL_FILE)
    if not meta_path.is_file():
        raise WsimilError(
            f"{path} is not a wsimil model bundle: {meta_path} is missing (`wsimil train` writes RUN/bundle/)"
        )
    return bundle_from_json(p, read_json(meta_path), meta_path)


def read_json(path: Path) -> dict[str, Any]:
    """A bundle description, or a one-line error naming the file."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WsimilError(f"{path} is not valid JSON: {e}") from e


def bundle_from_json(p: Path, d: dict[str, Any], source: Path) -> Bundle:
    """The :class:`Bundle` at folder ``p`` that description ``d`` (read from ``source``) holds."""
    if d.get("format") != "wsimil-bundle":
        raise WsimilError(f"{source} is not a wsimil bundle description (format {d.get('format')!r})")
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
        members=[Member.from_json(m) for m in d["members"]],
        encoder=EncoderRef(**d["encoder"]) if d.get("encoder") else None,
        tiling=TilingRef(**d["tiling"]) if d.get("tiling") else None,
        head_classes={k: list(v) for k, v in (d.get("head_classes") or {}).items()},
        config=d.get("config") or {},
        wsimil_version=d.get("wsimil_version", "?"),
        format_version=fv,
        slide_settings_missing=d.get("slide_settings_missing"),
    )


def bundle_folder(path: str | Path) -> Path:
    """The folder a ``--bundle`` argument names: the bundle itself, the folder of a given ``bundle.json`` or
    ``lrmil.json``, or ``RUN/bundle`` for a run folder."""
    p = Path(path)
    if p.is_file() and p.name in (BUNDLE_FILE, LRMIL_FILE):
        return p.parent
    if not any((p / f).is_file() for f in (BUNDLE_FILE, LRMIL_FILE)) and (p / "bundle").is_dir():
        return p / "bundle"
    return p
