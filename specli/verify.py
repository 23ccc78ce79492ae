"""Verification of drafted tokens against the target model: the step that makes it lossless.

Greedy: accept the longest prefix the target would itself have produced by argmax.
Sampled: speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept draft token x
with probability min(1, p(x)/q(x)), else draw from the residual max(p - q, 0). Each emitted
token is then distributed exactly as p, whatever the draft proposed.

Pure functions: numpy and the standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .sampling import ProbRows, sample
from .tree import children_of


@dataclass(frozen=True)
class Verdict:
    """Outcome of one verification step: emit draft[:n_accepted] and then next_token."""

    n_accepted: int  # how many draft tokens (a prefix) were accepted
    next_token: int  # the token the target contributes after them (correction or bonus)


def verify_greedy(draft: Sequence[int], target_argmax: Sequence[int]) -> Verdict:
    """Accept the longest prefix of ``draft`` that matches the target's argmax tokens.

    ``target_argmax[i]`` is the target's greedy choice at the position of ``draft[i]``, the last
    entry being the bonus position. The emitted tokens are exactly what greedy decoding of the
    target alone would have produced, because each accepted token equals the target's choice
    given the (already-accepted) prefix before it.
    """
    k = len(draft)
    if len(target_argmax) != k + 1:
        raise ValueError(
            f"target_argmax needs len(draft) + 1 = {k + 1} entries (got {len(target_argmax)})"
        )
    n = 0
    while n < k and int(draft[n]) == int(target_argmax[n]):
        n += 1
    return Verdict(n_accepted=n, next_token=int(target_argmax[n]))


def verify_sampled(
    draft: Sequence[int],
    p: np.ndarray | ProbRows,
    q: np.ndarray | list[np.ndarray] | None,
    rng: np.random.Generator,
) -> Verdict:
    """Speculative sampling: the emitted tokens are distributed exactly as the target's ``p``.

    ``p``: (k+1, Vp) target probabilities (from ``probs_from_logits``, or ``ProbRows``, which
    computes only the rows read: those up to the first rejection); row i is the target's
    distribution at the position of ``draft[i]``, row k the bonus position.
    ``q``: (k, Vq) draft probabilities the draft tokens were sampled from (an array, or k
    rows), or None for a deterministic draft (n-gram lookup), treated as a one-hot on
    ``draft[i]``.
    Vq may differ from Vp (padded vocabularies): q's missing columns count as 0, its extra columns
    are ignored, and a draft id >= Vp has p = 0 so it is always rejected.

    Draft token x is accepted with probability min(1, p(x)/q(x)) (one ``rng.random()`` per test);
    on rejection the correction is drawn from max(p - q, 0) renormalised. Then
    P(emit y) = min(p(y), q(y)) + (1 - sum_x min(p(x), q(x))) * residual(y) = p(y).
    A draft token with q(x) = 0 cannot have been sampled from q; it is verified as a
    deterministic proposal (accept with p(x), else p without x), which is lossless for any
    fixed proposal.
    """
    k = len(draft)
    p2 = _rows(p, k + 1, "p", k)
    vp = p2[0].shape[0]  # row 0 is always read
    q2 = None if q is None else _rows(q, k, "q", k)

    for i in range(k):
        x = int(draft[i])
        if x < 0:
            raise ValueError(f"draft token ids must be >= 0 (got {x} at position {i})")
        p_row = p2[i]
        px = float(p_row[x]) if x < vp else 0.0
        qx = 1.0
        if q2 is not None:
            qx = float(q2[i][x]) if x < q2[i].shape[0] else 0.0

        u = rng.random()
        if q2 is None or qx <= 0.0:  # deterministic proposal: accept with probability p(x)
            if u < px:
                continue
            residual = p_row.copy()
            if x < vp:
                residual[x] = 0.0
        else:
            if u * qx < px:  # u < min(1, px / qx), without dividing
                continue
            qrow = q2[i][:vp]
            residual = p_row.copy()
            residual[: qrow.shape[0]] -= qrow
            np.maximum(residual, 0.0, out=residual)

        if not float(residual.sum()) > 0.0:  # p == q up to rounding: p itself is exact
            return Verdict(n_accepted=i, next_token=sample(p_row, rng))
        return Verdict(n_accepted=i, next_token=sample(residual, rng))  # sample() normalises

    return Verdict(n_accepted=k, next_token=sample(p2[k], rng))


Rows = np.ndarray | ProbRows | list[np.ndarray]


def _rows(x: Rows, n: int, name: str, k: int) -> Rows:
    """`x` checked as n rows of probabilities, each read on its own: a 2-D float64 array
    (a (V,) array is one row), a list of 1-D rows (a drafter's, unstacked: stacking
    copied k full rows a round) or ``ProbRows``."""
    if isinstance(x, ProbRows):
        rows: Rows = x
        ok = True
    elif isinstance(x, list) and x and all(isinstance(r, np.ndarray) for r in x):
        rows = [np.asarray(r, dtype=np.float64) for r in x]
        ok = all(r.ndim == 1 for r in rows)
    else:
        a = np.asarray(x, dtype=np.float64)
        rows = a.reshape(1, -1) if a.ndim == 1 and n == 1 else a
        ok = rows.ndim == 2
    if not ok or len(rows) != n:
        got = getattr(rows, "shape", f"{len(rows)} rows")
        raise ValueError(f"{name} must have shape ({n}, V) for a {k}-token draft (got {got})")
    return rows


@dataclass(frozen=True)
class TreeVerdict:
    """Outcome of verifying a draft tree: emit the tokens of nodes `path` (a root-to-node
    chain of node indices) and then `next_token`."""

    path: list[int]
    next_token: int


def verify_tree_greedy(
    tokens: Sequence[int], parents: Sequence[int], target_argmax: Sequence[int]
) -> TreeVerdict:
    """Several candidate continuations verified at once: from the root, follow the child
    whose token is the target's argmax at that node; stop where none is.

    ``target_argmax[0]`` is the target's choice after the root, ``target_argmax[i + 1]``
    its choice after node i.  Every emitted token is the target's own greedy choice given
    the accepted tokens before it, so the output equals plain greedy decoding."""
    if len(target_argmax) != len(tokens) + 1:
        n = len(target_argmax)
        raise ValueError(f"target_argmax needs {len(tokens) + 1} entries (got {n})")
    kids = children_of(parents)
    path: list[int] = []
    node = -1
    while True:
        want = int(target_argmax[node + 1])
        nxt = next((c for c in kids[node] if int(tokens[c]) == want), None)
        if nxt is None:
            return TreeVerdict(path, want)
        path.append(nxt)
        node = nxt


def verify_tree_sampled(
    tokens: Sequence[int], parents: Sequence[int], p: np.ndarray | ProbRows,
    rng: np.random.Generator,
) -> TreeVerdict:
    """Deterministic candidate trees (n-gram drafts) under sampling, exactly lossless.

    At each node the children's tokens are tried in order: child x is accepted with
    probability r(x) / sum(r), r being p with the earlier-rejected children removed; if
    all are rejected the token is drawn from r renormalised.  This is sampling from p by
    sequential elimination, so P(emit y) = p(y) for every y, children or not; an accepted
    child continues the walk with its own subtree.  Row 0 of ``p`` is the distribution
    after the root, row i + 1 the distribution after node i (``ProbRows``: only the rows
    of the nodes the walk reaches are computed)."""
    p2 = _rows(p, len(tokens) + 1, "p", len(tokens))
    vp = p2[0].shape[0]  # row 0 is always read
    kids = children_of(parents)
    path: list[int] = []
    node = -1
    while True:
        r = p2[node + 1].copy()
        mass = float(r.sum())
        accepted = None
        for c in kids[node]:
            x = int(tokens[c])
            px = float(r[x]) if 0 <= x < vp else 0.0
            if px > 0.0 and rng.random() * mass < px:
                accepted = c
                break
            if px > 0.0:
                r[x] = 0.0
                mass -= px
        if accepted is None:  # sample() renormalises r; an all-zero r only by rounding
            return TreeVerdict(path, sample(r if r.sum() > 0 else p2[node + 1], rng))
        path.append(accepted)
        node = accepted
