"""How much of this process's cores other processes keep busy.

Why it matters: llama.cpp's CPU threads meet at a barrier after every graph op, so one
thread descheduled by a busy neighbour stalls them all.  Measured on this project's
2-core machine (Qwen2.5-Coder 1.5B Q4_K_M, 48 tokens, tok/s on 2 threads against 1):
idle 27-31 against 18; beside a process busy 25% of the time 22-23 against 16-17, 50%
16-18 against 18-19, 75% 12-17 against 16-18, and spinning all the time 10 against 19.
So the default thread count leaves out the cores others are using
(specli.threads.free_cores).

Linux only (/proc/stat); elsewhere nothing is measured and every core is used.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

MIN_WINDOW_S = 0.25  # shorter windows read too few scheduler ticks (10 ms each)
_STAT = "/proc/stat"


@dataclass(frozen=True)
class CpuTimes:
    """A reading of CPU time, in seconds."""

    busy_s: float  # everyone's time on this process's cores (time stolen by a hypervisor too)
    own_s: float  # this process's time, all its threads
    at: float  # time.monotonic() when read


def read_cpu_times(cores: set[int] | None = None, stat_path: str = _STAT) -> CpuTimes | None:
    """Busy time of the given cores (default: those this process may run on) and this
    process's own CPU time; None where /proc/stat cannot be read."""
    if cores is None:
        try:
            cores = os.sched_getaffinity(0)
        except AttributeError:
            return None
    try:
        with open(stat_path, encoding="ascii") as f:
            lines = f.readlines()
    except OSError:
        return None
    own, at = time.process_time(), time.monotonic()
    ticks = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores):
            continue
        # user nice system idle iowait irq softirq steal: all but idle and iowait
        f = [int(x) for x in rest.split()[:8]]
        ticks += f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
    return CpuTimes(ticks / os.sysconf("SC_CLK_TCK"), own, at)


def busy_elsewhere(before: CpuTimes, after: CpuTimes) -> float:
    """Cores' worth of time other processes (and the hypervisor) took between two
    readings: 1.0 is one core kept fully busy."""
    window = after.at - before.at
    if window <= 0:
        return 0.0
    others = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return max(0.0, others / window)


class Census:
    """Measures busy_elsewhere once per process, over the window from `start()` (the
    command's first step, so its imports and model loads fill the window) to the first
    `read()`, which waits out what is left of MIN_WINDOW_S."""

    def __init__(self, stat_path: str = _STAT) -> None:
        self._stat = stat_path
        self._start: CpuTimes | None = None
        self._result: float | None = None
        self._done = False

    def start(self) -> None:
        if self._start is None and not self._done:
            self._start = read_cpu_times(stat_path=self._stat)

    def read(self) -> float | None:
        """Cores' worth used by others during the window; None where nothing can be read."""
        if not self._done:
            self.start()
            if self._start is not None:
                left = MIN_WINDOW_S - (time.monotonic() - self._start.at)
                if left > 0:
                    time.sleep(left)
                end = read_cpu_times(stat_path=self._stat)
                if end is not None:
                    self._result = busy_elsewhere(self._start, end)
            self._done = True
        return self._result


census = Census()  # the process's one measurement, shared by every model it loads


class Watch:
    """busy_elsewhere since the last look, for a process that lives on between
    generations (chat, serve): the load others put on the cores changes meanwhile."""

    def __init__(self, stat_path: str = _STAT) -> None:
        self._stat = stat_path
        self._last = read_cpu_times(stat_path=stat_path)

    def look(self) -> float | None:
        """Cores' worth others used since the last look that returned a value; None
        where nothing can be read or less than MIN_WINDOW_S has passed."""
        now = read_cpu_times(stat_path=self._stat)
        if now is None or self._last is None or now.at - self._last.at < MIN_WINDOW_S:
            return None
        busy, self._last = busy_elsewhere(self._last, now), now
        return busy
