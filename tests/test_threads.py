from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from wsimil import threads as th
from wsimil.errors import WsimilError

SRC = str(Path(th.__file__).resolve().parents[1])


@pytest.fixture
def torch_threads():
    """Restore torch's and OpenCV's thread counts after a test that applies a plan."""
    import cv2

    n, c = torch.get_num_threads(), cv2.getNumThreads()
    yield
    torch.set_num_threads(n)
    cv2.setNumThreads(c)


@pytest.fixture
def eight_idle_cpus(monkeypatch):
    """A machine with 8 CPUs for this process, all idle, and no OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cpus", lambda: 8)
    monkeypatch.setattr(th, "free_cpus", lambda cpus, window=0: 8.0)


def test_parse_threads():
    assert th.parse_threads(None) == th.parse_threads("auto") == th.parse_threads(" AUTO ") == "auto"
    assert th.parse_threads("3") == th.parse_threads(3) == 3
    for bad in (0, -1, "0", "many", 1.5, True, ""):
        with pytest.raises(WsimilError, match="positive whole number or 'auto'"):
            th.parse_threads(bad)


def test_cgroup_quota_parsing():
    assert th.parse_cpu_max("max 100000\n") is None
    assert th.parse_cpu_max("150000 100000\n") == 1.5
    assert th.parse_cpu_max("400000 200000") == 2.0
    assert th.parse_cfs_quota("-1\n", "100000\n") is None
    assert th.parse_cfs_quota("250000\n", "100000\n") == 2.5


def test_cgroup_limit_walks_v2_and_v1_trees(tmp_path):
    # v2: the tightest quota on the way from the process's cgroup to the root counts
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "a" / "b" / "cpu.max").write_text("max 100000\n")
    assert th.cgroup_cpu_limit(tmp_path, "0::/a/b\n") == 3.0
    (tmp_path / "a" / "b" / "cpu.max").write_text("50000 100000\n")
    assert th.cgroup_cpu_limit(tmp_path, "0::/a/b\n") == 0.5
    # v1 in a container: the cgroup path is not visible, the controller's root is the container's own cgroup
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert th.cgroup_cpu_limit(v1, "4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n") == 2.0
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    assert th.cgroup_cpu_limit(v1, "3:cpu,cpuacct:/docker/x\n") is None
    assert th.cgroup_cpu_limit(tmp_path / "none", "0::/\n") is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to restrict the mask to 1")
def test_auto_counts_the_affinity_mask_not_cpu_count():
    code = (
        "import json, os, torch; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "from wsimil.threads import apply_threads;"
        "p = apply_threads('auto', 'encode', quiet=True);"
        "q = apply_threads(3, 'encode', quiet=True);"
        "print(json.dumps([p.cpus, p.threads, q.threads, torch.get_num_threads(), os.cpu_count()]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = SRC
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    cpus, auto, explicit, torch_now, cpu_count = json.loads(res.stdout.strip().splitlines()[-1])
    assert cpu_count >= 2 and cpus == 1 and auto == 1
    assert explicit == torch_now == 3  # an explicit count is honoured even above the CPUs available


def test_omp_num_threads_is_respected_by_auto_only(eight_idle_cpus, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    p = th.plan_threads("auto", "mil", elements=10)
    assert p.threads == 3 and "OMP_NUM_THREADS=3" in p.reason
    assert th.plan_threads(5, "mil").threads == 5


def test_auto_picks_by_the_work(eight_idle_cpus):
    small = th.plan_threads("auto", "mil", elements=40 * 166)  # a MUSK1 bag
    assert small.threads == 1 and small.cpus == 8 and small.free_cpus == 8.0
    assert th.plan_threads("auto", "mil", elements=th.MIL_ELEMENTS_PER_THREAD - 1).threads == 1
    assert th.plan_threads("auto", "mil").threads == 1  # unknown size
    big = th.plan_threads("auto", "mil", elements=3 * th.MIL_ELEMENTS_PER_THREAD)
    assert big.threads == 3
    assert th.plan_threads("auto", "mil", elements=100 * th.MIL_ELEMENTS_PER_THREAD).threads == 8
    enc = th.plan_threads("auto", "encode", workers=3)
    assert (enc.threads, enc.workers, enc.cv2) == (5, 3, 1)  # workers + intra-op threads <= CPUs
    assert th.plan_threads("auto", "encode").cv2 == 8
    assert th.plan_threads("auto", "encode", workers=20).threads == 1
    assert th.plan_threads("auto", "image", workers=2).threads == 4


def test_auto_leaves_busy_cpus_alone_for_mil_steps_not_encoding(eight_idle_cpus, monkeypatch):
    big = 100 * th.MIL_ELEMENTS_PER_THREAD
    monkeypatch.setattr(th, "free_cpus", lambda cpus, window=0: 2.85)
    assert th.plan_threads("auto", "mil", elements=big).threads == 3
    monkeypatch.setattr(th, "free_cpus", lambda cpus, window=0: 2.6)  # a CPU 40% busy is not free
    assert th.plan_threads("auto", "mil", elements=big).threads == 2
    monkeypatch.setattr(th, "free_cpus", lambda cpus, window=0: 0.2)
    p = th.plan_threads("auto", "mil", elements=big)
    assert p.threads == 1 and "0.2 idle" in p.reason
    # encoding keeps every CPU: its threads rarely wait on each other, so they win CPU time on a busy machine
    enc = th.plan_threads("auto", "encode", workers=1)
    assert enc.threads == 7 and enc.free_cpus is None and "all 8 CPU(s) less 1" in enc.reason


def test_free_cpus_reads_proc_stat():
    if not Path("/proc/stat").is_file():
        pytest.skip("needs /proc/stat")
    cpus = th.cpu_set()
    free = th.free_cpus(cpus, window=0.05)
    assert free is not None and 0.0 <= free <= len(cpus)


def test_apply_sets_torch_and_opencv(torch_threads, monkeypatch):
    import cv2

    p = th.apply_threads(2, "encode", workers=1, quiet=True)
    assert torch.get_num_threads() == 2 and cv2.getNumThreads() == 1 and p.cv2 == 1
    th.apply_threads(1, "image", quiet=True)
    assert torch.get_num_threads() == 1 and cv2.getNumThreads() == 1
    monkeypatch.setattr(th, "_requested", "auto")
    th.use_threads(2, "mil")
    assert th._requested == 2 and torch.get_num_threads() == 2
    assert th.apply_threads(None, "encode", quiet=True).threads == 2  # steps without their own setting follow it


def test_config_key_validated():
    from wsimil.config import load_config
    from wsimil.lrmil.config import load_lrmil_config

    assert load_config().threads == "auto"
    assert load_config(threads="4").threads == 4
    assert load_lrmil_config(threads="2").threads == 2
    with pytest.raises(WsimilError, match="threads"):
        load_config(threads="lots")
    with pytest.raises(WsimilError, match="threads"):
        load_lrmil_config(threads=0)


def test_threads_do_not_change_the_checkpoint_hash():
    from wsimil.config import load_config
    from wsimil.methods.trainer import config_hash

    assert config_hash(load_config(threads=1), {}) == config_hash(load_config(threads=4), {})


def test_resolved_threads_saved_in_the_run_config(digit_cohort, tmp_path, torch_threads, monkeypatch):
    from typer.testing import CliRunner

    from wsimil.cli import app

    monkeypatch.setattr(th, "_printed", set())
    feats, manifest = digit_cohort
    args = ["train", "--features", str(feats), "--manifest", str(manifest), "--model", "mean", "--folds", "2"]
    res = CliRunner().invoke(app, [*args, "--epochs", "1", "--threads", "2", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["threads"] == 2 and cfg["threads_resolved"]["threads"] == 2 and torch.get_num_threads() == 2
    assert cfg["threads_resolved"]["work"] == "mil" and "--threads" in cfg["threads_resolved"]["reason"]
    assert "Threads: 2" in res.output
    res = CliRunner().invoke(app, [*args, "--threads", "none", "--out", str(tmp_path / "r2")])
    assert res.exit_code == 2 and "positive whole number or 'auto'" in res.output


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _run_steps(tuner, clock, n, cost, elements=1000):
    """``n`` steps whose duration is ``cost(threads)`` seconds, the way the trainer's hooks drive the tuner."""
    seen = []
    for _ in range(n):
        tuner.begin(elements)
        seen.append(tuner._current[0])
        clock.t += cost(seen[-1])
        tuner.end()
    return seen


