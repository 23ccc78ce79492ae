"""The one interface every drafter implements.

A drafter guesses the next few tokens cheaply; the target then checks them all
in one forward pass.  Drafters never decide what is emitted: verification does,
which is why any drafter, however wrong, keeps the output lossless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .. import tree
from ..sampling import SamplingParams


@dataclass
class Draft:
    """Proposed tokens, with the distributions they were sampled from when the
    drafter has them (None: a deterministic guess, verified as a one-hot draft)."""

    tokens: list[int] = field(default_factory=list)
    probs: list[np.ndarray] | np.ndarray | None = None  # len(tokens) rows of vocab, or None
    confidence: list[float] = field(default_factory=list)  # drafter's p(token), per token
    # None: a chain (token i follows token i - 1).  Else a tree of candidates: token i
    # follows token parents[i] (-1: the context), parents before children (no probs).
    parents: list[int] | None = None
    source: str = ""  # which drafter made it, when an engine holds several (auto)
    ready: bool = False  # drafted beside the previous pass: only verifying it costs now

    def prefix(self, n: int) -> Draft:
        """A chain's first n tokens as a draft of their own."""
        assert self.parents is None
        if n >= len(self.tokens):
            return self
        probs = None if self.probs is None else self.probs[:n]
        return Draft(self.tokens[:n], probs, self.confidence[:n], None, self.source, self.ready)

    def subtree(self, keep: Sequence[int]) -> Draft:
        """The nodes `keep` (sorted, closed under parents) as a draft of their own: a
        chain when they form one."""
        assert self.parents is not None
        parents = tree.subtree(self.parents, keep)
        return Draft([self.tokens[i] for i in keep], None, [self.confidence[i] for i in keep],
                     None if tree.is_chain(parents) else parents, self.source, self.ready)


class KeepGoing(Protocol):
    """Asked after each drafted token with the confidences so far: draft another?
    `ready`: those tokens were drafted already (beside the last pass), so only verifying
    them costs."""

    def __call__(self, confidences: Sequence[float], ready: bool = False) -> bool: ...


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
        that cost: a draft model that sat out plain steps has to catch up).  A question
        only: nothing changes."""
        ...

    def prepare_beside(self) -> None:
        """This round's draft will be verified with the drafter working beside the pass
        (the budget's plan; before `propose`): a drafter that does so readies its thread."""
        ...

    def start_beside(self, context: Sequence[int], draft: Draft, k: int,
                     params: SamplingParams, rule: KeepGoing | None) -> int:
        """The target now verifies `draft` after `context`: a drafter that works beside
        verification starts on the next round's draft (up to k tokens, stopped by
        `rule`).  Returns how many tokens it drafts beside the pass (0: none)."""
        ...

    def accepted(self, context: Sequence[int], n_drafted: int, n_accepted: int) -> None:
        """After every round: of `n_drafted` tokens this drafter drafted (0: it did not
        draft), `n_accepted` were kept; `context` now ends with the target's own token.
        For drafters that keep statistics, or hold work for a context that cannot come."""
        ...

    def reset(self) -> None:
        """Forget per-generation state (a new prompt follows)."""
        ...

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        """A generation is over (prompt + output in `tokens`; only what follows index
        `start` is new): drafters with a memory learn from it."""
        ...

    def pause(self) -> None:
        """The generation ended, however it ended: a drafter's own threads end with it."""
        ...

    def describe(self) -> str:
        """One line for --stats about where drafts came from ('' if nothing to say)."""
        ...

    def close(self) -> None:
        """Release what the drafter holds open (threads, stores); the models are the
        runtime's."""
        ...


class BaseDrafter:
    """No-op defaults for everything but `propose`, so a new drafter is one method: a
    drafter with no draft model to catch up, nothing to learn, nothing running beside
    the target, nothing to close and nothing to say."""

    name = "drafter"

    def lag(self, context: Sequence[int]) -> int:
        return 0

    def prepare_beside(self) -> None:
        pass

    def start_beside(self, context: Sequence[int], draft: Draft, k: int,
                     params: SamplingParams, rule: KeepGoing | None) -> int:
        return 0

    def accepted(self, context: Sequence[int], n_drafted: int, n_accepted: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        pass

    def pause(self) -> None:
        pass

    def describe(self) -> str:
        return ""

    def close(self) -> None:
        pass
