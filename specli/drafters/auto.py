"""`--method auto`: several drafters, one chosen per round by what it is expected to pay.

Each member is a drafter with its own adaptive budget (its own measured costs and
acceptance).  Every round each member's budget plans as if it were alone (including its
occasional probe); among those that would draft, the one with the highest expected
tokens per second drafts, and only its budget learns from the outcome.  When none would
draft, the round is a plain step: auto is never asked to be slower than plain decoding.

`AutoDrafter` is the engine's drafter and `AutoBudget` its budget; they share the
choice of the round, so the engine's loop stays the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..budget import AdaptiveBudget
from ..sampling import SamplingParams
from .base import Draft, Drafter, KeepGoing


@dataclass
class Member:
    name: str  # as in --method: "hd", "draft", "draft+hd"
    drafter: Drafter
    budget: AdaptiveBudget


class AutoDrafter:
    name = "auto"

    def __init__(self, members: Sequence[Member], learner: Drafter | None = None) -> None:
        """`learner`: the one drafter whose finish() learns from generations (the hd
        stores, which members may share)."""
        self.members = list(members)
        self.learner = learner
        self.current: Member | None = None  # the member drafting this round
        self.lags = [0] * len(self.members)

    def lag(self, context: Sequence[int]) -> int:
        self.lags = [m.drafter.lag(context) for m in self.members]
        return 0  # each member's lag is weighed by its own budget (AutoBudget.plan)

    # -- drafter side ------------------------------------------------------------------
    def propose(
        self,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        rng: np.random.Generator,
        keep_going: KeepGoing | None = None,
    ) -> Draft:
        if self.current is None:
            return Draft()
        draft = self.current.drafter.propose(context, k, params, rng, keep_going)
        draft.source = self.current.name
        return draft

    def accepted(self, n_drafted: int, n_accepted: int) -> None:
        if self.current is not None:
            self.current.drafter.accepted(n_drafted, n_accepted)

    def reset(self) -> None:
        for m in self.members:
            m.drafter.reset()

    def pause(self) -> None:
        """The generation is over: members with threads of their own end them."""
        for m in self.members:
            if (pause := getattr(m.drafter, "pause", None)) is not None:
                pause()

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        if self.learner is not None:
            self.learner.finish(tokens, start)

    def describe(self) -> str:
        notes = [n for m in self.members if (n := m.drafter.describe())]
        names = ", ".join(m.name for m in self.members)
        return "; ".join([f"auto chose each round among: none, {names}", *notes])


class AutoBudget:
    """The budget side of auto: asks every member's budget, keeps the best offer."""

    name = "auto"

    def __init__(self, auto: AutoDrafter) -> None:
        self.auto = auto

    def begin(self) -> None:
        for m in self.auto.members:
            m.budget.begin()

    def plan(self, k_cap: int, lag: int = 0, left: int = 1 << 30) -> int:
        a = self.auto
        best, best_k, best_rate = None, 0, -1.0
        for m, m_lag in zip(a.members, a.lags, strict=True):
            k = m.budget.plan(k_cap, m_lag, left)
            if k and (r := m.budget.expected_rate(k, m_lag, left)) > best_rate:
                best, best_k, best_rate = m, k, r
        a.current = best
        return best_k

    def keep_going(self, confidences: Sequence[float]) -> bool:
        cur = self.auto.current
        return cur is None or cur.budget.keep_going(confidences)

    def prune_tree(self, parents: Sequence[int], confidences: Sequence[float]) -> list[int]:
        cur = self.auto.current
        return [] if cur is None else cur.budget.prune_tree(parents, confidences)

    def observe(self, confidences: Sequence[float], n_accepted: int,
                timing: tuple[float, float] | None, n_verified: int | None = None) -> None:
        if (cur := self.auto.current) is not None:
            cur.budget.observe(confidences, n_accepted, timing, n_verified)

    def describe(self) -> str:
        return " | ".join(f"{m.name}: {m.budget.describe()}" for m in self.auto.members)
