"""Turning logits into the probability rows that speculative sampling compares.

Speculative sampling is lossless only if the target distribution ``p`` and the draft
distribution ``q`` are produced by the *same* deterministic transformation (temperature,
top-k, top-p, renormalisation) of their respective logits: the verifier then reproduces
exactly the truncated target distribution a plain sampler would use. Every tie in this
module is therefore broken by a fixed rule (lowest token id wins), never by chance.

Pure functions: numpy and the standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# First candidate-set size tried by the nucleus search before falling back to larger sets.
_TOP_P_FIRST_GUESS = 64
# Logits this far below a token's add under e^-20 each to its softmax denominator.
_NEGLIGIBLE = 20.0
# Entries per block when a full-vocabulary row is searched or sampled by blocks first.
_BLOCK = 1024


@dataclass(frozen=True)
class SamplingParams:
    """How logits become probabilities; shared by target and draft, which keeps it lossless."""

    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """True when decoding is plain argmax (temperature 0)."""
        return self.temperature == 0

    def validate(self) -> None:
        """Raise ValueError with a one-line message if any setting is out of range."""
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (got {t!r})")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0, 0 meaning off (got {k!r})")
        p = self.top_p
        if not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], 1 meaning off (got {p!r})")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, np.integer))
                              or s < 0):
            raise ValueError(f"seed must be an integer >= 0 (got {s!r})")

    def rng(self) -> np.random.Generator:
        """A fresh generator from ``seed`` (None gives OS entropy)."""
        return np.random.default_rng(self.seed)


def probs_from_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Map raw logits (V,) or (n, V) to float64 probabilities of the same shape.

    Order: temperature, top-k, softmax, top-p (nucleus), renormalise. Greedy params give a
    one-hot at ``np.argmax``. Deterministic tie rules (lowest id kept) make the same logits
    always give the same row, so target and draft rows are truncated identically.
    """
    params.validate()
    x = np.asarray(logits)
    if x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"logits must have shape (V,) or (n, V) with V > 0 (got {x.shape})")
    squeeze = x.ndim == 1
    x2 = x.reshape(1, -1) if squeeze else x
    n, vocab = x2.shape

    if params.greedy:
        out = np.zeros((n, vocab), dtype=np.float64)
        out[np.arange(n), np.argmax(x2, axis=1)] = 1.0
        return out[0] if squeeze else out

    top = x2.max(axis=1, keepdims=True)
    if not np.all(np.isfinite(top)):
        raise ValueError("logits: every row needs a finite maximum (no NaN or +inf)")

    if 0 < params.top_k < vocab:
        # Sparse path: only k entries survive, so only those are scaled and exponentiated.
        # The k are chosen on the raw logits: temperature never changes their order.
        out = np.zeros((n, vocab), dtype=np.float64)
        for r in range(n):
            ids = _top_k_ids(x2[r], params.top_k)
            vals = np.exp(_scaled(x2[r, ids], top[r, 0], params.temperature))
            vals /= vals.sum()
            if params.top_p < 1.0:
                keep = _nucleus_positions(vals, params.top_p)
                ids, vals = ids[keep], vals[keep] / vals[keep].sum()
            out[r, ids] = vals
        return out[0] if squeeze else out

    probs = _scaled(x2, top, params.temperature)
    np.exp(probs, out=probs)
    np.multiply(probs, 1.0 / probs.sum(axis=1, keepdims=True), out=probs)
    if params.top_p < 1.0:
        for r in range(n):
            _nucleus_dense_inplace(probs[r], params.top_p)
    return probs[0] if squeeze else probs


class ProbRows:
    """``probs_from_logits`` of (n, V) logits, a row computed when first read: verifying
    reads the rows up to the first rejection only, and a row costs 0.3 to 0.5 ms at a
    150k vocabulary.  Row i equals row i of ``probs_from_logits(logits, params)``."""

    def __init__(self, logits: np.ndarray, params: SamplingParams) -> None:
        params.validate()
        x = np.asarray(logits)
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"logits must have shape (n, V) with V > 0 (got {x.shape})")
        self._logits, self._params = x, params
        self._done: dict[int, np.ndarray] = {}
        self.shape: tuple[int, int] = x.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        row = self._done.get(i)
        if row is None:
            row = self._done[i] = probs_from_logits(self._logits[i], self._params)
        return row


def _scaled(x: np.ndarray, top: np.ndarray | float, temperature: float) -> np.ndarray:
    """(x - top) / temperature in float64, a fresh array whose maximum is 0 when `top` is
    x's maximum.  Shifted first: a tiny temperature (1e-300) then sends the others to
    -inf (probability 0, as greedy would) instead of overflowing.  A multiplication by
    1 / temperature where that is finite: four times cheaper than dividing 150k floats."""
    out = np.subtract(x, top, dtype=np.float64)
    with np.errstate(over="ignore"):
        if temperature < 1e-300:  # 1 / temperature may overflow
            np.divide(out, float(temperature), out=out)
        elif temperature != 1.0:
            np.multiply(out, 1.0 / temperature, out=out)
    return out


