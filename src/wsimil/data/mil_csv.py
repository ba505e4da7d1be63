"""Convert a classic MIL CSV (MUSK, Elephant, Fox, Tiger; no header, column 0 = bag label, column 1 = bag id,
then features, one row per instance) into a feature folder and a manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from wsimil.errors import WsimilError, problems_error
from wsimil.features.store import write_bag
from wsimil.io import write_csv


def read_mil_csv(path: str | Path, instance_labels: str = "auto") -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None]:
    """Return ``(rows, features, instance_labels)`` where ``rows`` has ``bag_id,label`` per instance.

    Some public copies carry an instance-label column after the bag id. ``instance_labels="auto"`` treats
    column 2 as instance labels when it only holds 0/1 and every bag's label equals the max of it; ``"yes"``
    requires such a column, ``"no"`` never takes one."""
    path = Path(path)
    if not path.is_file():
        raise WsimilError(f"MIL CSV {path} does not exist")
    try:
        df = pd.read_csv(path, header=None)
    except Exception as e:  # noqa: BLE001
        raise WsimilError(f"cannot read MIL CSV {path}: {e}") from e
    if df.shape[1] < 3:
        raise WsimilError(f"MIL CSV {path} has {df.shape[1]} columns; expected label, bag id, features...")
    labels = pd.to_numeric(df[0], errors="coerce")
    bad = np.flatnonzero(~labels.isin([0, 1]))
    problems = [f"row {i + 1}: bag label {str(df.iat[i, 0])!r} is not 0/1" for i in bad]
    if problems:
        raise problems_error(f"MIL CSV {path} is invalid", problems)
    bag_ids = df[1].astype(str)
    feats = df.iloc[:, 2:].apply(pd.to_numeric, errors="coerce")
    bad_rows = np.flatnonzero(feats.isna().any(axis=1).to_numpy())
    if len(bad_rows):
        raise problems_error(
            f"MIL CSV {path} has non-numeric or missing features",
            [f"row {i + 1} (bag {bag_ids.iat[i]})" for i in bad_rows],
        )
    rows = pd.DataFrame({"bag_id": bag_ids, "label": labels.astype(int)})
    inconsistent = rows.groupby("bag_id")["label"].nunique()
    inconsistent = inconsistent[inconsistent > 1]
    if len(inconsistent):
        raise problems_error(
            f"MIL CSV {path}: bags with more than one label", [f"bag {b!r}" for b in inconsistent.index]
        )
    X = feats.to_numpy(dtype=np.float32)
    inst = None
    if instance_labels != "no":
        col = X[:, 0]
        looks = (
            np.isin(col, [0, 1]).all()
            and (
                pd.Series(col).groupby(rows["bag_id"].to_numpy()).max() == rows.groupby("bag_id")["label"].first()
            ).all()
        )
        if instance_labels == "yes" and not looks:
            raise WsimilError(
                f"MIL CSV {path}: column 3 is not a 0/1 instance-label column consistent with the bag labels"
            )
        if looks and X.shape[1] > 1:
            inst, X = col.astype(np.int64), X[:, 1:]
    return rows, X, inst


def convert_mil_csv(path: str | Path, out: str | Path, instance_labels: str = "auto") -> Path:
    """Write ``out/features/{bag}.h5`` (TRIDENT layout, no coords) and ``out/manifest.csv``; return the manifest."""
    rows, X, inst = read_mil_csv(path, instance_labels)
    out = Path(out)
    manifest = []
    for bag_id, idx in rows.groupby("bag_id", sort=False).indices.items():
        sid = f"bag_{bag_id}"
        write_bag(
            out / "features" / f"{sid}.h5",
            X[idx],
            instance_labels=None if inst is None else inst[idx],
            encoder="mil_csv",
            attrs={"source": str(Path(path).name)},
        )
        manifest.append({"case_id": sid, "slide_id": sid, "label": int(rows["label"].iat[idx[0]])})
    mpath = out / "manifest.csv"
    write_csv(mpath, pd.DataFrame(manifest))
    return mpath