def test_step_tuner_keeps_the_faster_count_and_follows_the_load():
    clock, set_to = FakeClock(), []
    tuner = th.StepTuner([1, 2], rounds=2, reprobe_s=60, min_hold=5, clock=clock, set_threads=set_to.append, quiet=True)
    # idle: 2 threads twice as fast; the probe is 2 warm-ups + 2 rounds of each count, interleaved
    seen = _run_steps(tuner, clock, 6, lambda c: 1.0 / c)
    assert seen == [1, 2, 1, 2, 1, 2] and tuner.choice == 2 and set_to[-1] == 2
    assert tuner.probes[0]["seconds_per_1M_values"] == {"1": 1000.0, "2": 500.0}
    # busy: a second thread now stalls; no re-probe before 60 s and 5 steps have passed ...
    n_set = len(set_to)
    assert _run_steps(tuner, clock, 5, lambda c: 3.0 if c == 2 else 1.0) == [2] * 5
    assert len(set_to) == n_set  # holding a count sets nothing per step
    clock.t += 60
    # ... then the probe (1 warm-up of the other count, 2 rounds) moves the choice to 1 thread
    seen = _run_steps(tuner, clock, 5, lambda c: 3.0 if c == 2 else 1.0)
    assert seen == [1, 1, 2, 1, 2] and tuner.choice == 1 and len(tuner.probes) == 2
    assert _run_steps(tuner, clock, 3, lambda c: 1.0) == [1, 1, 1]


