"""A drafter's own thread: one daemon thread running jobs in order.

Why a drafter needs one: llama.cpp's CPU builds run each model's threads as an OpenMP
team of the thread that calls it, and libgomp ends the extra threads whenever that
thread next asks for a smaller team (and creates them again for a bigger one: read in
libgomp's team.c, not measured here).  A draft model with 8 threads taking turns on one
thread with a GPU target's 2 would pay six thread exits and six creations every round.
And drafting beside verification (duo)
needs a second thread anyway.  The thread lives for one generation at most: one that
ran a model keeps its OpenMP pool until it ends (see specli.threads).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future


class Worker:
    """One daemon thread running jobs in order: the only thread touching the draft model.
    Daemon, so that a job stuck in native code can never keep the process alive."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], object]) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn))
        return fut

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            fut, fn = item
            if not fut.set_running_or_notify_cancel():
                continue
            t0 = time.perf_counter()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - every failure must reach the caller
                fut.set_exception(e)
            finally:
                self.busy_s += time.perf_counter() - t0

    def close(self, timeout: float) -> bool:
        """Stop after the queued jobs; True if the thread ended within `timeout`."""
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()
