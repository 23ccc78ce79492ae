"""A smaller model of the same tokenizer drafts for the target.

Its KV cache follows the accepted text lazily: before each proposal it keeps
the longest prefix it shares with the context, rolls the rest back, and feeds
only the new tokens.  So rejected guesses cost one rollback, never a re-prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..backends.base import Backend
from ..errors import SpecliError
from ..sampling import SamplingParams, probs_from_logits, sample
from ..tokens import common_prefix
from .base import Draft, KeepGoing


def check_same_tokenizer(target: Backend, draft: Backend) -> None:
    """Same-vocabulary drafting is only lossless-and-useful if token ids mean the
    same strings in both models: compare every token's text, not just sizes."""
    t_texts, d_texts = target.vocab_texts(), draft.vocab_texts()
    n = min(len(t_texts), len(d_texts))
    first_diff = next((i for i in range(n) if t_texts[i] != d_texts[i]), None)
    # a few padding ids at the end of one vocabulary are harmless (llama.cpp allows 128)
    if first_diff is None and abs(len(t_texts) - len(d_texts)) <= 128:
        return
    where = (
        f"token {first_diff} is {t_texts[first_diff]!r} vs {d_texts[first_diff]!r}"
        if first_diff is not None
        else "different vocabulary sizes"
    )
    raise SpecliError(
        f"draft {Path(draft.path).name} uses a different tokenizer than target "
        f"{Path(target.path).name} ({len(d_texts)} vs {len(t_texts)} tokens; {where}); "
        "cross-tokenizer drafting is not supported yet"
    )


class ModelDrafter:
    """Autoregressive drafting with a small model; greedy or sampled like the target."""

    name = "draft"

    def __init__(self, model: Backend) -> None:
        self.model = model

    def _sync(self, context: Sequence[int]) -> np.ndarray:
        """Make the cache hold `context` and return the next-token logits."""
        m = self.model
        keep = common_prefix(m.tokens, context)
        keep = min(keep, len(context) - 1)  # re-feed at least one token to get logits
        m.truncate(keep)
        fresh = context[keep:]
        return m.eval(fresh, [len(fresh) - 1])[0]

    def propose(
        self,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        rng: np.random.Generator,
        keep_going: KeepGoing | None = None,
    ) -> Draft:
        k = min(k, self.model.n_ctx - len(context))
        if k <= 0:
            return Draft()
        logits = self._sync(context)
        draft = Draft()
        rows: list[np.ndarray] = []
        for i in range(k):
            if params.greedy:
                tok = int(np.argmax(logits))
                conf = _top_probability(logits, tok)
            else:
                q = probs_from_logits(logits, params)
                tok = sample(q, rng)
                conf = float(q[tok])
                rows.append(q)
            draft.tokens.append(tok)
            draft.confidence.append(conf)
            if i == k - 1 or self.model.is_eog(tok):
                break
            if keep_going is not None and not keep_going(draft.confidence):
                break
            logits = self.model.eval([tok], [0])[0]
        draft.probs = np.stack(rows) if rows else None
        return draft

    def lag(self, context: Sequence[int]) -> int:
        return len(context) - min(common_prefix(self.model.tokens, context), len(context) - 1)

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        pass  # no memory across generations

    def describe(self) -> str:
        return ""

    def accepted(self, n_drafted: int, n_accepted: int) -> None:
        pass  # the next _sync rolls back whatever was rejected

    def reset(self) -> None:
        self.model.truncate(0)


def _top_probability(logits: np.ndarray, tok: int) -> float:
    """Softmax probability of `tok`: the drafter's confidence in a greedy guess."""
    return float(1.0 / np.exp(logits - logits[tok]).sum())
