"""The draft -> verify -> accept loop.

Invariant: the target's KV cache holds every context token but the last one.
Each round feeds that last token plus the draft in ONE target forward pass and
asks for logits only at those positions; verification then keeps a prefix of
the draft plus one token of the target's own (a correction or a bonus), and the
rejected tail is rolled back.  With no drafter this is plain decoding: the same
loop with empty drafts, so both methods share every line that could differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .backends.base import Backend
from .budget import Budget, CostModel, FixedBudget, Outcome
from .drafters.base import Draft, Drafter
from .errors import SpecliError
from .lineup import Lineup, Member, Pick
from .sampling import ProbRows, SamplingParams
from .threads import release_openmp_threads
from .tokens import common_prefix
from .verify import (
    Verdict,
    verify_greedy,
    verify_sampled,
    verify_tree_greedy,
    verify_tree_sampled,
)


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    params: SamplingParams = field(default_factory=SamplingParams)
    draft_max: int = 8  # most tokens drafted per round; the budget picks 0..draft_max
    reuse_prefix: bool = False  # keep a cached prompt prefix (chat turns)
    # asked from another thread to stop (a server's client left, or shutdown): checked
    # between prefill chunks, since a long prompt's prefill can outlast any grace period
    # a server has; the caller checks between the chunks this yields
    stop: Callable[[], bool] | None = None


@dataclass
class Stats:
    n_prompt: int = 0
    n_generated: int = 0
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    n_prefilled: int = 0  # prompt tokens actually evaluated (fewer when a prefix was reused)
    draft_rounds: int = 0  # rounds in which the budget chose to draft
    rounds_by: dict[str, int] = field(default_factory=dict)  # rounds per drafter ("none": plain)
    pass_tokens: int = 0  # tokens fed to target passes (the last context token + drafts)
    # one-token steps of the draft model(s) during this generation, wherever they ran
    # (the duo thread included) and what they took: a drafter's in-pipeline speed
    draft_steps: int = 0
    draft_step_s: float = 0.0
    draft_batches: int = 0  # and evals over several tokens (prompt, catch-ups) between them

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens produced per target forward pass: accepted drafts plus the target's
        own token (1.0 for plain decoding; Spec-Bench's "mean accepted tokens")."""
        return 1.0 + self.accepted / self.target_forwards if self.target_forwards else 0.0

    @property
    def ms_per_pass(self) -> float:
        """Milliseconds per target forward pass (plain steps and verify passes alike)."""
        return 1000 * self.verify_s / self.target_forwards if self.target_forwards else 0.0

    @property
    def pass_size(self) -> float:
        """Tokens per target pass, on average (1.0: plain decoding)."""
        return self.pass_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def ms_per_draft_step(self) -> float:
        """Milliseconds per one-token step of the draft model, in this generation."""
        return 1000 * self.draft_step_s / self.draft_steps if self.draft_steps else 0.0

    @property
    def ms_per_drafted_token(self) -> float:
        """Milliseconds the loop waited for drafts, per drafted token: the draft model's
        steps, its catch-up evals and specli's own work around them (choosing each token,
        its confidence, the sampled rows); for duo, only what a pass beside did not hide."""
        return 1000 * self.draft_s / self.drafted if self.drafted else 0.0

    @property
    def ms_per_round_other(self) -> float:
        """Milliseconds per round outside drafting and target passes: the loop's own work
        (budgets planning, bookkeeping) and the caller's between chunks.  On a GPU a plain
        step takes a few milliseconds, so this is what a round the budget declines adds."""
        other = self.decode_s - self.draft_s - self.verify_s
        return 1000 * other / self.target_forwards if self.target_forwards else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.n_prefilled / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.n_generated / self.decode_s if self.decode_s > 0 else 0.0

    def count_round(self, draft: Draft, n_accepted: int, draft_s: float,
                    verify_s: float) -> None:
        """One round: a target pass over the last token and `draft`."""
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.target_forwards += 1
        self.pass_tokens += 1 + len(draft.tokens)
        self.draft_rounds += bool(draft.tokens)
        by = draft.source if draft.tokens else "none"
        self.rounds_by[by] = self.rounds_by.get(by, 0) + 1
        self.drafted += len(draft.tokens)
        self.accepted += n_accepted

    def as_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = asdict(self)
        for name in ("acceptance_rate", "mean_accepted", "prefill_tok_s", "decode_tok_s",
                     "ms_per_pass", "pass_size", "ms_per_draft_step", "ms_per_drafted_token",
                     "ms_per_round_other"):
            d[name] = getattr(self, name)
        return d