def _candidates(row: np.ndarray, m: int) -> np.ndarray | None:
    """Ascending ids of every entry at or above the m-th largest block maximum: a superset
    of the row's m largest entries, ties with the m-th included, found without sorting
    the row (a full-vocabulary partition costs 0.2 to 1 ms).  None where the row has too
    few blocks for that, and the caller works on the whole row."""
    vocab = row.shape[0]
    blocks = -(-vocab // _BLOCK)
    if blocks < 8 or m > blocks // 2:
        return None
    maxima = np.maximum.reduceat(row, np.arange(0, vocab, _BLOCK))
    threshold = np.partition(maxima, blocks - m)[blocks - m]
    return np.flatnonzero(row >= threshold)


def _top_k_ids(row: np.ndarray, k: int) -> np.ndarray:
    """Ids (ascending) of exactly k entries: all above the k-th largest value, then ties by id."""
    vocab = row.shape[0]
    cand = _candidates(row, k)
    if cand is not None and cand.shape[0] < vocab:  # the k largest and their ties are in cand
        return cand[_top_k_ids(row[cand], k)]
    ids = np.argpartition(row, vocab - k)[vocab - k :]
    kth = row[ids].min()
    n_tied_in = int(np.count_nonzero(row[ids] == kth))
    if int(np.count_nonzero(row == kth)) == n_tied_in:  # no tie straddles the boundary
        return np.sort(ids)
    above = np.flatnonzero(row > kth)
    tied = np.flatnonzero(row == kth)[: k - above.shape[0]]
    return np.sort(np.concatenate([above, tied]))


def _nucleus_positions(vals: np.ndarray, top_p: float) -> np.ndarray:
    """Positions of the smallest prefix, by descending prob, whose mass reaches top_p.

    ``vals`` must be ordered by ascending token id, so the stable sort breaks ties by lowest id.
    """
    order = np.argsort(-vals, kind="stable")
    cum = np.cumsum(vals[order])
    n_keep = min(int(np.count_nonzero(cum < top_p)) + 1, order.shape[0])
    return np.sort(order[:n_keep])


def _nucleus_dense_inplace(row: np.ndarray, top_p: float) -> None:
    """Apply top-p to a full-vocabulary row without sorting all of it.

    Candidates are every entry at or above a threshold (all ties included, so they form an exact
    prefix of the global descending order): the m-th largest block maximum while m is small
    against the blocks, else a partition of the row.  The set grows until it holds top_p of
    the mass. The result equals that of a full stable sort of the row.
    """
    vocab = row.shape[0]
    m = min(_TOP_P_FIRST_GUESS, vocab)
    while True:
        cand = _candidates(row, m)
        if cand is None:
            cand = (np.arange(vocab) if m >= vocab
                    else np.flatnonzero(row >= np.partition(row, vocab - m)[vocab - m]))
        if m >= vocab or float(row[cand].sum()) >= top_p:
            break
        m = min(vocab, m * 8)
    vals = row[cand]
    keep = _nucleus_positions(vals, top_p)
    kept_ids, kept_vals = cand[keep], vals[keep]
    row[:] = 0.0
    row[kept_ids] = kept_vals / kept_vals.sum()


def sample(probs_row: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one index from a non-negative row (need not sum exactly to 1).

    Uses one ``rng.random()`` and an inverse-CDF search; ``side="right"`` means an index whose
    probability is zero (a flat step of the CDF) can never be chosen, which matters because the
    verifier's residual rows are full of exact zeros.  A full-vocabulary row is searched by
    blocks: the block sums' CDF picks a block, that block's own CDF the index (the same law;
    a cumulative sum over 150k floats cost 0.4 ms a token).
    """
    row = np.asarray(probs_row, dtype=np.float64)
    vocab = row.shape[0]
    if vocab < 8 * _BLOCK:
        return _inverse_cdf(row, rng.random())
    sums = np.add.reduceat(row, np.arange(0, vocab, _BLOCK))
    cdf = np.cumsum(sums)
    total = cdf[-1]
    if not total > 0 or not np.isfinite(total):
        raise ValueError("sample: probability row must have a positive, finite sum")
    goal = rng.random() * total
    b = int(np.searchsorted(cdf, goal, side="right"))
    if b >= sums.shape[0]:  # goal rounded up to total: the last block with any mass
        b = int(np.flatnonzero(sums > 0)[-1])
        goal = cdf[b]
    block = row[b * _BLOCK : (b + 1) * _BLOCK]
    return b * _BLOCK + _inverse_cdf(block, (goal - (cdf[b - 1] if b else 0.0)) / sums[b])


def _inverse_cdf(row: np.ndarray, u: float) -> int:
    """The index where the fraction u (in [0, 1]) of `row`'s mass is reached; never an
    index of probability zero."""
    cdf = np.cumsum(row)
    total = cdf[-1]
    if not total > 0 or not np.isfinite(total):
        raise ValueError("sample: probability row must have a positive, finite sum")
    idx = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    if idx >= row.shape[0]:  # u * total rounded up to total: take the last non-zero bucket
        idx = int(np.flatnonzero(row > 0)[-1])
    return idx


def draft_token(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None,
    guess: int | None = None,
) -> tuple[int, float, np.ndarray | None]:
    """A draft model's token after `logits`, its confidence, and (sampled) the row it is
    distributed as (`rng`: None only when greedy).  A `guess` (the cascade's n-gram
    guess) changes which random draws happen, never the law."""
    if params.greedy:
        tok = int(np.argmax(logits))
        return tok, top_probability(logits, tok), None
    assert rng is not None
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


def top_probability(logits: np.ndarray, tok: int) -> float:
    """Softmax probability of `tok`: the drafter's confidence in a greedy guess.

    Only the terms within 20 of `tok`'s logit are summed.  The rest are each below e^-20,
    so they add at most vocab * 2.1e-9 to a sum of at least 1: the confidence comes out
    at most 0.03% high at a 150k vocabulary.  A full softmax cost 0.1 to 0.4 ms a drafted
    token there (its exponentials of very negative logits are slow), this a quarter."""
    top = logits[tok]
    near = logits[logits > top - _NEGLIGIBLE]
    return float(1.0 / np.exp(near - top).sum())
