"""Scoring new data with a model bundle: slides → tiles → features → predictions and per-patch scores.

``predict_slides`` reuses :func:`wsimil.slide.job.run_tiling` and :func:`wsimil.features.extract.run_extraction`
on a job folder inside the output (``OUT/job``), so cached tiles and features are reused when they validate against
the bundle's settings, files are written atomically, and a slide that fails at any stage is listed in
``OUT/status.csv`` while the others go on. Outputs::

    OUT/predictions.csv       slide_id, prob_<class>…, predicted[, <head>_prob_<class>…, <head>_predicted]
                              (survival bundles: slide_id, risk = −Σ_k S_k, the members' mean)
    OUT/scores/{slide_id}.h5  coords (N, 2) level-0; maps (K, N) with attribute names (K map names); probs (C,);
                              member_probs (F, C)
    OUT/status.csv            slide_id, status (ok/failed/claimed), stage, error
    OUT/job/                  the tiling job and features (the cache)

Per-patch maps (:func:`score_bag`): for attention models the softmax attention weights (over the bag's patches) of
each member averaged over members — one map, or one per class when the model has one attention row per class
(CLAM-MB, DSMIL, HMIL: ``attention:<class>``; HMIL's ``attention_maps`` give both levels, ``fine:<class>`` and
``coarse:<class>``); for instance models (``instance_score == "instance"``, e.g. WENO, max pooling) the instance
class probabilities (``instance:<class>``; binary: the positive class only). The model's preferred kind comes first.
ABMIL models add patch evidence (``evidence:<class>``, binary: the positive class): the bag classifier applied to
each patch alone, ``softmax(W h_i + b)``, whose logits the bag logit is the attention-weighted mean of.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from wsimil.bundle import Bundle, load_bundle, verify_bundle_digest
from wsimil.claims import CLAIM_TIMEOUT, merge_rows, remove_orphans, try_claim
from wsimil.errors import WsimilError
from wsimil.io import atomic_path
from wsimil.progress import console


@dataclass
class SlideScores:
    """One slide's ensemble prediction and per-patch maps."""

    probs: np.ndarray  # (C,) mean of the members' class probabilities
    member_probs: np.ndarray  # (F, C)
    maps: dict[str, np.ndarray]  # name → (N,) per-patch score, members averaged
    kind: str  # "attention" or "instance": what the first map is
    extra_probs: dict[str, np.ndarray] = field(default_factory=dict)  # head → (C_h,)
    risk: float | None = None  # survival: mean of the members' risks −Σ_k S_k (hazard logits)


