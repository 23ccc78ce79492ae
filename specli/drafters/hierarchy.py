"""Hierarchy Drafting (HD, Cho et al., NAACL 2025 findings): n-gram sources queried in
order of temporal locality, the first that yields a draft wins.

1. context: the prompt and output so far (in memory, like prompt lookup);
2. history: this user's own past generations with this tokenizer (SQLite, persisted);
3. static: a corpus index built by `specli index build` (SQLite, read-only).

Text repeats most within a conversation, then within one user's work, then across a
corpus, so asking in that order finds the likeliest continuation at the lowest cost.
Drafts cost microseconds and are deterministic (probs None): verification treats them
as one-hot, which keeps sampling lossless.

With `branches` > 1 the draft is a tree: the chain above, plus chains that start with
the other tokens the sources have seen after the longest matched suffix (most frequent
first), so one target pass can verify several guesses; the budget prunes the tree.

`passes` refines "first source that yields": each pass asks every source in order for a
first token matched on at least that many tokens.  The default (2, 1) prefers a real
match in any source over a one-token coincidence in the context; (1,) is the paper's
plain order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import tree
from ..ngram import N_MAX, ContextIndex, Lookup, NgramStore, chain_draft, confidence
from ..sampling import SamplingParams
from .base import BaseDrafter, Draft, KeepGoing

SOURCES = ("context", "history", "static")


class HierarchyDrafter(BaseDrafter):
    name = "hd"

    def __init__(
        self,
        history: NgramStore | None = None,
        static: NgramStore | None = None,
        *,
        n_max: int = N_MAX,
        passes: Sequence[int] = (2, 1),
        branches: int = 1,
    ) -> None:
        self.context = ContextIndex(n_max)
        self.n_max = n_max
        self.branches = branches  # most candidate chains per draft (1: a single chain)
        self.history, self.static = history, static
        self.passes = tuple(passes)
        # per source, counted when the target has judged a draft (a tree draft's every
        # branch counts as drafted: an accepted path may run down any of them)
        self.sources = {s: 0 for s in SOURCES}  # drafts verified
        self.tokens = {s: [0, 0] for s in SOURCES}  # [verified, accepted] tokens
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
        order = [(name, source, source.lookup if name == "context" else _remembered(source.lookup))
                 for name, source in self._order()]
        for min_match in self.passes:
            for name, source, lookup in order:
                draft = chain_draft(lookup, context, k, keep_going, source.n_max, min_match)
                if draft.tokens:
                    self.last_source = name
                    if self.branches > 1:
                        alts = self._alternatives(context, k, draft.tokens[0])
                        return _as_tree(draft, alts) if alts else draft
                    return draft
        return Draft()

    def guess(self, context: Sequence[int], drafted: Sequence[int], k: int) -> list[int]:
        """Up to k tokens likely to follow context + drafted, for a draft model to check
        in one batch (the cascade).  Only `context` is indexed: a draft model's guesses
        may be rejected, and the index must never learn them."""
        if k <= 0 or not context:
            return []
        self.context.update(context)
        tail = [*context[-self.n_max :], *drafted][-self.n_max :]
        for min_match in self.passes:
            for _, source in self._order():
                d = chain_draft(source.lookup, tail, k, None, self.n_max, min_match)
                if d.tokens:
                    return d.tokens
        return []

    def _alternatives(self, context: Sequence[int], k: int, first: int) -> list[Draft]:
        """Up to branches - 1 chains starting with other tokens seen after the longest
        suffix each source knows, each continued by chaining in that source.  Works on
        a copy of the tail: the context index must not learn a guess."""
        alts: list[Draft] = []
        used = {first}
        tail = list(context[-self.n_max :])
        for _, source in self._order():
            for n in range(min(self.n_max, len(tail)), 0, -1):
                key = tail[-n:]
                found = source.lookup(key)
                if found is None:
                    continue
                for tok, count in source.next_counts(key):
                    if tok in used:
                        continue
                    used.add(tok)
                    rest = chain_draft(source.lookup, [*tail, tok], k - 1, None, self.n_max)
                    alts.append(Draft([tok, *rest.tokens], None,
                                      [confidence(n, count, found[2]), *rest.confidence]))
                    if len(alts) >= self.branches - 1:
                        return alts
                break  # only the longest match of each source
        return alts

    # lag: 0 (BaseDrafter): indexing the context costs ~1.5 us a token, nothing to weigh

    def accepted(self, context: Sequence[int], n_drafted: int, n_accepted: int) -> None:
        if self.last_source is not None and n_drafted:
            self.sources[self.last_source] += 1
            self.tokens[self.last_source][0] += n_drafted
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
                n = self.sources[s]
                parts.append(f"{s} {n} draft{'s' * (n != 1)}, {acc}/{drafted} tokens accepted")
        return "hd sources: " + ("; ".join(parts) if parts else "no drafts")

    def close(self) -> None:
        for store in (self.history, self.static):
            if store is not None:
                store.close()


def _remembered(lookup: Lookup) -> Lookup:
    """A store's look-up, answering a key it was asked before from memory: a later pass
    asks the earlier one's keys again (one SQLite query each, most rounds finding
    nothing), and a round the target may verify in a few milliseconds cannot spare them."""
    answers: dict[tuple[int, ...], tuple[int, float, float] | None] = {}

    def ask(key: Sequence[int]) -> tuple[int, float, float] | None:
        k = tuple(key)
        if k not in answers:
            answers[k] = lookup(key)
        return answers[k]

    return ask


def _as_tree(main: Draft, alts: list[Draft]) -> Draft:
    """One draft holding the main chain and the alternative chains as sibling branches."""
    tokens, conf = list(main.tokens), list(main.confidence)
    parents = tree.chain(len(tokens))
    for alt in alts:
        base = len(tokens)
        parents += [-1, *range(base, base + len(alt.tokens) - 1)]
        tokens += alt.tokens
        conf += alt.confidence
    return Draft(tokens, None, conf, parents)
