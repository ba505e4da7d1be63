"""Scoring new data with a model bundle: slides → tiles → features → scores → an output folder.

:func:`predict_slides` scores slides, :func:`predict_features` a feature folder; both run one loop
(:func:`score_to_folder`) over the slides that a source of bags hands over, with one ensemble scorer
(:func:`wsimil.predict.score.score_bag`). Where bags come from depends on the bundle alone:

- members sharing the bundle's encoder: :func:`wsimil.slide.job.run_tiling` and
  :func:`wsimil.features.extract.run_extraction` on a job folder inside the output (``OUT/job``), so cached tiles
  and features are reused when they validate against the bundle's settings (tiling and extraction may run on Ray);
- members carrying their own encoders (LRMIL: each fold's distilled 5x encoder): each slide is tiled in memory at
  the bundle's one magnification (:func:`wsimil.predict.memory.tile_in_memory`; no tiling job is cached, nothing
  at a finer level than that magnification needs is read) and encoded once per distinct encoder;
- a feature folder: its bags, refused slide by slide when another encoder made them.

Files are written atomically, a slide that fails at any stage is listed in ``OUT/status.csv`` while the others go
on, and several runs may share ``OUT``: a slide claimed by another run at any stage (:mod:`wsimil.claims`) is left
to it (``claimed``). Outputs::

    OUT/predictions.csv       slide_id, prob_<class>…, predicted[, <head>_prob_<class>…, <head>_predicted]
                              (survival bundles: slide_id, risk = −Σ_k S_k, the members' mean; bundles whose
                              members carry their own encoders add n_patches)
    OUT/scores/{slide_id}.h5  coords (N, 2) level-0; maps (K, N) with attribute names (K map names); probs (C,);
                              member_probs (F, C); attributes slide_id, classes, folds (the members' folds),
                              patch_size_level0, and for slides slide_path, mag, mpp
    OUT/status.csv            slide_id, status (ok/failed/claimed), stage (tile/extract/predict), error, seconds
    OUT/job/                  the tiling job and features (the cache; members sharing the bundle's encoder)
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import pandas as pd

from wsimil.claims import CLAIM_TIMEOUT, merge_rows, remove_orphans, try_claim
from wsimil.errors import WsimilError
from wsimil.predict.bundle import Bundle, load_bundle
from wsimil.predict.digest import verify_bundle_digest
from wsimil.predict.refs import EncoderRef, Member
from wsimil.predict.score import prediction_row, score_bag, write_scores
from wsimil.progress import console, track

LEFT = ("failed", "claimed")  # tile/extract outcomes that end a slide's prediction in this run


@dataclass
class SlideBag:
    """What a source hands the loop for one slide: patch coordinates, features (one matrix, or one per member),
    attributes for the scores file and extra columns of the slide's prediction row."""

    coords: np.ndarray | None
    features: Any
    attrs: dict[str, Any] = field(default_factory=dict)
    row: dict[str, Any] = field(default_factory=dict)


class BagSource(Protocol):
    def slides(self) -> list[tuple[str, dict | None]]:
        """Slide ids in output order, each with the status row of a slide already left at an earlier stage."""

    def bag(self, slide_id: str) -> SlideBag:
        """The slide's bag; raises (a :class:`WsimilError` for bad input) when it cannot be made."""


def predict_slides(
    bundle: Bundle | str | Path,
    slides: str | Path | list,
    out: str | Path,
    device: str = "auto",
    backend: str = "local",
    ray_address: str | None = None,
    workers: int = 1,
    batch_size: int = 64,
    encoder_weights: str | Path | None = None,
    mpp: float | None = None,
    overwrite: bool = False,
    folds: list[int] | None = None,
    expect_sha256: str | None = None,
    claim_timeout: float = CLAIM_TIMEOUT,
) -> pd.DataFrame:
    """Predict slides (a folder, a CSV with a ``path`` column, one file, or :class:`wsimil.slide.job.SlideSpec`
    objects) with a bundle into ``out``; returns the per-slide status table (``status`` ok/failed/claimed with the
    ``stage`` that failed). See the module docstring for outputs. ``folds`` picks fold models of the ensemble
    (default: all; with members that carry their own encoders one fold is the fastest). ``expect_sha256`` pins the
    bundle (:func:`wsimil.predict.digest.verify_bundle_digest`): nothing is loaded from a bundle that does not
    match."""
    from wsimil.config import resolve_device
    from wsimil.slide.job import collect_slides

    if backend not in ("local", "ray"):
        raise WsimilError(f"unknown backend {backend!r}; choose local or ray")
    b = _open(bundle, expect_sha256)
    b.require_slides()
    if b.member_encoders and backend != "local":
        raise WsimilError(
            f"bundle {b.path}'s members carry their own encoders (an LRMIL bundle): it predicts with the local "
            f"backend only, not {backend!r}"
        )
    out = Path(out)
    dev = resolve_device(device)
    specs = collect_slides(slides) if not isinstance(slides, list) else slides  # a bad --slides first
    members = b.load_models(dev, folds)
    chosen = b.select(folds)
    kw = {"batch_size": batch_size, "encoder_weights": encoder_weights, "mpp": mpp}
    if b.member_encoders:
        source: BagSource = MemorySource(b, chosen, specs, dev, **kw)
    else:
        source = JobSource(b, specs, out, dev, backend=backend, ray_address=ray_address, workers=workers,
                           overwrite=overwrite, claim_timeout=claim_timeout, n_members=len(members), **kw)  # fmt: skip
    return score_to_folder(b, source, members, chosen, out, dev, claim_timeout)


