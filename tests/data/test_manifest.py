import h5py
import numpy as np
import pytest

from wsimil.data.manifest import load_cohort, read_manifest
from wsimil.errors import WsimilError
from wsimil.features.store import FeatureStore, write_bag


def _write(tmp_path, rows, header="case_id,slide_id,label"):
    p = tmp_path / "manifest.csv"
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return p


def test_reads_and_orders_classes(tmp_path):
    m = read_manifest(_write(tmp_path, ["p1,a,10", "p1,b,2", "p2,c,10"]))
    assert m.classes == ["2", "10"]  # numeric order, not string order
    assert m.labels.tolist() == [1, 0, 1]
    m = read_manifest(_write(tmp_path, ["p1,a,tumor", "p2,b,normal"]), classes=["normal", "tumor"])
    assert m.labels.tolist() == [1, 0]


def test_case_id_defaults_to_slide_id(tmp_path):
    m = read_manifest(_write(tmp_path, ["a,0", "b,1"], header="slide_id,label"))
    assert m.groups.tolist() == ["a", "b"]


def test_manifest_problems_listed_together(tmp_path):
    p = _write(tmp_path, ["p1,a,0", "p2,a,1", "p3,b,", "p4,c,maybe"])
    with pytest.raises(WsimilError) as e:
        read_manifest(p, classes=["0", "1"])
    msg = str(e.value)
    assert "3 problems" in msg
    assert "slide 'a': duplicate slide_id (rows 2, 3)" in msg
    assert "slide 'b' (row 4): missing label" in msg
    assert "slide 'c' (row 5): unknown label 'maybe'; expected one of ['0', '1']" in msg


def test_missing_columns_and_single_class(tmp_path):
    with pytest.raises(WsimilError, match="lacks column\\(s\\) label"):
        read_manifest(_write(tmp_path, ["p,a,0"], header="case_id,slide_id,target"))
    with pytest.raises(WsimilError, match="single class"):
        read_manifest(_write(tmp_path, ["p,a,1", "q,b,1"]))


def _cohort_dir(tmp_path, n=4, d=8):
    feats = tmp_path / "features"
    rows = []
    for i in range(n):
        write_bag(feats / f"s{i}.h5", np.random.default_rng(i).normal(size=(5, d)))
        rows.append(f"p{i},s{i},{i % 2}")
    return feats, _write(tmp_path, rows)


def test_load_cohort_ok(tmp_path):
    feats, mp = _cohort_dir(tmp_path)
    cohort = load_cohort(read_manifest(mp), FeatureStore(feats))
    assert cohort.in_dim == 8 and len(cohort.bags) == 4 and not cohort.has_instance_labels


def test_missing_feature_files_listed(tmp_path):
    feats, mp = _cohort_dir(tmp_path)
    (feats / "s1.h5").unlink()
    (feats / "s3.h5").unlink()
    with pytest.raises(WsimilError) as e:
        load_cohort(read_manifest(mp), FeatureStore(feats))
    assert "2 of 4 slides" in str(e.value)
    assert "slide 's1': feature file not found" in str(e.value) and "'s3'" in str(e.value)


def test_bad_bags_listed(tmp_path):
    feats, mp = _cohort_dir(tmp_path, n=6)
    write_bag(feats / "s1.h5", np.ones((5, 4)))  # wrong width
    bad = np.ones((5, 8))
    bad[2, 3] = np.nan
    write_bag(feats / "s2.h5", bad)
    bad[2, 3] = np.inf
    write_bag(feats / "s3.h5", bad)
    write_bag(feats / "s4.h5", np.zeros((0, 8)))
    with h5py.File(feats / "s5.h5", "w") as f:
        f["coords"] = np.zeros((3, 2))
    with pytest.raises(WsimilError) as e:
        load_cohort(read_manifest(mp), FeatureStore(feats))
    msg = str(e.value)
    assert "feature dimension 4 in 1 slide(s) ('s1'); most slides have 8" in msg
    assert "slide 's2': NaN in 1 of 5 instances (first at row 2)" in msg
    assert "slide 's3': inf in 1 of 5 instances" in msg
    assert "slide 's4': the bag is empty" in msg
    assert "slide 's5':" in msg and "no 'features' dataset" in msg