def _softmax_n(e: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (instance) axis in float32; ``-inf`` (padding) gets weight 0."""
    return torch.softmax(e.float(), dim=-1)


def _rows(t: torch.Tensor, names: list[str], prefix: str) -> dict[str, torch.Tensor]:
    """Per-row maps of ``t (K, N)`` named ``prefix:<row name>`` (a single row is just ``prefix``)."""
    if t.shape[0] == 1:
        return {prefix: t[0]}
    labels = names if len(names) == t.shape[0] else [str(i) for i in range(t.shape[0])]
    return {f"{prefix}:{n}": t[i] for i, n in enumerate(labels)}


@torch.no_grad()
def member_maps(
    model, x: torch.Tensor, out, classes: list[str], head_classes: dict[str, list[str]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """Per-patch maps of one model for one bag ``x (1, N, D)`` with output ``out``: ``(attention maps, instance
    maps, preferred kind)``. Attention rows are softmax weights; a model whose heads are not one per class (TransMIL's
    8 heads) gets the mean over heads."""
    att: dict[str, torch.Tensor] = {}
    if hasattr(model, "attention_maps"):
        for level, e in model.attention_maps(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)).items():
            e = e[0] if e.dim() == 3 else e
            names = classes if e.shape[0] == len(classes) and level == "fine" else head_classes.get(level, [])
            att.update(_rows(_softmax_n(e), names, level))
    elif out.attention_logits is not None:
        e = out.attention_logits[0]
        w = _softmax_n(e if e.dim() == 2 else e[None])
        if w.shape[0] != len(classes):
            w = w.mean(0, keepdim=True)
        att = _rows(w, classes, "attention")
    inst: dict[str, torch.Tensor] = {}
    if out.instance_logits is not None:
        p = torch.softmax(out.instance_logits[0].float(), dim=-1).T  # (C, N)
        inst = {f"instance:{classes[1]}": p[1]} if len(classes) == 2 else _rows(p, classes, "instance")
    if hasattr(model, "patch_logits"):  # ABMIL: each patch's class probability under the bag classifier
        p = torch.softmax(model.patch_logits(x)[0].float(), dim=-1).T  # (C, N)
        inst.update({f"evidence:{classes[1]}": p[1]} if len(classes) == 2 else _rows(p, classes, "evidence"))
    prefer = getattr(model, "instance_score", "attention")
    if prefer == "instance" and inst:
        return att, inst, "instance"
    return att, inst, "attention" if att else "instance"


@torch.no_grad()
def score_bag(
    members: list[tuple], features: np.ndarray | torch.Tensor, bundle: Bundle, device: str = "cpu"
) -> SlideScores:
    """Score one bag ``(N, D)`` with every member ``(model, standardizer)``; average probabilities and maps."""
    x0 = torch.as_tensor(np.asarray(features, dtype=np.float32)).to(device)[None]
    probs, risks, extra, maps_sum, kind = [], [], {}, {}, "attention"
    order: list[str] = []
    for model, std in members:
        model.eval()
        x = std(x0) if std is not None else x0
        out = model(x, torch.ones(x.shape[:2], dtype=torch.bool, device=device))
        probs.append(torch.softmax(out.logits.float(), -1)[0].cpu().numpy())
        if bundle.task == "survival":
            from wsimil.evaluation.survival import risk_from_logits

            risks.append(float(risk_from_logits(out.logits.float().cpu().numpy())[0]))
        for head, z in (out.extra_logits or {}).items():
            extra.setdefault(head, []).append(torch.softmax(z.float(), -1)[0].cpu().numpy())
        att, inst, kind = member_maps(model, x, out, bundle.classes, bundle.head_classes)
        ordered = {**inst, **att} if kind == "instance" else {**att, **inst}
        for name, v in ordered.items():
            if name not in maps_sum:
                order.append(name)
                maps_sum[name] = np.zeros(x.shape[1], dtype=np.float64)
            maps_sum[name] += v.cpu().numpy()
    n = len(members)
    return SlideScores(
        probs=np.mean(probs, 0),
        member_probs=np.stack(probs),
        maps={k: (maps_sum[k] / n).astype(np.float32) for k in order},
        kind=kind,
        extra_probs={h: np.mean(v, 0) for h, v in extra.items()},
        risk=float(np.mean(risks)) if risks else None,
    )


def write_scores(path: Path, slide_id: str, coords: np.ndarray | None, s: SlideScores, attrs: dict) -> None:
    """``OUT/scores/{slide_id}.h5`` (see the module docstring), atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        if coords is not None:
            f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        names = list(s.maps)
        n = len(coords) if coords is not None else (len(next(iter(s.maps.values()))) if s.maps else 0)
        d = f.create_dataset("maps", data=np.stack([s.maps[k] for k in names]) if names else np.zeros((0, n)))
        d.attrs["names"] = json.dumps(names)
        d.attrs["kind"] = s.kind
        f.create_dataset("probs", data=s.probs.astype(np.float32))
        f.create_dataset("member_probs", data=s.member_probs.astype(np.float32))
        f.attrs["slide_id"] = slide_id
        for k, v in attrs.items():
            if v is not None:
                f.attrs[k] = v


def read_scores(path: str | Path) -> dict:
    """Read a scores file: ``{coords, maps: {name: (N,)}, kind, probs, attrs}``."""
    with h5py.File(path, "r") as f:
        names = json.loads(f["maps"].attrs["names"])
        maps = f["maps"][()]
        return {
            "coords": f["coords"][()] if "coords" in f else None,
            "maps": {n: maps[i] for i, n in enumerate(names)},
            "kind": str(f["maps"].attrs.get("kind", "attention")),
            "probs": f["probs"][()],
            "attrs": {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()},
        }


def _prediction_row(sid: str, s: SlideScores, bundle: Bundle) -> dict:
    row: dict = {"slide_id": sid}
    if s.risk is not None:  # survival: the bins' softmax is no class prediction (hazards are per-bin sigmoids)
        row["risk"] = s.risk
    else:
        row.update({f"prob_{c}": float(p) for c, p in zip(bundle.classes, s.probs, strict=True)})
        row["predicted"] = bundle.classes[int(np.argmax(s.probs))]
    for head, p in s.extra_probs.items():
        names = bundle.head_classes.get(head) or [str(i) for i in range(len(p))]
        row.update({f"{head}_prob_{c}": float(v) for c, v in zip(names, p, strict=True)})
        row[f"{head}_predicted"] = names[int(np.argmax(p))]
    return row


def failed_status(slide_id: str, err: BaseException, stage: str = "predict") -> dict:
    """The status row of a slide that failed: a :class:`WsimilError`'s message as is, anything else as
    ``unexpected: <type>: <message>``."""
    if isinstance(err, WsimilError):
        msg = str(err)
    else:
        msg = "unexpected: " + traceback.format_exception_only(type(err), err)[-1].strip()
    return {"slide_id": slide_id, "status": "failed", "stage": stage, "error": msg, "seconds": 0.0}


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


LEFT = ("failed", "claimed")  # tile/extract outcomes that end a slide's prediction in this run


def _claimed(slide_id: str, stage: str, note: str) -> dict:
    return {"slide_id": slide_id, "status": "claimed", "stage": stage, "error": note, "seconds": 0.0}


def predict_slides(
    bundle: Bundle | str | Path,
    slides: str | Path,
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
    """Predict slides (a folder, a CSV with a ``path`` column, or one file) with a bundle; returns the per-slide
    status table (``status`` ok/failed with the ``stage`` that failed). See the module docstring for outputs.
    ``folds`` picks fold models of the ensemble (default: all). An LRMIL bundle (``wsimil lrmil``) runs its 5×-only
    path (:func:`wsimil.lrmil.bundle.predict_to_folder`). ``expect_sha256`` pins the bundle
    (:func:`wsimil.bundle.verify_bundle_digest`): nothing is loaded from a bundle that does not match. Several runs
    may share ``out``: a slide claimed by another run at any stage (:mod:`wsimil.claims`) is left to it
    (``claimed``), so each slide is done by one run."""
    from wsimil.config import resolve_device
    from wsimil.features.extract import features_dir, run_extraction
    from wsimil.features.store import FeatureStore
    from wsimil.lrmil.bundle import is_lrmil_bundle, predict_to_folder
    from wsimil.slide.job import collect_slides, run_tiling

    if backend not in ("local", "ray"):
        raise WsimilError(f"unknown backend {backend!r}; choose local or ray")
    if expect_sha256 is not None:
        verify_bundle_digest(bundle.path if isinstance(bundle, Bundle) else bundle, expect_sha256)
    if not isinstance(bundle, Bundle) and is_lrmil_bundle(bundle):
        if backend != "local":
            raise WsimilError(f"an LRMIL bundle predicts with the local backend only, not {backend!r}")
        return predict_to_folder(
            bundle, slides, out, resolve_device(device), folds, mpp, batch_size, encoder_weights, claim_timeout
        )
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    b.require_slides()
    assert b.tiling is not None
    out = Path(out)
    dev = resolve_device(device)
    slides = collect_slides(slides) if not isinstance(slides, list) else slides  # a bad --slides first
    members = b.load_models(dev, folds)
    job = out / "job"
    tiling = b.tile_settings(mpp=mpp)
    st = b.extract_settings(dev, encoder_weights, batch_size=batch_size)
    st.validate()
    encoder = b.build_encoder(encoder_weights) if backend == "local" else None
    console.print(
        f"Predicting with {b.model if b.method == 'supervised' else b.method} ({len(members)} model"
        f"{'s' * (len(members) > 1)}, {b.tiling.mag:g}x "
        f"{b.tiling.patch_size}px, encoder {st.encoder}) → {out}"
    )
    remove_orphans(out, claim_timeout, recursive=False)
    remove_orphans(out / "scores", claim_timeout, recursive=False)
    tiles = run_tiling(slides, job, tiling, workers=workers, overwrite=overwrite, claim_timeout=claim_timeout)
    mine = [r["slide_id"] for _, r in tiles.iterrows() if r["status"] != "claimed"]
    feats = run_extraction(
        job, st, b.tiling.patch_size, overwrite=overwrite, encoder=encoder, backend=backend, ray_address=ray_address,
        claim_timeout=claim_timeout, slide_ids=mine,
    )  # fmt: skip
    fdir = features_dir(job, st, b.tiling.patch_size)
    status: list[dict] = []
    # slides that failed, or that another run claimed, at the tile or extract stage: (stage, status, error)
    failed = {r["slide_id"]: ("tile", r["status"], r["error"]) for _, r in tiles.iterrows() if r["status"] in LEFT}
    for _, r in feats.iterrows():
        if r["status"] in LEFT and r["slide_id"] not in failed:
            failed[r["slide_id"]] = ("extract", r["status"], r["error"])
    paths = dict(zip(tiles["slide_id"], tiles["path"], strict=True))
    store = FeatureStore(fdir) if fdir.is_dir() and any(fdir.glob("*.h5")) else None
    rows = []
    for sid in tiles["slide_id"]:
        t0 = time.perf_counter()
        if sid in failed:
            stage, st_, err = failed[sid]
            status.append({"slide_id": sid, "status": st_, "stage": stage, "error": err, "seconds": 0.0})
            continue
        if not (claim := try_claim(out, sid, claim_timeout)).held:
            status.append(_claimed(sid, "predict", claim.describe()))
            continue
        try:
            assert store is not None
            bag = store.read(sid)
            b.check_features(sid, store.path(sid), bag.features.shape[1])
            if len(bag.features) == 0:
                raise WsimilError(f"slide {sid!r}: no tissue patches to score")
            s = score_bag(members, bag.features, b, dev)
            ps0 = _patch_size_level0(store.path(sid))
            write_scores(
                out / "scores" / f"{sid}.h5",
                sid,
                bag.coords,
                s,
                {
                    "slide_path": paths.get(sid),
                    "patch_size_level0": ps0,
                    "mag": b.tiling.mag,
                    "mpp": mpp,
                    "classes": json.dumps(b.classes),
                },
            )
            rows.append(_prediction_row(sid, s, b))
            status.append({"slide_id": sid, "status": "ok", "stage": "", "error": "", "seconds": 0.0})
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the batch
            status.append(failed_status(sid, e))
        finally:
            claim.release()
        status[-1]["seconds"] = round(time.perf_counter() - t0, 3)
    return _finish(out, rows, status, b)


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
    from wsimil.lrmil.bundle import is_lrmil_bundle

    if expect_sha256 is not None:
        verify_bundle_digest(bundle.path if isinstance(bundle, Bundle) else bundle, expect_sha256)
    if not isinstance(bundle, Bundle) and is_lrmil_bundle(bundle):
        raise WsimilError(
            f"{bundle} is an LRMIL bundle: each fold has its own distilled encoder, so it predicts from slides "
            "(--slides), not from a feature folder"
        )
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    out = Path(out)
    dev = resolve_device(device)
    store = FeatureStore(features)
    _check_widths(store, b)
    members = b.load_models(dev, folds)
    rows, status = [], []
    remove_orphans(out, claim_timeout, recursive=False)
    remove_orphans(out / "scores", claim_timeout, recursive=False)
    for sid in store.slide_ids():
        t0 = time.perf_counter()
        if not (claim := try_claim(out, sid, claim_timeout)).held:  # another run sharing OUT scores it
            status.append(_claimed(sid, "predict", claim.describe()))
            continue
        try:
            bag = store.read(sid)
            b.check_features(sid, store.path(sid), bag.features.shape[1])
            if len(bag.features) == 0:
                raise WsimilError(f"slide {sid!r}: the bag is empty")
            s = score_bag(members, bag.features, b, dev)
            ps0 = _patch_size_level0(store.path(sid)) if store.ext == ".h5" else None
            attrs = {"patch_size_level0": ps0, "classes": json.dumps(b.classes)}
            write_scores(out / "scores" / f"{sid}.h5", sid, bag.coords, s, attrs)
            rows.append(_prediction_row(sid, s, b))
            status.append({"slide_id": sid, "status": "ok", "stage": "", "error": ""})
        except WsimilError as e:
            status.append({"slide_id": sid, "status": "failed", "stage": "predict", "error": str(e)})
        finally:
            claim.release()
        status[-1]["seconds"] = round(time.perf_counter() - t0, 3)
    return _finish(out, rows, status, b)


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


def _patch_size_level0(path: Path) -> float | None:
    """Exact level-0 footprint of a bag's patches from its ``coords`` attributes (``None`` if unknown)."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                return None
            from wsimil.features.patches import level0_footprint

            return level0_footprint(dict(f["coords"].attrs))
    except OSError:
        return None


@dataclass
class RunSlide:
    """One slide of a training run scored by the fold model that held it out (for report heatmaps)."""

    slide_id: str
    scores: SlideScores
    coords: np.ndarray | None
    patch_size_level0: float | None
    slide_path: str | None
    mag: float | None
    repeat: int
    fold: int


def run_slide_paths(run: str | Path, slides: str | Path | None = None) -> dict[str, str]:
    """Slide files of a run's slides: from ``slides`` (a folder, a CSV with ``path``, or a file), else from the
    tiling job the run's features came from (``JOB/slides.csv``, found from ``config.yaml``'s feature folder)."""
    import yaml

    from wsimil.slide.job import collect_slides

    if slides is not None:
        return {s.slide_id: s.path for s in collect_slides(slides)}
    cfg = yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}
    feats = Path(cfg.get("features", ""))
    for job in (feats.parent.parent, feats.parent, feats.parent.parent.parent):
        table = job / "slides.csv"
        if table.is_file():
            df = pd.read_csv(table, dtype=str, keep_default_na=False)
            if {"slide_id", "path"} <= set(df.columns):
                return dict(zip(df["slide_id"], df["path"], strict=True))
    return {}


def score_run_slides(
    run: str | Path, slide_ids: list[str] | None = None, slides: str | Path | None = None, device: str = "cpu"
) -> list[RunSlide]:
    """Score a training run's slides out of fold: each slide with the model of the (first) fold whose test part
    held it, on the run's own features, so heatmaps show what a model that never trained on the slide attends to.
    Needs ``RUN/bundle`` (written by ``wsimil train``) and the feature folder recorded in ``config.yaml``."""
    import yaml

    from wsimil.features.store import FeatureStore

    run = Path(run)
    b = load_bundle(run / "bundle")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    pred = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str})
    first = pred.drop_duplicates("slide_id", keep="first").set_index("slide_id")
    ids = [s for s in (slide_ids if slide_ids is not None else first.index.tolist()) if s in first.index]
    try:
        store = FeatureStore(cfg["features"])
    except (KeyError, WsimilError):
        return []
    paths = run_slide_paths(run, slides)
    models = dict(zip([(m.repeat, m.fold) for m in b.members], b.load_models(device), strict=True))
    mag = b.tiling.mag if b.tiling else None
    out = []
    for sid in ids:
        key = (int(first.loc[sid, "repeat"]), int(first.loc[sid, "fold"]))
        if key not in models or not store.has(sid):
            continue
        bag = store.read(sid)
        if len(bag.features) == 0:
            continue
        s = score_bag([models[key]], bag.features, b, device)
        ps0 = _patch_size_level0(store.path(sid)) if store.ext == ".h5" else None
        out.append(RunSlide(sid, s, bag.coords, ps0, paths.get(sid), mag, *key))
    return out
