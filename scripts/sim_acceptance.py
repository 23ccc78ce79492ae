"""The adaptive budget on simulated hardware and text: does it find what drafting pays?

    python scripts/sim_acceptance.py

Drives the real AdaptiveBudget with simulated timings (a cost model per machine) and
Bernoulli acceptance (each draft token accepted with probability p, the drafter's
confidence p too), for texts whose p is steady or switches between predictable and
unpredictable stretches, as real answers do.  Prints the speedup over plain steps of the
budget with and without `Acceptance.relax` (0: the estimates stay where drafting left
them), and of the best fixed draft length.  Then, for a draft model that must catch up on
what it has not read, the budget over 13 texts in a row, as the bench runs them: speed and
probes a text.  Simulated time, not a measurement.
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
    return judge(budget, budget.plan(8, 0, left).k, p, rng)


def judge(budget, k: int, p: float, rng: np.random.Generator) -> tuple[list[float], int]:
    """Up to k tokens drafted under the budget's stop rule, judged as `draft_and_judge`."""
    confs: list[float] = []
    while len(confs) < k:
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


# A draft model that must first read what it has not seen (the prompt, the rounds it sat
# out): the H200 pair (its drafter reading ~0.05 ms a token) and the 2-core AMX VM's 0.5B
# (calibrated 2026-11-28: 0.54 of a step a drafted token, 4.1 ms a token to catch up).
LAGGING = {
    "gpu": CostModel(MACHINES["gpu"].verify, 0.7 * MS, catch_up=0.05 * MS),
    "amx-0.5b": CostModel([MS * x for x in (62.6, 95.3, 102.1, 102.1, 132.5, 151.9, 171.2,
                                            180.9, 195.5)], 34 * MS, catch_up=4.1 * MS),
}


def text_sequence(cost: CostModel, p: float, texts: int = 13, prompt: int = 50,
                  n: int = 128, seed: int = 0) -> tuple[float, float]:
    """One budget over `texts` generations of n tokens, each after a prompt the drafter
    has not read, as `specli bench` runs them: (speedup over plain steps, probes a text).
    A round that drafts first pays the drafter's catch-up on everything it has not read."""
    rng = np.random.default_rng(seed)
    budget = AdaptiveBudget(cost)
    clock, made, probes = 0.0, 0, 0
    for _ in range(texts):
        budget.begin()
        lag, done = prompt, 0
        while done < n:
            plan = budget.plan(min(8, n - done - 1), lag, n - done)
            probes += plan.probe
            confs, acc = judge(budget, plan.k, p, rng)
            k = len(confs)
            draft_s = cost.catch_up_cost(lag) + k * cost.draft if k else 0.0
            verify_s = cost.verify_cost(k + 1)
            clock += draft_s + verify_s
            budget.observe(Outcome(confs[: acc + 1], acc, k, (draft_s, verify_s),
                                   caught_up=lag if k else 0))
            lag = 1 if k else lag + 1
            done += acc + 1
        made += done
    return made / clock * cost.verify_cost(1), probes / texts


def main() -> None:
    print(f"{'machine':<10} {'text':<20} {'relax':>7} {'no relax':>9} {'best fixed':>11}")
    for machine, cost in MACHINES.items():
        for text, p_at in TEXTS.items():
            s = speedups(cost, p_at)
            print(f"{machine:<10} {text:<20} {s['relax']:>6.3f}x {s['no relax']:>8.3f}x "
                  f"{s['best fixed']:>10.3f}x")
    print(f"\n{'machine':<10} {'13 texts at p':<14} {'speedup':>8} {'probes a text':>14}")
    for machine, cost in LAGGING.items():
        for p in (0.3, 0.75, 0.85, 0.95):
            runs = [text_sequence(cost, p, seed=s) for s in range(8)]
            speed, probes = (float(np.mean(x)) for x in zip(*runs, strict=True))
            print(f"{machine:<10} {p:<14} {speed:>7.3f}x {probes:>14.2f}")


if __name__ == "__main__":
    main()
