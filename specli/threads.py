"""How many CPU threads each model gets when the user does not say.

Why this is not simply "all cores" for both: with the target on a GPU its CPU threads
only feed the GPU, and a drafter running beside it (duo) needs those cores.  Measured
on an H200 machine with 16 cores (`scripts/gpu_probe.py speed`, a 1.9B Q4_K_M target
fully offloaded, an 87M Q4_K_M drafter on the CPU, k = 4): the target's verify pass took
2.8-2.9 ms with 1, 2 or 16 CPU threads; the drafter took 1.2 ms per token with 8 threads,
1.8 with 4, and 8.8 with 16 beside the target (more threads than free cores).  With the
target on the CPU the two models take turns (or the overlap budget decides that they
should), so each keeps every core.
"""

from __future__ import annotations

import os

GPU_FEEDER_THREADS = 2  # a fully offloaded target: its CPU only launches the GPU's work
DRAFTER_MAX_THREADS = 8  # beyond this a small drafter gained nothing (1.2 vs 1.1 ms/token)


def available_cores() -> int:
    """All cores this process may run on: decoding is memory-bound, so more threads
    than cores only adds contention."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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
