"""What a round of the engine costs in Python, outside the models: plain decoding against
budgets that decline to draft (or, with `agree`, that draft and see every token accepted),
on near-free fake models.

    python scripts/round_overhead.py [METHODS] [REPEATS] [agree]   # none,draft,duo,hd,auto 9
    python scripts/round_overhead.py none,draft 5 --vocab 151936 --temperature 0.8 --top-p 0.95

On a GPU a plain step lasts a few milliseconds (5.2 ms for the H200 timing pair), so
the tens to hundreds of microseconds a budget spends deciding not to draft are a
visible share of it.  The fake target answers at once (a fixed argmax per position);
the fake draft model always disagrees, so the budgets (with the H200-like costs of
scripts/sim_shape_change.py) soon decline and mostly plan.  With `agree` it always agrees
and the budgets draft every round.  The budgets plan from those costs alone, never from
the fake models' timings (near-free passes of every size would tell them a draft costs
nothing, so they drafted where the H200-like costs decline).  hd asks a real history
store of 20k random tokens, which never matches.  Prints microseconds per round and per
generated token, the fastest of REPEATS generations of 300 tokens (a shared machine only
adds time).

Sampled (`--temperature` above 0) every token also turns logits into probabilities and
draws from them; with `--vocab` at a real model's size (151936 for Qwen2.5) that is the
per-token Python work a GPU's few-millisecond steps must carry.  The fake models' logits
are then a fixed bank of normal rows (scale 3) with the answer's logit at 30.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from specli.backends.base import StepClock
from specli.budget import AdaptiveBudget, CostModel, OverlapBudget
from specli.drafters.duo import DuoDrafter
from specli.drafters.hierarchy import HierarchyDrafter
from specli.drafters.model import ModelDrafter
from specli.engine import Engine, GenerationConfig, Result
from specli.lineup import Lineup, Member
from specli.ngram import NgramStore
from specli.sampling import SamplingParams

VOCAB = 2000
BANK = 8  # background logit rows the fake models cycle through when sampling
MS = 1e-3
GPU = CostModel([MS * (5.35 + 0.5 * i) for i in range(17)], 0.7 * MS, catch_up=0.05 * MS)
FREE = CostModel(GPU.verify, 0.0)  # n-gram drafts: only verifying costs
BESIDE = replace(GPU, overlap_verify=1.05, overlap_draft=0.8 * MS)  # duo: the drafter apart


class FakeModel:
    """A model that answers at once: the argmax after position i is a fixed function of
    the token there (`shift` makes two fake models disagree)."""

    name = path = placement = "fake"
    n_vocab, n_ctx, bos, add_bos, max_branches, catch_up_stepwise = VOCAB, 8192, None, False, 1, 0

    def __init__(self, shift: int, vocab: int = VOCAB, background: bool = False) -> None:
        self.tokens: list[int] = []
        self.step_clock = StepClock()
        self.shift = shift
        self.n_vocab = vocab
        rng = np.random.default_rng(shift)
        self.bank = ((rng.standard_normal((BANK, vocab)) * 3).astype(np.float32) if background
                     else np.zeros((BANK, vocab), dtype=np.float32))

    def is_eog(self, token: int) -> bool:
        return False

    def eval(self, tokens, logits_for=()) -> np.ndarray:
        start = len(self.tokens)
        self.tokens += list(tokens)
        rows = list(logits_for)
        out = self.bank[[(start + i) % BANK for i in rows]]
        for r, i in enumerate(rows):
            out[r, self.answer(self.tokens[start + i], start + i)] = 30.0
        return out

    def answer(self, token: int, pos: int) -> int:
        """The argmax after `token` at position `pos`."""
        return (token * 31 + pos * self.shift + 7) % self.n_vocab

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def close(self) -> None:
        pass


def untimed(budget: AdaptiveBudget) -> AdaptiveBudget:
    """The budget learns acceptance from every round, but no cost from the fakes' clocks."""
    learn = budget.observe
    budget.observe = lambda outcome: learn(replace(outcome, timing=None))  # type: ignore
    return budget


def engine(method: str, store: NgramStore, agree: bool = False, vocab: int = VOCAB,
           background: bool = False) -> Engine:
    target = FakeModel(1, vocab, background)
    draft = FakeModel(1 if agree else 2, vocab, background)
    if method == "none":
        return Engine(target)
    if method == "draft":
        return Engine(target, ModelDrafter(draft), untimed(AdaptiveBudget(GPU)))
    if method == "duo":
        return Engine(target, DuoDrafter(draft), untimed(OverlapBudget(BESIDE)))
    if method == "hd":
        return Engine(target, HierarchyDrafter(store), untimed(AdaptiveBudget(FREE)))
    if method == "auto":  # as on a CPU: hd, draft, draft+hd (no duo)
        hd = HierarchyDrafter(store)
        members = [Member("hd", hd, untimed(AdaptiveBudget(FREE))),
                   Member("draft", ModelDrafter(draft), untimed(AdaptiveBudget(GPU))),
                   Member("draft+hd", ModelDrafter(draft, hd), untimed(AdaptiveBudget(GPU)))]
        return Engine(target, lineup=Lineup(members, learner=hd, name="auto"))
    raise SystemExit(f"unknown method {method!r}: none, draft, duo, hd or auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("methods", nargs="?", default="none,draft,duo,hd,auto")
    ap.add_argument("repeats", nargs="?", type=int, default=9)
    ap.add_argument("agree", nargs="?", choices=["agree"], help="the draft model always agrees")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    a = ap.parse_args()
    sampled = a.temperature > 0
    params = SamplingParams(a.temperature, a.top_k, a.top_p, seed=0)
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(0, VOCAB, 900)]
    with tempfile.TemporaryDirectory() as tmp:
        store = NgramStore(Path(tmp, "history.sqlite"), fingerprint="fake")
        store.add([int(x) for x in rng.integers(0, VOCAB, 20000)])
        for m in a.methods.split(","):
            best = None
            for _ in range(a.repeats):
                res = Result(method=m)
                cfg = GenerationConfig(max_tokens=300, params=params)
                eng = engine(m, store, bool(a.agree), a.vocab, background=sampled)
                for _ in eng.stream(prompt, cfg, res):
                    pass
                if best is None or res.stats.decode_s < best.decode_s:
                    best = res.stats
            print(f"{m:6s} {1e6 * best.decode_s / best.target_forwards:7.1f} us a round, "
                  f"{1e6 * best.decode_s / best.n_generated:6.1f} a token "
                  f"({best.n_generated / best.target_forwards:.2f} tokens a round)")
        store.close()


if __name__ == "__main__":
    main()
