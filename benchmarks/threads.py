"""Thread policy benchmark: is ``--threads auto`` as fast as the best fixed choice, on an idle and on a busy machine?

Two workloads, each at 1 thread, all available CPUs and ``auto`` (:mod:`wsimil.threads`):

- ``abmil``: ABMIL training steps (forward, cross-entropy, backward, Adam) on slide-sized bags of N x 1,024 features;
- ``resnet18``: patch encoding, resnet18 with random weights on batches of 256 px uint8 patches (resize, normalise,
  forward), as ``wsimil extract`` does.

and two conditions: ``idle``, and ``busy`` with two CPU-bound background processes that the benchmark starts itself
(killed when the benchmark ends, also on error, Ctrl-C or SIGTERM; each also ends by itself after ``--busy-seconds``
or when the benchmark process is gone).

Every configuration runs in a fresh subprocess (thread settings cannot be undone within one process) with
``OMP_NUM_THREADS`` removed from its environment, so that ``auto`` decides. It times one warm-up step, then up to
``--steps`` (``--batches``) steps, stopping early after ``--max-seconds`` (at least one step); a process still running
after ``--timeout`` is stopped and reported as ``timed_out``. ``--repeats`` rounds interleave the settings (the fastest
of each is kept), and the idle CPUs measured at the start of each condition are reported: on a shared machine "idle"
may not be. Prints JSON, with, per condition and workload, how ``auto`` compares to the best fixed choice (target:
within 10%).

    python benchmarks/threads.py            # ~10 minutes on 2 cores (3 rounds, rotated order)
    python benchmarks/threads.py --quick    # a check that it runs (timings meaningless; most of it is importing torch)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# a CPU-bound loop that ends after argv[1] seconds, or as soon as the benchmark that started it is gone
BUSY_CODE = """import os, sys, time
parent, end = os.getppid(), time.time() + float(sys.argv[1])
while time.time() < end and os.getppid() == parent:
    for _ in range(200_000):
        pass
