"""DuoDecoding (Lv et al., 2025): the drafter drafts the next round while the target
verifies this one.

The draft model drafts in its own thread (on the CPU or the GPU, wherever the runtime
measured it faster) and the target verifies on the main thread; llama.cpp releases the
GIL during a forward pass, so the two really run at once.  Each round the budget says
whether to draft beside the pass or in turn (where the two share the cores, overlapping
only slows the pass down); in turn, with no thread of its own yet, the drafter runs on
the caller's thread and nothing runs in the background.  Right after each
proposal the thread starts on the draft the NEXT round needs if all goes as the drafter
expects: this round's draft all accepted, then the target's own next token as the drafter
guesses it, then a draft after that.  If the target agrees, that draft is ready (or
nearly) when asked for; if not, it is dropped and the draft is made from the real
context.  Early work never decides anything: it is only ever a draft, and verification
alone decides what is emitted.

Thread rules, and why:
- the thread starts with a generation's first round drafted beside the target and ends
  with the generation (`pause`): a thread that ran a model keeps an OpenMP pool that
  slows every later step when the pools outnumber the cores (specli.threads);
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

from ..backends.base import Backend
from ..budget import Budget, OverlapBudget
from ..errors import SpecliError
from ..sampling import SamplingParams
from ..tokens import common_prefix
from .base import Draft, KeepGoing
from .model import _choose
from .worker import Worker

StopRule = Callable[[Sequence[float]], bool]
T = TypeVar("T")


@dataclass
class Drafted:
    """Tokens the worker drafted: a chain (parents None) or a tree whose nodes 0..m-1 are
    the main chain and whose other sequences start at the context."""

    tokens: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)  # sampled: each token's q
    parents: list[int] | None = None

    def as_draft(self) -> Draft:
        probs = np.stack(self.rows) if self.rows and self.parents is None else None
        return Draft(list(self.tokens), probs, list(self.confidence), self.parents)

    def trimmed(self, k: int, keep_going: KeepGoing | None) -> Drafted:
        """At most k tokens deep, and a chain cut where the stop rule says so (asked after
        each token, as while drafting)."""
        if self.parents is not None:
            depth: list[int] = []
            for par in self.parents:
                depth.append(depth[par] + 1 if par >= 0 else 0)
            keep = [i for i, d in enumerate(depth) if d < k]
            index = {old: new for new, old in enumerate(keep)}
            parents = [index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in keep]
            return Drafted([self.tokens[i] for i in keep],
                           [self.confidence[i] for i in keep], [], parents)
        n = min(k, len(self.tokens))
        if keep_going is not None:
            n = next((i for i in range(1, n) if not keep_going(self.confidence[:i])), n)
        return Drafted(self.tokens[:n], self.confidence[:n], self.rows[:n], None)


def main_chain(parents: Sequence[int] | None, n: int) -> int:
    """Length of the chain a draft's first sequence forms (all of it for a chain)."""
    if parents is None:
        return n
    return next((i for i, par in enumerate(parents) if par != i - 1), len(parents))


@dataclass
class _Job:
    base: list[int]  # the context its draft follows (speculation: + the guess, once known)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None
    guess: int | None = None  # speculation: the target token it bets on (set by the worker)


