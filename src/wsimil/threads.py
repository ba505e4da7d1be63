"""How many CPU threads a step uses: ``--threads N|auto`` (config key ``threads``), resolved per kind of work.

torch starts one busy-waiting OpenMP thread per core it sees. On a shared server those threads compete with other
jobs: an OpenMP parallel region ends only when its slowest thread finishes, so a thread that has lost its core
stalls all the others (a MIL run 4x slower at 2 threads than at 1 beside other jobs on 2 cores). Small MIL steps
(small bags, small feature widths) have too little arithmetic per step for more threads to pay, while large bags and
a patch encoder's convolutions scale with the cores that are actually free.

``auto`` therefore resolves, at the start of each step (:func:`apply_threads`):

1. ``OMP_NUM_THREADS``, when the user set it, is taken as given;
2. otherwise the budget is the CPUs this process may use (affinity mask, cgroup v2 ``cpu.max`` or v1
   ``cpu.cfs_quota_us``), less those other processes keep busy (idle time of those CPUs over 0.2 s; on systems
   without ``/proc/stat``, the 1-minute load average);
3. the work picks from the budget: MIL steps get one thread per :data:`MIL_ELEMENTS_PER_THREAD` feature values
   (at least 1), and MIL *training* then times its first steps at each candidate count and keeps the fastest
   (:class:`StepTuner`, repeated every few minutes); patch encoding uses every CPU this process may use less its
   DataLoader workers (busy or not: its convolutions synchronise rarely, so on a contended machine more threads win
   more CPU time); image work (tissue detection, tiling, heatmaps) shares the budget among its worker processes.

An explicit ``N`` is honoured as given. The resolved plan is printed once and saved in the run's config. Thread
counts can change floating-point summation order, so bitwise-identical re-runs need a fixed ``N``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from wsimil.errors import WsimilError

AUTO = "auto"
Work = Literal["mil", "encode", "image"]
# One intra-op thread per this many feature values of a MIL step (instances x width x bags). ABMIL (1,024-d, 512
# hidden) on the 2-core development machine: at 1 thread on idle cores a step costs ~70 ms per 1,000 instances
# (GEMM-bound, far above OpenMP's cost per parallel region), so 1,000 x 1,024 values keep a thread busy; beside other
# jobs (load 3-8) a second thread made steps 2.5-8x slower at every N from 250 to 8,000, which the free-CPU count
# prevents. An idle-machine crossover could not be measured there (it was never idle).
MIL_ELEMENTS_PER_THREAD = 1_000_000
LOAD_WINDOW_S = 0.2

_requested: int | str = AUTO  # the process-wide request (use_threads); config keys and arguments override it
_printed: set[tuple] = set()  # plans already printed by this process


@dataclass(frozen=True)
class ThreadPlan:
    """A resolved thread setting. ``threads``: torch intra-op threads; ``interop``: torch inter-op threads;
    ``cv2``: OpenCV threads; ``workers``: DataLoader workers / processes counted against the budget; ``cpus``: CPUs
    this process may use; ``free_cpus``: of those, idle when measured (``None``: not measured)."""

    threads: int
    interop: int
    cv2: int
    workers: int
    cpus: int
    free_cpus: float | None
    requested: str
    work: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def parse_threads(value: int | str | None) -> int | str:
    """``"auto"`` or a positive int from a flag or config value (``None`` means auto)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return AUTO
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or (isinstance(value, float) and value != n):
        raise WsimilError(f"threads must be a positive whole number or 'auto', got {value!r}")
    return n


