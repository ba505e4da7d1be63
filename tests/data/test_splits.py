import numpy as np
import pandas as pd
import pytest

from wsimil.data.manifest import read_manifest
from wsimil.data.splits import kfold_splits, read_splits, write_clam_splits
from wsimil.errors import WsimilError


@pytest.fixture
def manifest(tmp_path):
    rows = []
    rng = np.random.default_rng(0)
    for case in range(30):
        label = case % 3
        for s in range(int(rng.integers(1, 4))):  # 1-3 slides per patient
            rows.append({"case_id": f"case{case}", "slide_id": f"c{case}_s{s}", "label": label})
    p = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    return read_manifest(p)


def test_kfold_groups_stratifies_and_covers(manifest):
    splits = kfold_splits(manifest, k=5, repeats=2, val_fraction=0.2, seed=1)
    assert len(splits) == 10
    case_of = dict(zip(manifest.slide_ids, manifest.groups, strict=True))
    label_of = dict(zip(manifest.slide_ids, manifest.labels, strict=True))
    for r in (0, 1):
        tests = [sid for s in splits if s.repeat == r for sid in s.test]
        assert sorted(tests) == sorted(manifest.slide_ids)  # each slide tested exactly once per repeat
    for s in splits:
        parts = [set(s.train), set(s.val), set(s.test)]
        assert sum(map(len, parts)) == len(manifest.slide_ids)
        cases = [{case_of[x] for x in p} for p in parts]
        assert not (cases[0] & cases[2]) and not (cases[1] & cases[2]) and not (cases[0] & cases[1])
        assert len(s.val) > 0
        assert {label_of[x] for x in s.test} == {0, 1, 2}
    assert splits[0].test != splits[5].test  # repeats reshuffle


def test_kfold_is_deterministic(manifest):
    a = kfold_splits(manifest, 5, seed=7)
    b = kfold_splits(manifest, 5, seed=7)
    assert [s.test for s in a] == [s.test for s in b]


def test_too_many_folds_is_clear(manifest):
    with pytest.raises(WsimilError, match="class '0' has only 10 case"):
        kfold_splits(manifest, k=11)


def test_clam_roundtrip(manifest, tmp_path):
    splits = kfold_splits(manifest, 3, val_fraction=0.25)
    write_clam_splits(splits, tmp_path / "splits")
    df = pd.read_csv(tmp_path / "splits" / "splits_0.csv")
    assert list(df.columns) == ["train", "val", "test"]
    back = read_splits(tmp_path / "splits", manifest)
    assert [(s.train, s.val, s.test) for s in back] == [(s.train, s.val, s.test) for s in splits]
    single = read_splits(tmp_path / "splits" / "splits_2.csv")
    assert single[0].fold == 2 and single[0].test == splits[2].test


def test_patho_bench_and_fixed_lists(manifest, tmp_path):
    ids = manifest.slide_ids
    tsv = pd.DataFrame(
        {
            "case_id": manifest.groups,
            "slide_id": ids,
            "task": manifest.labels,
            "fold_0": ["test" if i % 2 else "train" for i in range(len(ids))],
            "fold_1": ["train" if i % 2 else "test" for i in range(len(ids))],
        }
    )
    tsv.to_csv(tmp_path / "k=all.tsv", sep="\t", index=False)
    splits = read_splits(tmp_path / "k=all.tsv", manifest)
    assert len(splits) == 2 and set(splits[0].test) == set(splits[1].train)
    fixed = pd.DataFrame({"slide_id": ids, "split": ["train"] * (len(ids) - 4) + ["val", "test", "test", "test"]})
    fixed.to_csv(tmp_path / "fixed.csv", index=False)
    (s,) = read_splits(tmp_path / "fixed.csv", manifest)
    assert len(s.val) == 1 and len(s.test) == 3


