"""How much to draft: a hardware-aware budget from measured costs and acceptance.

On a CPU, verifying k tokens costs far more than one step, and a draft model costs
a good fraction of the target; on a GPU verification is nearly flat in k.  So the
draft length that pays differs by an order of magnitude between machines, and a
fixed length loses somewhere.  Each round we pick the length k (0 = a plain
step) that maximises expected tokens per second,

    rate(k) = E[tokens | k] / (k * draft_cost + verify_cost(k + 1)),
    E[tokens | k] = 1 + sum_{i<=k} prod_{j<=i} p_j,

with p_j the estimated probability that draft token j is accepted given the ones
before it were.  While drafting, the drafter's own confidence refines p_j and
drafting stops once one more token is expected to cost more than it pays
(SpecDec++'s stop rule, in expected-rate form).

With a drafter that works beside the target (duo), a round costs about the larger of
drafting and verifying instead of their sum, when the next round's draft made in the
background turns out to be the one needed; `overlap_rate` weighs that (see there).
Pure: numbers in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .tree import depths

CONF_EDGES = (0.3, 0.5, 0.7, 0.85, 0.95)  # drafter confidence bins: [0,.3) [.3,.5) ... [.95,1]


STEPWISE_LAG = 3  # the longest catch-up read token by token where that measured faster
STEPWISE_GAIN = 0.9  # ... by at least 10%, so noise never flips it (2-core CPU: a tie)


@dataclass
class CostModel:
    """Seconds per target forward of n tokens (`verify[n-1]`, n = 1..len) and per
    drafted token.  Measured by calibration, then tracked online."""

    verify: list[float]
    # a drafted token as drafting rounds pay it: right after a target pass (calibrate.
    # measure_draft_round); `draft_alone`: back to back, the drafter with nothing between
    # its steps (0: not measured).  On a CPU a drafter that fits the caches loses them to
    # each pass: the 27M timing drafter's step cost 2.3-2.6x after one.
    draft: float
    draft_alone: float = 0.0
    catch_up: float = 0.0  # per token the drafter must read (in a batch) before drafting
    # Drafting beside verification (duo): a target pass runs this many times slower while
    # the drafter works next to it (they share cores or memory bandwidth; 1.0: unaffected),
    # and a token drafted meanwhile costs `overlap_draft` seconds (0: not measured, `draft`).
    overlap_verify: float = 1.0
    overlap_draft: float = 0.0
    # A drafting round that first reads two tokens then drafts three, timed with the two
    # read in one batch and token by token (calibrate.measure_catch_up; 0: not measured)
    round_batched: float = 0.0
    round_stepwise: float = 0.0
    # what the two plain steps after a verify pass cost beyond two steady ones (a runtime
    # keeping one graph per shape pays it; a CPU not).  Measured, not planned with: in a
    # simulation of an H200-like pair (5.35 ms step, 1-2 ms of it), charging it to the
    # first draft after a plain step moved the rate by -2.4% to +0.1% at every acceptance
    # (drafting runs last long; most switches back are probes), so --stats only says it.
    shape_change: float = 0.0

    def beside_draft(self) -> float:
        """Seconds per token the drafter takes while a target pass runs beside it."""
        return self.overlap_draft if self.overlap_draft > 0 else self.draft

    def verify_cost(self, n: int) -> float:
        """Cost of one target pass over n tokens; linear beyond the measured range."""
        if n <= len(self.verify):
            return self.verify[n - 1]
        if len(self.verify) == 1:
            return self.verify[0] * n
        slope = max(self.verify[-1] - self.verify[-2], 0.0)
        return self.verify[-1] + slope * (n - len(self.verify))

    def round_cost(self, k: int) -> float:
        return k * self.draft + self.verify_cost(k + 1)

    @property
    def catch_up_stepwise(self) -> int:
        """The longest lag the drafter reads token by token, as drafting steps: where
        that measured clearly faster than one batch (a runtime that keeps a graph per
        shape: llama.cpp on CUDA); 0: every catch-up in one batch."""
        faster = self.round_stepwise < STEPWISE_GAIN * self.round_batched
        return STEPWISE_LAG if faster else 0

    def catch_up_cost(self, lag: int) -> float:
        """Seconds for a drafter `lag` tokens behind to read them."""
        return lag * (self.draft if lag <= self.catch_up_stepwise else self.catch_up)


def with_costs(cost: CostModel, **changes: float | list[float]) -> CostModel:
    """`dataclasses.replace(cost, **changes)`, for the budgets' hot paths: replace goes
    through __init__ and took ~8 us a call on a 2-core VM, asked several times a round."""
    copy = CostModel.__new__(CostModel)
    copy.__dict__.update(cost.__dict__, **changes)
    return copy


def expected_tokens(p: Sequence[float]) -> float:
    """Tokens one round yields when draft token i is accepted with probability p[i]
    (given its predecessors were): the target's own token plus the accepted prefix."""
    total, survive = 1.0, 1.0
    for pi in p:
        survive *= pi
        total += survive
    return total


def rate(cost: CostModel, p: Sequence[float], setup: float = 0.0) -> float:
    """Expected tokens per second of a round drafting len(p) tokens; `setup` is extra
    time the round pays only if it drafts (the drafter catching up)."""
    return expected_tokens(p) / (cost.round_cost(len(p)) + (setup if p else 0.0))


