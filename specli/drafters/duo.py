"""DuoDecoding (Lv et al., 2025): the drafter drafts the next round while the target
verifies this one.

The draft model drafts in its own thread (on the CPU or the GPU, wherever the runtime
measured it faster) and the target verifies on the main thread; llama.cpp releases the
GIL during a forward pass, so the two really run at once.  Each round the budget says
whether to draft beside the pass or in turn (where the two share the cores, overlapping
only slows the pass down); in turn, with no thread of its own yet, the drafter runs on
the caller's thread and nothing runs in the background.  Beside: as the pass begins
(`start_beside`) the thread starts on the draft the NEXT round needs if all goes as the
drafter expects: this round's draft all accepted, then the target's own next token as the drafter
guesses it, then a draft after that.  If the target agrees, that draft is ready (or
nearly) when asked for; if not, it is dropped and the draft is made from the real
context.  Early work never decides anything: it is only ever a draft, and verification
alone decides what is emitted.

Thread rules, and why:
- the thread starts with a round drafted beside the target and ends with the generation
  (`pause`), or, where its OpenMP pool and the target's outnumber the cores, as soon as
  nothing is left for it to do and a round goes without drafting beside (unless the
  draft model needs a thread of its own: `own_thread`): a thread that ran a model keeps
  an OpenMP pool that slows every step while the pools outnumber the cores
  (specli.threads).  On the 2-core AMX VM the timing pair's target passes ran
  9.4 ms against 3.9 for plain decoding (median) in the duo runs that drafted at all,
  which had kept the thread to the generation's end, and duo ran at 0.40-0.42x in three
  categories;
- while it lives it is the only one that touches the draft model (a llama.cpp context is
  not thread-safe); the main thread only submits jobs and waits for their results;
- each job samples with its own generator, spawned in submission order from the run's,
  so the verifier's generator is never shared and a seeded run replays exactly: a job's
  length is fixed when it is submitted, never by when verification ends, and only work
  that can no longer be used is cancelled early;
- a job that raises or hangs ends the generation with a SpecliError, never a hang.

Multi-sequence drafting (greedy): when the drafter is unsure of its first token, i.e.
other candidates for it are likelier than its whole chain (the product of the chain's
probabilities), the chain stops there and the remaining tokens go to short sequences
starting with those candidates; the target verifies them all in one pass (a tree).
Sampled drafts stay chains: a tree's tokens are verified as fixed guesses, which would
give up the acceptance that speculative sampling gets from knowing q.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from .. import tree
from ..backends.base import Backend
from ..errors import SpecliError
from ..sampling import SamplingParams, draft_token
from ..tokens import common_prefix
from . import follower
from .base import BaseDrafter, Draft, KeepGoing
from .worker import Worker

T = TypeVar("T")


@dataclass
class Drafted:
    """Tokens the worker drafted: a chain (parents None) or a tree whose nodes 0..m-1 are
    the main chain and whose other sequences start at the context."""

    tokens: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)  # sampled: each token's q
    parents: list[int] | None = None

    def as_draft(self, ready: bool = False) -> Draft:
        probs = list(self.rows) if self.rows and self.parents is None else None
        return Draft(list(self.tokens), probs, list(self.confidence), self.parents,
                     ready=ready)

    def trimmed(self, k: int, keep_going: KeepGoing | None) -> Drafted:
        """A draft made beside the last pass, cut to at most k tokens deep and, a chain,
        where the stop rule says so for tokens already drafted (asked after each one)."""
        if self.parents is not None:
            keep = tree.shallower_than(self.parents, k)
            return Drafted([self.tokens[i] for i in keep], [self.confidence[i] for i in keep],
                           [], tree.subtree(self.parents, keep))
        n = min(k, len(self.tokens))
        if keep_going is not None:
            n = next((i for i in range(1, n)
                      if not keep_going(self.confidence[:i], ready=True)), n)
        return Drafted(self.tokens[:n], self.confidence[:n], self.rows[:n], None)


@dataclass
class _Job:
    base: list[int]  # the context its draft follows (speculation: + the guess, once known)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None
    guess: int | None = None  # speculation: the target token it bets on (set by the worker)


class DuoDrafter(BaseDrafter):
    """A same-tokenizer draft model drafting in its own thread, one round ahead."""

    name = "duo"

    def __init__(self, model: Backend, branches: int = 1, timeout_s: float = 120.0,
                 own_thread: bool = False, end_idle_thread: bool = True) -> None:
        """`branches`: most sequences of a multi-sequence draft (the target's max_branches);
        `timeout_s`: longest wait for the worker, plus 0.1 s per context token it reads;
        `own_thread`: draft on the worker even in turn (when the draft model's CPU threads
        differ from the target's: see drafters.worker); `end_idle_thread`: the worker
        ends within a generation once idle (see the thread rules; False where its OpenMP
        pool beside the target's fits the cores: specli.threads.pools_outnumber_cores)."""
        self.model = model
        self.own_thread = own_thread
        self.end_idle_thread = end_idle_thread and not own_thread
        self.branches = max(1, branches)
        self.timeout_s = timeout_s
        self.stopped = True  # no worker thread is inside the model (it may be freed)
        # The worker thread exists only from a generation's first round drafted beside the
        # target to that generation's end (`pause`): a thread that ran the model keeps an
        # OpenMP pool, and pools beyond the cores slow every model step (specli.threads).
        # Until then the model runs on the caller's thread, in turn with the target.
        self._worker: Worker | None = None
        self._busy_s = 0.0  # drafting time of the workers that ended
        self._pending: _Job | None = None  # the speculation for the next round
        # this round drafts beside the pass: set by `prepare_beside`, cleared in `accepted`
        # once the round is over (the worker stays for the round after it)
        self._beside = False
        self._dropped: list[_Job] = []  # cancelled jobs, checked for errors once done
        self._known: list[int] = []  # what the draft model holds after the queued jobs
        self._broken: str | None = None
        self._hung = False  # the worker did not answer in time
        self._rng_of: np.random.Generator | None = None
        self._root: np.random.Generator | None = None
        # for --stats
        self.rounds = self.speculated = self.spec_tokens = self.hits = self.trees = 0
        self.beside_rounds = 0  # rounds the budget had it draft beside the pass

    # -- the drafter protocol (main thread) ---------------------------------------------
    def propose(
        self,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        rng: np.random.Generator,
        keep_going: KeepGoing | None = None,
    ) -> Draft:
        if self._broken is not None:
            raise SpecliError(self._broken)
        ctx = list(context)
        k = min(k, self.model.n_ctx - len(ctx) - 1)
        if k <= 0:
            return Draft()
        self._check_dropped()
        if rng is not self._rng_of:  # a new generation: its own line of job generators
            self._rng_of, self._root = rng, rng.spawn(1)[0]
        job, self._pending = self._pending, None
        got: Drafted | None = None
        if job is not None and self._still_possible(job, ctx):
            got = self._wait(job, len(ctx))
            got = got if job.guess == ctx[-1] and got.tokens else None
        elif job is not None:
            self._drop(job)
        if self.own_thread and self._worker is None:  # its threads differ: never this one
            self._start_worker()
        elif not self._beside:  # in turn: on this thread, with no second pool alive
            self._idle_worker_ends()
        self.rounds += 1
        if got is not None:  # drafted beside the last pass: its tokens are paid for
            self.hits += 1
            drafted = got.trimmed(k, keep_going)
        else:
            gen = self._job_rng(params)
            cancel = threading.Event()
            drafted = self._call(lambda: self._grow(ctx, k, params, gen, keep_going, cancel),
                                 len(ctx), cancel)
        self.trees += drafted.parents is not None
        self._known = ctx + drafted.tokens
        return drafted.as_draft(ready=got is not None)

    def prepare_beside(self) -> None:
        """From a round drafted beside the target until the worker ends (see the thread
        rules), drafts run on the worker thread (a job that hangs there ends the
        generation, never a hang)."""
        self._beside = True
        if self._worker is None:
            self._start_worker()

    def start_beside(self, context: Sequence[int], draft: Draft, k: int,
                     params: SamplingParams, rule: KeepGoing | None) -> int:
        """Start drafting the next round beside this round's verification (the draft as
        the engine will verify it: pruned).  Returns the tokens it drafts beside."""
        self.beside_rounds += 1
        return self._speculate(list(context), draft, k, params, rule)

    def lag(self, context: Sequence[int]) -> int:
        return follower.behind(self._known, context)  # what the model holds once idle

    def accepted(self, context: Sequence[int], n_drafted: int, n_accepted: int) -> None:
        job = self._pending
        if job is not None and not self._still_possible(job, context):
            self._drop(job)  # the target did not follow it: stop spending the cores on it
        # a round that did not draft beside, with nothing left for the worker: the next
        # pass runs alone (after a bet the target did not follow, the next round likely
        # drafts beside again: the worker and its pool stay for it)
        if self._pending is None and not self._beside:
            self._idle_worker_ends()
        self._beside = False

    def reset(self) -> None:
        if self._pending is not None:
            self._drop(self._pending)
        self._known = []
        self._call(lambda: self.model.truncate(0), 0)

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        self.pause()

    def pause(self) -> None:
        """The generation is over: drop what is pending and end the worker thread, so no
        thread of ours holds cores (or an OpenMP pool) until the next one drafts beside."""
        if self._pending is not None:
            self._drop(self._pending)
        self._dropped = []  # what they did no longer matters
        self._beside = False
        self._end_worker()

    def _idle_worker_ends(self) -> None:
        """Within a generation: the worker, idle, ends where `end_idle_thread` says so
        (see the thread rules); then a dropped job's failure is raised."""
        if self._worker is not None and self.end_idle_thread and not self._hung:
            self._end_worker()
            self._check_dropped()

    def _end_worker(self) -> None:
        w = self._worker
        if w is None:
            return
        # a worker that hung has had its timeout: close() alone waits for it again
        self.stopped = w.close(timeout=0.0 if self._hung else 10.0)
        if self.stopped:
            self._busy_s += w.busy_s
            self._worker = None
        elif self._broken is None:
            self._broken = "the duo drafter thread did not stop within 10 s"

    def describe(self) -> str:
        busy = self._busy_s + (self._worker.busy_s if self._worker is not None else 0.0)
        return (f"duo: drafted beside verification in {self.speculated} rounds "
                f"({self.spec_tokens} tokens, guesses included), {self.hits} of those drafts "
                f"used; in turn in {self.rounds - self.beside_rounds} rounds (the budget's "
                "choice); "
                f"{self.trees} multi-sequence drafts; drafter thread busy {busy:.2f} s")

    def close(self) -> None:
        self._hung = False  # one last, patient wait
        self.pause()

    # -- main-thread helpers --------------------------------------------------------------
    def _call(self, fn: Callable[[], T], n_ctx: int,
              cancel: threading.Event | None = None) -> T:
        """Run fn on the model's thread: the worker while it lives, else this one
        (`cancel`: what fn watches, set if the worker does not answer in time)."""
        if self._broken is not None:
            raise SpecliError(self._broken)
        if self._worker is not None:
            job = _Job([], cancel or threading.Event(), self._worker.submit(fn))
            return self._wait(job, n_ctx)  # type: ignore[return-value]
        try:
            return fn()
        except SpecliError:
            raise
        except Exception as e:
            raise self._fail(e) from e

    def _still_possible(self, job: _Job, ctx: Sequence[int]) -> bool:
        """Whether the context can still be the one the speculation bet on."""
        n = len(job.base)
        if len(ctx) != n + 1 or (job.guess is not None and ctx[n] != job.guess):
            return False
        return common_prefix(job.base, ctx) == n

    def _start_worker(self) -> None:
        self._worker = Worker("specli-duo-drafter")
        self.stopped = False

    def _speculate(self, ctx: list[int], draft: Draft, k: int, params: SamplingParams,
                   rule: KeepGoing | None) -> int:
        """The next round's draft, on the worker: the target's likely token after this
        draft's main chain, then up to k tokens after it."""
        top = tree.main_chain(draft.parents, len(draft.tokens))
        base = ctx + draft.tokens[:top]
        if not top or len(base) + 2 >= self.model.n_ctx or self._worker is None:
            return 0
        job = _Job(base)
        gen = self._job_rng(params)
        job.future = self._worker.submit(lambda: self._guess_and_grow(job, k, params, gen, rule))
        self._pending, self._known = job, base
        self.speculated += 1
        return k + 1

    def _job_rng(self, params: SamplingParams) -> np.random.Generator | None:
        if params.greedy or self._root is None:
            return None
        return self._root.spawn(1)[0]

    def _drop(self, job: _Job) -> None:
        job.cancel.set()
        self._dropped.append(job)
        if self._pending is job:
            self._pending = None

    def _check_dropped(self) -> None:
        """Dropped work is never waited for, but its failure must not go unseen."""
        live = []
        for job in self._dropped:
            if job.future is None or not job.future.done():
                live.append(job)
            elif (e := job.future.exception()) is not None:
                raise self._fail(e) from e
        self._dropped = live

    def _wait(self, job: _Job, n_ctx: int) -> Drafted:
        assert job.future is not None
        try:
            return job.future.result(timeout=self.timeout_s + 0.1 * n_ctx)
        except FutureTimeout:
            job.cancel.set()
            self._hung = True
            self._broken = (f"the duo drafter thread did not answer within "
                            f"{self.timeout_s + 0.1 * n_ctx:.0f} s")
            raise SpecliError(self._broken) from None
        except Exception as e:  # one line for the user; the draft model is now suspect
            raise self._fail(e) from e

    def _fail(self, e: BaseException) -> SpecliError:
        self._broken = f"the duo drafter failed: {type(e).__name__}: {e}"
        return SpecliError(self._broken)

    # -- worker-thread jobs ---------------------------------------------------------------
    def _guess_and_grow(self, job: _Job, k: int, params: SamplingParams,
                        rng: np.random.Generator | None, rule: KeepGoing | None) -> Drafted:
        """The speculation: the target's likely next token after job.base, then a draft
        of up to k tokens after it."""
        if job.cancel.is_set():
            return Drafted()
        guess, _, _ = draft_token(follower.sync(self.model, job.base), params, rng)
        job.guess = guess
        if self.model.is_eog(guess):
            return Drafted()
        out = self._grow([*job.base, guess], k, params, rng, rule, job.cancel)
        self.spec_tokens += 1 + len(out.tokens)  # written by this thread only
        return out

    def _grow(self, context: list[int], n: int, params: SamplingParams,
              rng: np.random.Generator | None, stop: KeepGoing | None,
              cancel: threading.Event) -> Drafted:
        """Up to n tokens after `context`: a chain, or (greedy, when the first token is in
        doubt) several short sequences."""
        m = self.model
        n = min(n, m.n_ctx - len(context) - 1)
        out = Drafted()
        if n <= 0 or cancel.is_set():
            return out
        logits = follower.sync(m, context)
        alts = _alternatives(logits, self.branches - 1) if params.greedy else []
        switched = False
        while True:
            tok, conf, q = draft_token(logits, params, rng)
            out.tokens.append(tok)
            out.confidence.append(conf)
            if q is not None:
                out.rows.append(q)
            if len(out.tokens) >= n or m.is_eog(tok) or cancel.is_set():
                break
            if stop is not None and not stop(out.confidence):
                break
            rivals = [p for a, p in alts if a != out.tokens[0]]
            if rivals and math.prod(out.confidence) < rivals[0]:
                switched = True  # another first token is likelier than this chain goes on
                break
            logits = m.eval([tok], [0])[0]
        if alts and not cancel.is_set():
            self._branch(context, out, alts, n if switched else len(out.tokens), params)
        return out

    def _branch(self, context: list[int], out: Drafted, alts: list[tuple[int, float]],
                n: int, params: SamplingParams) -> None:
        """Sequences after the first-token candidates likelier than the main chain: each as
        long as the chain at most, within n tokens in all (a lone candidate is free)."""
        chain = len(out.tokens)
        whole = math.prod(out.confidence)
        rivals = [(a, p) for a, p in alts if a != out.tokens[0] and p > whole]
        if not rivals:
            return
        out.parents = list(range(-1, chain - 1))
        left = n - chain
        for a, p in rivals:
            seq, conf = [a], [p]
            while len(seq) < chain and left > 0:
                tok, c, _ = draft_token(follower.sync(self.model, context + seq), params, None)
                seq.append(tok)
                conf.append(c)
                left -= 1
                if self.model.is_eog(tok):
                    break
            first = len(out.tokens)
            out.parents += [-1] + list(range(first, first + len(seq) - 1))
            out.tokens += seq
            out.confidence += conf


def _alternatives(logits: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n + 1 likeliest first tokens with their probabilities, likeliest first (the
    chosen token is among them; callers skip it)."""
    if n <= 0:
        return []
    x = np.asarray(logits, dtype=np.float64)
    top = np.argpartition(x, -(n + 1))[-(n + 1):]
    p = np.exp(x[top] - x.max()) / np.exp(x - x.max()).sum()
    order = np.argsort(-p, kind="stable")
    return [(int(top[i]), float(p[i])) for i in order]
