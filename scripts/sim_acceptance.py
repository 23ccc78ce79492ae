"""The adaptive budget on simulated hardware and text: does it find what drafting pays?

    python scripts/sim_acceptance.py

Drives the real AdaptiveBudget with simulated timings (a cost model per machine) and
Bernoulli acceptance (each draft token accepted with probability p, the drafter's
confidence p too), for texts whose p is steady or switches between predictable and
unpredictable stretches, as real answers do.  Prints the speedup over plain steps of the
budget with and without `Acceptance.relax` (0: the estimates stay where drafting left
them), and of the best fixed draft length.  Simulated time, not a measurement.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from specli.budget import Acceptance, AdaptiveBudget, CostModel, FixedBudget, Outcome

MS = 1e-3
# The H200 timing pair's calibration, about (5.35 ms step, +0.49 ms a token, 0.7 ms a
# drafted token); FIELD-NOTES' 2-core curve for the 1.5B with an n-gram drafter, and with
# the 0.5B draft model (0.6 of a step: drafting never pays there).
CPU_CURVE = [0.036 * x for x in (1, 1.47, 1.81, 2.33, 3.01, 3.35, 4.1, 4.91, 5.42)]
MACHINES = {
    "gpu": CostModel([MS * (5.35 + 0.49 * i) for i in range(9)], 0.7 * MS),
    "cpu-ngram": CostModel(CPU_CURVE, 0.0005),
    "cpu-0.5b": CostModel(CPU_CURVE, 0.6 * 0.036),
}


def steady(p: float) -> Callable[[int], float]:
    return lambda t: p


def switching(hi: float, lo: float, every: int) -> Callable[[int], float]:
    """p alternates every `every` tokens, starting low."""
    return lambda t: hi if (t // every) % 2 else lo


TEXTS = {
    "p 0.1": steady(0.1), "p 0.3": steady(0.3), "p 0.4": steady(0.4),
    "p 0.5": steady(0.5), "p 0.8": steady(0.8),
    "0.8/0.2 every 100": switching(0.8, 0.2, 100),
    "0.9/0.05 every 200": switching(0.9, 0.05, 200),
    # against relax: the long memory remembers a good start the text never returns to
    "0.9 then 0.05": lambda t: 0.9 if t < 300 else 0.05,
    "0.05 then 0.9": lambda t: 0.05 if t < 1000 else 0.9,
}


def draft_and_judge(budget, p: float, left: int,
                    rng: np.random.Generator) -> tuple[list[float], int]:
    """One round's draft under the budget's plan and stop rule (the drafter's confidence:
    p), judged token by token with probability p: (confidences drafted, tokens accepted).
    The caller times the round and hands the budget its Outcome."""
    plan = budget.plan(8, 0, left)
    confs: list[float] = []
    while len(confs) < plan.k:
        confs.append(p)
        if not budget.keep_going(confs):
            break
    acc = 0
    while acc < len(confs) and rng.random() < p:
        acc += 1
    return confs, acc


def simulate(cost: CostModel, p_at: Callable[[int], float], budget, n: int = 2000,
             seed: int = 0) -> float:
    """Tokens per simulated second over n tokens."""
    rng = np.random.default_rng(seed)
    clock, made = 0.0, 0
    while made < n:
        confs, acc = draft_and_judge(budget, p_at(made), n - made, rng)
        k = len(confs)
        draft_s, verify_s = k * cost.draft, cost.verify_cost(k + 1)
        clock += draft_s + verify_s
        budget.observe(Outcome(confs[: acc + 1], acc, k, (draft_s, verify_s)))
        made += acc + 1
    return made / clock


def speedups(cost: CostModel, p_at: Callable[[int], float], seeds: int = 5) -> dict[str, float]:
    """Mean speedup over plain steps: the budget with and without relax, best fixed k."""
    plain = 1.0 / cost.verify_cost(1)

    def mean(make) -> float:
        return float(np.mean([simulate(cost, p_at, make(), seed=s) for s in range(seeds)])) / plain

    return {
        "relax": mean(lambda: AdaptiveBudget(cost)),
        "no relax": mean(lambda: AdaptiveBudget(cost, Acceptance(relax_rate=0.0))),
        "best fixed": max(mean(lambda k=k: FixedBudget(k)) for k in (1, 2, 3, 4)),
    }


def main() -> None:
    print(f"{'machine':<10} {'text':<20} {'relax':>7} {'no relax':>9} {'best fixed':>11}")
    for machine, cost in MACHINES.items():
        for text, p_at in TEXTS.items():
            s = speedups(cost, p_at)
            print(f"{machine:<10} {text:<20} {s['relax']:>6.3f}x {s['no relax']:>8.3f}x "
                  f"{s['best fixed']:>10.3f}x")


if __name__ == "__main__":
    main()