def best_length(
    cost: CostModel, p: Sequence[float], k_max: int, lag: int = 0, horizon: float = 1e9,
    min_gain: float = 1.0,
) -> int:
    """The draft length in 0..k_max with the highest expected tokens per second.

    A drafter `lag` tokens behind must first read them (`catch_up_cost`); that
    is paid once and then serves the rest of the generation, so each round is charged
    its share: the fraction of the `horizon` (tokens left) the round produces.  A draft
    must beat a plain step's rate by the factor `min_gain`."""
    best_k, best_rate = 0, rate(cost, []) * min_gain
    survive, tokens = 1.0, 1.0  # carried from one length to the next (asked every round)
    catch_up, horizon = cost.catch_up_cost(lag), max(horizon, 1.0)
    k_top = min(k_max, len(p))
    draft, verify, n_verify = cost.draft, cost.verify, len(cost.verify)
    for k in range(1, k_top + 1):
        # cost.round_cost(k), inlined: asked several times a round, every round
        spent = k * draft + (verify[k] if k < n_verify else cost.verify_cost(k + 1))
        # no longer draft can beat the best so far: each adds at most `survive` tokens
        # and costs no less than this one (calibration keeps pass costs nondecreasing),
        # so stopping here picks what trying every length picks; a round the estimates
        # decline stops after a length or two
        if (tokens + survive * (k_top - k + 1)) / spent <= best_rate:
            break
        survive *= p[k - 1]
        tokens += survive  # expected_tokens(p[:k])
        r = tokens / (spent + catch_up * min(1.0, tokens / horizon))  # amortised_rate
        if r > best_rate:
            best_k, best_rate = k, r
    return best_k


def amortised_rate(cost: CostModel, p: Sequence[float], lag: int = 0,
                   horizon: float = 1e9) -> float:
    """`rate` with the drafter's catch-up charged by the round's share of the horizon."""
    share = min(1.0, expected_tokens(p) / max(horizon, 1.0))
    return rate(cost, p, cost.catch_up_cost(lag) * share)


def best_tree(cost: CostModel, parents: Sequence[int], p: Sequence[float],
              min_gain: float = 1.0) -> list[int]:
    """Which nodes of a candidate tree to verify (sorted indices; [] = a plain step).

    `p[i]`: probability node i is accepted given its parent was.  A node yields a token
    with the product of p along its path, so the best set of N nodes holds the N likeliest
    paths, and it is closed under parents (a path is never likelier than its prefix; ties
    go to the earlier node, and parents come first).  N is chosen as a chain's length is:
    the highest expected tokens per second of one pass over N + 1 tokens."""
    path_p: list[float] = []
    for i, par in enumerate(parents):
        path_p.append(p[i] * (path_p[par] if par >= 0 else 1.0))
    order = sorted(range(len(parents)), key=lambda i: (-path_p[i], i))
    best_n, best_rate, tokens = 0, min_gain / cost.round_cost(0), 1.0
    for n, i in enumerate(order, start=1):
        tokens += path_p[i]
        r = tokens / (n * cost.draft + cost.verify_cost(n + 1))
        if r > best_rate:
            best_n, best_rate = n, r
    return sorted(order[:best_n])


def exclusive(parents: Sequence[int], p: Sequence[float],
              confidence: Sequence[float]) -> list[float]:
    """Siblings are exclusive (the target takes one token), so their acceptance estimates,
    learnt one chain at a time, must not add up to more than the best of them: each is
    weighted by its share of the siblings' confidence."""
    groups: dict[int, list[int]] = {}
    for i, par in enumerate(parents):
        groups.setdefault(par, []).append(i)
    out = list(p)
    for kids in groups.values():
        if len(kids) > 1:
            total = sum(confidence[i] for i in kids)
            for i in kids:
                out[i] = p[i] * (confidence[i] / total if total > 0 else 1.0 / len(kids))
    return out


def keep_drafting(cost: CostModel, p_so_far: Sequence[float], p_next: float) -> bool:
    """Draft one more token only if the round's expected rate improves."""
    return rate(cost, [*p_so_far, p_next]) > rate(cost, p_so_far)


def overlapped_verify(cost: CostModel, n: int, busy: float) -> float:
    """A target pass over n tokens while the drafter works for `busy` seconds beside it:
    slower by `overlap_verify` while both run, at full speed once the drafter is done."""
    w = cost.verify_cost(n)
    slow = max(cost.overlap_verify, 1.0)
    return min(w * slow, w + busy * (1.0 - 1.0 / slow))


def overlap_rate(cost: CostModel, p: Sequence[float], p_guess: float, lag: int = 0,
                 horizon: float = 1e9) -> float:
    """Expected tokens per second when each round drafts len(p) tokens and, while the target
    verifies them, the drafter drafts the next round's draft beside it: a guess of the
    target's own next token, then len(p) tokens after it.

    That work is used (a hit) only if the target accepts all of p and its next token is
    the guess (probability prod(p) * p_guess); the round then waits only for what drafting
    had not finished when the pass ended.  Otherwise (a miss) it is dropped and the draft
    is made in the open, as without overlap.  Steady state: the two kinds of round mix with
    the hit probability, and every pass runs with the drafter beside it."""
    k = len(p)
    if k == 0:
        return 1.0 / cost.verify_cost(1)
    beside = cost.beside_draft()
    busy = (k + 1) * beside
    verify = overlapped_verify(cost, k + 1, busy)
    hit = math.prod(p) * p_guess
    late = max(0.0, busy - verify) * (cost.draft / beside if beside > 0 else 0.0)
    share = min(1.0, expected_tokens(p) / max(horizon, 1.0))
    catch_up = cost.catch_up_cost(lag) * share
    return expected_tokens(p) / (verify + hit * late + (1.0 - hit) * k * cost.draft + catch_up)


