"""Many workers, one job: slide claims, stale-claim takeover, orphan clean-up, shared status tables, and two
processes that split one tiling job and one extraction job."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import wsimil
from wsimil.claims import _break, claim_path, holder, merge_rows, remove_orphans, try_claim
from wsimil.cli import app
from wsimil.io import HOST, atomic_path, temp_prefix
from wsimil.slide.job import TileSettings, collect_slides, outputs_valid, run_tiling

runner = CliRunner()
SRC = str(Path(wsimil.__file__).resolve().parents[1])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_claim(folder: Path, key: str, host: str, pid: int, age: float = 0.0) -> Path:
    p = claim_path(folder, key)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"host": host, "pid": pid, "started": 0, "token": f"t{pid}"}))
    if age:
        os.utime(p, (time.time() - age, time.time() - age))
    return p


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Six small synthetic Aperio slides (copies of one 1536² render: 8 patches each at 20x)."""
    from wsimil.slide.synth import render_slide, write_aperio_tiff

    d = tmp_path_factory.mktemp("claim_slides")
    write_aperio_tiff(d / "s0.svs", render_slide(3, 1536, 1536)[0], downsamples=(4,))
    for i in range(1, 6):
        shutil.copy(d / "s0.svs", d / f"s{i}.svs")
    return d


def test_claim_is_exclusive_kept_alive_and_released(tmp_path):
    c = try_claim(tmp_path, "s1", timeout=0.2)
    assert c.held and claim_path(tmp_path, "s1").is_file()
    other = try_claim(tmp_path, "s1", timeout=0.2)
    assert not other.held and other.describe() == f"claimed by {HOST}:{os.getpid()}"
    time.sleep(0.8)  # four timeouts: the heartbeat keeps the claim fresh
    age = time.time() - claim_path(tmp_path, "s1").stat().st_mtime
    assert age < 0.2 and not try_claim(tmp_path, "s1", timeout=0.2).held
    assert holder(tmp_path, "s1", timeout=0.2).pid == os.getpid()
    c.release()
    c.release()
    assert not claim_path(tmp_path, "s1").exists() and holder(tmp_path, "s1") is None
    with try_claim(tmp_path, "s1") as again:
        assert again.held
    assert not claim_path(tmp_path, "s1").exists()


def test_stale_claims_are_taken_over(tmp_path):
    _write_claim(tmp_path, "dead", HOST, _dead_pid())  # this host, process gone: stale at once
    _write_claim(tmp_path, "old", "elsewhere", 1, age=120)  # another host, no heartbeat for 2 min
    _write_claim(tmp_path, "fresh", "elsewhere", 1)  # another host, recent heartbeat
    claim_path(tmp_path, "junk").write_text("")  # unreadable (a writer died mid-way), old
    os.utime(claim_path(tmp_path, "junk"), (0, 0))
    for key in ("dead", "old", "junk"):
        with try_claim(tmp_path, key, timeout=60) as c:
            assert c.held, key
            assert json.loads(claim_path(tmp_path, key).read_text())["pid"] == os.getpid()
    fresh = try_claim(tmp_path, "fresh", timeout=60)
    assert not fresh.held and fresh.describe() == "claimed by elsewhere:1"
    _write_claim(tmp_path, "slow", "elsewhere", 1, age=120)
    assert not try_claim(tmp_path, "slow", timeout=300).held  # 2 min without heartbeat is live under 5 min


def test_takeover_never_removes_a_claim_that_replaced_the_stale_one(tmp_path):
    """Two workers judge the same claim stale; the first replaces it; the second must not remove the new one."""
    p = _write_claim(tmp_path, "s", "elsewhere", 1, age=120)
    seen = p.read_bytes()
    with try_claim(tmp_path, "s", timeout=60) as first:
        assert first.held
        assert not _break(p, seen)  # the second worker's view is outdated
        assert json.loads(p.read_text())["token"] == first.owner.token
        assert not try_claim(tmp_path, "s", timeout=60).held
    assert list((tmp_path / ".claims").iterdir()) == []  # no private copy left behind


def test_remove_orphans_keeps_live_workers_files(tmp_path):
    old = time.time() - 3600
    dead = _dead_pid()
    files = {
        f".a.h5.~{HOST}~{dead}~x1y2z3w4.tmp": False,  # this host, owner gone
        f"{temp_prefix('b.h5')}abcdefgh.tmp": True,  # this process: live, even if old
        ".c.h5.~elsewhere~7~abcdefgh.tmp": False,  # another host, older than the timeout
        ".d.h5.abcdefgh.tmp": False,  # untagged (older wsimil), old
        "e.h5": True,  # an output
        ".notes.tmp": True,  # not ours
    }
    for name in files:
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / name).write_text("x")
        os.utime(tmp_path / "sub" / name, (old, old))
    (tmp_path / ".f.h5.~elsewhere~7~abcdefgh.tmp").write_text("young")  # another host, recent: maybe live
    (tmp_path / f".bundle.~{HOST}~{dead}~qwertyui").mkdir()  # a temporary folder of a dead process
    (tmp_path / f".bundle.~{HOST}~{dead}~qwertyui" / "member.pt").write_text("x")
    stale = _write_claim(tmp_path, "s1", HOST, dead)
    live = _write_claim(tmp_path, "s2", HOST, os.getpid())
    assert remove_orphans(tmp_path, timeout=600) == 5
    for name, kept in files.items():
        assert (tmp_path / "sub" / name).exists() == kept, name
    assert (tmp_path / ".f.h5.~elsewhere~7~abcdefgh.tmp").exists()
    assert not (tmp_path / f".bundle.~{HOST}~{dead}~qwertyui").exists()
    assert not stale.exists() and live.exists()
    assert remove_orphans(tmp_path / "sub", timeout=600, recursive=False) == 0