def predict_features(
    bundle: Bundle | str | Path,
    features: str | Path,
    out: str | Path,
    device: str = "auto",
    folds: list[int] | None = None,
    expect_sha256: str | None = None,
    claim_timeout: float = CLAIM_TIMEOUT,
) -> pd.DataFrame:
    """Predict every bag of a feature folder (any layout :class:`~wsimil.features.store.FeatureStore` reads) with a
    bundle; bags from another encoder than the bundle's are refused slide by slide. Outputs as
    :func:`predict_slides` (without the job); ``expect_sha256`` as there."""
    from wsimil.config import resolve_device
    from wsimil.features.store import FeatureStore

    b = _open(bundle, expect_sha256)
    if b.member_encoders:
        raise WsimilError(
            f"{b.path} is an LRMIL bundle: each fold has its own distilled encoder (its members carry their own "
            "encoders), so it predicts from slides (--slides), not from a feature folder"
        )
    dev = resolve_device(device)
    store = FeatureStore(features)
    _check_widths(store, b)
    members = b.load_models(dev, folds)
    return score_to_folder(b, StoreSource(b, store), members, b.select(folds), Path(out), dev, claim_timeout)


def _open(bundle: Bundle | str | Path, expect_sha256: str | None) -> Bundle:
    if expect_sha256 is not None:
        verify_bundle_digest(bundle.path if isinstance(bundle, Bundle) else bundle, expect_sha256)
    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


def score_to_folder(
    b: Bundle,
    source: BagSource,
    members: list[tuple],
    chosen: list[Member],
    out: Path,
    device: str,
    claim_timeout: float = CLAIM_TIMEOUT,
) -> pd.DataFrame:
    """The predict loop: each slide of ``source`` claimed, its bag scored by the ensemble ``members`` (loaded from
    ``chosen``), its scores file and prediction row written; a slide that fails is a status row and the others go
    on. Rows are merged into ``OUT``'s tables (other runs' slides keep theirs); returns this run's status table."""
    remove_orphans(out, claim_timeout, recursive=False)
    remove_orphans(out / "scores", claim_timeout, recursive=False)
    folds = json.dumps([m.fold for m in chosen])
    rows, status = [], []
    for sid, left in track(source.slides(), "predict"):
        t0 = time.perf_counter()
        if left is not None:
            status.append(left)
            continue
        if not (claim := try_claim(out, sid, claim_timeout)).held:  # another run sharing OUT scores it
            status.append(_claimed(sid, "predict", claim.describe()))
            continue
        try:
            bag = source.bag(sid)
            s = score_bag(members, bag.features, b, device)
            attrs = {**bag.attrs, "classes": json.dumps(b.classes), "folds": folds}
            write_scores(out / "scores" / f"{sid}.h5", sid, bag.coords, s, attrs)
            rows.append({**prediction_row(sid, s, b), **bag.row})
            status.append({"slide_id": sid, "status": "ok", "stage": "", "error": "", "seconds": 0.0})
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the batch
            status.append(failed_status(sid, e))
        finally:
            claim.release()
        status[-1]["seconds"] = round(time.perf_counter() - t0, 3)
    return _finish(out, rows, status, b)