def best_overlap_length(
    cost: CostModel, p: Sequence[float], k_max: int, lag: int = 0, horizon: float = 1e9,
    min_gain: float = 1.0,
) -> int:
    """`best_length` for drafting beside verification: `p` holds one estimate more than
    the longest draft considered (for the guess of the target's token after it).  Asked
    every round, so `overlap_rate`'s sums are carried from one length to the next."""
    best_k, best_rate = 0, rate(cost, []) * min_gain
    beside = cost.beside_draft()
    late_share = cost.draft / beside if beside > 0 else 0.0
    catch_up_all, horizon = cost.catch_up_cost(lag), max(horizon, 1.0)
    survive, tokens = 1.0, 1.0  # prod(p[:k]) and expected_tokens(p[:k])
    slow = max(cost.overlap_verify, 1.0)
    hidden = 1.0 - 1.0 / slow
    passes, n_passes = cost.verify, len(cost.verify)
    for k in range(1, min(k_max, len(p) - 1) + 1):
        survive *= p[k - 1]
        tokens += survive
        busy = (k + 1) * beside
        # overlapped_verify(cost, k + 1, busy), inlined
        w = passes[k] if k < n_passes else cost.verify_cost(k + 1)
        verify = min(w * slow, w + busy * hidden)
        hit = survive * p[k]
        late = max(0.0, busy - verify) * late_share
        catch_up = catch_up_all * min(1.0, tokens / horizon)
        r = tokens / (verify + hit * late + (1.0 - hit) * k * cost.draft + catch_up)
        if r > best_rate:
            best_k, best_rate = k, r
    return best_k


def best_duo_round(
    cost: CostModel, p: Sequence[float], k_max: int, lag: int = 0, horizon: float = 1e9,
    min_gain: float = 1.0,
) -> tuple[int, bool]:
    """A duo drafter's round: (draft length, True to draft the next round beside the pass
    or False to draft in turn).  Beside wins where the two run apart (a target on a GPU,
    a drafter on idle cores); in turn wins where they share cores (a 2-core CPU, where a
    pass runs ~2x slower beside the drafter), so duo never does worse than drafting in
    turn on the measured hardware.  (0, False): a plain step."""
    k_beside = best_overlap_length(cost, p, k_max, lag, horizon, min_gain)
    k_turn = best_length(cost, p[:k_max], k_max, lag, horizon, min_gain)
    if not k_beside and not k_turn:
        return 0, False
    beside = overlap_rate(cost, p[:k_beside], p[k_beside], lag, horizon) if k_beside else 0.0
    turn = amortised_rate(cost, p[:k_turn], lag, horizon) if k_turn else 0.0
    return (k_beside, True) if beside >= turn else (k_turn, False)


def duo_rate(cost: CostModel, p: float, k_max: int) -> float:
    """Best expected tokens per second of a duo drafter with these costs when every draft
    token is accepted with probability p: beside or in turn, whichever pays (a plain
    step if neither does)."""
    ps = [p] * (k_max + 1)
    k, beside = best_duo_round(cost, ps, k_max)
    if k == 0:
        return rate(cost, [])
    return overlap_rate(cost, ps[:k], p) if beside else rate(cost, ps[:k])


PLACEMENT_ACCEPTANCE = (0.5, 0.7, 0.9)  # per-token acceptance a placement is judged at


def choose_placement(costs: dict[str, CostModel], k_max: int = 8) -> tuple[str, dict[str, float]]:
    """Where the draft model should run, from its calibrated costs in each place (e.g. on
    the GPU beside the target's layers, or on the CPU drafting beside the GPU): the place
    with the best expected speed over plain decoding, averaged over a spread of acceptance
    rates (acceptance is the same model wherever it runs; only the costs differ).
    Returns (place, expected speedup of each place over a plain step)."""
    speedups = {}
    for place, cost in costs.items():
        plain = rate(cost, [])
        speedups[place] = sum(duo_rate(cost, p, k_max) / plain
                              for p in PLACEMENT_ACCEPTANCE) / len(PLACEMENT_ACCEPTANCE)
    best = max(speedups, key=lambda name: speedups[name])
    return best, speedups


_COUNTS = ("pos_hits", "pos_tries", "slow_hits", "slow_tries", "conf_hits", "conf_tries")


