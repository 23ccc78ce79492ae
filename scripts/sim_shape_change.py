"""Should the budget plan with `CostModel.shape_change`?  A simulation says no.

    python scripts/sim_shape_change.py

A runtime that keeps one captured graph per pass shape (llama.cpp on CUDA) runs the two
plain steps after a verify pass slower.  One way to plan with it: charge that cost to
the first draft after a plain step (a run of drafting rounds pays it once, when plain
steps resume).  This simulates an H200-like pair (5.35 ms step, +0.5 ms a verified token,
0.7 ms a drafted token; plain steps after a verify pass pay 60% + 40% of the shape
change), drives the real AdaptiveBudget with simulated timings and Bernoulli acceptance,
and prints the speedup over plain steps with and without the charge.  Simulated time,
not a measurement; every draft token is accepted with the same probability p.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from specli.budget import AdaptiveBudget, CostModel, Outcome, Plan

sys.path.insert(0, str(Path(__file__).parent))
from sim_acceptance import draft_and_judge  # noqa: E402  (a sibling script)

MS = 1e-3
PAIR = CostModel([MS * (5.35 + 0.5 * i) for i in range(9)], 0.7 * MS)


class ChargingBudget(AdaptiveBudget):
    """AdaptiveBudget, with the shape change added to a draft round's cost where the
    last pass was a plain step: planned as a one-token catch-up costing exactly that,
    read in full (horizon 1).  Probes stay uncharged (they plan with the calibrated
    catch-up cost, 0 here)."""

    after_plain = False

    @property
    def cost(self) -> CostModel:
        cost = super().cost
        return replace(cost, catch_up=cost.shape_change) if self.after_plain else cost

    def plan(self, k_cap: int, lag: int = 0, left: int = 1 << 30) -> Plan:
        return super().plan(k_cap, 1, 1) if self.after_plain else super().plan(k_cap, lag, left)


def simulate(cost: CostModel, p: float, n_tokens: int, charge: bool, seed: int) -> float:
    """Tokens per simulated second."""
    rng = np.random.default_rng(seed)
    b = ChargingBudget(cost) if charge else AdaptiveBudget(cost)
    clock, made, penalty = 0.0, 0, [0.0, 0.0]
    after_plain = False
    while made < n_tokens:
        if charge:
            b.after_plain = after_plain
        confs, acc = draft_and_judge(b, p, n_tokens - made, rng)
        k = len(confs)
        draft_s, verify_s = k * cost.draft, cost.verify_cost(k + 1)
        if k:
            penalty = [0.6 * cost.shape_change, 0.4 * cost.shape_change]
        elif penalty:
            verify_s += penalty.pop(0)
        clock += draft_s + verify_s
        b.observe(Outcome(confs[: acc + 1], acc, k, (draft_s, verify_s)))
        after_plain = k == 0
        made += acc + 1
    return made / clock


def speedups(p: float, shape_change: float, seeds: int = 5) -> tuple[float, float]:
    """Speedup over plain steps without and with the charge: mean of `seeds` runs of
    2000 tokens."""
    cost = replace(PAIR, shape_change=shape_change)
    plain = 1.0 / cost.verify_cost(1)
    without, charged = (
        float(np.mean([simulate(cost, p, 2000, charge, s) for s in range(seeds)])) / plain
        for charge in (False, True)
    )
    return without, charged


def main() -> None:
    print("p     shape change   speedup without charge   with charge")
    for p in (0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.8):
        for sc in (1.0, 2.0):
            without, charged = speedups(p, sc * MS)
            print(f"{p:<5} {sc:.1f} ms         {without:.3f}x                   {charged:.3f}x")


if __name__ == "__main__":
    main()
