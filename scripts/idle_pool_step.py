"""What an idle thread that once ran a model costs the target's plain steps.

    python scripts/idle_pool_step.py TARGET.gguf DRAFT.gguf [--threads N]

llama.cpp's pip builds run each model on an OpenMP team of the calling thread, and
libgomp keeps that team's pool until the thread ends.  While the pools of all threads
together hold more threads than there are cores, libgomp sleeps at every barrier
instead of spinning (specli.threads).  This times the target's one-token step on the
main thread: alone, beside an idle thread whose pool is alive (as duo's drafting thread
was for the rest of a generation after one round beside), after that thread handed its
pool back, after it ran the draft model again, and after it ended.  Nothing of specli
runs but the worker thread and the backend.
"""

from __future__ import annotations

import argparse
import statistics
import time

import llama_cpp  # noqa: F401  before numpy (see specli/__init__.py)

from specli.backends.base import LoadOptions
from specli.backends.gguf import GGUFModel
from specli.drafters.worker import Worker
from specli.threads import release_openmp_threads

TEXT = "The quick brown fox jumps over the lazy dog."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target")
    ap.add_argument("draft")
    ap.add_argument("--threads", type=int, default=None, help="both models (default: all cores)")
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    opts = LoadOptions(n_ctx=512, n_threads=a.threads)
    target, draft = GGUFModel(a.target, opts), GGUFModel(a.draft, opts)
    ctx = target.tokenize(TEXT, add_bos=target.add_bos)

    def step_ms() -> float:
        target.truncate(0)
        target.eval(ctx)
        times = []
        for i in range(a.steps):
            t0 = time.perf_counter()
            target.eval([ctx[i % len(ctx)]], [0])
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times[5:])

    def drafts() -> None:
        draft.truncate(0)
        draft.eval(ctx)
        draft.eval([ctx[0]], [0])

    rows = [("target step alone", step_ms())]
    worker = Worker("idle-pool")
    worker.submit(drafts).result()
    rows.append(("beside an idle thread that ran the draft model", step_ms()))
    worker.submit(release_openmp_threads).result()
    rows.append(("... after that thread handed its pool back", step_ms()))
    worker.submit(drafts).result()
    rows.append(("... after it ran the draft model again", step_ms()))
    worker.close(10.0)
    rows.append(("... after it ended", step_ms()))
    base = rows[0][1]
    for name, ms in rows:
        print(f"{name:50s} {ms:7.3f} ms  {ms / base:5.2f}x")


if __name__ == "__main__":
    main()