@dataclass
class Acceptance:
    """Online acceptance estimates: per draft position, and per bin of the drafter's
    confidence (its probability for the token it proposed).  Beta-smoothed counts,
    decayed so the estimates follow the text as it changes.

    Per position, a long memory too (`slow_decay`), which `relax` lifts the short one
    toward while the budget sits out: the short memory learns only from drafts, and a
    budget stops drafting just when it dipped, so without that it would stay at its dip.

    `calibrated`: the drafter's confidence is itself a probability of acceptance (hd's
    n-gram look-ups, `ngram.confidence`).  A token is then judged by its own confidence,
    its log-odds shifted by one number learnt online from every judged token, all
    confidences pooled (a logistic regression on a bias alone, one Newton step a token):
    a text copies well or badly as a whole (Spec-Bench answers: summaries 0.81 right where
    the confidences said 0.71 on average, role play 0.27 where they said 0.39).  Not by
    a bin's rate: that is as good as the mix of tokens that taught it, and the mix
    changes from one text to the next."""

    prior_mean: float = 0.6
    prior_weight: float = 2.0
    decay: float = 0.95
    slow_decay: float = 0.995
    relax_rate: float = 0.05  # per idle round (0: estimates stay where drafting left them)
    positions: int = 64
    pos_hits: list[float] = field(default_factory=list)
    pos_tries: list[float] = field(default_factory=list)
    slow_hits: list[float] = field(default_factory=list)
    slow_tries: list[float] = field(default_factory=list)
    conf_hits: list[float] = field(default_factory=lambda: [0.0] * (len(CONF_EDGES) + 1))
    conf_tries: list[float] = field(default_factory=lambda: [0.0] * (len(CONF_EDGES) + 1))
    calibrated: bool = False
    shift: float = 0.0  # calibrated: added to each confidence's log-odds
    shift_info: float = 0.0  # calibrated: what the judged tokens said of it (decayed)
    said_weight: float = 3.0  # calibrated: tokens' worth of belief in the confidences
    # Asked several times a round (the plan, the stop rule per drafted token) and costing
    # a loop over positions each time: on a GPU a round the budget declines is a few
    # milliseconds, and its planning is paid on top.  So the positions ever judged are
    # counted (the rest hold zeros, which decaying and relaxing leave as they are) and
    # by_position's answer is kept until the counts change.
    reached: int = 0  # positions 0..reached-1 have been judged at least once
    _by_pos: list[float] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("pos_hits", "pos_tries", "slow_hits", "slow_tries"):
            setattr(self, name, getattr(self, name) or [0.0] * self.positions)
        tried = [i for i, counts in enumerate(zip(self.pos_hits, self.pos_tries, self.slow_hits,
                                                  self.slow_tries, strict=True)) if any(counts)]
        self.reached = max(self.reached, tried[-1] + 1 if tried else 0)

    def by_position(self, k: int) -> list[float]:
        """p_i for i = 1..k from position statistics (conditional on reaching i).  A
        position seldom reached leans on the one before it, not on the fixed prior: a
        drafter that was only ever asked for one token (duo on a GPU, at first) would
        otherwise keep every deeper position at the prior and never be asked for more."""
        n = min(k, self.positions)
        if n <= 0:
            return []
        out = self._first(n)
        return out[:n] + [out[n - 1]] * (k - n)

    def at_position(self, i: int) -> float:
        """by_position(i + 1)[i]: the estimate for draft position i alone."""
        n = min(i + 1, self.positions)
        return self._first(n)[n - 1]

    def _first(self, n: int) -> list[float]:
        """At least the first n position estimates (0 < n <= positions), kept until the
        counts change."""
        out = self._by_pos
        if len(out) < n:
            out = []
            prior, weight = self.prior_mean, self.prior_weight
            for hits, tries in zip(self.pos_hits[:n], self.pos_tries[:n], strict=True):
                # beta-smoothed: the prior (the position before) worth `weight` tries
                prior = (hits + prior * weight) / (tries + weight)
                out.append(prior)
            self._by_pos = out
        return out

    def by_confidence(self, conf: float, position: int) -> float:
        """p for a drafted token: its confidence bin, falling back toward the
        position estimate while the bin has few observations (calibrated: see above)."""
        if self.calibrated:
            return _shifted(conf, self.shift)
        b = conf_bin(conf)
        tries = self.conf_tries[b]
        pos = self.at_position(position)
        if tries <= 0:
            return pos
        w = tries / (tries + 4.0)  # trust the bin more as it fills
        return w * (self.conf_hits[b] / tries) + (1 - w) * pos

    def update(self, confidences: Sequence[float], n_accepted: int) -> None:
        """Draft tokens 0..n_accepted-1 were accepted, token n_accepted (if drafted)
        rejected, later ones never judged."""
        self._decay()
        _scale((self.slow_hits, self.slow_tries), self.slow_decay, self.reached)
        judged = min(len(confidences), n_accepted + 1)
        self.reached = max(self.reached, min(judged, self.positions))
        for i in range(min(judged, self.positions)):
            hit = 1.0 if i < n_accepted else 0.0
            self.pos_tries[i] += 1
            self.pos_hits[i] += hit
            self.slow_tries[i] += 1
            self.slow_hits[i] += hit
            b = conf_bin(confidences[i])
            self.conf_tries[b] += 1
            self.conf_hits[b] += hit
            if self.calibrated:
                self._learn_shift(confidences[i], hit)

    def _learn_shift(self, conf: float, hit: float) -> None:
        """One Newton step of the shift toward this token's outcome; the confidences are
        believed as much as `said_weight` tokens at even odds, so the first steps are
        short, and the steps shrink as judged tokens accumulate."""
        p = _shifted(conf, self.shift)
        self.shift_info += p * (1.0 - p)
        step = (hit - p) / (self.shift_info + 0.25 * self.said_weight)
        self.shift = min(max(self.shift + step, -SHIFT_MAX), SHIFT_MAX)

    def snapshot(self) -> Acceptance:
        """A copy that later updates leave alone (for a drafter's thread); its lists copied
        one by one, since copy.deepcopy took ~65 us a drafting round for the same."""
        copy = Acceptance.__new__(Acceptance)  # not replace: __post_init__ scans the counts
        copy.__dict__.update(self.__dict__, **{name: list(getattr(self, name))
                                               for name in _COUNTS})
        return copy  # sharing _by_pos: it is replaced, never changed in place

    def _decay(self, factor: float | None = None) -> None:
        factor = self.decay if factor is None else factor
        _scale((self.pos_hits, self.pos_tries), factor, self.reached)
        _scale((self.conf_hits, self.conf_tries), factor)
        self.shift_info *= factor
        self._by_pos = []

    def relax(self) -> None:
        """A round without a draft: each position's estimate below its long-memory mean
        moves `relax_rate` of the way up to it (same weight).  A dip that was noise heals
        in a few dozen idle rounds; a real change, which the long memory saw too, keeps it
        down.  Never down: the bias this undoes (stopping at a dip) only ever lowers."""
        hits, rate_, n = self.pos_hits, self.relax_rate, self.reached
        for i, (tries, s_hits, s_tries) in enumerate(
                zip(self.pos_tries[:n], self.slow_hits[:n], self.slow_tries[:n], strict=True)):
            if s_tries > 0 and tries > 0:
                target = s_hits / s_tries * tries
                if target > hits[i]:
                    hits[i] += rate_ * (target - hits[i])
                    self._by_pos = []

    def new_text(self, keep: float = 0.5, keep_said: float = 0.25) -> None:
        """A new generation: what the last text taught counts for `keep` as much, so a
        prompt that drafts well does not make the next one, which may not, pay for it.
        Calibrated, how far the confidences were off counts for `keep_said`: that is the
        text's own (a summary copies its source, a story does not), and without it the
        confidences are an honest start."""
        info = self.shift_info
        self._decay(keep)
        self.shift *= keep_said
        self.shift_info = info * keep_said