def test_atomic_path_tags_its_temporary_file(tmp_path):
    with atomic_path(tmp_path / "x.h5") as tmp:
        assert tmp.name.startswith(f".x.h5.~{HOST}~{os.getpid()}~") and tmp.suffix == ".tmp"
        tmp.write_text("x")
        assert remove_orphans(tmp_path, timeout=0) == 0  # our own file in progress
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


def test_merge_rows_keeps_other_workers_rows(tmp_path):
    path = tmp_path / "status.csv"
    order = ["a", "b", "c", "d"]
    # worker 1 did a and b, saw c claimed; an older run had failed on d
    pd.DataFrame({"slide_id": ["d"], "status": ["failed"], "error": ["old"]}).to_csv(path, index=False)
    w1 = [{"slide_id": "a", "status": "ok"}, {"slide_id": "b", "status": "failed", "error": "bad"},
          {"slide_id": "c", "status": "claimed", "error": "claimed by h:2"}]  # fmt: skip
    merge_rows(path, w1, order, ["a", "b"])
    t = pd.read_csv(path, keep_default_na=False).set_index("slide_id")
    assert t.status.to_dict() == {"a": "ok", "b": "failed", "c": "claimed", "d": "failed"}
    # worker 2 did c and d, saw a and b claimed (stale view): worker 1's rows stay
    w2 = [{"slide_id": "a", "status": "claimed"}, {"slide_id": "b", "status": "claimed"},
          {"slide_id": "c", "status": "ok"}, {"slide_id": "d", "status": "skipped"}]  # fmt: skip
    merge_rows(path, w2, order, ["c", "d"])
    t = pd.read_csv(path, keep_default_na=False)
    assert t.slide_id.tolist() == order and t.status.tolist() == ["ok", "failed", "ok", "skipped"]
    assert t.error.tolist() == ["", "bad", "", ""]
    assert not list((tmp_path / ".claims").iterdir())  # the lock is gone


def test_tile_leaves_a_claimed_slide_to_its_owner(slides, tmp_path):
    job = tmp_path / "job"
    with try_claim(job, "s2"):
        res = runner.invoke(app, ["tile", "--slides", str(slides), "--out", str(job), "--mag", "20"])
        assert res.exit_code == 0, res.output
        assert "Tiled 5, skipped 0 (already done), left 1 to other workers, failed 0" in res.output
    status = pd.read_csv(job / "status.csv").set_index("slide_id")
    assert status.loc["s2", "status"] == "claimed" and status.loc["s2", "error"] == f"claimed by {HOST}:{os.getpid()}"
    assert not outputs_valid(job, "s2", TileSettings(mags=[20]))
    table = run_tiling(slides, job, TileSettings(mags=[20]))  # the claim is gone: s2 is done now
    assert table.status.tolist() == ["skipped", "skipped", "ok", "skipped", "skipped", "skipped"]
    assert (pd.read_csv(job / "status.csv").status == "skipped").sum() == 5


# A worker: wait for the start signal, then run the stage; each slide it works on is logged (and slowed down so that
# the two workers overlap). Prints its own status table as JSON.
WORKER = """
import json, sys, time
from pathlib import Path
stage, job, slides, go, log = sys.argv[1:6]
if stage == "tile":
    import wsimil.slide.job as m
    name, run = "tile_slide", lambda: m.run_tiling(slides, job, m.TileSettings(mags=[20]), claim_timeout=30)
else:
    import wsimil.features.extract as m
    st = m.ExtractSettings(mag=20, encoder="resnet18", batch_size=8)
    enc = m.create_encoder("resnet18", None, 0)
    name, run = "encode_slide", lambda: m.run_extraction(job, st, encoder=enc, claim_timeout=30)
work = getattr(m, name)
def logged(*a, **k):
    sid = a[0].slide_id if stage == "tile" else a[1].slide_id
    with open(log, "a") as f:
        f.write(sid + "\\n")
    time.sleep(0.3)
    return work(*a, **k)
setattr(m, name, logged)
Path(log).touch()
while not Path(go).exists():
    time.sleep(0.01)
print(json.dumps(run()[["slide_id", "status"]].values.tolist()))
"""


