"""How many CPU threads each model gets when the user does not say.

Why this is not simply "all cores" for both: with the target on a GPU its CPU threads
only feed the GPU, and a drafter running beside it (duo) needs those cores.  Measured
on an H200 machine with 16 cores (`scripts/gpu_probe.py speed`, a 1.9B Q4_K_M target
fully offloaded, an 87M Q4_K_M drafter on the CPU, k = 4): the target's verify pass took
2.8-2.9 ms with 1, 2 or 16 CPU threads; the drafter took 1.2 ms per token with 8 threads,
1.8 with 4, and 8.8 with 16 beside the target (more threads than free cores).  With the
target on the CPU the two models take turns (or the overlap budget decides that they
should), so each keeps every core.

OpenMP (llama.cpp's CPU thread pool in its pip builds, through libgomp) keeps one pool of
threads per thread that ever ran a model, alive until that thread exits.  When all pools
together hold more threads than there are cores, libgomp stops spinning at its barriers
and sleeps on a futex at every one of them, and llama.cpp crosses one barrier per graph
op: a 2-core machine measured a one-token step 4-5x slower (0.28 -> 1.2-1.4 ms) for as
long as duo's drafting thread, idle, was alive.  So a thread that ran a model must end,
or hand its pool back (`release_openmp_threads`), before the next generation.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import platform
from pathlib import Path

from .cpu_load import census

GPU_FEEDER_THREADS = 2  # a fully offloaded target: its CPU only launches the GPU's work
DRAFTER_MAX_THREADS = 8  # beyond this a small drafter gained nothing (1.2 vs 1.1 ms/token)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return cpu


def allowed_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cpu_quota(root: str = "/sys/fs/cgroup") -> int | None:
    """Cores' worth of CPU time a cgroup limit allows (a container run with --cpus=2 sees
    every core of the host but gets two cores' worth), rounded up; None: no limit."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path(root, "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:  # cgroup v1
            quota = Path(root, "cpu", "cpu.cfs_quota_us").read_text().strip()
            period = Path(root, "cpu", "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max"
        return None
    return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None


def available_cores() -> int:
    """All cores this process may use: its affinity, within a cgroup's CPU limit.
    Decoding is memory-bound, so more threads than cores only adds contention."""
    cores, quota = allowed_cores(), cpu_quota()
    return cores if quota is None else min(cores, quota)


# a core counts as taken once others use this much of it: on 2 cores, 2 threads beat 1
# beside a neighbour busy a quarter of the time, tied at half, lost from three quarters
# (specli.cpu_load)
TAKEN_FROM = 0.5


def free_cores(cores: int, busy_elsewhere: float) -> int:
    """Cores left for specli when other processes keep `busy_elsewhere` cores' worth busy:
    a core counts as taken once TAKEN_FROM of it is used; at least one is left."""
    taken = max(0, math.floor(busy_elsewhere + 1 - TAKEN_FROM))
    return max(1, cores - taken)


def usable_cores(busy_elsewhere: float) -> int:
    """The cores left for specli's threads: those it may run on less those others use,
    within a cgroup's CPU limit (on a 64-core host a --cpus=2 container keeps 2 while
    the host has idle cores)."""
    return min(available_cores(), free_cores(allowed_cores(), busy_elsewhere))


def default_cores() -> int:
    """The cores default thread counts are made from: those this process may use, less
    those other processes were using when the command started (measured once)."""
    busy = census.read()
    return available_cores() if busy is None else usable_cores(busy)


def cores_note(busy: float | None = None, when: str = "at the start") -> str:
    """Why default thread counts are below the core count, for --stats; "" when they are
    not.  `busy`: cores' worth others used (default: the census at the start)."""
    busy = census.read() if busy is None else busy
    if busy is None or usable_cores(busy) == available_cores():
        return ""
    return (f"other processes kept {busy:.1f} of {allowed_cores()} cores busy {when}; "
            "--threads overrides")


def target_threads(cores: int, fully_offloaded: bool) -> int:
    """Default CPU threads for a model: every core, or a couple when the GPU runs it all."""
    return min(cores, GPU_FEEDER_THREADS) if fully_offloaded else max(1, cores)


def drafter_threads(cores: int, target_cpu_threads: int) -> int | None:
    """Default CPU threads for a draft model drafting beside the target (duo); None: the
    target's default (every core: the two take turns).  When the target leaves cores
    free (it runs on a GPU): those cores, less one for the main thread, at most
    DRAFTER_MAX_THREADS."""
    if target_cpu_threads >= cores:
        return None
    return max(1, min(DRAFTER_MAX_THREADS, cores - target_cpu_threads - 1))


def drafter_needs_own_thread(target_cpu_threads: int | None, draft_cpu_threads: int | None) -> bool:
    """Whether a draft model taking turns with the target should run on a thread of its
    own: yes when both run OpenMP teams (more than one thread) of different sizes, since
    libgomp ends a master thread's extra workers whenever it asks for a smaller team and
    creates them again for a bigger one, every round (specli.drafters.worker)."""
    t, d = target_cpu_threads or 0, draft_cpu_threads or 0
    return t > 1 and d > 1 and t != d


def pools_outnumber_cores(target_cpu_threads: int | None, draft_cpu_threads: int | None,
                          cores: int | None = None) -> bool:
    """Whether the target's OpenMP team and a drafting thread's together hold more
    threads than there are cores (None: every core), so that libgomp sleeps at every
    barrier while both pools live: then duo's thread must not outlive its work (on the
    2-core AMX VM a target step ran 2.5-2.7x slower beside the timing drafter's idle pool,
    1.3x beside the 0.5B's: scripts/idle_pool_step.py).  On a GPU machine (2 target
    threads, 2-8 drafter threads, 16 cores) they do not, and the thread stays."""
    cores = available_cores() if cores is None else cores
    return (target_cpu_threads or cores) + (draft_cpu_threads or cores) > cores


_OMP_PAUSE_SOFT = 1
_gomp: ctypes.CDLL | None | bool = None  # None: not looked up yet; False: not available


def release_openmp_threads() -> bool:
    """Hand the calling thread's OpenMP pool back (`omp_pause_resource_all`): its threads
    exit, so none spin or count against the cores while specli waits; the next model run
    makes a new pool (microseconds).  Call it only between generations, from a thread
    that is not inside a model run.  False where libgomp is not loaded (other builds)."""
    global _gomp
    if _gomp is None:
        _gomp = False
        name = ctypes.util.find_library("gomp") or "libgomp.so.1"
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)  # only if loaded
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            lib.omp_pause_resource_all.restype = ctypes.c_int
            _gomp = lib
        except (OSError, AttributeError):
            pass
    return bool(_gomp) and _gomp.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