SHIFT_MAX = 4.0  # log-odds: a confidence of 0.5 moves to 0.02..0.98 at most


def _shifted(conf: float, shift: float) -> float:
    """`conf` with its log-odds moved by `shift`."""
    if shift == 0.0:
        return conf
    c = min(max(conf, 1e-4), 1.0 - 1e-4)
    return 1.0 / (1.0 + (1.0 - c) / c * math.exp(-shift))


def _scale(arrays: Sequence[list[float]], factor: float, n: int | None = None) -> None:
    """Multiply each array's first `n` entries (all: None) by `factor`, in place."""
    for arr in arrays:
        m = len(arr) if n is None else n
        arr[:m] = [x * factor for x in arr[:m]]


def conf_bin(conf: float) -> int:
    for i, edge in enumerate(CONF_EDGES):
        if conf < edge:
            return i
    return len(CONF_EDGES)


def describe_costs(c: CostModel) -> str:
    """Costs relative to one plain target step, in one line."""
    v1 = c.verify_cost(1)
    curve = ", ".join(f"{n} tokens {c.verify_cost(n) / v1:.2f}x" for n in (2, 5, 9, 17))
    text = f"cost model: target step {1000 * v1:.1f} ms; one pass over {curve}"
    if c.draft > 0 or c.catch_up > 0:  # else no draft model: n-gram drafts cost ~nothing
        text += f"; a drafted token {c.draft / v1:.2f}x"
        if c.draft_alone > 0 and c.draft > 1.1 * c.draft_alone:  # else the same: say it once
            text += f" after a target pass ({c.draft_alone / v1:.2f}x back to back)"
        text += f", catching up {c.catch_up / v1:.3f}x a token"
    if c.overlap_verify != 1.0 or c.overlap_draft > 0:
        text += (f"; side by side, a pass {c.overlap_verify:.2f}x slower and a drafted token "
                 f"{c.beside_draft() / v1:.2f}x")
    if c.round_batched > 0 and c.round_stepwise > 0:
        way = "token by token" if c.catch_up_stepwise else "in one batch"
        text += (f"; a short catch-up is read {way} (a round reading two tokens then "
                 f"drafting three: {1000 * c.round_batched:.2f} ms batched, "
                 f"{1000 * c.round_stepwise:.2f} ms token by token)")
    if c.shape_change > 0.1 * v1:  # below that: a CPU's noise
        text += (f"; the two plain steps after a verify pass take {1000 * c.shape_change:.2f} "
                 "ms more than two steady ones")
    return text


def ema(old: float, new: float, weight: float = 0.2) -> float:
    return old + weight * (new - old)


StopRule = Callable[..., bool]
"""(confidences so far, ready=False) -> draft another token?"""


@dataclass(frozen=True)
class Plan:
    """A budget's decision for one round."""

    k: int = 0  # tokens to draft (0: a plain step)
    # for a drafter that can draft beside the pass (duo): wait its turn this round instead
    in_turn: bool = False
    # beside the pass: the stop rule for the next round's draft, frozen as the round starts
    background: StopRule | None = None
    # a probe: the estimates say drafting does not pay, and this draft checks whether they
    # are still right (a lineup gives a due probe its round: see Lineup.pick)
    probe: bool = False


@dataclass(frozen=True)
class Outcome:
    """What one round taught; the engine hands it to the budget that planned it."""

    confidences: Sequence[float]  # the judged chain (a tree: accepted path + next candidate)
    n_accepted: int
    n_verified: int = 0  # draft tokens the pass verified (more than the chain for a tree)
    timing: tuple[float, float] | None = None  # seconds drafting, verifying (None: skip)
    ready: bool = False  # the draft was made beside the previous pass (paid for then)
    beside: int = 0  # tokens the drafter drafted beside this round's pass
    # context tokens the drafter read before drafting (its lag): after a new prompt or a
    # run of rounds it sat out, that catching up is in the drafting time and says nothing
    # about what a drafted token costs
    caught_up: int = 0
    # plain steps in a row before this round since the last round that drafted (None:
    # not tracked, taken as long settled): the first plain steps after a drafting round
    # run slower than plain decoding does, and are no measure of it (`_settled`)
    plain_before: int | None = None


class Budget(Protocol):
    """What the engine asks each round; implementations below."""

    name: str

    def begin(self) -> None:
        """A generation starts (a new prompt or chat turn)."""
        ...

    def plan(self, k_cap: int, lag: int = 0, left: int = 1 << 30) -> Plan:
        """This round's plan: a draft length 0..k_cap (0: a plain step), for a drafter
        `lag` tokens behind the context and `left` tokens still to generate."""
        ...

    def expected_rate(self, k: int, lag: int = 0, left: int = 1 << 30) -> float:
        """Expected tokens per second of drafting k tokens now (k = 0: a plain step); how
        an engine holding several drafters picks one (0.0: no cost model to say)."""
        ...

    def keep_going(self, confidences: Sequence[float], ready: bool = False) -> bool:
        """After each drafted token: draft another?  `ready`: drafted already (beside the
        last pass), so only verifying costs."""
        ...

    def prune_tree(self, parents: Sequence[int], confidences: Sequence[float]) -> list[int]:
        """Of a tree of candidates, the nodes worth verifying (sorted, parents kept)."""
        ...

    def trim(self, confidences: Sequence[float]) -> int:
        """Of a drafted chain, how many tokens (a prefix) are worth verifying; 0: none,
        the round is a plain step."""
        ...

    def observe(self, outcome: Outcome) -> None:
        """What the round's draft, verification and timing taught."""
        ...

    def describe(self) -> str:
        """The cost model in words, for --stats ('' when there is none)."""
        ...


