"""A draft model's one-token step back to back (as calibration times it) and right after
what a generation puts between two drafting rounds: a target pass, a memory sweep, an idle
gap.  Only the two llama.cpp models, on the main thread; no specli engine, budget or thread.

    python scripts/cold_draft_step.py TARGET.gguf DRAFT.gguf [--threads N] [--ngl N] [--draft-ngl N]

Why: `--stats` and the bench set the draft model's step inside a generation beside its
calibrated one, and a gap there was how a thread-pool defect was found (issue #14).  On a
CPU a gap can also be the hardware: a target pass that streams its weights through the
caches leaves a drafter small enough to live in them to fetch its own again.  This tells
the two apart on the machine at hand: a step slow here too is not specli's doing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import llama_cpp  # noqa: F401  before numpy (see specli/__init__.py)
import numpy as np

from specli.backends.base import LoadOptions
from specli.backends.gguf import GGUFModel

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. "
N_CONTEXT = 56  # tokens: the cache a short prompt leaves
SAMPLES = 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target")
    ap.add_argument("draft")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of both models")
    ap.add_argument("--ngl", type=int, default=0, help="target layers on the GPU")
    ap.add_argument("--draft-ngl", type=int, default=0, help="draft layers on the GPU")
    a = ap.parse_args()
    target = GGUFModel(a.target, LoadOptions(n_threads=a.threads, n_gpu_layers=a.ngl))
    draft = GGUFModel(a.draft, LoadOptions(n_threads=a.threads, n_gpu_layers=a.draft_ngl))
    tctx, dctx = _context(target), _context(draft)
    target.eval(tctx)
    draft.eval(dctx)
    sweep = np.ones(200 * 2**20 // 8)  # 200 MB: more than a drafter that fits a cache

    def target_pass(n: int, logits: bool = True) -> Callable[[], object]:
        def run() -> None:
            target.eval(tctx[:n], range(n) if logits else ())
            target.truncate(len(tctx))
        return run

    def idle(seconds: float) -> Callable[[], object]:
        return lambda: time.sleep(seconds)

    before: dict[str, Callable[[], object] | None] = {
        "nothing (back to back, as calibrated)": None,
        "an idle gap of 1 ms": idle(0.001),
        "an idle gap of 8 ms": idle(0.008),
        "a 200 MB memory sweep": sweep.sum,
        "a target step (1 token)": target_pass(1),
        "a target pass over 5 tokens": target_pass(5),
        "a target pass over 5 tokens, no logits": target_pass(5, logits=False),
    }
    print(f"target {Path(a.target).name} (ngl {a.ngl}), draft {Path(a.draft).name} "
          f"(ngl {a.draft_ngl}), threads {a.threads or 'all'}; median of {SAMPLES}")
    base = None
    for label, first in before.items():
        ms = 1000 * statistics.median(_step_after(draft, dctx, first) for _ in range(SAMPLES))
        base = base or ms
        print(f"  draft step after {label:40s} {ms:8.3f} ms  {ms / base:5.2f}x")
    for m in (target, draft):
        m.close()


def _context(model: GGUFModel) -> list[int]:
    toks = model.tokenize(TEXT, add_bos=False)
    return (toks * (N_CONTEXT // len(toks) + 1))[:N_CONTEXT]


def _step_after(draft: GGUFModel, ctx: list[int],
                first: Callable[[], object] | None) -> float:
    if first is not None:
        first()
    t = time.perf_counter()
    draft.eval(ctx[:1], [0])
    seconds = time.perf_counter() - t
    draft.truncate(len(ctx))
    return seconds


if __name__ == "__main__":
    main()