@dataclass
class Result:
    """Filled in while a generation runs, so an interrupted run still has its stats."""

    method: str
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = ""  # "eos", "length", "context", "interrupted"
    stats: Stats = field(default_factory=Stats)
    budget: str = ""  # the draft budget's name, when a drafter ran
    cost_note: str = ""  # the budget's cost model, in words (for --stats)
    drafter_note: str = ""  # where drafts came from, in words (for --stats)
    # the calibrated standalone costs the budget planned with (seconds), to set beside
    # what this run measured: a target pass over n tokens (verify[n - 1]), a draft step
    calibrated: CostModel | None = None


def verify(draft: Draft, logits: np.ndarray, params: SamplingParams, rng) -> Verdict:
    """Greedy: exact match against the target's argmax.  Sampled: speculative
    sampling against the target's distribution, transformed exactly as the draft's."""
    if params.greedy:
        return verify_greedy(draft.tokens, logits.argmax(axis=1).tolist())
    return verify_sampled(draft.tokens, ProbRows(logits, params), draft.probs, rng)


def draft_backends(lineup: Lineup | None) -> list[Backend]:
    """The draft models a lineup's drafters run (none for n-gram drafters)."""
    if lineup is None:
        return []
    found = [m for d in lineup.drafters() if (m := getattr(d, "model", None)) is not None]
    return list({id(b): b for b in found}.values())


def calibrated_costs(lineup: Lineup | None) -> CostModel | None:
    """The calibrated cost model the budgets planned with (several: that of a member
    drafting with a model, else any), or None for fixed budgets."""
    costs = [c for m in (lineup.members if lineup else ())
             if isinstance(c := getattr(m.budget, "base", None), CostModel)]
    return next((c for c in costs if c.draft > 0), costs[0] if costs else None)


def branch_confidence(draft: Draft, path: list[int]) -> list[float]:
    """Confidences along the accepted path of a tree, then of the first candidate after
    it (the one rejected), as if that branch alone had been drafted: what the budget's
    acceptance estimates learn from."""
    assert draft.parents is not None
    last = path[-1] if path else -1
    after = next((i for i, par in enumerate(draft.parents) if par == last), None)
    judged = [*path, after] if after is not None else path
    return [draft.confidence[i] for i in judged]


