"""Prompt lookup: draft by copying what followed the latest earlier occurrence of the
context's last n tokens (n from `n_max` down to `n_min`).

Costs almost nothing (dictionary look-ups), so on a CPU, where a draft model loses,
it is the drafting that can pay: summaries, edits and extraction repeat their input.
The index grows incrementally with the context, O(n_max) per new token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..sampling import SamplingParams
from .base import BaseDrafter, Draft, KeepGoing


class LookupDrafter(BaseDrafter):
    name = "lookup"

    def __init__(self, n_max: int = 4, n_min: int = 1) -> None:
        self.n_max, self.n_min = n_max, n_min
        self._seen: list[int] = []  # the context the index covers
        # n -> {n-gram: position right after its latest occurrence (with a continuation)}
        self._index: dict[int, dict[tuple[int, ...], int]] = {}

    def reset(self) -> None:
        self._seen, self._index = [], {}

    def _catch_up(self, context: Sequence[int]) -> None:
        """Index every n-gram of `context` that has at least one token after it."""
        if list(context[: len(self._seen)]) != self._seen:  # a different text: start over
            self.reset()
        start = len(self._seen)
        self._seen = list(context)
        for end in range(max(start, 1), len(context)):  # n-grams ending before `end`
            for n in range(self.n_min, self.n_max + 1):
                if end - n >= 0:
                    key = tuple(context[end - n : end])
                    self._index.setdefault(n, {})[key] = end

    def propose(
        self,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        rng: np.random.Generator,
        keep_going: KeepGoing | None = None,
    ) -> Draft:
        if k <= 0 or not context:
            return Draft()
        self._catch_up(context)
        for n in range(min(self.n_max, len(context)), self.n_min - 1, -1):
            pos = self._index.get(n, {}).get(tuple(context[-n:]))
            if pos is None:
                continue
            tokens = list(context[pos : pos + k])
            conf = n / (n + 1)  # longer matches are likelier right; the budget learns how much
            draft = Draft()
            for tok in tokens:
                draft.tokens.append(tok)
                draft.confidence.append(conf)
                if keep_going is not None and not keep_going(draft.confidence):
                    break
            return draft  # probs None: a deterministic draft, verified as one-hot
        return Draft()
