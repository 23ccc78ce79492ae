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

from .sampling import sample
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
    p: np.ndarray,
    q: np.ndarray | None,
    rng: np.random.Generator,
) -> Verdict:
    """Speculative sampling: the emitted tokens are distributed exactly as the target's ``p``.

    ``p``: (k+1, Vp) target probabilities (from ``probs_from_logits``); row i is the target's
    distribution at the position of ``draft[i]``, row k the bonus position.
    ``q``: (k, Vq) draft probabilities the draft tokens were sampled from, or None for a
    deterministic draft (n-gram lookup), which is treated as a one-hot on ``draft[i]``.
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
    p2 = np.asarray(p, dtype=np.float64)
    if p2.ndim == 1:
        p2 = p2.reshape(1, -1)
    if p2.ndim != 2 or p2.shape[0] != k + 1:
        raise ValueError(f"p must have shape ({k + 1}, V) for a {k}-token draft (got {p2.shape})")
    vp = p2.shape[1]
    q2: np.ndarray | None = None
    if q is not None:
        q2 = np.asarray(q, dtype=np.float64)
        if q2.ndim == 1 and k == 1:
            q2 = q2.reshape(1, -1)
        if q2.ndim != 2 or q2.shape[0] != k:
            raise ValueError(f"q must have shape ({k}, V) for a {k}-token draft (got {q2.shape})")

    for i in range(k):
        x = int(draft[i])
        if x < 0:
            raise ValueError(f"draft token ids must be >= 0 (got {x} at position {i})")
        px = float(p2[i, x]) if x < vp else 0.0
        qx = 1.0
        if q2 is not None:
            qx = float(q2[i, x]) if x < q2.shape[1] else 0.0

        u = rng.random()
        if q2 is None or qx <= 0.0:  # deterministic proposal: accept with probability p(x)
            if u < px:
                continue
            residual = p2[i].copy()
            if x < vp:
                residual[x] = 0.0
        else:
            if u * qx < px:  # u < min(1, px / qx), without dividing
                continue
            qrow = q2[i, :vp]
            residual = p2[i].copy()
            residual[: qrow.shape[0]] -= qrow
            np.maximum(residual, 0.0, out=residual)

        total = float(residual.sum())
        if not total > 0.0:  # p == q up to rounding: the residual is empty, p itself is exact
            return Verdict(n_accepted=i, next_token=sample(p2[i], rng))
        residual /= total
        return Verdict(n_accepted=i, next_token=sample(residual, rng))

    return Verdict(n_accepted=k, next_token=sample(p2[k], rng))


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
    tokens: Sequence[int], parents: Sequence[int], p: np.ndarray, rng: np.random.Generator
) -> TreeVerdict:
    """Deterministic candidate trees (n-gram drafts) under sampling, exactly lossless.

    At each node the children's tokens are tried in order: child x is accepted with
    probability r(x) / sum(r), r being p with the earlier-rejected children removed; if
    all are rejected the token is drawn from r renormalised.  This is sampling from p by
    sequential elimination, so P(emit y) = p(y) for every y, children or not; an accepted
    child continues the walk with its own subtree.  Row 0 of ``p`` is the distribution
    after the root, row i + 1 the distribution after node i."""
    p2 = np.asarray(p, dtype=np.float64)
    if p2.ndim != 2 or p2.shape[0] != len(tokens) + 1:
        raise ValueError(f"p must have shape ({len(tokens) + 1}, V) (got {p2.shape})")
    vp = p2.shape[1]
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