def parse_budget(spec: str) -> int | None:
    """'auto' -> None; 'fixed:K' -> K.  Raises ValueError with a one-line message."""
    if spec == "auto":
        return None
    kind, _, num = spec.partition(":")
    if kind == "fixed" and num.isdigit() and int(num) >= 1:
        return int(num)
    raise ValueError(f"invalid budget {spec!r}: use 'auto' or 'fixed:K' with K >= 1")


class FixedBudget:
    """Always the same draft length (None: --draft-max): for experiments and the
    bench's baselines."""

    def __init__(self, k: int | None = None) -> None:
        self.k = k
        self.name = "fixed" if k is None else f"fixed:{k}"

    def begin(self) -> None:
        pass

    def plan(self, k_cap: int, lag: int = 0, left: int = 1 << 30) -> Plan:
        return Plan(k_cap if self.k is None else min(self.k, k_cap))

    def expected_rate(self, k: int, lag: int = 0, left: int = 1 << 30) -> float:
        return 0.0

    def keep_going(self, confidences: Sequence[float], ready: bool = False) -> bool:
        return True

    def observe(self, outcome: Outcome) -> None:
        pass

    def describe(self) -> str:
        return ""

    def prune_tree(self, parents: Sequence[int], confidences: Sequence[float]) -> list[int]:
        return list(range(len(parents)))

    def trim(self, confidences: Sequence[float]) -> int:
        return len(confidences)


