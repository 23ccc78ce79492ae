"""What a round of the engine costs in Python, outside the models: plain decoding against
budgets that decline to draft, on near-free fake models.

    python scripts/round_overhead.py [METHODS] [REPEATS]     # default none,draft,hd,auto 9

On a GPU a plain step lasts a few milliseconds (5.2 ms for the H200 timing pair), so
the tens to hundreds of microseconds a budget spends deciding not to draft are a
visible share of it.  The fake target answers at once (a fixed argmax per position);
the fake draft model always disagrees, so the budgets (with the H200-like costs of
scripts/sim_shape_change.py) soon decline and mostly plan.  hd asks a real history
store of 20k random tokens, which never matches.  Prints microseconds per round, the
fastest of REPEATS generations of 300 tokens (a shared machine only adds time).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from specli.backends.base import StepClock
from specli.budget import AdaptiveBudget, CostModel
from specli.drafters.hierarchy import HierarchyDrafter
from specli.drafters.model import ModelDrafter
from specli.engine import Engine, GenerationConfig, Result
from specli.lineup import Lineup, Member
from specli.ngram import NgramStore

VOCAB = 2000
MS = 1e-3
GPU = CostModel([MS * (5.35 + 0.5 * i) for i in range(17)], 0.7 * MS, catch_up=0.05 * MS)
FREE = CostModel(GPU.verify, 0.0)  # n-gram drafts: only verifying costs


class FakeModel:
    """A model that answers at once: the argmax after position i is a fixed function of
    the token there (`shift` makes two fake models disagree)."""

    name = path = placement = "fake"
    n_vocab, n_ctx, bos, add_bos, max_branches, catch_up_stepwise = VOCAB, 8192, None, False, 1, 0

    def __init__(self, shift: int) -> None:
        self.tokens: list[int] = []
        self.step_clock = StepClock()
        self.shift = shift

    def is_eog(self, token: int) -> bool:
        return False

    def eval(self, tokens, logits_for=()) -> np.ndarray:
        start = len(self.tokens)
        self.tokens += list(tokens)
        rows = list(logits_for)
        out = np.zeros((len(rows), VOCAB), dtype=np.float32)
        for r, i in enumerate(rows):
            pos = start + i
            out[r, (self.tokens[pos] * 31 + pos * self.shift + 7) % VOCAB] = 1.0
        return out

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def close(self) -> None:
        pass


def engine(method: str, store: NgramStore) -> Engine:
    target, draft = FakeModel(1), FakeModel(2)
    if method == "none":
        return Engine(target)
    if method == "draft":
        return Engine(target, ModelDrafter(draft), AdaptiveBudget(GPU))
    if method == "hd":
        return Engine(target, HierarchyDrafter(store), AdaptiveBudget(FREE))
    if method == "auto":  # as on a CPU: hd, draft, draft+hd (no duo)
        hd = HierarchyDrafter(store)
        members = [Member("hd", hd, AdaptiveBudget(FREE)),
                   Member("draft", ModelDrafter(draft), AdaptiveBudget(GPU)),
                   Member("draft+hd", ModelDrafter(draft, hd), AdaptiveBudget(GPU))]
        return Engine(target, lineup=Lineup(members, learner=hd, name="auto"))
    raise SystemExit(f"unknown method {method!r}: none, draft, hd or auto")


def main() -> None:
    methods = (sys.argv[1] if len(sys.argv) > 1 else "none,draft,hd,auto").split(",")
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(0, VOCAB, 900)]
    with tempfile.TemporaryDirectory() as tmp:
        store = NgramStore(Path(tmp, "history.sqlite"), fingerprint="fake")
        store.add([int(x) for x in rng.integers(0, VOCAB, 20000)])
        for m in methods:
            best = float("inf")
            for _ in range(repeats):
                res = Result(method=m)
                for _ in engine(m, store).stream(prompt, GenerationConfig(max_tokens=300), res):
                    pass
                best = min(best, res.stats.decode_s / res.stats.target_forwards)
            print(f"{m:6s} {1e6 * best:7.1f} us a round")
        store.close()


if __name__ == "__main__":
    main()
