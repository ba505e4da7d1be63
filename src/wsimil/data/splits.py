"""Train/validation/test splits: stratified group k-fold with repeats, CLAM ``splits_{k}.csv``, Patho-Bench
``k=all.tsv`` and fixed lists.

CLAM's ``create_splits_seq.py`` writes three files per fold: ``splits_{k}.csv`` (columns train,val,test of slide
ids; these are the folds), ``splits_{k}_bool.csv`` (slide ids as the index, True/False per part) and
``splits_{k}_descriptor.csv`` (counts per class). A folder is read from its ``splits_{k}.csv`` files (from the
``_bool`` files when there are none); a lone ``_bool`` file is read too, a lone ``_descriptor`` file is refused.
Patho-Bench fold columns hold train/val/test, or ``-1`` for a slide not used in that fold (few-shot splits).

k-fold splits are stratified by label and grouped by ``case_id`` so a patient never spans train and test; the
validation part is carved from each training part the same way.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from wsimil.data.manifest import Manifest
from wsimil.errors import WsimilError, problems_error
from wsimil.io import write_csv

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    repeat: int
    fold: int
    train: list[str]
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)


def _check_k(manifest: Manifest, k: int, what: str, val_fraction: float = 0.0) -> None:
    per_class = pd.Series(manifest.groups).groupby(manifest.labels).nunique()
    smallest = int(per_class.min())
    if k < 2:
        raise WsimilError(f"{what} needs at least 2 folds, got {k}")
    if smallest < k:
        name = manifest.classes[int(per_class.idxmin())]
        fix = f"use --folds {smallest} or fewer" if smallest >= 2 else "each class needs at least 2 cases"
        # with that many folds, would a training part still hold 2 cases of some class for the validation split?
        if smallest >= 2 and val_fraction > 0 and int((per_class - np.ceil(per_class / smallest)).max()) < 2:
            fix += " with --val-fraction 0 (too few cases to also hold out a validation part)"
        raise WsimilError(f"cannot make {k} stratified {what}: class {name!r} has only {smallest} case(s); {fix}")


def kfold_splits(
    manifest: Manifest, k: int = 5, repeats: int = 1, val_fraction: float = 0.1, seed: int = 0
) -> list[Split]:
    """``k`` folds × ``repeats``; each repeat reshuffles with seed ``seed + repeat``."""
    if not 0 <= val_fraction < 1:
        raise WsimilError(f"val_fraction must be in [0, 1), got {val_fraction}")
    _check_k(manifest, k, "folds", val_fraction)
    ids = np.asarray(manifest.slide_ids)
    y, groups = manifest.labels, manifest.groups
    splits = []
    for r in range(repeats):
        outer = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + r)
        for f, (tr, te) in enumerate(outer.split(ids, y, groups)):
            val_idx = np.array([], dtype=int)
            if val_fraction > 0:
                # small cohorts: at least one case goes to validation even if that is more than val_fraction
                # (scikit-learn needs the largest class to have at least n_splits cases)
                largest = int(pd.Series(groups[tr]).groupby(y[tr]).nunique().max())
                if largest < 2:
                    raise WsimilError(
                        f"with {k} folds, fold {f}'s training part has {len(set(groups[tr]))} case(s), at most one "
                        "per class: too few to also hold out a validation part; set val_fraction to 0 "
                        "(--val-fraction 0: no early stopping, the last epoch is kept) or add slides"
                    )
                n_inner = max(2, min(round(1 / val_fraction), largest))
                inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed + 1000 * (r + 1) + f)
                with warnings.catch_warnings():  # small classes: stratification is best effort here
                    warnings.simplefilter("ignore", UserWarning)
                    _, v = next(inner.split(tr, y[tr], groups[tr]))
                val_idx = tr[v]
                tr = np.setdiff1d(tr, val_idx)
            splits.append(Split(r, f, sorted(ids[tr]), sorted(ids[val_idx]), sorted(ids[te])))
    return splits


def write_clam_splits(splits: list[Split], out_dir: str | Path) -> list[Path]:
    """Write CLAM's ``splits_{k}.csv`` (columns train,val,test of slide ids) for repeat 0 (or all, numbered
    sequentially, if there are repeats)."""
    out_dir = Path(out_dir)
    paths = []
    for i, s in enumerate(splits):
        n = max(len(s.train), len(s.val), len(s.test))
        cols = {k: v + [""] * (n - len(v)) for k, v in (("train", s.train), ("val", s.val), ("test", s.test))}
        p = out_dir / f"splits_{i}.csv"
        write_csv(p, pd.DataFrame(cols))
        paths.append(p)
    return paths


def read_splits(path: str | Path, manifest: Manifest | None = None) -> list[Split]:
    """Read splits from a CLAM folder/file (``splits_{k}.csv``), a Patho-Bench ``.tsv`` or a fixed-list CSV
    (``slide_id,split`` with values train/val/test). When ``manifest`` is given, every id must be in it."""
    path = Path(path)
    if path.is_dir():
        files = _clam_fold_files(path, "") or _clam_fold_files(path, "_bool")
        if not files:
            raise WsimilError(f"no CLAM splits_{{k}}.csv (or splits_{{k}}_bool.csv) files in {path}")
        splits = [_read_clam_file(p, i) for i, p in enumerate(files)]
    elif not path.is_file():
        raise WsimilError(f"splits file {path} does not exist")
    elif path.suffix == ".tsv":
        splits = _read_patho_bench(path)
    else:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        if {"train", "val", "test"} <= set(df.columns) or {"train", "test"} <= set(df.columns):
            m = re.findall(r"\d+", path.stem)
            splits = [_read_clam_file(path, int(m[-1]) if m else 0)]
        elif {"slide_id", "split"} <= set(df.columns):
            splits = [_split_from_column(df["slide_id"], df["split"], path)]
        else:
            raise WsimilError(
                f"cannot tell the format of splits file {path}: expected columns train,val,test "
                f"(CLAM) or slide_id,split (fixed lists); found {', '.join(df.columns)}"
            )
    if manifest is not None:
        known = set(manifest.slide_ids)
        problems = []
        for s in splits:
            for part in ("train", "val", "test"):
                for sid in getattr(s, part):
                    if sid not in known:
                        problems.append(f"fold {s.fold}: {part} slide {sid!r} is not in the manifest")
            overlap = (set(s.train) & set(s.test)) | (set(s.val) & set(s.test)) | (set(s.train) & set(s.val))
            for sid in sorted(overlap):
                problems.append(f"fold {s.fold}: slide {sid!r} is in more than one of train/val/test")
        if problems:
            raise problems_error(f"splits {path} do not match the manifest", problems)
    return splits


def _clam_fold_files(folder: Path, suffix: str) -> list[Path]:
    """``splits_{k}{suffix}.csv`` in ``folder``, ordered by ``k`` (not ``_bool``/``_descriptor`` for suffix "")."""
    pattern = re.compile(rf"splits_(\d+){suffix}\.csv")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _read_clam_file(path: Path, fold: int) -> Split:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if path.stem.endswith("_descriptor"):
        raise WsimilError(
            f"{path} is a CLAM split descriptor (case counts per class), not a split; "
            f"pass splits_{fold}.csv or the folder that holds it"
        )
    unnamed = [c for c in df.columns if c.startswith("Unnamed")]
    values = {v.strip().lower() for c in ("train", "val", "test") if c in df.columns for v in df[c]}
    if unnamed and values and values <= {"true", "false"}:  # CLAM's splits_{k}_bool.csv: ids in the index
        ids = df[unnamed[0]]
        parts = {c: list(ids[df[c].str.strip().str.lower() == "true"]) if c in df.columns else [] for c in SPLITS}
        if not parts["train"] or not parts["test"]:
            raise WsimilError(f"CLAM splits file {path} marks no slide True in 'train' or in 'test'")
        return Split(0, fold, parts["train"], parts["val"], parts["test"])
    df = df.drop(columns=unnamed)
    parts = {c: [v for v in df[c] if v] if c in df.columns else [] for c in SPLITS}
    if not parts["train"] or not parts["test"]:
        raise WsimilError(f"CLAM splits file {path} needs non-empty 'train' and 'test' columns")
    return Split(0, fold, parts["train"], parts["val"], parts["test"])


def _split_from_column(ids: pd.Series, values: pd.Series, path: Path, fold: int = 0) -> Split:
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    bad = []
    for sid, v in zip(ids, values, strict=True):
        v = v.strip().lower()
        v = {"validation": "val", "valid": "val"}.get(v, v)
        if v in parts:
            parts[v].append(sid)
        elif v not in ("", "none", "nan", "-1"):  # -1: Patho-Bench's "not used in this fold"
            bad.append(f"slide {sid!r}: split value {v!r} is not train/val/test (or -1 / empty for unused)")
    if bad:
        raise problems_error(f"splits {path} are invalid", bad)
    return Split(0, fold, parts["train"], parts["val"], parts["test"])


def _read_patho_bench(path: Path) -> list[Split]:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    fold_cols = sorted((c for c in df.columns if re.fullmatch(r"fold_\d+", c)), key=lambda c: int(c[5:]))
    if "slide_id" not in df.columns or not fold_cols:
        raise WsimilError(
            f"Patho-Bench splits {path} need a slide_id column and fold_0..fold_k columns; "
            f"found {', '.join(df.columns)}"
        )
    return [_split_from_column(df["slide_id"], df[c], path, int(c[5:])) for c in fold_cols]