class AdaptiveBudget:
    """Chooses each round's draft length from a calibrated cost model, rescaled online
    by what rounds actually cost (context growth, machine load), and from online
    acceptance estimates.  Never drafts when even near-perfect acceptance cannot beat a
    plain step; otherwise, while it sits out, its estimates relax toward their long
    memory (`Acceptance.relax`) and it probes now and then so they can recover, backing
    off (16, 32, 64... idle rounds) while probes fail.  A probe goes ahead only where
    drafting, at near-perfect acceptance, would clear the margin drafting must clear
    (`min_gain`): else even a probe that proved the text easy would leave it declining,
    and it would have paid for nothing.  A probe assumes the calibrated
    drafting cost where the tracked one has grown: it measures that cost again, and a cost
    inflated once (a stall, a catch-up) must not rule drafting out for good."""

    name = "auto"

    def __init__(self, cost: CostModel, acceptance: Acceptance | None = None,
                 explore_every: int = 16, optimistic_p: float = 0.95,
                 min_gain: float = 1.05) -> None:
        self.base = cost
        # Estimates are noisy and a wrong draft costs more than a right one saves (a
        # rejected token pays a share of the pass, an accepted one saves under a step):
        # draft only when it is expected to beat a plain step by this factor.
        self.min_gain = min_gain
        self.acc = acceptance or Acceptance()
        self.explore_every = explore_every
        self.optimistic_p = optimistic_p
        self.verify_scale = 1.0  # plain steps (one token) now against calibrated
        # passes over several tokens, apart: on the 2-core CPU plain steps ran at 0.86 of
        # calibrated and 2-4 token passes at 0.94-1.0, so one scale from the steps made
        # drafts look 5-15% cheaper than they were.  None until one is timed: the steps'.
        self.pass_scale: float | None = None
        # a drafted token now against calibrated, beyond what plain steps show: drafting
        # not measured lately is taken to have slowed (or sped up) as the plain steps did.
        # On the 2-core AMX VM a busy neighbour slowed plain steps 1.3-1.45x; drafting,
        # unmeasured, stayed at calibrated, looked cheap, and duo drafted at 0.75x.
        self.draft_scale = 1.0
        self._gap = explore_every  # idle rounds before a probe; doubles while probes fail
        self._probing = False
        self._probe_cap = 0  # the draft cap the running probe was planned under
        self._rounds = 0  # rounds planned in this generation (the probe's horizon)
        self._idle = 0  # rounds planned without a draft since this budget's last verified one
        self._scaled: tuple[tuple, CostModel] | None = None  # `cost` and what it was built of
        self._free: CostModel | None = None  # `free_cost`, built with `cost`

    def begin(self) -> None:
        self.acc.new_text()
        self._rounds = 0

    @property
    def cost(self) -> CostModel:
        """The calibrated costs rescaled by what rounds cost now.  Asked several times a
        round (the plan, the stop rule after each drafted token, a tree's pruning), so
        built once per change of scale, not per question: on a GPU a plain step lasts a
        few milliseconds and every microsecond of a round the budget declines is lost."""
        key = (id(self.base), self.verify_scale, self.pass_scale, self.draft_scale)
        if self._scaled is None or self._scaled[0] != key:
            cost = self._drafting(self.draft_scale, self._verify(self.multi_scale))
            self._scaled = (key, cost)
            self._free = None
        return self._scaled[1]

    @property
    def free_cost(self) -> CostModel:
        """`cost` with drafting free: for tokens drafted already (a draft made beside the
        last pass, an n-gram chain to trim, a tree to prune), only verifying them costs."""
        cost = self.cost
        if self._free is None:
            self._free = with_costs(cost, draft=0.0)
        return self._free

    def _drafting(self, scale: float, verify: list[float]) -> CostModel:
        """The calibrated costs with these passes, and drafting at `scale` beyond the
        plain steps' own scale."""
        s, b = scale * self.verify_scale, self.base
        return with_costs(b, verify=verify, draft=b.draft * s, catch_up=b.catch_up * s,
                          overlap_draft=b.overlap_draft * s)

    @property
    def multi_scale(self) -> float:
        """What passes over several tokens cost now against calibrated."""
        return self.verify_scale if self.pass_scale is None else self.pass_scale

    def _verify(self, multi: float) -> list[float]:
        """The calibrated pass costs rescaled, the steps' and the longer passes' scales
        apart; a longer pass never below a plain step (as calibration clips them), or two
        scales learned apart could make drafting a token look cheaper than not drafting."""
        first, *rest = self.base.verify
        step = first * self.verify_scale
        return [step, *(max(v * multi, step) for v in rest)]

    def _learn_pass(self, outcome: Outcome, ratio: float) -> None:
        """The round's pass took `ratio` of its calibrated cost.  A plain step teaches
        the steps' scale only once settled (`_settled`)."""
        if outcome.n_verified:
            self.pass_scale = ema(self.multi_scale, ratio)
        elif _settled(outcome):
            self.verify_scale = ema(self.verify_scale, ratio)

    def _draft_ratio(self, draft_s: float, n: int) -> float:
        """A round's drafting time against calibrated, beyond the plain steps' scale."""
        return draft_s / (n * self.base.draft * self.verify_scale)

    def plan(self, k_cap: int, lag: int = 0, left: int = 1 << 30) -> Plan:
        cost = self.cost
        self._new_round()
        k = best_length(cost, self.acc.by_position(k_cap), k_cap, lag, left, self.min_gain)
        if k == 0:
            self.acc.relax()
        if k == 0 and self._probe_due():
            k = best_length(self.probe_cost, [self.optimistic_p] * k_cap, k_cap, lag,
                            self._probe_horizon(left), self.min_gain)
            self._probed(k, k_cap)
        # drafting pays: let the confidence rule decide where to stop
        return Plan(k_cap if k else 0, probe=self._probing)

    def _new_round(self) -> None:
        self._probing = False
        self._rounds += 1

    def _probe_horizon(self, left: int) -> int:
        """The tokens a probe's catch-up is charged against.  A probe pays only if drafting
        goes on after it, for as long as the text goes on, which nobody knows: the text
        so far (in rounds, a lower bound) is the guess, not the --max-tokens left.  On a
        2-core AMX machine a 0.5B drafter catching up on a 56-token prompt cost 0.31 s, 5
        plain steps; charged to 112 tokens left it looked cheap, the answer ended after
        17 and the draft method ran at 0.79x (qa 0.84x, reasoning 0.85x)."""
        return max(1, min(left, self._rounds))

    def _probe_due(self) -> bool:
        """Called when the estimates decline a draft: whether a probe is due now.  The
        idle count is reset by this budget's own verified draft (`_learn`), not by a plan:
        in a lineup a plan may lose the round to another member's."""
        self._idle += 1
        return self._idle >= self._gap

    def _probed(self, k: int, k_cap: int) -> None:
        if k:
            self._probing, self._probe_cap = True, k_cap
        else:  # drafting cannot pay even then: wait another gap
            self._idle = 0

    def _pays(self, k_cap: int) -> bool:
        """Whether the estimates, as they stand, would draft with the drafter caught up."""
        p = self.acc.by_position(k_cap)
        return best_length(self.cost, p, k_cap, 0, 1 << 30, self.min_gain) > 0

    @property
    def probe_cost(self) -> CostModel:
        """The costs a probe plans with: the tracked ones, but drafting no dearer, against
        calibrated, than the plain steps are now, and a pass over several tokens no dearer
        than them either (the probe measures both again)."""
        return self._drafting(min(self.draft_scale, 1.0),
                              self._verify(min(self.multi_scale, self.verify_scale)))

    def describe(self) -> str:
        return describe_costs(self.cost)

    def expected_rate(self, k: int, lag: int = 0, left: int = 1 << 30) -> float:
        """Expected tokens per second of drafting k tokens now (k = 0: a plain step)."""
        return amortised_rate(self.cost, self.acc.by_position(k), lag, left)

    def prune_tree(self, parents: Sequence[int], confidences: Sequence[float]) -> list[int]:
        return self._prune(self.cost, parents, confidences)

    def _prune(self, cost: CostModel, parents: Sequence[int],
               confidences: Sequence[float]) -> list[int]:
        p = [self.acc.by_confidence(c, d)
             for c, d in zip(confidences, depths(parents), strict=True)]
        return best_tree(cost, parents, exclusive(parents, p, confidences), self.min_gain)

    def keep_going(self, confidences: Sequence[float], ready: bool = False) -> bool:
        cost = self.free_cost if ready else self.cost
        return _keep(cost, self.acc, confidences)

    def trim(self, confidences: Sequence[float]) -> int:
        """With calibrated confidences (hd), the prefix with the best expected tokens per
        second, if it beats a plain step by `min_gain`: the plan was made before the draft
        existed, and the stop rule weighs every token but the first, which it takes.  On
        the 2-core AMX VM hd's first token was often one seen once after the last token,
        right 1 time in 4, and a 23-token answer began with 5 rejected drafts.  Other
        drafters' confidences are no acceptance rates: their drafts stay whole."""
        if not self.acc.calibrated or not confidences:
            return len(confidences)
        p = [self.acc.by_confidence(c, i) for i, c in enumerate(confidences)]
        return best_length(self.free_cost, p, len(p), min_gain=self.min_gain)

    def observe(self, outcome: Outcome) -> None:
        n = outcome.n_verified
        if outcome.timing is not None:
            draft_s, verify_s = outcome.timing
            self._learn_pass(outcome, verify_s / self.base.verify_cost(n + 1))
            if n and self.base.draft > 0 and _steady(outcome):
                self.draft_scale = ema(self.draft_scale, self._draft_ratio(draft_s, n))
        self._learn(outcome.confidences, outcome.n_accepted, n)

    def _learn(self, confidences: Sequence[float], n_accepted: int, n: int) -> None:
        if not n:
            return
        surprise = self._probing and n_accepted == n and math.prod(self.acc.by_position(n)) < 0.5
        self.acc.update(confidences, n_accepted)
        self._idle = 0
        # A probe succeeds when drafting pays after it, or when every token it drafted was
        # right where the estimates gave that less than even odds (they lag: probes that
        # keep hitting bring them back, as on the H200).  Otherwise it said the estimates
        # are right, and the next one waits twice as long: on the 2-core AMX machine a
        # 0.5B probe of one token, which the estimates put at 0.8, hit most times, and
        # counted as a success it brought the next (0.14-0.48 s each) 16 rounds later.
        if self._probing:
            paid = surprise or (n_accepted and self._pays(self._probe_cap))
            self._gap = self.explore_every if paid else min(2 * self._gap, 1024)
            self._probing = False


