"""A smaller model of the same tokenizer drafts for the target.

Its KV cache follows the accepted text lazily (drafters.follower): rejected guesses
cost one rollback, never a re-prefill.

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
from ..sampling import SamplingParams, draft_token
from . import follower
from .base import BaseDrafter, Draft, KeepGoing
from .worker import Worker

if TYPE_CHECKING:
    from .hierarchy import HierarchyDrafter


class ModelDrafter(BaseDrafter):
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

    def close(self) -> None:
        self.pause()
        if self.helper is not None:
            self.helper.close()

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
        logits = follower.sync(m, context)  # invariant: m holds context + draft, logits follow it
        draft = Draft()
        rows: list[np.ndarray] = []
        while True:
            want = k - len(draft.tokens)
            guess = self.helper.guess(context, draft.tokens, want - 1) if self.helper else []
            ahead = m.eval(guess, range(len(guess))) if guess else ()
            self.guessed += len(guess)
            for j in range(len(guess) + 1):
                hint = guess[j] if j < len(guess) else None
                tok, conf, q = draft_token(logits, params, rng, hint)
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
        draft.probs = rows or None  # unstacked: verify reads a row at a time
        return draft

    def lag(self, context: Sequence[int]) -> int:
        return follower.behind(self.model.tokens, context)

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        if self.helper is not None:  # the cascade's n-gram stores learn; the model does not
            self.helper.finish(tokens, start)

    def describe(self) -> str:
        if self.helper is None:
            return ""
        return (f"cascade: n-gram lookup guessed {self.guessed} tokens for the draft model, "
                f"{self.guess_hits} matched its own choice")

    def reset(self) -> None:
        self.model.truncate(0)  # no compute: safe from this thread while its worker waits
        if self.helper is not None:
            self.helper.reset()

