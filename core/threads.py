"""How many threads a job computes with, and how its threads wait: a job's fair share of a busy machine.

Why this exists (bench/README.md, "Read this before comparing absolute times", and
bench/under_load.py): torch (and bitsandbytes' CPU kernels, through the OpenMP runtime)
split every operation across one thread per core and make the threads meet at a barrier
after it. When another process holds a core, the thread on that core runs only when the
scheduler gives it a slice, and every barrier waits for it: a 2-thread job beside one
busy process ran its small operations 7x slower than with one thread (dropout on one
layer's input: 12 ms against 1.7 ms), and with OpenMP's default spin-waiting the waiting
threads also burn the cores the other process needs.

The policy, applied to every job (`python -m core …` through `configure_job`, the
dashboard's job worker through `job_env`, the benchmarks through `bench/common.py`):

1. Waits are passive (`OMP_WAIT_POLICY=PASSIVE`): a thread with nothing to do sleeps
   instead of spinning. Set in the environment before the OpenMP runtime starts (before
   torch is imported); torch's bundled runtime and the system libgomp that bitsandbytes
   links both read it there.
2. At most one thread per physical core the job may use (affinity, cgroup quota):
   `OMP_NUM_THREADS`, so that both runtimes agree even on machines with SMT.
3. While the job runs, `adjust()` (called by the training loop at each step and by the
   sweep between batches) measures how many cores the machine's other processes keep
   busy (from /proc/stat, minus this process's own time) and computes with the cores
   that are left, at least one: its share, with no thread waiting for a core it cannot
   get. When the other work ends, the threads come back.

`RANK_STUDIO_THREADS` chooses: `auto` (the default: all of the above), a number N (N
threads, passive waits, no adjusting), or `off` (leave the libraries' own defaults; for
measuring them). Variables the user set (OMP_WAIT_POLICY, OMP_NUM_THREADS) are kept.

Changing the thread count can change the last bits of a float sum, so a run that was
adjusted is reproducible to float tolerance rather than bit for bit; library calls
(`core.train.train`, tests) never adjust unless `configure_job` ran in the process.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

ENV_VAR = "RANK_STUDIO_THREADS"
MODES = ("auto", "off")
# Hysteresis in cores of other work: give a thread back when others use at least REDUCE_AT
# of the core it would run on, take it again when they use at most RESTORE_AT (averaged over
# at least MIN_WINDOW_S seconds, so a short burst next door does not flip the count).
REDUCE_AT = 0.5
RESTORE_AT = 0.3
MIN_WINDOW_S = 2.0


# ------------------------------------------------------------------ cores


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup v2 (or v1) quota, e.g. `docker --cpus 2`; None when unlimited."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def usable_cores() -> int:
    """Physical cores this process may run on: affinity mask, cgroup quota and SMT taken into account."""
    logical = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = logical
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:  # pragma: no cover - psutil is a dependency
        physical = logical
    # With SMT on, `allowed` logical CPUs hold about allowed * physical / logical cores.
    cores = max(1, math.floor(allowed * physical / logical)) if physical < logical else allowed
    quota = _cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def mode() -> str | int:
    """'auto', 'off' or a fixed thread count, from RANK_STUDIO_THREADS."""
    raw = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if raw in MODES:
        return raw
    try:
        value = int(raw)
    except ValueError:
        return "auto"  # a typo must not stop a job; describe() shows what was used
    return max(1, value)


def job_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the job policy's OpenMP variables filled in.

    For launching a job: the child's OpenMP runtimes read these when they start.
    What the caller set already is kept.
    """
    out = dict(os.environ if env is None else env)
    chosen = mode()
    if chosen == "off":
        return out
    out.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out.setdefault("OMP_NUM_THREADS", str(chosen if isinstance(chosen, int) else usable_cores()))
    return out


# ------------------------------------------------------------------ measuring the machine