def test_step_tuner_compares_time_per_feature_value_not_per_step():
    clock = FakeClock()
    tuner = th.StepTuner([1, 2], rounds=1, clock=clock, set_threads=lambda n: None, quiet=True)
    sizes = iter([100, 100, 100, 10_000])  # warm 1, warm 2, timed 1 (small bag), timed 2 (large bag)
    for _ in range(4):
        n = next(sizes)
        tuner.begin(n)
        clock.t += n * (1e-3 if tuner._current[0] == 1 else 0.5e-3)
        tuner.end()
    assert tuner.choice == 2  # its step took longer, on a bag 100x larger


def test_step_tuner_only_where_auto_decides(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = th.ThreadPlan(1, 1, 1, 0, 8, 8.0, "auto", "mil", "")
    assert th.StepTuner.for_plan(plan).candidates == [1, 4, 8]
    assert th.StepTuner.for_plan(th.ThreadPlan(**{**plan.to_dict(), "requested": "2"})) is None
    assert th.StepTuner.for_plan(th.ThreadPlan(**{**plan.to_dict(), "cpus": 1})) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert th.StepTuner.for_plan(plan) is None


def test_step_tuner_hooks_time_training_steps_only(torch_threads):
    clock = FakeClock()
    tuner = th.StepTuner([1, 2], rounds=1, clock=clock, quiet=True)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = tuner.attach(model, opt)
    for _ in range(4):
        model(torch.randn(3, 4)).sum().backward()
        model(torch.randn(3, 4))  # a second forward in the same step is part of it
        clock.t += 1.0 if torch.get_num_threads() == 1 else 2.0
        opt.step()
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 4))  # validation: not a step
    assert tuner.steps == 4 and tuner.choice == 1 and torch.get_num_threads() == 1
    for h in hooks:
        h.remove()
    model.train()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert tuner.steps == 4


def test_training_with_auto_threads_saves_the_timed_choice(digit_cohort, tmp_path, torch_threads, monkeypatch):
    from wsimil.config import load_config
    from wsimil.methods.trainer import run_training

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cpus", lambda: 2)
    feats, manifest = digit_cohort
    cfg = load_config(model="mean", folds=2, epochs=2, threads="auto", bootstrap=0)
    res = run_training(cfg, feats, manifest, tmp_path / "run")
    tuned = json.loads((tmp_path / "run" / "results.json").read_text())["threads_tuned"]
    assert res["threads_tuned"] == tuned and tuned["candidates"] == [1, 2] and tuned["steps"] > 0
    assert tuned["choice"] in (1, 2) and tuned["probes"] and tuned["probes"][0]["chose"] == tuned["choice"]