class DuoDrafter:
    """A same-tokenizer draft model drafting in its own thread, one round ahead."""

    name = "duo"

    def __init__(self, model: Backend, budget: Budget | None = None, branches: int = 1,
                 timeout_s: float = 120.0, own_thread: bool = False) -> None:
        """`branches`: most sequences of a multi-sequence draft (the target's max_branches);
        `timeout_s`: longest wait for the worker, plus 0.1 s per context token it reads;
        `own_thread`: draft on the worker even in turn (when the draft model's CPU threads
        differ from the target's: see drafters.worker)."""
        self.model = model
        self.own_thread = own_thread
        self.budget = budget
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
        self._top = 0  # length of the chain that speculation continues
        self._dropped: list[_Job] = []  # cancelled jobs, checked for errors once done
        self._known: list[int] = []  # what the draft model holds after the queued jobs
        self._broken: str | None = None
        self._hung = False  # the worker did not answer in time
        self._rng_of: np.random.Generator | None = None
        self._root: np.random.Generator | None = None
        # for --stats
        self.speculated = self.spec_tokens = self.hits = self.trees = self.in_turn = 0

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
        if isinstance(self.budget, OverlapBudget):
            self.budget.ready = got is not None  # its tokens are paid for: only verifying costs
        beside = getattr(self.budget, "overlap", True)  # the budget's call for this round
        if (beside or self.own_thread) and self._worker is None:  # from now on: the worker
            self._worker = Worker("specli-duo-drafter")
            self.stopped = False
        drafted: Drafted | None = None
        if got is not None:
            self.hits += 1
            drafted = got.trimmed(k, keep_going)
        else:
            gen = self._job_rng(params)
            cancel = threading.Event()
            drafted = self._call(lambda: self._grow(ctx, k, params, gen, keep_going, cancel),
                                 len(ctx), cancel)
        draft = drafted.as_draft()
        if draft.parents is not None:
            self.trees += 1
            if self.budget is not None:  # prune now: speculation continues the kept chain
                draft = draft.subtree(self.budget.prune_tree(draft.parents, draft.confidence))
        if beside:
            self._speculate(ctx, draft, k, params)
        else:
            self.in_turn += 1
            self._known = ctx + draft.tokens
        return draft

    def lag(self, context: Sequence[int]) -> int:
        job = self._pending
        if job is not None and not self._still_possible(job, context):
            self._drop(job)  # the target did not follow it: stop spending the cores on it
        known = self._known
        return len(context) - min(common_prefix(known, context), len(context) - 1)

    def accepted(self, n_drafted: int, n_accepted: int) -> None:
        if self._pending is not None and n_accepted < self._top:
            self._drop(self._pending)  # the draft was cut short: its continuation is moot

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
                f"used; in turn in {self.in_turn} rounds (the budget's choice); "
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

    def _speculate(self, ctx: list[int], draft: Draft, k: int, params: SamplingParams) -> None:
        """Start drafting the next round beside this round's verification."""
        top = main_chain(draft.parents, len(draft.tokens))
        base = ctx + draft.tokens[:top]
        if not top or len(base) + 2 >= self.model.n_ctx or self._worker is None:
            return
        job = _Job(base)
        gen = self._job_rng(params)
        rule = self.budget.background_rule() if isinstance(self.budget, OverlapBudget) else None
        job.future = self._worker.submit(lambda: self._guess_and_grow(job, k, params, gen, rule))
        self._pending, self._top, self._known = job, top, base
        self.speculated += 1
        if isinstance(self.budget, OverlapBudget):
            self.budget.beside = k + 1

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
    def _sync(self, context: Sequence[int]) -> np.ndarray:
        """Make the draft cache hold `context` and return the next-token logits."""
        m = self.model
        keep = min(common_prefix(m.tokens, context), len(context) - 1)
        m.truncate(keep)
        fresh = context[keep:]
        return m.eval(fresh, [len(fresh) - 1])[0]

    def _guess_and_grow(self, job: _Job, k: int, params: SamplingParams,
                        rng: np.random.Generator | None, rule: StopRule | None) -> Drafted:
        """The speculation: the target's likely next token after job.base, then a draft
        of up to k tokens after it."""
        if job.cancel.is_set():
            return Drafted()
        guess, _, _ = _choose(self._sync(job.base), params, rng, None)  # type: ignore[arg-type]
        job.guess = guess
        if self.model.is_eog(guess):
            return Drafted()
        out = self._grow([*job.base, guess], k, params, rng, rule, job.cancel)
        self.spec_tokens += 1 + len(out.tokens)  # written by this thread only
        return out

    def _grow(self, context: list[int], n: int, params: SamplingParams,
              rng: np.random.Generator | None, stop: StopRule | None,
              cancel: threading.Event) -> Drafted:
        """Up to n tokens after `context`: a chain, or (greedy, when the first token is in
        doubt) several short sequences."""
        m = self.model
        n = min(n, m.n_ctx - len(context) - 1)
        out = Drafted()
        if n <= 0 or cancel.is_set():
            return out
        logits = self._sync(context)
        alts = _alternatives(logits, self.branches - 1) if params.greedy else []
        switched = False
        while True:
            tok, conf, q = _choose(logits, params, rng, None)  # type: ignore[arg-type]
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
                tok, c, _ = _choose(self._sync(context + seq), params, None, None)  # type: ignore[arg-type]
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
