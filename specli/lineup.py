"""The drafters an engine may draft with, each with its own budget, and each round's pick.

One member is the usual case: a drafter and its budget.  Several is `--method auto`:
every round each member's budget plans as if it were alone (its occasional probe
included), and only the budget of the member that drafts learns from the draft.  Among
the members whose estimates say drafting pays, the one with the highest expected tokens
per second drafts, or, when it finds no draft in this context, the next.  When none
expects to pay, a due probe takes the round (of several, the one that has waited
longest) and keeps its claim until it gets one: a probe is how a member whose estimates
turned against it finds out whether they still hold, and judged by those same estimates
it would lose every round to a member whose drafts cost nothing (hd), so it would never
find out.  When none would draft, the round is a plain step, so auto is never asked to
be slower than plain decoding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .budget import Budget, Outcome, Plan
from .drafters.base import Drafter
from .errors import SpecliError


@dataclass
class Member:
    name: str  # as in --method: "hd", "draft", "draft+hd", "duo"
    drafter: Drafter
    budget: Budget


@dataclass(frozen=True)
class Pick:
    """This round's drafter, what its budget planned, and the context tokens the drafter
    must read first (its lag)."""

    member: Member
    plan: Plan
    lag: int = 0


def trace_path() -> str | None:
    """SPECLI_TRACE's file, None when unset; one that cannot be written fails now, not
    after the answer (the CLI asks before it loads and calibrates)."""
    path = os.environ.get("SPECLI_TRACE") or None
    if path:
        try:
            open(path, "a").close()
        except OSError as e:  # named: the command line has no path in it
            raise SpecliError(f"SPECLI_TRACE={path} cannot be written: "
                              f"{e.strerror or e}") from None
    return path


class Lineup:
    def __init__(self, members: Sequence[Member], learner: Drafter | None = None,
                 name: str = "") -> None:
        """`learner`: the one drafter whose `finish` learns from generations, when members
        share it (auto: the hd stores, which the cascade also reads); None: every member
        learns for itself.  `name`: the budget's name in the stats (one member: its own)."""
        self.members = list(members)
        self.learner = learner
        self.name = name or self.members[0].budget.name
        self._rounds = 0
        self._drafted_at = {id(m): 0 for m in self.members}  # round of each one's last draft
        # SPECLI_TRACE=FILE: one JSON line per round with every budget's state, to see why
        # a lineup drafts what it does on hardware one cannot sit at (the GPU check)
        self._trace = trace_path()
        # kept in memory and written when the generation pauses: serialising and writing
        # a line every round cost ~165 us a round (auto, this 2-core VM), 3% of a GPU
        # step, in exactly the bench whose speed the trace is there to explain
        self._trace_lines: list[dict] = []

    def picks(self, context: Sequence[int], k_cap: int, left: int) -> list[Pick]:
        """The members that would draft this round, in the order to ask them for a draft:
        by expected tokens per second, then due probes (the longest waiting first).  The
        engine drafts with the first that finds one: an n-gram drafter (hd) often finds
        nothing in this context, and its free drafts would otherwise rank it first every
        round, each one a plain step, while a draft model that pays never drafted (a
        GPU-like timing pair: auto at 1.73x beside duo's 1.88x).  Empty: a plain step."""
        self._rounds += 1
        ranked: list[tuple[float, Pick]] = []
        probes: list[Pick] = []
        for m in self.members:
            lag = m.drafter.lag(context)
            plan = m.budget.plan(k_cap, lag, left)
            if not plan.k:
                continue
            if len(self.members) == 1:
                return [Pick(m, plan, lag)]
            if plan.probe:
                probes.append(Pick(m, plan, lag))
            else:
                ranked.append((m.budget.expected_rate(plan.k, lag, left), Pick(m, plan, lag)))
        ranked.sort(key=lambda rp: -rp[0])
        probes.sort(key=lambda p: self._drafted_at[id(p.member)])
        return [p for _, p in ranked] + probes

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
        if pick is not None:
            self._drafted_at[id(pick.member)] = self._rounds
        for m in [pick.member] if pick is not None else self.members:
            m.budget.observe(outcome)
        if self._trace:
            self._trace_round(pick, outcome)

    def _trace_round(self, pick: Pick | None, outcome: Outcome) -> None:
        def state(b: object) -> dict:
            acc = getattr(b, "acc", None)
            return {"draft_scale": getattr(b, "draft_scale", None),
                    "verify_scale": getattr(b, "verify_scale", None),
                    "pass_scale": getattr(b, "pass_scale", None),
                    "p": acc.by_position(4) if acc else None,
                    "idle": getattr(b, "_idle", None), "gap": getattr(b, "_gap", None)}

        self._trace_lines.append({
            "round": self._rounds, "pick": pick.member.name if pick else None,
            "k": pick.plan.k if pick else 0, "probe": bool(pick and pick.plan.probe),
            "lag": pick.lag if pick else 0, "verified": outcome.n_verified,
            "accepted": outcome.n_accepted, "ready": outcome.ready,
            "plain_before": outcome.plain_before, "confidence": list(outcome.confidences),
            "seconds": outcome.timing, "budgets": {m.name: state(m.budget) for m in self.members}})

    def _flush_trace(self) -> None:
        """The rounds traced so far, one JSON line each, appended to SPECLI_TRACE."""
        if not self._trace or not self._trace_lines:
            return
        with open(self._trace, "a") as f:
            for line in self._trace_lines:
                line["confidence"] = [round(c, 3) for c in line["confidence"]]
                for b in line["budgets"].values():
                    if b["p"] is not None:
                        b["p"] = [round(x, 3) for x in b["p"]]
                f.write(json.dumps(line) + "\n")
        self._trace_lines.clear()

    def accepted(self, pick: Pick | None, context: Sequence[int], n_drafted: int,
                 n_accepted: int) -> None:
        for m in self.members:
            mine = pick is not None and m is pick.member
            m.drafter.accepted(context, n_drafted if mine else 0, n_accepted if mine else 0)

    def pause(self) -> None:
        for d in self.drafters():
            d.pause()
        self._flush_trace()

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        learners = [self.learner] if self.learner is not None else self.drafters()
        for d in learners:
            d.finish(tokens, start)

    def close(self) -> None:
        for d in self.drafters():
            d.close()
        self._flush_trace()

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