class OverlapBudget(AdaptiveBudget):
    """The budget of a drafter that drafts the next round beside verification (duo).

    Draft lengths come from `overlap_rate`, so drafting time is matched to verification
    time on the measured hardware pair.  The round's outcome says whether the draft came
    ready from the background (its tokens are paid for, only verifying them costs) and
    how many tokens the drafter drafted beside the pass."""

    def plan(self, k_cap: int, lag: int = 0, left: int = 1 << 30) -> Plan:
        """The draft length, and whether the drafter drafts the next round beside this
        round's pass or waits its turn: whichever the measured costs expect to be faster.
        Beside: the length itself (the next draft is made to it before the confidence
        rule could be asked).  In turn: k_cap, the confidence rule stops it."""
        cost = self.cost
        self._new_round()
        p = self.acc.by_position(k_cap + 1)
        k, overlap = best_duo_round(cost, p, k_cap, lag, left, self.min_gain)
        if k == 0:
            self.acc.relax()
        if k == 0 and self._probe_due():
            k, overlap = best_duo_round(self.probe_cost, [self.optimistic_p] * (k_cap + 1),
                                        k_cap, lag, self._probe_horizon(left), self.min_gain)
            self._probed(k, k_cap)
        if not k:
            return Plan(0)
        if not overlap:
            return Plan(k_cap, in_turn=True, probe=self._probing)
        return Plan(k, background=self.background_rule(), probe=self._probing)

    def _pays(self, k_cap: int) -> bool:
        p = self.acc.by_position(k_cap + 1)
        return best_duo_round(self.cost, p, k_cap, 0, 1 << 30, self.min_gain)[0] > 0

    def expected_rate(self, k: int, lag: int = 0, left: int = 1 << 30) -> float:
        if k == 0:
            return rate(self.cost, [])
        p = self.acc.by_position(k + 1)
        return max(overlap_rate(self.cost, p[:k], p[k], lag, left),
                   amortised_rate(self.cost, p[:k], lag, left))

    def background_rule(self) -> StopRule:
        """The stop rule for drafting beside verification, frozen now: the drafter's thread
        asks it while this budget goes on learning on the main thread.  A token drafted
        beside the target costs what it slows the pass down."""
        cost = self.cost
        slow = max(cost.overlap_verify, 1.0)
        frozen = with_costs(cost, draft=cost.beside_draft() * (1.0 - 1.0 / slow))
        acc = self.acc.snapshot()
        return lambda confidences, ready=False: _keep(frozen, acc, confidences)

    def prune_tree(self, parents: Sequence[int], confidences: Sequence[float]) -> list[int]:
        # the candidates are drafted already (mostly in the background): only verifying costs
        return self._prune(self.free_cost, parents, confidences)

    def observe(self, outcome: Outcome) -> None:
        n = outcome.n_verified
        if outcome.timing is not None:
            draft_s, verify_s = outcome.timing
            busy = outcome.beside * self.base.beside_draft()
            self._learn_pass(outcome, verify_s / overlapped_verify(self.base, n + 1, busy))
            if n and not outcome.ready and self.base.draft > 0 and _steady(outcome):
                self.draft_scale = ema(self.draft_scale, self._draft_ratio(draft_s, n))
        self._learn(outcome.confidences, outcome.n_accepted, n)


STEADY_LAG = 2  # a drafter in step reads the last accepted token or two before drafting
SETTLE_STEPS = 2  # plain steps after a drafting round that do not measure plain decoding


def _steady(outcome: Outcome) -> bool:
    """Whether the round's drafting time measures drafted tokens: not when the drafter
    first caught up on a new prompt or on rounds it sat out."""
    return outcome.caught_up <= STEADY_LAG


def _settled(outcome: Outcome) -> bool:
    """Whether a plain step measures what plain decoding costs now: not one of the first
    `SETTLE_STEPS` after a round that drafted.  Those pay for the round before them (a
    draft model's steps evicted the target's weights from the CPU's caches; on a GPU a
    change of pass shape costs the next steps their captured graph), and what a plain
    step costs is the bar drafting must beat.  Learnt from them, the bar rose with every
    draft: on the 2-core AMX VM with the small timing pair the first plain step after a
    drafting round took 5.74 ms and the second 5.41 against 4.84 settled (3051 steps),
    plain steps looked up to 15% dearer than they were, and drafts that lose looked like
    gains.  (A generation's first two plain steps, after its prefill, are left out too.)"""
    return outcome.plain_before is None or outcome.plain_before >= SETTLE_STEPS


def _keep(cost: CostModel, acc: Acceptance, confidences: Sequence[float]) -> bool:
    i = len(confidences)
    p = [acc.by_confidence(c, j) for j, c in enumerate(confidences)]
    return keep_drafting(cost, p, acc.at_position(i))