"""


# ------------------------------------------------------------------------------------------- one configuration
def run_one(args: argparse.Namespace) -> dict:
    """Time one workload at one thread setting in this process (a subprocess of the benchmark)."""
    import warnings

    import torch

    from wsimil.threads import StepTuner, apply_threads, available_cpus, mil_step_elements

    threads = str(available_cpus()) if args.threads == "all" else args.threads
    torch.manual_seed(0)
    tuner = None
    if args.run == "abmil":
        from wsimil.models import create_model

        elements = mil_step_elements([args.instances], args.dim)
        plan = apply_threads(threads, "mil", elements=elements, quiet=True)
        model = create_model("abmil", in_dim=args.dim, n_classes=2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x, y = torch.randn(1, args.instances, args.dim), torch.tensor([1])
        # auto: the trainer's timed choice (StepTuner), probe steps included in the timing
        tuner = StepTuner.for_plan(plan, quiet=True) if args.threads == "auto" else None
        if tuner:
            tuner.attach(model, opt)

        def step() -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x).logits, y).backward()
            opt.step()

        n_steps = args.steps
    else:
        from wsimil.features.encoders import create_encoder

        plan = apply_threads(threads, "encode", quiet=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc = create_encoder("resnet18", None, seed=0)
        enc.model.eval()
        patches = torch.randint(0, 256, (args.batch_size, 256, 256, 3), dtype=torch.uint8)

        def step() -> None:
            with torch.inference_mode():
                enc.model(enc.preprocess(patches))

        n_steps = args.batches
    step()  # warm-up: allocator, OpenMP pool, lazy init
    t0 = time.perf_counter()
    done = 0
    while done < n_steps and (done == 0 or time.perf_counter() - t0 < args.max_seconds):
        step()
        done += 1
    sec = (time.perf_counter() - t0) / done
    out = {"seconds_per_step": round(sec, 4), "steps": done, "threads": plan.threads, "reason": plan.reason}
    if tuner:
        out.update(threads=tuner.choice, reason="auto: timed probe", probes=tuner.probes)
    return out


# ------------------------------------------------------------------------------------------- the benchmark
def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env["WSIMIL_PROGRESS"] = "0"
    return env


def measure(args: argparse.Namespace, workload: str, threads: str) -> dict:
    cmd = [sys.executable, __file__, "--run", workload, "--threads", threads]
    cmd += ["--instances", str(args.instances), "--dim", str(args.dim), "--steps", str(args.steps)]
    cmd += ["--batch-size", str(args.batch_size), "--batches", str(args.batches)]
    cmd += ["--max-seconds", str(args.max_seconds)]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "seconds_per_step": None, "wall_s": round(time.perf_counter() - t0, 1)}
    if res.returncode != 0:
        raise RuntimeError(f"{workload} at threads={threads} failed:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {**out, "timed_out": False, "wall_s": round(time.perf_counter() - t0, 1)}


def start_busy(n: int, seconds: float) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, "-c", BUSY_CODE, str(seconds)], stdout=subprocess.DEVNULL) for _ in range(n)
    ]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(timeout=10)


def _faster(a: dict, b: dict) -> bool:
    sa, sb = a["seconds_per_step"], b["seconds_per_step"]
    return sa is not None and (sb is None or sa < sb)


def compare(rows: dict) -> dict:
    """``auto`` against the best fixed choice (1 or all); a timed-out setting counts as slower than any finished."""
    fixed = {k: v for k, v in rows.items() if k != "auto" and v["seconds_per_step"] is not None}
    auto = rows["auto"]["seconds_per_step"]
    if not fixed or auto is None:
        return {"best_fixed": None, "auto_over_best": None, "within_10pct": False}
    best = min(fixed, key=lambda k: fixed[k]["seconds_per_step"])
    ratio = auto / fixed[best]["seconds_per_step"]
    # auto resolving to the thread count of a fixed setting runs exactly that setting: their gap is the noise
    same = [k for k, v in fixed.items() if v.get("threads") == rows["auto"].get("threads")]
    return {"best_fixed": best, "auto_threads": rows["auto"].get("threads"), "auto_same_as": same[0] if same else None,
            "auto_over_best": round(ratio, 3), "within_10pct": ratio <= 1.10}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings: checks that the benchmark runs")
    ap.add_argument("--instances", type=int, default=6000, help="instances per ABMIL bag")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30, help="timed ABMIL training steps (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=32, help="patches per resnet18 batch")
    ap.add_argument("--batches", type=int, default=5, help="timed resnet18 batches (after one warm-up)")
    ap.add_argument("--busy", type=int, default=2, help="background busy processes in the busy condition")
    ap.add_argument(
        "--busy-seconds",
        type=float,
        default=None,
        help="upper bound on their life (default: every configuration of the condition at --timeout)",
    )
    ap.add_argument("--max-seconds", type=float, default=25, help="timed seconds per configuration (fewer steps)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds before a configuration's process is stopped")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the settings (the fastest round is kept)")
    ap.add_argument("--conditions", default="idle,busy")
    ap.add_argument("--run", choices=["abmil", "resnet18"], help=argparse.SUPPRESS)  # one configuration
    ap.add_argument("--threads", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run_one(args)))
        return
    if args.quick:
        args.instances, args.steps, args.batch_size, args.batches = 800, 2, 4, 1
        args.max_seconds = min(args.max_seconds, 2)

    sys.path.insert(0, str(SRC))
    from wsimil.threads import available_cpus, cgroup_cpu_limit, cpu_set, free_cpus

    # a SIGTERM must also reach the `finally` that stops the busy processes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    results: dict = {}
    free_at_start: dict = {}
    busy: list[subprocess.Popen] = []
    busy_alive_at_end = None
    stopped = None
    try:
        for cond in args.conditions.split(","):
            if cond == "busy":
                # they must outlive the condition: a round timed after they ended would not be "busy"
                life = args.busy_seconds or args.repeats * 6 * (args.timeout + 30)
                busy = start_busy(args.busy, life)
                time.sleep(1.0)  # let them reach full speed
            free_at_start[cond] = free_cpus(cpu_set(), 1.0)  # is "idle" idle? (other users of the machine)
            for rep in range(args.repeats):  # settings interleaved, so a change of load hits all of them
                for w in ("abmil", "resnet18"):
                    order = ("1", "all", "auto")
                    for t in order[rep % 3 :] + order[: rep % 3]:  # rotated: no setting always runs first
                        r = measure(args, w, t)
                        rows = results.setdefault(cond, {}).setdefault(w, {})
                        if t not in rows or _faster(r, rows[t]):
                            rows[t] = r
                        print(f"[{cond}] {w} threads={t}: {r}", file=sys.stderr, flush=True)
            if busy:  # a busy process that ended early would have made later rounds idle ones
                busy_alive_at_end = all(p.poll() is None for p in busy)
            stop_busy(busy)
            busy = []
    except (KeyboardInterrupt, SystemExit) as e:  # still report what was measured
        stopped = type(e).__name__
    finally:
        stop_busy(busy)
    summary = {f"{c}/{w}": compare(rows) for c, ws in results.items() for w, rows in ws.items() if len(rows) == 3}
    print(
        json.dumps(
            {
                "benchmark": "threads",
                "machine": {
                    "cpus_available": available_cpus(),
                    "affinity": len(cpu_set()),
                    "cgroup_cpu_limit": cgroup_cpu_limit(),
                    "cpu_count": os.cpu_count(),
                    "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
                "settings": {k: v for k, v in vars(args).items() if k not in ("run", "threads", "conditions")},
                "free_cpus_at_start": free_at_start,
                "busy_processes_alive_at_end": busy_alive_at_end,
                "results": results,
                "auto_vs_best_fixed": summary,
                "all_within_10pct": bool(summary) and all(s["within_10pct"] for s in summary.values()),
                "complete": stopped is None,
                "total_seconds": round(time.perf_counter() - t_start, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