def test_splits_must_match_manifest(manifest, tmp_path):
    pd.DataFrame({"slide_id": ["ghost", manifest.slide_ids[0]], "split": ["train", "test"]}).to_csv(
        tmp_path / "f.csv", index=False
    )
    with pytest.raises(WsimilError, match="train slide 'ghost' is not in the manifest"):
        read_splits(tmp_path / "f.csv", manifest)
    pd.DataFrame({"slide_id": ["a"], "split": ["holdout"]}).to_csv(tmp_path / "g.csv", index=False)
    with pytest.raises(WsimilError, match="split value 'holdout' is not train/val/test"):
        read_splits(tmp_path / "g.csv")
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "h.csv", index=False)
    with pytest.raises(WsimilError, match="cannot tell the format"):
        read_splits(tmp_path / "h.csv")


def test_tiny_cohorts_still_get_a_validation_part(tmp_path):
    p = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": [f"s{i}" for i in range(10)], "label": [i % 2 for i in range(10)]}).to_csv(p, index=False)
    splits = kfold_splits(read_manifest(p), k=5, val_fraction=0.1, seed=0)
    assert all(len(s.val) >= 1 and len(s.train) >= 4 for s in splits)


def _clam_split_files(folder, fold, parts, classes):
    """The three files CLAM's create_splits_seq.py writes per fold (from its documented format): the id lists,
    the per-slide booleans (ids as the index) and the per-class counts."""
    folder.mkdir(exist_ok=True)
    cols = [pd.Series(parts[k], name=k, dtype=object) for k in ("train", "val", "test")]
    pd.concat(cols, axis=1).to_csv(folder / f"splits_{fold}.csv")
    ids = [i for k in ("train", "val", "test") for i in parts[k]]
    flags = {k: [i in parts[k] for i in ids] for k in ("train", "val", "test")}
    pd.DataFrame(flags, index=ids).to_csv(folder / f"splits_{fold}_bool.csv")
    counts = {k: [sum(classes[i] == c for i in parts[k]) for c in (0, 1, 2)] for k in ("train", "val", "test")}
    pd.DataFrame(counts, index=["a", "b", "c"]).to_csv(folder / f"splits_{fold}_descriptor.csv")


def test_clam_split_folder_reads_only_the_folds(manifest, tmp_path):
    splits = kfold_splits(manifest, 3, val_fraction=0.25)
    classes = dict(zip(manifest.slide_ids, manifest.labels, strict=True))
    for s in splits:
        _clam_split_files(tmp_path / "splits", s.fold, {"train": s.train, "val": s.val, "test": s.test}, classes)
    back = read_splits(tmp_path / "splits", manifest)  # 9 files, 3 folds
    assert [(b.fold, b.train, b.val, b.test) for b in back] == [(s.fold, s.train, s.val, s.test) for s in splits]
    (lone,) = read_splits(tmp_path / "splits" / "splits_1_bool.csv", manifest)
    assert (lone.fold, sorted(lone.train), sorted(lone.val), sorted(lone.test)) == (
        1,
        splits[1].train,
        splits[1].val,
        splits[1].test,
    )
    with pytest.raises(WsimilError, match="descriptor"):
        read_splits(tmp_path / "splits" / "splits_1_descriptor.csv")
    only_bool = tmp_path / "only_bool"
    only_bool.mkdir()
    (only_bool / "splits_0_bool.csv").write_bytes((tmp_path / "splits" / "splits_0_bool.csv").read_bytes())
    (b,) = read_splits(only_bool, manifest)
    assert sorted(b.test) == splits[0].test


def test_patho_bench_few_shot_minus_one_is_unused(manifest, tmp_path):
    ids = manifest.slide_ids
    values = ["train", "test", "-1", "val"]
    tsv = pd.DataFrame(
        {"case_id": manifest.groups, "slide_id": ids, "fold_0": [values[i % 4] for i in range(len(ids))]}
    )
    tsv.to_csv(tmp_path / "k=all.tsv", sep="\t", index=False)
    (s,) = read_splits(tmp_path / "k=all.tsv", manifest)
    unused = {ids[i] for i in range(len(ids)) if i % 4 == 2}
    assert unused and not unused & (set(s.train) | set(s.val) | set(s.test))
    assert len(s.train) + len(s.val) + len(s.test) == len(ids) - len(unused)
    tsv["fold_0"] = ["-2"] + list(tsv["fold_0"][1:])
    tsv.to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(WsimilError, match="split value '-2'"):
        read_splits(tmp_path / "bad.tsv")