class Engine:
    def __init__(self, target: Backend, drafter: Drafter | None = None,
                 budget: Budget | None = None, *, lineup: Lineup | None = None) -> None:
        """A drafter and its budget (default: a fixed length, --draft-max), or a lineup of
        several to pick from each round (auto); neither: plain decoding."""
        self.target = target
        self.drafter = drafter
        if lineup is None and drafter is not None:
            lineup = Lineup([Member(drafter.name, drafter, budget or FixedBudget())])
        self.lineup = lineup

    def check_prompt(self, prompt: Sequence[int],
                     advice: str = "raise --ctx or shorten the prompt") -> None:
        """`advice`: the way out of a prompt the context cannot hold (the front end's)."""
        if not prompt:
            raise SpecliError("empty prompt: nothing to continue")
        if len(prompt) >= self.target.n_ctx:
            raise SpecliError(
                f"prompt is {len(prompt)} tokens but the context holds {self.target.n_ctx}; "
                f"{advice}"
            )

    def stream(
        self, prompt: Sequence[int], cfg: GenerationConfig, res: Result
    ) -> Iterator[list[int]]:
        """Yield accepted tokens chunk by chunk while filling `res`."""
        self.check_prompt(prompt)
        try:
            yield from self._rounds(prompt, cfg, res)
        finally:  # however it ended (done, error, Ctrl-C, a closed pipe)
            if self.lineup is not None:
                self.lineup.pause()  # a drafter's own threads end with the generation
            release_openmp_threads()  # and so do this thread's idle OpenMP workers

    def _rounds(
        self, prompt: Sequence[int], cfg: GenerationConfig, res: Result
    ) -> Iterator[list[int]]:
        t, team, st = self.target, self.lineup, res.stats
        if team is not None:
            team.begin()
            res.budget = team.name
            res.cost_note = team.describe_costs()
        rng = cfg.params.rng()
        # the draft models' step clocks, as they stood when this generation began
        clocks = [(c, replace(c)) for m in draft_backends(team)
                  if (c := getattr(m, "step_clock", None)) is not None]
        # A seeded sampled run must replay exactly: its budget then decides from the
        # calibrated costs and the (deterministic) acceptance history, not the clock.
        timed = cfg.params.greedy or cfg.params.seed is None
        start = time.perf_counter()

        # Prefill everything but the last prompt token, with no logits at all.
        keep = min(common_prefix(t.tokens, prompt), len(prompt) - 1) if cfg.reuse_prefix else 0
        t.truncate(keep)
        if not self._prefill(prompt[keep:-1], cfg.stop):
            res.stop_reason = "interrupted"
            return
        if team is not None and not cfg.reuse_prefix:
            team.reset()
        st.n_prompt, st.n_prefilled = len(prompt), len(prompt) - 1 - keep
        st.prefill_s = time.perf_counter() - start

        ctx = list(prompt)
        plain = 0  # plain steps in a row since the last round that drafted
        while True:
            left = cfg.max_tokens - len(res.tokens)
            if left <= 0 or len(ctx) >= t.n_ctx:
                res.stop_reason = "length" if left <= 0 else "context"
                break
            # the round's tokens (accepted drafts and the target's own) end within the
            # context, so a generation stops at the same length whatever was drafted
            k_cap = min(cfg.draft_max, left - 1, t.n_ctx - len(ctx) - 1)
            picks = team.picks(ctx, k_cap, left) if team is not None and k_cap > 0 else []

            t0 = time.perf_counter()
            pick, draft, beside = self._draft(picks, ctx, cfg.params, rng)
            t1 = time.perf_counter()
            accepted, next_token, judged = self._check(ctx, draft, cfg.params, rng)
            t2 = time.perf_counter()
            if team is not None:
                team.observe(pick, Outcome(judged, len(accepted), len(draft.tokens),
                                           (t1 - t0, t2 - t1) if timed else None,
                                           draft.ready, beside, pick.lag if pick else 0,
                                           plain))
            st.count_round(draft, len(accepted), t1 - t0, t2 - t1)
            plain = 0 if draft.tokens else plain + 1

            new = [*accepted, next_token]
            eog = next((i for i, tok in enumerate(new) if t.is_eog(tok)), None)
            if eog is not None:
                new = new[:eog]
            new = new[:left]
            ctx += new
            res.tokens += new
            if team is not None:
                team.accepted(pick, ctx, len(draft.tokens), len(accepted))
            st.n_generated = len(res.tokens)
            if clocks:
                st.draft_steps = sum(c.steps - was.steps for c, was in clocks)
                st.draft_step_s = sum(c.seconds - was.seconds for c, was in clocks)
                st.draft_batches = sum(c.batches - was.batches for c, was in clocks)
            st.decode_s = time.perf_counter() - start - st.prefill_s
            st.wall_s = st.prefill_s + st.decode_s
            if new:
                yield new
            if eog is not None:
                res.stop_reason = "eos"
                break
        st.wall_s = time.perf_counter() - start
        if team is not None:
            res.cost_note = team.describe_costs()  # as tracked online by the end
            res.drafter_note = team.describe()
            res.calibrated = calibrated_costs(team)

    def _prefill(self, tokens: Sequence[int], stop: Callable[[], bool] | None) -> bool:
        """Evaluate `tokens` with no logits; with `stop`, in chunks of the target's batch
        and asked in between (False: stopped, the cache holds what was evaluated)."""
        if stop is None:
            self.target.eval(tokens)
            return True
        step = max(1, self.target.n_batch)
        for i in range(0, len(tokens), step):
            if stop():
                return False
            self.target.eval(tokens[i : i + step])
        return True

    @staticmethod
    def _draft(picks: list[Pick], ctx: list[int], params: SamplingParams,
               rng: np.random.Generator) -> tuple[Pick | None, Draft, int]:
        """The first picked drafter that finds a draft worth verifying (None: a plain
        step), its draft (a tree pruned by its budget to the candidates that pay, a chain
        trimmed to the prefix that pays, a probe's whole), and the tokens it drafts beside
        the pass that verifies it (duo)."""
        for pick in picks:
            d, budget, plan = pick.member.drafter, pick.member.budget, pick.plan
            if not plan.in_turn:
                d.prepare_beside()
            draft = d.propose(ctx, plan.k, params, rng, budget.keep_going)
            if draft.parents is not None:
                draft = draft.subtree(budget.prune_tree(draft.parents, draft.confidence))
            elif not plan.probe and draft.tokens and len(draft.confidence) == len(draft.tokens):
                draft = draft.prefix(budget.trim(draft.confidence))  # (none given: whole)
            if not draft.tokens:
                continue
            draft.source = draft.source or pick.member.name
            beside = 0 if plan.in_turn else d.start_beside(ctx, draft, plan.k, params,
                                                          plan.background)
            return pick, draft, beside
        return None, Draft(), 0

    def _check(
        self, ctx: list[int], draft: Draft, params: SamplingParams, rng: np.random.Generator
    ) -> tuple[list[int], int, list[float]]:
        """One target pass over the last context token and the draft, then the cache
        rolled back to what was accepted.  Returns the accepted draft tokens, the target's
        own next token, and the confidences of the drafted branch that was judged."""
        t = self.target
        if draft.parents is None:
            logits = t.eval([ctx[-1], *draft.tokens], range(len(draft.tokens) + 1))
            v = verify(draft, logits, params, rng)
            t.truncate(len(ctx) + v.n_accepted)
            return draft.tokens[: v.n_accepted], v.next_token, draft.confidence
        tokens, parents = draft.tokens, draft.parents
        logits = t.eval_tree(ctx[-1], tokens, parents)
        if params.greedy:
            tv = verify_tree_greedy(tokens, parents, logits.argmax(axis=1).tolist())
        else:
            tv = verify_tree_sampled(tokens, parents, ProbRows(logits, params), rng)
        t.keep_path(tv.path)
        return [tokens[i] for i in tv.path], tv.next_token, branch_confidence(draft, tv.path)

    def finish(self, tokens: Sequence[int], start: int = 0) -> None:
        """A generation is over (prompt + output in `tokens`, new from `start` on):
        drafters with a memory (hd) learn from it."""
        if self.lineup is not None:
            self.lineup.finish(tokens, start)

    def close(self) -> None:
        """End the drafters' threads and close their stores (the models are the caller's)."""
        if self.lineup is not None:
            self.lineup.close()

    def generate(self, prompt: Sequence[int], cfg: GenerationConfig, method: str) -> Result:
        """Run to the end; for callers that do not stream."""
        res = Result(method=method)
        for _ in self.stream(prompt, cfg, res):
            pass
        return res

