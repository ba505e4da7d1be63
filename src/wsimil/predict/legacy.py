"""The trained LR pipeline of an LRMIL run, saved under ``RUN/bundle/`` and used to score new slides from 5× alone.

Layout::

    lrmil.json                 what the bundle holds (written last: a folder without it is incomplete)
    fold{k}/                   a wsimil model bundle (:mod:`wsimil.bundle`) holding fold k's student checkpoint
    fold{k}/lrmil_encoder.safetensors
                               fold k's distilled encoder (absent when stage 1 was ablated: the LR encoder is then
                               the registry encoder itself, as recorded in lrmil.json); bundles of format 1 hold
                               ``lrmil_encoder.pt``, read through the safe loader

``lrmil.json``: format name and version, wsimil version, class names, the encoder (registry name for the
architecture, the student input size, the teacher weights' description, seed), the LR tiling (magnification, patch
size, tissue detection, reader) and per fold the bundle folder and the encoder file with its SHA-256.

Every fold has its own distilled encoder (stage 1 never sees the fold's test slides), so the fold bundles do not
record an encoder for ``wsimil.bundle``: its slide path would build the registry encoder at the registry input size,
not the distilled one at the LR patch size. :func:`predict_to_folder` (``wsimil predict --model RUN/bundle``) is
the slide path: tile at 5×, encode with each fold's encoder, average the fold students' probabilities and attention.
Nothing at 20× is read. :func:`predict_slides` is the same as a Python call returning a table.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsimil import __version__
from wsimil.claims import CLAIM_TIMEOUT, remove_orphans, try_claim
from wsimil.errors import WsimilError
from wsimil.features.encoders import Encoder, create_encoder, sha256_file
from wsimil.io import write_json
from wsimil.lrmil.features import EncodeSettings
from wsimil.lrmil.infer import SlidePipeline
from wsimil.slide.job import SlideSpec, TileSettings, collect_slides

FORMAT = "wsimil-lrmil-bundle"
FORMAT_VERSION = 2  # 2: distilled encoders and students are safetensors (1: torch.save files)
META = "lrmil.json"


@dataclass
class FoldEntry:
    fold: int
    bundle: str
    encoder: str | None
    encoder_sha256: str | None


def save_bundle(
    out: Path,
    folds: list[tuple[int, Path, Path | None]],
    *,
    classes: list[str],
    encoder: Encoder,
    seed: int,
    student_input: int | None,
    tiling: TileSettings,
    config: dict,
) -> Path:
    """Write ``out`` from ``folds`` = ``[(fold, student checkpoint, distilled encoder file or None)]``; ``encoder``
    is the teacher encoder (registry name, weights, input size)."""
    from wsimil.bundle import write_bundle

    out = Path(out)
    if (out / META).exists():
        (out / META).unlink()
    entries = []
    for k, ckpt, enc_file in folds:
        d = out / f"fold{k}"
        write_bundle(
            d,
            [ckpt],
            encoder=None,
            tiling=None,
            config=config,
            slide_settings_missing=f"an LRMIL student: score slides with `wsimil predict --model {out}` "
            f"(fold {k}'s distilled encoder is in {d.name}/lrmil_encoder.safetensors)",
        )
        rel = None
        sha = None
        if enc_file is not None:
            rel = f"fold{k}/lrmil_encoder.safetensors"
            shutil.copyfile(enc_file, out / rel)
            sha = sha256_file(out / rel)
        entries.append(FoldEntry(k, f"fold{k}", rel, sha))
    weights = None if encoder.weights.startswith("random(") else encoder.weights
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "wsimil_version": __version__,
        "classes": list(classes),
        "encoder": {
            "name": encoder.name,
            "teacher_weights": encoder.weights,
            "weights": weights.removeprefix("hub:") if weights and weights.startswith("hub:") else weights,
            "hub": bool(weights and weights.startswith("hub:")),
            "weights_sha256": encoder.weights_sha256,
            "seed": seed,
            "input_size": student_input,
        },
        "tiling": {
            "mag": float(tiling.mags[0]),
            "patch_size": tiling.patch_size,
            "min_tissue": tiling.min_tissue,
            "tissue": tiling.tissue.to_dict(),
            "reader": tiling.reader,
        },
        "folds": [asdict(e) for e in entries],
    }
    write_json(out / META, meta)
    return out


@dataclass
class LRMILBundle:
    path: Path
    meta: dict

    def __post_init__(self) -> None:
        self._base: Encoder | None = None
        self._arch: Encoder | None = None
        self._fold_bundles: dict = {}
        self.weights_override: str | Path | None = None  # where the teacher weights file is now (ablated stage 1)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def folds(self) -> list[int]:
        return [int(e["fold"]) for e in self.meta["folds"]]

    def tile_settings(self, mpp: float | None = None, reader: str | None = None) -> TileSettings:
        from wsimil.slide.tissue import TissueParams

        t = self.meta["tiling"]
        return TileSettings(
            mags=[float(t["mag"])],
            patch_size=int(t["patch_size"]),
            reader=reader or t["reader"],
            mpp=mpp,
            min_tissue=float(t["min_tissue"]),
            tissue=TissueParams(**t["tissue"]),
        )

    def base_encoder(self) -> Encoder:
        """The registry encoder (the teacher's architecture; its weights when stage 1 was ablated); built once."""
        if self._base is not None:
            return self._base
        e = self.meta["encoder"]
        if e["hub"]:
            weights = "hub"
        elif e["weights"]:
            weights = str(self.weights_override or e["weights"])
            if e.get("weights_sha256") and Path(weights).is_file() and sha256_file(weights) != e["weights_sha256"]:
                raise WsimilError(f"encoder weights {weights} do not match the checksum recorded in {self.path}")
        else:
            weights = None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*randomly initialised.*")
            self._base = create_encoder(e["name"], weights, int(e["seed"]))
        return self._base

    def architecture(self) -> Encoder:
        """The registry encoder's architecture, randomly initialised: a distilled encoder brings all its weights, so
        the teacher's weights (a file, the hub) are not needed to use the bundle."""
        if self._arch is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*randomly initialised.*")
                self._arch = create_encoder(self.meta["encoder"]["name"], None, 0)
        return self._arch

    def fold_pipeline(self, fold: int, device: str = "cpu", **encode_kw) -> SlidePipeline:
        """Fold ``fold``'s LR path: 5× tiling, its distilled encoder, its student."""
        from wsimil.lrmil.stage1 import load_student

        entry = self._entry(fold)
        if entry["encoder"] is None:  # stage 1 ablated: the teacher encoder at the LR input size
            from wsimil.lrmil.pipeline import undistilled_lr_encoder

            base = self.base_encoder()
            encoder = undistilled_lr_encoder(base, int(self.meta["encoder"].get("input_size") or base.spec.input_size))
        else:
            path = self.path / entry["encoder"]
            if not path.is_file() or sha256_file(path) != entry["encoder_sha256"]:
                raise WsimilError(f"bundle {self.path}: {entry['encoder']} is missing or does not match its checksum")
            encoder, _ = load_student(path, self.architecture())
        members = self.fold_bundle(fold).load_models(device)
        return SlidePipeline(self.tile_settings(), encoder, members, EncodeSettings(device=device, **encode_kw), fold)

    def fold_bundle(self, fold: int):
        """Fold ``fold``'s student as a :class:`wsimil.bundle.Bundle` (classes, task, checkpoint)."""
        from wsimil.bundle import load_bundle

        if fold not in self._fold_bundles:
            self._fold_bundles[fold] = load_bundle(self.path / self._entry(fold)["bundle"])
        return self._fold_bundles[fold]

    def _entry(self, fold: int) -> dict:
        entry = next((e for e in self.meta["folds"] if int(e["fold"]) == fold), None)
        if entry is None:
            raise WsimilError(f"bundle {self.path} has no fold {fold}; folds: {self.folds}")
        return entry


def load_lrmil_bundle(path: str | Path) -> LRMILBundle:
    """Load ``RUN/bundle`` (or a run folder holding one)."""
    p = Path(path)
    if not (p / META).is_file() and (p / "bundle" / META).is_file():
        p = p / "bundle"
    if not (p / META).is_file():
        raise WsimilError(f"{path} is not an LRMIL bundle: {p / META} is missing (written by `wsimil lrmil`)")
    meta = json.loads((p / META).read_text())
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise WsimilError(f"{p / META}: unsupported bundle format {meta.get('format')!r} v{meta.get('format_version')}")
    return LRMILBundle(p, meta)


def _fold_pipelines(b: LRMILBundle, device: str, folds: list[int] | None, **encode_kw) -> list[SlidePipeline]:
    return [b.fold_pipeline(k, device, **encode_kw) for k in (folds or b.folds)]


def score_slide(b: LRMILBundle, pipes: list[SlidePipeline], spec: SlideSpec, device: str):
    """One slide through the LR path of every chosen fold: ``(SlideScores, 5x patch grid)``. Each fold encodes the
    5× patches with its own distilled encoder; probabilities and attention maps are the folds' mean."""
    from wsimil.inference import SlideScores, score_bag

    grid = pipes[0].tile(spec)
    if len(grid.coords) == 0:
        raise WsimilError(f"slide {spec.slide_id!r}: no tissue patches at {pipes[0].mag:g}x to score")
    parts = [score_bag(p.members, p.features(grid, spec.mpp), b.fold_bundle(p.fold), device) for p in pipes]
    maps = {n: np.mean([s.maps[n] for s in parts], 0).astype(np.float32) for n in parts[0].maps}
    s = SlideScores(
        probs=np.mean([s.probs for s in parts], 0),
        member_probs=np.concatenate([s.member_probs for s in parts]),
        maps=maps,
        kind=parts[0].kind,
    )
    return s, grid


def predict_slides(
    bundle: str | Path | LRMILBundle,
    slides: str | Path | list[SlideSpec],
    device: str = "cpu",
    folds: list[int] | None = None,
    **encode_kw,
) -> pd.DataFrame:
    """Class probabilities of new slides from 5× alone: ``slide_id, n_patches, prob_<class>…`` (mean over the
    chosen ``folds``; default all — each fold encodes the patches with its own distilled encoder, so one fold is
    the fastest). ``slides``: a folder, a CSV with a ``path`` column, one slide, or ``SlideSpec`` objects. Errors
    stop the call; :func:`predict_to_folder` is the batch path that isolates failing slides."""
    b = bundle if isinstance(bundle, LRMILBundle) else load_lrmil_bundle(bundle)
    specs = slides if isinstance(slides, list) else collect_slides(slides)
    pipes = _fold_pipelines(b, device, folds, **encode_kw)
    rows = []
    for spec in specs:
        s, grid = score_slide(b, pipes, spec, device)
        rows.append({"slide_id": spec.slide_id, "n_patches": len(grid.coords), **dict(zip(
            [f"prob_{c}" for c in b.classes], map(float, s.probs), strict=True))})  # fmt: skip
    return pd.DataFrame(rows)


def predict_to_folder(
    bundle: str | Path | LRMILBundle,
    slides: str | Path,
    out: str | Path,
    device: str = "cpu",
    folds: list[int] | None = None,
    mpp: float | None = None,
    batch_size: int = 64,
    encoder_weights: str | Path | None = None,
    claim_timeout: float = CLAIM_TIMEOUT,
) -> pd.DataFrame:
    """``wsimil predict`` with an LRMIL bundle: the outputs of :func:`wsimil.inference.predict_slides`
    (``OUT/predictions.csv`` with ``n_patches``, ``OUT/scores/{slide_id}.h5`` holding the folds' mean 5× attention,
    ``OUT/status.csv``) from 5× patches alone. Patches are read in memory (no tiling job is cached); a slide that fails
    is listed in the status table while the others go on; one claimed by another run sharing ``out`` is left to it
    (:mod:`wsimil.claims`). Returns the status table."""
    import time

    from wsimil.inference import _claimed, _finish, _prediction_row, failed_status, write_scores
    from wsimil.progress import console, track

    b = bundle if isinstance(bundle, LRMILBundle) else load_lrmil_bundle(bundle)
    if encoder_weights is not None:
        b.weights_override = encoder_weights
    out = Path(out)
    specs = collect_slides(slides)
    if mpp is not None:
        specs = [s if s.mpp is not None else SlideSpec(s.slide_id, s.path, mpp, s.extra) for s in specs]
    pipes = _fold_pipelines(b, device, folds, batch_size=batch_size)
    console.print(
        f"Predicting with LRMIL ({len(pipes)} fold pipeline{'s' * (len(pipes) > 1)}: distilled "
        f"{b.meta['encoder']['name']} + student, {b.meta['tiling']['mag']:g}x {b.meta['tiling']['patch_size']}px; "
        f"nothing at high magnification is read) → {out}",
        soft_wrap=True,
    )
    ref = b.fold_bundle(pipes[0].fold)
    rows, status = [], []
    remove_orphans(out, claim_timeout, recursive=False)
    remove_orphans(out / "scores", claim_timeout, recursive=False)
    for spec in track(specs, "LRMIL predict"):
        t0 = time.perf_counter()
        if not (claim := try_claim(out, spec.slide_id, claim_timeout)).held:
            status.append(_claimed(spec.slide_id, "predict", claim.describe()))
            continue
        try:
            s, grid = score_slide(b, pipes, spec, device)
            attrs = {
                "slide_path": spec.path,
                "patch_size_level0": float(grid.step0),
                "mag": float(b.meta["tiling"]["mag"]),
                "mpp": spec.mpp,
                "classes": json.dumps(b.classes),
                "folds": json.dumps([p.fold for p in pipes]),
            }
            write_scores(out / "scores" / f"{spec.slide_id}.h5", spec.slide_id, grid.coords, s, attrs)
            rows.append({**_prediction_row(spec.slide_id, s, ref), "n_patches": len(grid.coords)})
            status.append({"slide_id": spec.slide_id, "status": "ok", "stage": "", "error": ""})
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the batch
            status.append(failed_status(spec.slide_id, e))
        finally:
            claim.release()
        status[-1]["seconds"] = round(time.perf_counter() - t0, 3)
    return _finish(out, rows, status, ref)


def is_lrmil_bundle(path: str | Path) -> bool:
    """Whether ``path`` (a bundle folder or a run holding one) is an LRMIL bundle."""
    p = Path(path)
    return (p / META).is_file() or (p / "bundle" / META).is_file()
