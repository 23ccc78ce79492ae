"""Hierarchy Drafting (HD, Cho et al., NAACL 2025 findings): n-gram sources queried in
order of temporal locality, the first that yields a draft wins.

1. context: the prompt and output so far (in memory, like prompt lookup);
2. history: this user's own past generations with this tokenizer (SQLite, persisted);
3. static: a corpus index built by `specli index build` (SQLite, read-only).

Text repeats most within a conversation, then within one user's work, then across a
corpus, so asking in that order finds the likeliest continuation at the lowest cost.
Drafts cost microseconds and are deterministic (probs None): verification treats them
as one-hot, which keeps sampling lossless.

`passes` refines "first source that yields": each pass asks every source in order for a
first token matched on at least that many tokens.  The default (2, 1) prefers a real
match in any source over a one-token coincidence in the context; (1,) is the paper's
plain order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..ngram import N_MAX, ContextIndex, NgramStore
from ..sampling import SamplingParams
from .base import Draft, KeepGoing

SOURCES = ("context", "history", "static")


class HierarchyDrafter:
    name = "hd"

    def __init__(
        self,
        history: NgramStore | None = None,
        static: NgramStore | None = None,
        *,
        n_max: int = N_MAX,
        passes: Sequence[int] = (2, 1),
    ) -> None:
        self.context = ContextIndex(n_max)
        self.history, self.static = history, static
        self.passes = tuple(passes)
        self.sources = {s: 0 for s in SOURCES}  # drafts per source
        self.tokens = {s: [0, 0] for s in SOURCES}  # [drafted, accepted] tokens per source
        self.last_source: str | None = None  # who drafted the latest draft

    def _order(self) -> list[tuple[str, ContextIndex | NgramStore]]:
        order: list[tuple[str, ContextIndex | NgramStore]] = [("context", self.context)]
        if self.history is not None:
            order.append(("history", self.history))
        if self.static is not None:
            order.append(("static", self.static))
        return order

    def propose(
        self,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        rng: np.random.Generator,
        keep_going: KeepGoing | None = None,
    ) -> Draft:
        self.last_source = None
        if k <= 0 or not context:
            return Draft()
        self.context.update(context)
        for min_match in self.passes:
            for name, source in self._order():
                draft = source.draft(context, k, keep_going, min_match=min_match)
                if draft.tokens:
                    self.last_source = name
                    self.sources[name] += 1
                    self.tokens[name][0] += len(draft.tokens)
                    return draft
        return Draft()

    def lag(self, context: Sequence[int]) -> int:
        return 0  # indexing the context costs ~1.5 us a token: nothing to weigh

    def accepted(self, n_drafted: int, n_accepted: int) -> None:
        if self.last_source is not None and n_drafted:
            self.tokens[self.last_source][1] += n_accepted
        self.last_source = None

    def reset(self) -> None:
        self.context.reset()

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        """After a generation: add prompt + output to the history store, so later runs
        can draft from it.  `start`: count only continuations from that index on (a chat
        turn whose earlier part was added before).  No history store: nothing to do."""
        if self.history is not None and not self.history.readonly:
            self.history.add(tokens, start)

    def describe(self) -> str:
        """Drafts and acceptance per source, in one line (for --stats)."""
        parts = []
        for s in SOURCES:
            drafted, acc = self.tokens[s]
            if self.sources[s]:
                parts.append(f"{s} {self.sources[s]} drafts, {acc}/{drafted} tokens accepted")
        return "hd sources: " + ("; ".join(parts) if parts else "no drafts")

    def close(self) -> None:
        for store in (self.history, self.static):
            if store is not None:
                store.close()