def _two_workers(stage: str, job: Path, slides: Path, tmp: Path) -> list[dict]:
    """Run two worker processes on one job; returns each one's ``{slide_id: status}`` and logged slides."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    logs = [tmp / f"worker{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, stage, str(job), str(slides), str(tmp / "go"), str(log)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for log in logs
    ]
    deadline = time.time() + 240
    while not all(log.exists() for log in logs) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (tmp / "go").touch()  # both ready (imports done): start together
    out = []
    for p, log in zip(procs, logs, strict=True):
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr
        status = dict(json.loads(stdout.strip().splitlines()[-1]))
        out.append({"status": status, "did": log.read_text().split()})
    return out


def _assert_split(workers: list[dict], ids: list[str]) -> None:
    did = [w["did"] for w in workers]
    assert sorted(did[0] + did[1]) == ids, did  # every slide worked on exactly once...
    assert did[0] and did[1], did  # ...and both workers had a share
    for w, other in ((workers[0], workers[1]), (workers[1], workers[0])):
        for sid in ids:
            if sid in w["did"]:
                assert w["status"][sid] == "ok" and other["status"][sid] in ("claimed", "skipped")


def test_two_tile_processes_split_the_slides(slides, tmp_path):
    job = tmp_path / "job"
    workers = _two_workers("tile", job, slides, tmp_path)
    ids = [f"s{i}" for i in range(6)]
    _assert_split(workers, ids)
    status = pd.read_csv(job / "status.csv")  # both workers' rows, merged ("skipped": done when the other came)
    assert status.slide_id.tolist() == ids and status.status.isin(["ok", "skipped"]).all()
    assert (status.status == "ok").sum() >= 3 and status.patches_20x.max() == 8
    assert all(outputs_valid(job, s, TileSettings(mags=[20])) for s in ids)
    assert not [p for p in job.rglob("*") if p.name.endswith(".tmp") or p.suffix == ".claim"]


@pytest.mark.slow  # two fresh processes import torch and build an encoder
def test_two_extract_processes_split_the_slides(slides, tmp_path):
    from wsimil.features.store import FeatureStore

    job = tmp_path / "job"
    run_tiling(slides, job, TileSettings(mags=[20]))
    workers = _two_workers("extract", job, slides, tmp_path)
    ids = [f"s{i}" for i in range(6)]
    _assert_split(workers, ids)
    fdir = job / "20x_256px_0px_overlap" / "features_resnet18"
    status = pd.read_csv(fdir / "status.csv")
    assert status.slide_id.tolist() == ids and status.status.isin(["ok", "skipped"]).all()
    store = FeatureStore(fdir)
    first = store.read("s0").features
    for s in ids:  # identical slides: identical, complete feature bags whoever encoded them
        assert store.read(s).features.shape == first.shape == (8, 512)
        assert abs(store.read(s).features - first).max() < 1e-5
    assert not [p for p in job.rglob("*") if p.name.endswith(".tmp") or p.suffix == ".claim"]


def test_killed_worker_leaves_nothing_behind(slides, tmp_path):
    """A worker holding a claim and writing a temporary file: a second run leaves both alone while it lives; once it
    is killed, the next run removes its temporary file and takes over its slide."""
    job = tmp_path / "job"
    ready = tmp_path / "ready"
    hold = (
        "import sys, time; from pathlib import Path; from wsimil.claims import try_claim; "
        "from wsimil.io import atomic_path\n"
        f"c = try_claim({str(job)!r}, 's1', 30)\n"
        f"with atomic_path(Path({str(job)!r}) / 'links' / 's1_links.h5') as tmp:\n"
        f"    tmp.write_text('half'); Path({str(ready)!r}).touch(); time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-c", hold], env=env)
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert p.poll() is None and time.time() < deadline
            time.sleep(0.05)
        temp = next((job / "links").glob(".s1_links.h5.*.tmp"))
        os.utime(temp, (0, 0))  # older than any timeout: still its owner's
        table = run_tiling(slides, job, TileSettings(mags=[20]), claim_timeout=60)
        assert table.set_index("slide_id").loc["s1", "error"] == f"claimed by {HOST}:{p.pid}"
        assert temp.exists()
    finally:
        p.kill()
        p.wait()
    table = run_tiling(slides, job, TileSettings(mags=[20]), claim_timeout=600)
    assert table.set_index("slide_id").loc["s1", "status"] == "ok" and not temp.exists()
    assert not list((job / ".claims").iterdir())


def test_extract_leaves_a_slide_being_tiled(slides, tmp_path):
    import warnings

    from wsimil.features.extract import ExtractSettings, run_extraction

    job = tmp_path / "job"
    run_tiling(collect_slides(slides)[:2], job, TileSettings(mags=[20]))
    with try_claim(job, "s1"), warnings.catch_warnings():  # s1 is being tiled again elsewhere
        warnings.simplefilter("ignore", UserWarning)  # random encoder weights
        table = run_extraction(job, ExtractSettings(mag=20, encoder="resnet18")).set_index("slide_id")
    assert table.loc["s1", "status"] == "claimed" and table.loc["s1", "error"] == f"being tiled by {HOST}:{os.getpid()}"
    assert table.loc["s0", "status"] == "ok"