class JobSource:
    """Bags of the bundle's shared encoder from a tiling job in ``OUT/job``: every slide is tiled and encoded
    first (cached, resumable; on Ray with ``backend="ray"``), then read slide by slide."""

    def __init__(self, b: Bundle, specs: list, out: Path, device: str, *, backend: str, ray_address: str | None,
                 workers: int, batch_size: int, encoder_weights: str | Path | None, mpp: float | None,
                 overwrite: bool, claim_timeout: float, n_members: int) -> None:  # fmt: skip
        from wsimil.features.extract import features_dir, run_extraction
        from wsimil.features.store import FeatureStore
        from wsimil.slide.job import run_tiling

        assert b.tiling is not None
        self.b, self.mpp = b, mpp
        job = out / "job"
        tiling = b.tile_settings(mpp=mpp)
        st = b.extract_settings(device, encoder_weights, batch_size=batch_size)
        st.validate()
        encoder = b.build_encoder(encoder_weights) if backend == "local" else None
        console.print(
            f"Predicting with {b.model if b.method == 'supervised' else b.method} ({n_members} model"
            f"{'s' * (n_members > 1)}, {b.tiling.mag:g}x {b.tiling.patch_size}px, encoder {st.encoder}) → {out}"
        )
        tiles = run_tiling(specs, job, tiling, workers=workers, overwrite=overwrite, claim_timeout=claim_timeout)
        mine = [r["slide_id"] for _, r in tiles.iterrows() if r["status"] != "claimed"]
        feats = run_extraction(
            job, st, b.tiling.patch_size, overwrite=overwrite, encoder=encoder, backend=backend,
            ray_address=ray_address, claim_timeout=claim_timeout, slide_ids=mine,
        )  # fmt: skip
        fdir = features_dir(job, st, b.tiling.patch_size)
        # slides that failed, or that another run claimed, at the tile or extract stage
        self.left: dict[str, dict] = {}
        for stage, table in (("tile", tiles), ("extract", feats)):
            for _, r in table.iterrows():
                if r["status"] in LEFT and r["slide_id"] not in self.left:
                    self.left[r["slide_id"]] = {"slide_id": r["slide_id"], "status": r["status"], "stage": stage,
                                                "error": r["error"], "seconds": 0.0}  # fmt: skip
        self.ids = list(tiles["slide_id"])
        self.paths = dict(zip(tiles["slide_id"], tiles["path"], strict=True))
        self.store = FeatureStore(fdir) if fdir.is_dir() and any(fdir.glob("*.h5")) else None

    def slides(self) -> list[tuple[str, dict | None]]:
        return [(sid, self.left.get(sid)) for sid in self.ids]

    def bag(self, sid: str) -> SlideBag:
        assert self.store is not None and self.b.tiling is not None
        bag = self.store.read(sid)
        self.b.check_features(sid, self.store.path(sid), bag.features.shape[1])
        if len(bag.features) == 0:
            raise WsimilError(f"slide {sid!r}: no tissue patches to score")
        attrs = {"slide_path": self.paths.get(sid), "patch_size_level0": patch_size_level0(self.store.path(sid)),
                 "mag": self.b.tiling.mag, "mpp": self.mpp}  # fmt: skip
        return SlideBag(bag.coords, bag.features, attrs)


class MemorySource:
    """Bags of members that carry their own encoders: each slide tiled in memory at the bundle's magnification
    (no tiling job), its patches encoded once per distinct member encoder (LRMIL: each fold's distilled encoder)."""

    def __init__(self, b: Bundle, chosen: list[Member], specs: list, device: str, *, batch_size: int,
                 encoder_weights: str | Path | None, mpp: float | None) -> None:  # fmt: skip
        from wsimil.features.extract import EncodeSettings
        from wsimil.predict.memory import SlidePipeline
        from wsimil.slide.job import SlideSpec

        assert b.tiling is not None
        self.b = b
        self.specs = {s.slide_id: s if s.mpp is not None or mpp is None else SlideSpec(s.slide_id, s.path, mpp, s.extra)
                      for s in specs}  # fmt: skip
        settings = EncodeSettings(device=device, batch_size=batch_size)
        self.paths: dict[EncoderRef, SlidePipeline] = {}  # one slide path per distinct encoder
        for m in chosen:
            assert m.encoder is not None
            if m.encoder not in self.paths:
                enc = b.build_encoder(encoder_weights, m)
                self.paths[m.encoder] = SlidePipeline(b.tile_settings(), enc, [], settings, m.fold)
        self.keys = [m.encoder for m in chosen]
        names = sorted({r.describe for r in self.paths})
        console.print(
            f"Predicting with {b.model if b.method == 'supervised' else b.method} ({len(chosen)} model"
            f"{'s' * (len(chosen) > 1)}, each with its own encoder: {', '.join(names)}; {b.tiling.mag:g}x "
            f"{b.tiling.patch_size}px tiled in memory, nothing at a finer magnification is read)",
            soft_wrap=True,
        )

    def slides(self) -> list[tuple[str, dict | None]]:
        return [(sid, None) for sid in self.specs]

    def bag(self, sid: str) -> SlideBag:
        assert self.b.tiling is not None
        spec = self.specs[sid]
        grid = next(iter(self.paths.values())).tile(spec)  # the members share the tiling
        if len(grid.coords) == 0:
            raise WsimilError(f"slide {sid!r}: no tissue patches at {self.b.tiling.mag:g}x to score")
        feats = {ref: path.features(grid, spec.mpp) for ref, path in self.paths.items()}
        attrs = {"slide_path": spec.path, "patch_size_level0": float(grid.step0), "mag": float(self.b.tiling.mag),
                 "mpp": spec.mpp}  # fmt: skip
        return SlideBag(grid.coords, [feats[k] for k in self.keys], attrs, {"n_patches": len(grid.coords)})


