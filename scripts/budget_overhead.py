"""What the draft budgets cost a round, in microseconds of this machine's Python.

On a GPU a plain step of the issue-14 H200 pair took 5.2 ms, and every round pays its
budgets' planning and learning on top: 0.3-0.4 ms a round for `auto` there (2026-11-27),
6-8% of a step, in rounds that drafted nothing as much as in those that did.  This times
the budgets alone (no model), on that pair's measured costs, in the two kinds of round:

- declining: the estimates say drafting does not pay (acceptance taught low first), so
  every round is a plain step, and a probe now and then;
- drafting: 4 tokens planned, 3 accepted, each token judged by the stop rule.

    python scripts/budget_overhead.py [--rounds N]

Members as `--method auto` builds them (hd with calibrated confidences, the draft model,
the cascade) and `duo`'s OverlapBudget alone.  Timings, not a test: run it on the machine
whose overhead you want, idle.
"""

from __future__ import annotations

import argparse
import statistics
import time

from specli.budget import Acceptance, AdaptiveBudget, CostModel, Outcome, OverlapBudget
from specli.lineup import Lineup, Member

STEP = 0.0052  # the H200 pair's plain step (issue 14); a pass over n tokens 1 + 0.1 (n - 1)
GPU = CostModel([STEP * (1 + 0.1 * i) for i in range(16)], 0.0012, catch_up=0.0002)
FREE = CostModel(GPU.verify, 0.0)  # n-gram drafts cost nothing


class _Drafter:
    """Only what a lineup asks of a drafter while planning: its lag."""

    def __init__(self, name: str) -> None:
        self.name = name

    def lag(self, context) -> int:
        return 1


def _members() -> dict[str, list[Member]]:
    return {
        "auto (hd, draft, draft+hd)": [
            Member("hd", _Drafter("hd"), AdaptiveBudget(FREE, Acceptance(calibrated=True))),
            Member("draft", _Drafter("draft"), AdaptiveBudget(GPU)),
            Member("draft+hd", _Drafter("draft+hd"), AdaptiveBudget(GPU))],
        "draft": [Member("draft", _Drafter("draft"), AdaptiveBudget(GPU))],
        "duo": [Member("duo", _Drafter("duo"), OverlapBudget(GPU))],
    }


def _time(lineup: Lineup, drafting: bool, rounds: int) -> float:
    """Microseconds per round: plan every member, then the round's learning (and, when
    drafting, the stop rule asked after each of 4 drafted tokens)."""
    ctx = list(range(100))
    plain = Outcome([], 0, 0, (0.0, STEP), plain_before=8)
    conf = [0.9, 0.8, 0.7, 0.6]
    drafted = Outcome(conf, 3, 4, (0.0048, GPU.verify[4]), caught_up=1, plain_before=0)
    missed = Outcome(conf[:1], 0, 1, (0.0012, GPU.verify[1]), caught_up=1, plain_before=0)
    t0 = time.perf_counter()
    for _ in range(rounds):
        picks = lineup.picks(ctx, 8, 1000)
        if not picks:
            lineup.observe(None, plain)
            continue
        pick = picks[0]  # declining: a probe, which misses
        for i in range(1, 5 if drafting else 2):
            pick.member.budget.keep_going(conf[:i])
        lineup.observe(pick, drafted if drafting else missed)
    return (time.perf_counter() - t0) / rounds * 1e6


def _teach(members: list[Member], hits: int) -> None:
    for m in members:
        for _ in range(40):
            m.budget.observe(Outcome([0.5] * 4, hits, 4, None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()
    for name in _members():
        for kind, hits in (("declining", 0), ("drafting", 3)):
            runs = []
            for _ in range(5):
                members = _members()[name]
                _teach(members, hits)
                runs.append(_time(Lineup(members), hits > 0, args.rounds))
            print(f"{name:28s} {kind:9s} {statistics.median(runs):7.1f} us a round "
                  f"(min {min(runs):.1f})")


if __name__ == "__main__":
    main()
