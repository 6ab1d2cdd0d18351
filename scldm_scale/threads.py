"""How many CPU threads a compute command uses: the cores free when it starts, unless told otherwise.

Why: torch's CPU ops run on an OpenMP team of one thread per core (libgomp in the pip wheels), and every
parallel region waits for its slowest thread, spinning while it waits. Beside one other busy process on 2
cores, the quickstart prior's steps took ~3.5x longer with 2 threads than idle, and their CPU time doubled
(the spinning), while 1 thread lost only ~10-50% (its models are small: 2 threads bought ~10-20% idle).
So a command counts the cores that other processes keep busy during a short look at /proc/stat, and gives
torch (and the BLAS / OpenMP / numba pools loaded later) the free ones.

Precedence, first that applies:
1. SCLDM_THREADS=N: N threads per process; SCLDM_THREADS=auto: the free cores, ignoring OMP_NUM_THREADS.
2. OMP_NUM_THREADS=N (the standard variable, which torch reads itself; torchrun sets it to 1 when it
   starts several processes and it is unset): left as it is.
3. The free cores: those this process may use (CPU affinity, a cgroup CPU quota) less the ones other
   processes kept busy, rounded; under torchrun divided between the local ranks (the sibling ranks'
   own start-up is not counted as busy). A config's train.num_threads still wins for its training stage.

The choice is made once, when the command starts. A job that starts later makes the threads spin against
it; OMP_WAIT_POLICY=PASSIVE (in the environment before the command starts: libgomp reads it when torch
loads it) makes them sleep instead, at some cost on an idle machine.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from scldm_scale.config import ConfigError

log = logging.getLogger(__name__)

ENV = "SCLDM_THREADS"
# The commands that compute (the others read, write or print, or launch processes with their own settings).
COMPUTE_COMMANDS = frozenset({"train", "quickstart", "generate", "evaluate", "embed", "classify", "profile-step"})
# Thread pools that read their size from the environment when loaded, which may be after the choice.
LIBRARY_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
LOOK_S = 0.3  # how long /proc/stat is watched; 0.3 s is ~30 clock ticks per core
# /proc/stat per-CPU columns: user nice system idle iowait irq softirq steal (guest time is inside user)
_IDLE_COLUMNS = (3, 4)
_COUNTED_COLUMNS = 8


@dataclass(frozen=True)
class ThreadChoice:
    threads: int  # per process
    reason: str

    def line(self) -> str:
        return f"{self.threads} thread{'s' if self.threads > 1 else ''} per process ({self.reason})"


def choose_threads(
    env: Mapping[str, str], usable: int, local_ranks: int, busy_by_others: Callable[[], float | None]
) -> ThreadChoice:
    """The thread count per process and why. `usable`: cores this process may run on; `local_ranks`:
    processes of this job on this machine; `busy_by_others()`: cores other processes keep busy now (None when
    it cannot be read), called only when the free cores decide."""
    asked = env.get(ENV, "").strip().lower()
    if asked and asked != "auto":
        if not asked.isdigit() or int(asked) < 1:
            raise ConfigError(
                f"{ENV}={env[ENV]!r} is neither a whole number of threads >= 1 nor 'auto'; "
                f"set e.g. {ENV}=2, or unset it to use the cores that are free"
            )
        return ThreadChoice(int(asked), f"{ENV}={asked}")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if not asked and omp:
        first = omp.split(",")[0].strip()  # OpenMP also takes a list, one count per nesting level
        threads = int(first) if first.isdigit() and int(first) > 0 else torch.get_num_threads()
        return ThreadChoice(threads, f"OMP_NUM_THREADS={omp}; {ENV}=auto picks from the free cores")
    busy = busy_by_others()
    if busy is None:
        free, why = usable, f"{usable} usable cores, their load unreadable"
    else:
        # A core counts as taken when other processes use more than half of it.
        free = min(usable, max(0, math.floor(usable - busy + 0.5)))
        why = f"{free} of {usable} usable cores free, {busy:.1f} busy with other processes"
    threads = max(1, free // local_ranks)
    if local_ranks > 1:
        why += f", shared by {local_ranks} local ranks"
    return ThreadChoice(threads, f"{why}; {ENV}=N sets it")


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup's quota (v2 cpu.max, v1 cfs_quota_us / cfs_period_us), None when unlimited."""
    try:
        v2 = Path("/sys/fs/cgroup/cpu.max")
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
        else:
            v1 = Path("/sys/fs/cgroup/cpu")
            quota, period = (v1 / "cpu.cfs_quota_us").read_text(), (v1 / "cpu.cfs_period_us").read_text()
        return None if quota.strip() in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cpu_ticks(cpus: set[int]) -> tuple[int, int]:
    """(busy, total) clock ticks since boot, summed over the given CPUs, from /proc/stat."""
    busy = total = 0
    for row in Path("/proc/stat").read_text().splitlines():
        name, *values = row.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in values[:_COUNTED_COLUMNS]]
            total += sum(ticks)
            busy += sum(ticks) - sum(ticks[i] for i in _IDLE_COLUMNS)
    return busy, total


def _process_ticks(pids: set[int]) -> int:
    """User + system clock ticks of the given processes (those that have gone are skipped)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return ticks


def _sibling_pids() -> set[int]:
    """Processes started by this one's parent (torchrun's local ranks), this one included."""
    parent, siblings = os.getppid(), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == parent:
                    siblings.add(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return siblings | {os.getpid()}


def busy_cores_by_others(seconds: float = LOOK_S, *, ours: set[int] | None = None) -> float | None:
    """Cores kept busy over `seconds` by processes other than `ours` (default: this one), on the CPUs this
    process may use; None where /proc/stat cannot be read (not Linux)."""
    ours = {os.getpid()} if ours is None else ours
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    try:
        busy0, total0 = _cpu_ticks(cpus)
        own0 = _process_ticks(ours)
        time.sleep(seconds)
        busy1, total1 = _cpu_ticks(cpus)
        own1 = _process_ticks(ours)
    except (OSError, ValueError):
        return None
    per_cpu = (total1 - total0) / max(1, len(cpus))
    if per_cpu <= 0:
        return None
    return max(0.0, (busy1 - busy0 - (own1 - own0)) / per_cpu)


def use_free_cores(command: str, env: Mapping[str, str] | None = None) -> ThreadChoice | None:
    """Choose and set the thread count of a compute command (None for the others), and log why.

    Sets torch's intra-op threads and the BLAS / OpenMP pools already loaded, and, unless already set, the
    environment variables of the pools loaded later (scipy's OpenBLAS, scikit-learn's OpenMP, numba)."""
    if command not in COMPUTE_COMMANDS:
        return None
    env = os.environ if env is None else env
    local_ranks = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    ours = _sibling_pids() if local_ranks > 1 else None
    choice = choose_threads(env, usable_cores(), local_ranks, lambda: busy_cores_by_others(ours=ours))
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
        threadpool_limits(limits=choice.threads)
    for name in LIBRARY_ENV:
        os.environ.setdefault(name, str(choice.threads))
    log.info(choice.line())
    return choice