# ---------------------------------------------------------------------------------------------- CPUs we may use
def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` (``"150000 100000"`` → 1.5; ``"max 100000"`` → ``None``)."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return int(parts[0]) / period if period > 0 else None


def parse_cfs_quota(quota: str, period: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota ``-1`` → ``None``)."""
    q, p = int(quota.strip()), int(period.strip())
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | None = None) -> float | None:
    """The tightest CPU quota (in CPUs) of this process's cgroups, v2 or v1, walking from its own cgroup up to the
    hierarchy's root; ``None`` without a quota. ``proc_cgroup`` is the text of ``/proc/self/cgroup``."""
    root = Path(root)
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    limits: list[float] = []
    for line in proc_cgroup.splitlines():
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy (also under unified/ on hybrid hosts)
            bases, read = [root, root / "unified"], _v2_limit
        elif "cpu" in controllers.split(","):
            bases = [root / c for c in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
            read = _v1_limit
        else:
            continue
        for base in bases:
            d = base / path.lstrip("/")
            if not d.is_dir():
                d = base  # in a container the process's own cgroup is mounted as the root
            while d.is_dir() and (d == base or base in d.parents):
                lim = read(d)
                if lim is not None:
                    limits.append(lim)
                if d == base:
                    break
                d = d.parent
    return min(limits) if limits else None


def _v2_limit(d: Path) -> float | None:
    try:
        return parse_cpu_max((d / "cpu.max").read_text())
    except (OSError, ValueError):
        return None


def _v1_limit(d: Path) -> float | None:
    try:
        return parse_cfs_quota((d / "cpu.cfs_quota_us").read_text(), (d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def cpu_set() -> set[int]:
    """The CPUs this process may run on (its affinity mask)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (rounded up)."""
    n = len(cpu_set())
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def _cpu_times() -> dict[int, tuple[int, int]]:
    """``{cpu: (idle, total)}`` jiffies from ``/proc/stat`` (``{}`` where unreadable)."""
    try:
        text = Path("/proc/stat").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]]
            out[int(name[3:])] = (v[3] + (v[4] if len(v) > 4 else 0), sum(v))  # idle + iowait; steal counts busy
    return out


def free_cpus(cpus: set[int], window: float = LOAD_WINDOW_S) -> float | None:
    """How many of ``cpus`` sat idle over the next ``window`` seconds (from ``/proc/stat``; elsewhere estimated from
    the 1-minute load average). ``None`` when neither can be read."""
    a = _cpu_times()
    if a:
        time.sleep(window)
        b = _cpu_times()
        idle = 0.0
        for c in cpus & a.keys() & b.keys():
            dt = b[c][1] - a[c][1]
            idle += (b[c][0] - a[c][0]) / dt if dt > 0 else 1.0
        return round(idle, 2)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return round(max(0.0, min(len(cpus), (os.cpu_count() or 1) - load)), 2)


# ---------------------------------------------------------------------------------------------- the policy
def mil_step_elements(lengths, in_dim: int, batch_size: int = 1, max_instances: int | None = None) -> int:
    """Feature values in a typical MIL step: median bag length (capped at ``max_instances``) x width x bags."""
    ns = sorted(min(int(n), max_instances or int(n)) for n in lengths)
    return ns[len(ns) // 2] * int(in_dim) * int(batch_size) if ns else 0


def plan_threads(
    requested: int | str | None = None,
    work: Work = "mil",
    *,
    elements: int | None = None,
    workers: int = 0,
    window: float = LOAD_WINDOW_S,
) -> ThreadPlan:
    """Resolve ``requested`` (``None``: the process-wide request of :func:`use_threads`) for ``work``.

    ``elements``: feature values of a typical MIL step (:func:`mil_step_elements`; unknown → 1 thread);
    ``workers``: DataLoader workers (encode) or worker processes (image) that share the budget."""
    if work not in ("mil", "encode", "image"):
        raise ValueError(f"unknown work {work!r}")
    req = parse_threads(_requested if requested is None else requested)
    cpus = available_cpus()
    workers = max(0, int(workers))
    free = None
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if req != AUTO:
        n = int(req)
        reason = f"--threads/config {n}" + (f" (more than the {cpus} CPUs available)" if n > cpus else "")
    elif env.isdigit() and int(env) > 0:
        n, reason = int(env), f"OMP_NUM_THREADS={env}"
    else:
        if cpus > 1 and work != "encode":
            free = free_cpus(cpu_set(), window)
        # a CPU counts as free when idle >= 80% of the time: a thread sharing a core stalls its team at every step
        budget = cpus if free is None else max(1, min(cpus, int(free + 0.2)))
        why = f"{cpus} CPUs available" + ("" if free is None else f", {free:g} idle")
        if work == "mil":
            n = max(1, min(budget, (elements or 0) // MIL_ELEMENTS_PER_THREAD))
            size = "unknown size" if not elements else f"{elements / 1e6:.1f}M values"
            reason = f"auto: MIL steps of {size}, 1 thread per {MIL_ELEMENTS_PER_THREAD / 1e6:g}M; {why}"
        elif work == "encode":
            # convolutions keep every thread busy between rare synchronisations, so beside other jobs more threads
            # win a larger share of the CPUs instead of stalling (benchmarks/threads.py, 2 cores, two busy
            # processes: resnet18 3.06 s per batch at 2 threads, 3.85 s at 1); busy CPUs are not left out here
            n = max(1, cpus - workers)
            less = f" less {workers} DataLoader worker(s)" if workers else ""
            reason = f"auto: patch encoding, all {cpus} CPU(s){less}"
        else:
            n = max(1, budget // max(1, workers))
            reason = f"auto: image work shared by {max(1, workers)} process(es); {why}"
    # DataLoader workers run OpenCV in their own processes, one thread each; the main process only encodes
    cv2_threads = 1 if work == "encode" and workers > 0 else n
    return ThreadPlan(n, 1, cv2_threads, workers, cpus, free, str(req), work, reason)


def apply_threads(
    requested: int | str | None = None,
    work: Work = "mil",
    *,
    elements: int | None = None,
    workers: int = 0,
    quiet: bool = False,
) -> ThreadPlan:
    """Resolve (:func:`plan_threads`) and set torch's intra-op threads, its inter-op threads (once per process: torch
    allows no change after that) and OpenCV's threads. Prints the plan, once per process for each work and count."""
    import torch

    plan = plan_threads(requested, work, elements=elements, workers=workers)
    torch.set_num_threads(plan.threads)
    with contextlib.suppress(RuntimeError):  # torch allows one setting, before any inter-op work
        torch.set_num_interop_threads(plan.interop)
    try:
        import cv2

        cv2.setNumThreads(plan.cv2)
    except ImportError:
        pass
    plan = ThreadPlan(**{**plan.to_dict(), "interop": torch.get_num_interop_threads()})
    key = (plan.threads, plan.cv2, plan.work)
    if not quiet and key not in _printed:
        from wsimil.progress import console

        console.print(f"Threads: {plan.threads} ({plan.reason})", highlight=False, soft_wrap=True)
        _printed.add(key)
    return plan


def use_threads(requested: int | str | None, work: Work = "mil", workers: int = 0) -> ThreadPlan:
    """Set the process-wide request (what steps without their own ``threads`` setting resolve, e.g. the
    extraction inside ``predict``) and apply it for ``work`` now. ``None`` keeps the current request."""
    global _requested
    if requested is not None:
        _requested = parse_threads(requested)
    return apply_threads(None, work, workers=workers)


# ---------------------------------------------------------------------------------------------- timed choice
class StepTuner:
    """Chooses the intra-op thread count of MIL training steps by timing them (``auto`` only).

    Whether a second thread pays depends on the bag size, the model and what else runs on the machine; no rule
    predicts it (2 cores beside two busy processes: ABMIL on 6,000 x 1,024 bags ran 0.54 s per step at 2 threads
    and 0.62 s at 1, while MUSK1's small bags ran 4x faster at 1). So the first steps of a run are a probe: one
    warm-up step at each candidate count, then ``rounds`` steps at each, interleaved so that a change of load hits
    all of them; the count with the least time per feature value is kept. The probe is repeated when
    ``reprobe_s`` seconds and ``min_hold`` steps have passed since the last, so a run follows the load of a shared
    machine. A step is timed from the model's first training-mode forward to the optimiser's ``step`` (data
    loading and validation are outside); :meth:`attach` installs the two hooks.
    """

    def __init__(
        self,
        candidates: list[int],
        *,
        rounds: int = 3,
        reprobe_s: float = 120.0,
        min_hold: int = 20,
        clock=time.perf_counter,
        set_threads=None,
        quiet: bool = False,
    ):
        self.candidates = sorted({max(1, int(c)) for c in candidates})
        self.rounds, self.reprobe_s, self.min_hold = int(rounds), float(reprobe_s), int(min_hold)
        self.clock, self.quiet = clock, quiet
        if set_threads is None:
            import torch

            set_threads, get_threads = torch.set_num_threads, torch.get_num_threads
        else:
            get_threads = None  # an injected setter (tests): remember what was set
        self._set, self._get = set_threads, get_threads
        self._now: int | None = None
        self.choice: int | None = None
        self.probes: list[dict] = []  # one entry per probe: seconds per 1M feature values for each candidate
        self.steps = 0
        self._plan: list[tuple[int, bool]] = []  # (threads, timed) for the next steps of the current probe
        self._acc: dict[int, list[float]] = {}
        self._current: tuple[int, bool] | None = None
        self._t0: float | None = None
        self._n = 0
        self._held_since = (0, 0.0)  # (steps, time) when the current choice was made

    @classmethod
    def for_plan(cls, plan: ThreadPlan, **kw) -> StepTuner | None:
        """A tuner for a resolved ``mil`` plan, or ``None`` where the count is not ours to choose (an explicit
        ``N``, ``OMP_NUM_THREADS`` set, one CPU)."""
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if plan.requested != AUTO or (env.isdigit() and int(env) > 0) or plan.cpus < 2:
            return None
        cands = {1, plan.cpus}
        if plan.cpus >= 4:
            cands.add(plan.cpus // 2)
        return cls(sorted(cands), **kw)

    # -------------------------------------------------------------- the state machine
    def _start_probe(self) -> None:
        warm = [(c, False) for c in self.candidates if c != self.choice]  # the current count is warm already
        timed = [(c, True) for _ in range(self.rounds) for c in self.candidates]
        self._plan = warm + timed
        self._acc = {c: [0.0, 0.0] for c in self.candidates}

    def begin(self, elements: int) -> None:
        """A training step starts, on ``elements`` feature values (instances x width). Later calls before
        :meth:`end` (a second forward in the same step) are ignored."""
        if self._t0 is not None:
            return
        if not self._plan and self._due():
            self._start_probe()
        threads, timed = self._plan.pop(0) if self._plan else (self.choice, False)
        self._current = (threads, timed)
        self._apply(threads)
        self._n = max(1, int(elements))
        self._t0 = self.clock()

    def end(self) -> None:
        """The step's optimiser update is done."""
        if self._t0 is None:
            return
        dt = self.clock() - self._t0
        self._t0 = None
        self.steps += 1
        threads, timed = self._current
        if timed:
            acc = self._acc[threads]
            acc[0] += dt
            acc[1] += self._n
            if not self._plan:
                self._decide()

    def _apply(self, n: int) -> None:
        """Set ``n`` threads unless already set: most steps keep the count, and this runs on every step."""
        now = self._get() if self._get is not None else self._now
        if now != n:
            self._set(n)
            self._now = n

    def _due(self) -> bool:
        if self.choice is None:
            return True
        steps, t = self._held_since
        return self.steps - steps >= self.min_hold and self.clock() - t >= self.reprobe_s

    def _decide(self) -> None:
        per = {c: s / n * 1e6 for c, (s, n) in self._acc.items() if n > 0}
        best = min(per, key=per.get)
        changed = best != self.choice
        self.choice = best
        self._held_since = (self.steps, self.clock())
        self.probes.append({"step": self.steps, "seconds_per_1M_values": {str(c): round(v, 4) for c, v in per.items()},
                            "chose": best})  # fmt: skip
        self._apply(best)
        if changed and not self.quiet:
            from wsimil.progress import console

            timed = ", ".join(f"{c} → {v:.3g} s" for c, v in per.items())
            console.print(f"Threads: {best} for MIL steps (auto, timed per 1M feature values: {timed})",
                          highlight=False, soft_wrap=True)  # fmt: skip

    # -------------------------------------------------------------- hooks
    def attach(self, model, optimizer) -> list:
        """Time ``model``'s training steps: a forward pre-hook (training mode with gradients only) starts a step, an
        optimiser step post-hook ends it. Returns the hook handles (``.remove()`` them when the fold is done)."""
        import torch

        def pre(module, args):
            if module.training and torch.is_grad_enabled():
                x = next((a for a in args if isinstance(a, torch.Tensor)), None)
                self.begin(x.numel() if x is not None else 1)

        return [model.register_forward_pre_hook(pre), optimizer.register_step_post_hook(lambda *_: self.end())]

    def summary(self) -> dict:
        """What was chosen and what each probe measured (saved in a run's results)."""
        return {"candidates": self.candidates, "choice": self.choice, "steps": self.steps, "probes": self.probes}