def read_cpu_times() -> tuple[float, float, float] | None:
    """(busy seconds of full-priority work, busy seconds of niced work, total seconds) since boot, all CPUs; None without /proc."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    values = [int(v) for v in fields[1:]]
    user, nice, system, idle = values[0:4]
    iowait, irq, softirq, steal = (values[4:8] + [0, 0, 0, 0])[:4]
    busy = user + system + irq + softirq + steal  # steal: a hypervisor's other guests hold the core
    total = busy + nice + idle + iowait
    return busy / ticks, nice / ticks, total / ticks


def own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) and its finished children used so far.

    Children count as the job's own work: torch.compile runs the C++ compiler in child processes,
    and taken for other load they would make the job give its cores away while it compiles."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Sample:
    wall: float
    busy: float
    niced: float
    own: float


def others_busy_cores(before: Sample, after: Sample, own_is_niced: bool) -> float:
    """Cores that other processes kept busy between two samples (0 when the window is empty).

    Processes with a higher nice value than this job yield to it, so their time counts only
    when this job is niced itself (then it competes with them).
    """
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    busy = after.busy - before.busy
    if own_is_niced:
        busy += after.niced - before.niced
    return max(0.0, (busy - (after.own - before.own)) / wall)


def threads_for(cores: int, others: float, current: int) -> int:
    """Threads to compute with when other processes keep `others` cores busy (hysteresis around `current`)."""
    free = cores - others
    keep = math.floor(free + REDUCE_AT)     # the n-th thread stays while others take less than REDUCE_AT of its core
    add = math.floor(free + RESTORE_AT)     # ... and comes back when they take at most RESTORE_AT of it
    target = keep if keep < current else (add if add > current else current)
    return max(1, min(cores, target))


# ------------------------------------------------------------------ applying


def _openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes loaded in this process (torch's own, and a system libgomp if another library brought one)."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libgomp" in line or "libiomp" in line or "libomp" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def set_threads(n: int) -> None:
    """Compute with n threads from now on: torch's pool and every other OpenMP runtime in the process."""
    import ctypes

    import torch

    torch.set_num_threads(n)
    for path in _openmp_runtimes():
        # torch.set_num_threads sets the calling thread's value in torch's runtime; a second
        # runtime (bitsandbytes' system libgomp when torch bundles a differently named one)
        # keeps its own, and its parallel regions are entered from this same thread.
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
            lib.omp_set_num_threads(ctypes.c_int(n))
        except (OSError, AttributeError):
            continue


class ThreadGovernor:
    """Keeps a job's thread count at the cores other processes leave free (see the module doc)."""

    def __init__(self, cores: int, min_window_s: float = MIN_WINDOW_S, apply=set_threads, clock=time.monotonic,
                 read=read_cpu_times, own=own_cpu_seconds, actual=None, cap: int | None = None):
        # `cores`: what the machine offers (others' work is measured machine-wide); `cap`: the most this job
        # may use (a thread count the user or a launcher gave, e.g. one share per data-parallel process).
        self.cores = cores
        self.cap = max(1, cap or cores)
        self.current = self.cap
        self.stopped = False
        self.min_window_s = min_window_s
        self._apply, self._clock, self._read, self._own = apply, clock, read, own
        self._actual = actual or _torch_threads
        self._niced = _own_nice() > 0
        self._last = self._sample()
        self.changes: list[dict] = []   # when and why the count changed (for the log and the run's record)

    def _sample(self) -> Sample | None:
        times = self._read()
        if times is None:
            return None
        busy, niced, _ = times
        return Sample(self._clock(), busy, niced, self._own())

    def adjust(self) -> int:
        """Look at the machine since the last call (if long enough ago) and set the thread count; returns it.

        If the program set torch's thread count itself since the last call, that choice wins
        and the governor stops adjusting.
        """
        if self._last is None or self.stopped:
            return self.current
        actual = self._actual()
        if actual is not None and actual != self.current:
            self.stopped = True
            self.changes.append({"time": time.time(), "threads": actual, "set_by": "the program"})
            self.current = actual
            return actual
        now = self._sample()
        if now is None or now.wall - self._last.wall < self.min_window_s:
            return self.current
        others = others_busy_cores(self._last, now, self._niced)
        self._last = now
        target = min(self.cap, threads_for(self.cores, others, self.current))
        if target != self.current:
            self._apply(target)
            self.changes.append({"time": time.time(), "threads": target, "others_busy_cores": round(others, 2)})
            self.current = target
        return self.current


def _torch_threads() -> int | None:
    """torch's intra-op thread count, if torch is already imported (never imports it)."""
    import sys

    torch = sys.modules.get("torch")
    try:
        return int(torch.get_num_threads()) if torch is not None else None
    except (AttributeError, RuntimeError):
        return None


def _own_nice() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):
        return 0


_governor: ThreadGovernor | None = None
_configured = False


def configure_job() -> dict:
    """Make this process a job under the policy: environment now (call it before torch is imported), then adjusting.

    Returns `describe()`.
    """
    global _governor, _configured
    user_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ.update(job_env())
    _configured = True
    chosen = mode()
    if chosen == "auto" and read_cpu_times() is not None:
        # A thread count the user (or `--processes`/`--workers`) gave is the most the governor uses; the
        # cores left free are still counted on the whole machine, so sibling processes each keep their share.
        _governor = ThreadGovernor(usable_cores(), cap=_positive_int(user_threads))
    else:
        _governor = None
    return describe()


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(str(text).split(",")[0])
    except ValueError:
        return None
    return value if value > 0 else None


def adjust() -> int | None:
    """At a step/batch boundary: let the governor set the thread count (no-op unless `configure_job` ran)."""
    return _governor.adjust() if _governor is not None else None


def describe() -> dict:
    """The policy in force, for run folders and benchmark results."""
    info = {"mode": mode() if _configured else "not a job: library defaults",
            "usable_cores": usable_cores(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if _governor is not None:
        info["threads_now"] = _governor.current
        info["changes"] = list(_governor.changes[-20:])
    return info
