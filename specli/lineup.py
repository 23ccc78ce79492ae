"""The drafters an engine may draft with, each with its own budget, and each round's pick.

One member is the usual case: a drafter and its budget.  Several is `--method auto`:
every round each member's budget plans as if it were alone (its occasional probe
included); among those that would draft, the one with the highest expected tokens per
second drafts, and only its budget learns from the draft.  When none would draft, the
round is a plain step, so auto is never asked to be slower than plain decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .budget import Budget, Outcome, Plan
from .drafters.base import Drafter


@dataclass
class Member:
    name: str  # as in --method: "hd", "draft", "draft+hd", "duo"
    drafter: Drafter
    budget: Budget


@dataclass(frozen=True)
class Pick:
    """This round's drafter and what its budget planned."""

    member: Member
    plan: Plan


class Lineup:
    def __init__(self, members: Sequence[Member], learner: Drafter | None = None,
                 name: str = "") -> None:
        """`learner`: the one drafter whose `finish` learns from generations, when members
        share it (auto: the hd stores, which the cascade also reads); None: every member
        learns for itself.  `name`: the budget's name in the stats (one member: its own)."""
        self.members = list(members)
        self.learner = learner
        self.name = name or self.members[0].budget.name

    def pick(self, context: Sequence[int], k_cap: int, left: int) -> Pick | None:
        """The member to draft this round and its plan, or None for a plain step."""
        best: Pick | None = None
        best_rate = -1.0
        for m in self.members:
            lag = m.drafter.lag(context)
            plan = m.budget.plan(k_cap, lag, left)
            if not plan.k:
                continue
            if len(self.members) == 1:
                return Pick(m, plan)
            if (r := m.budget.expected_rate(plan.k, lag, left)) > best_rate:
                best, best_rate = Pick(m, plan), r
        return best

    # -- every member at once --------------------------------------------------------
    def drafters(self) -> list[Drafter]:
        """Each distinct drafter once (members may share one)."""
        found = [m.drafter for m in self.members]
        if self.learner is not None:
            found.append(self.learner)
        return list({id(d): d for d in found}.values())

    def begin(self) -> None:
        for m in self.members:
            m.budget.begin()

    def reset(self) -> None:
        for m in self.members:
            m.drafter.reset()

    def observe(self, pick: Pick | None, outcome: Outcome) -> None:
        """The budget that planned the round learns from it; after a plain step, every
        budget learns what a pass costs now."""
        for m in [pick.member] if pick is not None else self.members:
            m.budget.observe(outcome)

    def accepted(self, pick: Pick | None, context: Sequence[int], n_drafted: int,
                 n_accepted: int) -> None:
        for m in self.members:
            mine = pick is not None and m is pick.member
            m.drafter.accepted(context, n_drafted if mine else 0, n_accepted if mine else 0)

    def pause(self) -> None:
        for d in self.drafters():
            d.pause()

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        learners = [self.learner] if self.learner is not None else self.drafters()
        for d in learners:
            d.finish(tokens, start)

    def close(self) -> None:
        for d in self.drafters():
            d.close()

    def describe(self) -> str:
        """Where drafts came from, for --stats."""
        notes = [n for d in self.drafters() if (n := d.describe())]
        if len(self.members) == 1:
            return "; ".join(notes)
        names = ", ".join(m.name for m in self.members)
        return "; ".join([f"{self.name} chose each round among: none, {names}", *notes])

    def describe_costs(self) -> str:
        if len(self.members) == 1:
            return self.members[0].budget.describe()
        return " | ".join(f"{m.name}: {m.budget.describe()}" for m in self.members)
