"""specli's whole speculative pipeline on a GPU-like timing pair that needs no GPU.

    python scripts/sleep_pipeline.py [AGREE ...]          # default 0.8 0.93
    SLOW=1.6 python scripts/sleep_pipeline.py             # drafter slower than calibrated

The fake models sleep for what the cost model says a pass costs on the H200 timing pair
(target 5.35 ms a step plus 0.5 ms a token, drafter 0.7 ms a token), then answer.  A
sleep releases the GIL as llama.cpp's ctypes calls do while a GPU works, so duo's drafter
thread can draft while the target "verifies", the way it does on a GPU.  The draft model
agrees with the target's greedy token with probability AGREE (a fixed hash of the
position and token, so a re-draft gives the same answer).

For each method it prints the decode speed against plain decoding in the same run and
what the cost model expects at that agreement: where the two differ, the difference is
specli's own time (Python, thread hand-offs, the GIL), which a GPU run would also pay,
and what the sleeps overshoot beyond the median subtracted.  This times the pipeline,
never a model's quality, and never a GPU runtime's own costs.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

import numpy as np
from round_overhead import GPU, VOCAB, FakeModel  # scripts/ is on sys.path when run

from specli.budget import (
    AdaptiveBudget,
    Budget,
    FixedBudget,
    OverlapBudget,
    expected_tokens,
    overlap_rate,
)
from specli.drafters.duo import DuoDrafter
from specli.drafters.hierarchy import HierarchyDrafter
from specli.drafters.model import ModelDrafter
from specli.engine import Engine, GenerationConfig, Result
from specli.lineup import Lineup, Member

# sleeps do not slow each other: a pass beside the drafter costs what it costs alone
BESIDE = replace(GPU, overlap_verify=1.0, overlap_draft=GPU.draft)
N_TOKENS, PROMPTS = 128, 8  # the same prompts for every method


def _slack() -> float:
    """How much longer than asked a short sleep lasts here (subtracted from every one)."""
    over = []
    for _ in range(20):
        t0 = time.perf_counter()
        time.sleep(0.001)
        over.append(time.perf_counter() - t0 - 0.001)
    return float(np.median(over))


SLACK = _slack()


def _agrees(token: int, pos: int, agree: float) -> bool:
    return ((token * 2654435761 + pos * 40503) & 0xFFFFFFFF) / 2**32 < agree


class SleepModel(FakeModel):
    """round_overhead's fake model, whose pass over n tokens first sleeps `cost(n)`
    seconds.  The target (agree None) answers FakeModel's token; a draft model agrees
    with it with probability `agree`."""

    name = path = placement = "sleep"

    def __init__(self, cost, agree: float | None = None) -> None:
        super().__init__(shift=17)
        self.cost = cost
        self.agree = agree

    def eval(self, tokens, logits_for=()) -> np.ndarray:
        t0 = time.perf_counter()
        time.sleep(max(0.0, self.cost(len(tokens)) - SLACK))
        out = super().eval(tokens, logits_for)
        self.step_clock.add(len(tokens), time.perf_counter() - t0)
        return out

    def answer(self, token: int, pos: int) -> int:
        tok = super().answer(token, pos)
        if self.agree is not None and not _agrees(token, pos, self.agree):
            tok = (tok + 1) % VOCAB
        return tok


# SLOW=1.5: the drafter's passes take 1.5x what its calibration says (as inside the
# pipeline on the H200: 1.3-2.1x), so the budgets must learn its cost online
SLOW = float(os.environ.get("SLOW", "1.0"))


def _draft_cost(n: int) -> float:
    return SLOW * (GPU.draft + GPU.catch_up * (n - 1))


def engine(method: str, agree: float) -> Engine:
    target = SleepModel(GPU.verify_cost)
    draft = SleepModel(_draft_cost, agree)
    name, _, fixed = method.partition("@fixed:")
    if name == "none":
        return Engine(target)
    budget: Budget = FixedBudget(int(fixed)) if fixed else None  # type: ignore[assignment]
    if name == "draft":
        return Engine(target, ModelDrafter(draft), budget or AdaptiveBudget(GPU))
    if name == "duo":
        return Engine(target, DuoDrafter(draft), budget or OverlapBudget(BESIDE))
    if name == "auto":  # as runtime builds it with the target on a GPU (hd: context only)
        hd = HierarchyDrafter()
        members = [Member("hd", hd, AdaptiveBudget(replace(GPU, draft=0.0))),
                   Member("draft", ModelDrafter(draft), AdaptiveBudget(GPU)),
                   Member("draft+hd", ModelDrafter(draft, hd), AdaptiveBudget(GPU)),
                   Member("duo", DuoDrafter(SleepModel(_draft_cost, agree)),
                          OverlapBudget(BESIDE))]
        return Engine(target, lineup=Lineup(members, learner=hd, name="auto"))
    raise SystemExit(f"unknown method {method!r}")


def expected(method: str, agree: float) -> float | None:
    """Tokens per second the cost model expects at a fixed length (None: the budget's)."""
    name, _, fixed = method.partition("@fixed:")
    if name == "none":
        return 1.0 / GPU.verify_cost(1)
    if not fixed:
        return None
    k = int(fixed)
    if name == "draft":
        return expected_tokens([agree] * k) / GPU.round_cost(k)
    return overlap_rate(BESIDE, [agree] * k, agree)


def main() -> None:
    agreements = [float(a) for a in sys.argv[1:]] or [0.8, 0.93]
    methods = ["none", "auto", "draft", "draft@fixed:4", "duo", "duo@fixed:4"]
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(0, VOCAB, 100)] for _ in range(PROMPTS)]
    print(f"sleep overshoot subtracted: {SLACK * 1e6:.0f} us; {PROMPTS} prompts x {N_TOKENS} "
          f"tokens per method; drafter at {SLOW}x its calibrated cost")
    for agree in agreements:
        print(f"\nagreement {agree}: method, decode tok/s, speedup, expected, tokens a pass, "
              f"rounds drafted, drafted a drafting round, acceptance, ms a round outside "
              f"the models' sleeps")
        base = None
        for m in methods:
            runs = []
            e = engine(m, agree)  # one engine for every prompt, as in specli bench
            for prompt in prompts:
                res = Result(method=m)
                for _ in e.stream(prompt, GenerationConfig(max_tokens=N_TOKENS), res):
                    pass
                runs.append(res.stats)
            e.close()
            n, secs = sum(st.n_generated for st in runs), sum(st.decode_s for st in runs)
            passes = sum(st.target_forwards for st in runs)
            rounds = sum(st.draft_rounds for st in runs)
            drafted, accepted = sum(st.drafted for st in runs), sum(st.accepted for st in runs)
            other = sum(st.ms_per_round_other * st.target_forwards for st in runs) / passes
            tok_s = n / secs
            base = base or tok_s
            want = expected(m, agree)
            want_x = f"{want / (1.0 / GPU.verify_cost(1)):.2f}x" if want else "budget"
            by = {}
            for st in runs:
                for who, count in st.rounds_by.items():
                    by[who] = by.get(who, 0) + count
            print(f"  {m:14s} {tok_s:7.1f} {tok_s / base:6.2f}x {want_x:>7s} "
                  f"{n / passes:5.2f} {rounds:4d}/{passes:<4d} {drafted / max(rounds, 1):5.2f} "
                  f"{accepted / max(drafted, 1):5.2f} {other:7.3f}"
                  + (f"  {by}" if m == "auto" else ""))

if __name__ == "__main__":
    main()
