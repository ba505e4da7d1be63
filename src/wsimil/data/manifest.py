"""Slide manifests (``case_id,slide_id,label`` + optional columns) and their validation against a feature store.

Everything that can be wrong with a cohort is checked before training starts and reported in one error that
names every offending slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from wsimil.errors import WsimilError, problems_error
from wsimil.evaluation.tasks import get_task
from wsimil.features.store import Bag, FeatureStore
from wsimil.progress import track

REQUIRED = ("slide_id",)


@dataclass
class Manifest:
    """A validated slide table. ``classes[i]`` is the name of class ``i``; ``df.y`` holds class indices."""

    df: pd.DataFrame
    classes: list[str]
    path: Path | None = None

    @property
    def slide_ids(self) -> list[str]:
        return self.df["slide_id"].tolist()

    @property
    def labels(self) -> np.ndarray:
        return self.df["y"].to_numpy(dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        return self.df["case_id"].to_numpy()

    def subset(self, slide_ids: list[str]) -> Manifest:
        idx = self.df.set_index("slide_id").loc[slide_ids].reset_index()
        return Manifest(idx, self.classes, self.path)


def read_manifest(
    path: str | Path,
    classes: list[str] | None = None,
    label_column: str = "label",
    task: str = "classification",
    survival_bins: int = 4,
) -> Manifest:
    """Read and check a manifest CSV. ``classes`` fixes the class order (and rejects other labels); by default
    the sorted distinct labels (numerically if they are all numbers). ``task="survival"`` reads ``time,event``
    instead of a label and makes ``y`` the quantile time bin (classes ``bin0…``); the task reads the labels
    (:meth:`wsimil.evaluation.tasks.Task.read_labels`)."""
    path = Path(path)
    if not path.is_file():
        raise WsimilError(f"manifest {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as e:  # noqa: BLE001 - pandas raises several parser errors
        raise WsimilError(f"cannot read manifest {path}: {e}") from e
    df.columns = [c.strip() for c in df.columns]
    kind = get_task(task)
    columns = kind.label_columns(label_column)
    missing = [c for c in (*REQUIRED, *columns) if c not in df.columns]
    if missing:
        raise WsimilError(
            f"manifest {path} lacks column(s) {', '.join(missing)}; found {', '.join(df.columns) or 'none'}. "
            f"Expected at least case_id,slide_id,{','.join(columns)}"
        )
    df = df.copy()
    for c in df.columns:
        df[c] = df[c].str.strip()
    if "case_id" not in df.columns:
        df.insert(0, "case_id", df["slide_id"])  # one slide per case when no case is given

    problems: list[str] = []
    for i, sid in enumerate(df["slide_id"]):
        if not sid:
            problems.append(f"row {i + 2}: empty slide_id")
    dup = df["slide_id"][df["slide_id"].duplicated(keep=False) & (df["slide_id"] != "")]
    for sid in sorted(set(dup)):
        rows = [str(i + 2) for i in np.flatnonzero(df["slide_id"].to_numpy() == sid)]
        problems.append(f"slide {sid!r}: duplicate slide_id (rows {', '.join(rows)})")
    df, classes = kind.read_labels(df, label_column, classes, survival_bins, path, problems)
    return Manifest(df.reset_index(drop=True), classes, path)


@dataclass
class Cohort:
    """A manifest joined with its checked bags.

    ``bags[sid]`` always carries ``instance_labels`` and ``coords``; its ``features`` are kept in memory when
    the cohort fits in the memory budget, and are otherwise empty ``(0, D)`` placeholders read back from
    ``store`` on demand (:meth:`features`)."""

    manifest: Manifest
    bags: dict[str, Bag] = field(repr=False)
    in_dim: int = 0
    lengths: dict[str, int] = field(default_factory=dict, repr=False)
    store: FeatureStore | None = None
    in_memory: bool = True

    @property
    def has_instance_labels(self) -> bool:
        return any(b.instance_labels is not None and (b.instance_labels >= 0).any() for b in self.bags.values())

    def features(self, slide_id: str) -> np.ndarray:
        if self.in_memory or self.store is None:
            return self.bags[slide_id].features
        return self.store.read(slide_id).features


def load_cohort(
    manifest: Manifest, store: FeatureStore, desc: str = "Loading feature bags", max_memory_gb: float = 16.0
) -> Cohort:
    """Check every slide of ``manifest`` against ``store`` (file present, readable, one feature width, finite
    values, not empty) and load the bags. Raises one error that lists every offending slide.

    Bags stay in memory when their float32 features total at most ``max_memory_gb``; larger cohorts are checked
    bag by bag and read from disk when used."""
    problems: list[str] = []
    for sid in manifest.slide_ids:
        if not store.has(sid):
            problems.append(f"slide {sid!r}: feature file not found ({store.path(sid)})")
    if problems:
        raise problems_error(
            f"{len(problems)} of {len(manifest.slide_ids)} slides in the manifest have no features in {store.dir}",
            problems,
        )

    bags: dict[str, Bag] = {}
    dims: dict[int, list[str]] = {}
    lengths: dict[str, int] = {}
    total_bytes = 0
    for sid in manifest.slide_ids:
        try:
            n, d = store.shape(sid)
            total_bytes += n * d * 4
        except WsimilError:
            pass  # reported by the full read below
    in_memory = total_bytes <= max_memory_gb * 2**30
    for sid in track(manifest.slide_ids, desc):
        try:
            bag = store.read(sid)
        except WsimilError as e:
            problems.append(str(e))
            continue
        if bag.features.shape[0] == 0:
            problems.append(f"slide {sid!r}: the bag is empty (0 instances) in {store.path(sid)}")
        bad = ~np.isfinite(bag.features)
        if bad.any():
            rows = np.flatnonzero(bad.any(1))
            kinds = "/".join(k for k, m in (("NaN", np.isnan), ("inf", np.isinf)) if m(bag.features).any())
            problems.append(
                f"slide {sid!r}: {kinds} in {len(rows)} of {len(bag.features)} instances "
                f"(first at row {rows[0]}) in {store.path(sid)}"
            )
        dims.setdefault(bag.features.shape[1], []).append(sid)
        lengths[sid] = bag.features.shape[0]
        if not in_memory:
            bag.features = bag.features[:0]
        bags[sid] = bag
    if len(dims) > 1:
        majority = max(dims, key=lambda d: len(dims[d]))
        for d, sids in sorted(dims.items()):
            if d != majority:
                shown = ", ".join(repr(s) for s in sids[:10]) + (" ..." if len(sids) > 10 else "")
                problems.append(f"feature dimension {d} in {len(sids)} slide(s) ({shown}); most slides have {majority}")
    if problems:
        raise problems_error(f"feature bags in {store.dir} are invalid", problems)
    in_dim = next(iter(dims)) if dims else 0
    return Cohort(manifest, bags, in_dim, lengths, store, in_memory)
