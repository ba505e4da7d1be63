"""A training run's slides scored out of fold (each by the fold model that held it out), for report heatmaps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsimil.errors import WsimilError
from wsimil.predict.bundle import load_bundle
from wsimil.predict.pipeline import patch_size_level0
from wsimil.predict.score import SlideScores, score_bag


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
    tiling job the run's features came from (its ``slides.csv``; the job is found from what the feature files record,
    :meth:`~wsimil.slide.tiling_job.TilingJob.find_for_features`, never by guessing folders)."""
    from wsimil.run import RunDir
    from wsimil.slide.job import collect_slides
    from wsimil.slide.tiling_job import TilingJob

    if slides is not None:
        return {s.slide_id: s.path for s in collect_slides(slides)}
    feats = RunDir(run).read_config().get("features")
    job = TilingJob.find_for_features(feats) if feats else None
    return {sid: row["path"] for sid, row in job.slides().items()} if job is not None else {}


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
        ps0 = patch_size_level0(store.path(sid)) if store.ext == ".h5" else None
        out.append(RunSlide(sid, s, bag.coords, ps0, paths.get(sid), mag, *key))
    return out
