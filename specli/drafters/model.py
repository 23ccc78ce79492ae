"""A smaller model of the same tokenizer drafts for the target.

Its KV cache follows the accepted text lazily: before each proposal it keeps
the longest prefix it shares with the context, rolls the rest back, and feeds
only the new tokens.  So rejected guesses cost one rollback, never a re-prefill.

Cascade (`draft+hd`, after Cascade Speculative Drafting's vertical cascade): n-gram
lookup guesses the draft model's next tokens and the draft model checks a whole guess
in one batch, as the target checks drafts, so it spends fewer sequential steps.  The
check is itself lossless: greedy keeps the draft model's argmax; sampled accepts a
guessed token x with probability q(x), else draws from q without x, so every drafted
token is still distributed exactly as the draft model's q.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..backends.base import Backend
from ..sampling import SamplingParams, probs_from_logits, sample
from ..tokens import common_prefix
from .base import Draft, KeepGoing
from .worker import Worker

if TYPE_CHECKING:
    from .hierarchy import HierarchyDrafter


class ModelDrafter:
    """Autoregressive drafting with a small model; greedy or sampled like the target.
    With a `helper`, n-gram guesses let it draft several tokens per forward pass."""

    name = "draft"

    def __init__(self, model: Backend, helper: HierarchyDrafter | None = None,
                 own_thread: bool = False) -> None:
        """`own_thread`: draft on a thread of its own, for one generation at a time (when
        the draft model's CPU threads differ from the target's: see drafters.worker)."""
        self.model = model
        self.helper = helper
        self.own_thread = own_thread
        self._worker: Worker | None = None
        self.guessed = self.guess_hits = 0  # cascade statistics, for --stats

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
        if not self.own_thread:
            return self._propose(context, k, params, rng, keep_going)
        if self._worker is None:
            self._worker = Worker("specli-drafter")
        job = self._worker.submit(lambda: self._propose(context, k, params, rng, keep_going))
        return job.result()  # type: ignore[return-value]

    def pause(self) -> None:
        """The generation is over: the drafting thread (if any) ends, and its OpenMP pool
        with it."""
        w, self._worker = self._worker, None
        if w is not None:
            w.close(timeout=10.0)

    def _propose(
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
        m = self.model
        logits = self._sync(context)  # invariant: m holds context + draft, logits follow it
        draft = Draft()
        rows: list[np.ndarray] = []
        while True:
            want = k - len(draft.tokens)
            guess = self.helper.guess(context, draft.tokens, want - 1) if self.helper else []
            ahead = m.eval(guess, range(len(guess))) if guess else ()
            self.guessed += len(guess)
            for j in range(len(guess) + 1):
                tok, conf, q = _choose(logits, params, rng, guess[j] if j < len(guess) else None)
                draft.tokens.append(tok)
                draft.confidence.append(conf)
                if q is not None:
                    rows.append(q)
                stop = (len(draft.tokens) == k or m.is_eog(tok)
                        or (keep_going is not None and not keep_going(draft.confidence)))
                if j < len(guess) and tok == guess[j]:
                    self.guess_hits += 1
                    if stop:
                        break
                    logits = ahead[j]  # the guess holds: its logits come for free
                    continue
                if not stop:  # a miss (or past the guess): drop the rest, feed the choice
                    m.truncate(len(context) + len(draft.tokens) - 1)
                    logits = m.eval([tok], [0])[0]
                break
            if stop:
                break
        draft.probs = np.stack(rows) if rows else None
        return draft

    def lag(self, context: Sequence[int]) -> int:
        return len(context) - min(common_prefix(self.model.tokens, context), len(context) - 1)

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        if self.helper is not None:  # the cascade's n-gram stores learn; the model does not
            self.helper.finish(tokens, start)

    def describe(self) -> str:
        if self.helper is None:
            return ""
        return (f"cascade: n-gram lookup guessed {self.guessed} tokens for the draft model, "
                f"{self.guess_hits} matched its own choice")

    def accepted(self, n_drafted: int, n_accepted: int) -> None:
        pass  # the next _sync rolls back whatever was rejected

    def reset(self) -> None:
        self.model.truncate(0)  # no compute: safe from this thread while its worker waits
        if self.helper is not None:
            self.helper.reset()


def _choose(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, guess: int | None
) -> tuple[int, float, np.ndarray | None]:
    """The draft model's token after `logits`, its confidence, and (sampled) the row it
    is distributed as.  A guess changes which random draws happen, never the law."""
    if params.greedy:
        tok = int(np.argmax(logits))
        return tok, _top_probability(logits, tok), None
    q = probs_from_logits(logits, params)
    if guess is not None and guess < q.shape[0]:
        if rng.random() < q[guess]:
            return guess, float(q[guess]), q
        rest = q.copy()
        rest[guess] = 0.0
        if rest.sum() > 0:
            tok = sample(rest, rng)
            return tok, float(q[tok]), q
    tok = sample(q, rng)
    return tok, float(q[tok]), q


def _top_probability(logits: np.ndarray, tok: int) -> float:
    """Softmax probability of `tok`: the drafter's confidence in a greedy guess."""
    return float(1.0 / np.exp(logits - logits[tok]).sum())