class StoreSource:
    """Bags of a feature folder, checked against the bundle's encoder and width slide by slide."""

    def __init__(self, b: Bundle, store: Any) -> None:
        self.b, self.store = b, store

    def slides(self) -> list[tuple[str, dict | None]]:
        return [(sid, None) for sid in self.store.slide_ids()]

    def bag(self, sid: str) -> SlideBag:
        bag = self.store.read(sid)
        self.b.check_features(sid, self.store.path(sid), bag.features.shape[1])
        if len(bag.features) == 0:
            raise WsimilError(f"slide {sid!r}: the bag is empty")
        ps0 = patch_size_level0(self.store.path(sid)) if self.store.ext == ".h5" else None
        return SlideBag(bag.coords, bag.features, {"patch_size_level0": ps0})


def failed_status(slide_id: str, err: BaseException, stage: str = "predict") -> dict:
    """The status row of a slide that failed: a :class:`WsimilError`'s message as is, anything else as
    ``unexpected: <type>: <message>``."""
    if isinstance(err, WsimilError):
        msg = str(err)
    else:
        msg = "unexpected: " + traceback.format_exception_only(type(err), err)[-1].strip()
    return {"slide_id": slide_id, "status": "failed", "stage": stage, "error": msg, "seconds": 0.0}


def _claimed(slide_id: str, stage: str, note: str) -> dict:
    return {"slide_id": slide_id, "status": "claimed", "stage": stage, "error": note, "seconds": 0.0}


def _finish(out: Path, rows: list[dict], status: list[dict], bundle: Bundle) -> pd.DataFrame:
    """Merge this run's predictions and status rows into ``OUT`` (other workers' slides keep their rows)."""
    cols = ["slide_id", *[f"prob_{c}" for c in bundle.classes], "predicted"]
    if bundle.task == "survival":
        cols = ["slide_id", "risk"]
    order = [r["slide_id"] for r in status]
    owned = [r["slide_id"] for r in status if r["status"] != "claimed"]
    merge_rows(out / "predictions.csv", rows, order, owned, cols)
    table = pd.DataFrame(status, columns=["slide_id", "status", "stage", "error", "seconds"])
    merge_rows(out / "status.csv", status, order, owned, list(table.columns))
    return table


def _check_widths(store, b: Bundle) -> None:
    """Refuse a feature folder in which no bag has the bundle's width (another encoder's features) before anything
    is loaded or written; a few odd bags among good ones fail alone, slide by slide. HDF5 widths are read from
    the file headers; of ``.pt`` bags (loaded whole) only the first is checked."""
    ids = store.slide_ids()
    widths: dict[int, int] = {}
    for sid in ids if store.ext == ".h5" else ids[:1]:
        try:
            d = store.shape(sid)[1]
        except WsimilError:
            continue  # an unreadable bag fails alone below
        widths[d] = widths.get(d, 0) + 1
    if widths and b.in_dim not in widths:
        found = ", ".join(f"{d}-d ({n} bag{'s' if n != 1 else ''})" for d, n in sorted(widths.items()))
        enc = f" from encoder {b.encoder.name!r}" if b.encoder else ""
        raise WsimilError(
            f"features in {store.dir} are {found}, but bundle {b.path} expects {b.in_dim}-d features{enc}; "
            "extract them with the bundle's encoder (or predict from --slides)"
        )


def patch_size_level0(path: Path) -> float | None:
    """Exact level-0 footprint of a bag's patches from its ``coords`` attributes (``None`` if unknown)."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                return None
            from wsimil.features.patches import level0_footprint

            return level0_footprint(dict(f["coords"].attrs))
    except OSError:
        return None
