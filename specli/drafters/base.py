"""The one interface every drafter implements.

A drafter guesses the next few tokens cheaply; the target then checks them all
in one forward pass.  Drafters never decide what is emitted: verification does,
which is why any drafter, however wrong, keeps the output lossless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..sampling import SamplingParams


@dataclass
class Draft:
    """Proposed tokens, with the distributions they were sampled from when the
    drafter has them (None: a deterministic guess, verified as a one-hot draft)."""

    tokens: list[int] = field(default_factory=list)
    probs: np.ndarray | None = None  # (len(tokens), vocab) or None
    confidence: list[float] = field(default_factory=list)  # drafter's p(token), per token
    # None: a chain (token i follows token i - 1).  Else a tree of candidates: token i
    # follows token parents[i] (-1: the context), parents before children (no probs).
    parents: list[int] | None = None
    source: str = ""  # which drafter made it, when one drafter holds several (auto)

    def subtree(self, keep: Sequence[int]) -> Draft:
        """The nodes `keep` (sorted, closed under parents) as a draft of their own: a
        chain when they form one."""
        index = {old: new for new, old in enumerate(keep)}
        assert self.parents is not None
        parents = [index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in keep]
        chain = parents == list(range(-1, len(keep) - 1))
        return Draft([self.tokens[i] for i in keep], None,
                     [self.confidence[i] for i in keep], None if chain else parents, self.source)


KeepGoing = Callable[[Sequence[float]], bool]
"""Asked after each drafted token with the confidences so far: draft another?"""


class Drafter(Protocol):
    name: str

    def propose(
        self,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        rng: np.random.Generator,
        keep_going: KeepGoing | None = None,
    ) -> Draft:
        """Up to `k` tokens likely to follow `context` (prompt + accepted output);
        stop early when `keep_going` says another token would not pay."""
        ...

    def lag(self, context: Sequence[int]) -> int:
        """Context tokens the drafter must read before it can draft (the budget weighs
        that cost: a draft model that sat out plain steps has to catch up)."""
        ...

    def accepted(self, n_drafted: int, n_accepted: int) -> None:
        """Feedback after verification, for drafters that learn or keep statistics."""
        ...

    def reset(self) -> None:
        """Forget per-generation state (a new prompt follows)."""
        ...

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        """A generation is over (prompt + output in `tokens`; only what follows index
        `start` is new): drafters with a memory learn from it."""
        ...

    def describe(self) -> str:
        """One line for --stats about where drafts came from ('' if nothing to say)."""
        ...


class BaseDrafter:
    """No-op defaults for everything but `propose`, so a new drafter is one method: a
    drafter with no draft model to catch up, nothing to learn and nothing to say."""

    name = "drafter"

    def lag(self, context: Sequence[int]) -> int:
        return 0

    def accepted(self, n_drafted: int, n_accepted: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        pass

    def describe(self) -> str:
        return ""
