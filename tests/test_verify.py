"""Exact and statistical tests of sampling.py and verify.py: the lossless guarantee.

The statistical tests run speculative verification many times with fixed seeds and check, by a
chi-square goodness-of-fit test, that the emitted tokens are distributed exactly as the target's
``p``. They are deterministic. Their power is demonstrated, not assumed: deliberately broken
verifiers and a sampler that is off by 1% in one cell are rejected by the same check at the same
sample size, and (with scipy) each design is checked to detect any 1% error with power >= 0.99.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from specli.sampling import ProbRows, SamplingParams, probs_from_logits, sample
from specli.verify import Verdict, verify_greedy, verify_sampled

try:  # scipy is a test dependency; the fallback keeps the file runnable without it
    from scipy import stats
except ImportError:  # pragma: no cover
    stats = None

ALPHA = 1e-4  # p-value threshold: a pass needs p >= ALPHA, a negative control p < ALPHA
DELTA = 0.01  # the absolute error in one cell's probability the designs must detect
Z_ALPHA = 3.7190164854556804  # standard normal upper quantile at ALPHA (fallback only)
N_FIRST = 150_000  # trials for first-token tests (V = 20)
N_PAIR = 120_000  # trials for the two-token joint test (V = 6, 36 cells)

Verifier = Callable[[Sequence[int], np.ndarray, np.ndarray | None, np.random.Generator], Verdict]


# --------------------------------------------------------------------------- chi-square helpers


def _gof(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int, float]:
    """Chi-square statistic, degrees of freedom and critical value at ALPHA.

    Cells with probability 0 must be empty (any hit there is a hard failure on its own); cells
    whose expected count is below 5 are pooled so the chi-square approximation holds.
    """
    counts = np.asarray(counts, dtype=np.float64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    n = counts.sum()
    zero = probs == 0
    assert counts[zero].sum() == 0, (
        f"tokens emitted where p = 0: {np.flatnonzero(zero & (counts > 0))}"
    )
    obs, exp = counts[~zero], probs[~zero] * n
    small = exp < 5
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    df = len(obs) - 1
    assert df >= 1, "need at least two cells for a goodness-of-fit test"
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, df, _critical(df)


def _critical(df: int) -> float:
    if stats is not None:
        return float(stats.chi2.isf(ALPHA, df))
    h = 2.0 / (9.0 * df)  # Wilson-Hilferty: slightly above the exact quantile
    return df * (1.0 - h + Z_ALPHA * math.sqrt(h)) ** 3


def assert_fits(counts: np.ndarray, probs: np.ndarray) -> None:
    stat, df, crit = _gof(counts, probs)
    assert stat < crit, f"distribution differs from p: chi2={stat:.1f} > {crit:.1f} (df={df})"


def assert_rejected(counts: np.ndarray, probs: np.ndarray) -> None:
    stat, df, crit = _gof(counts, probs)
    assert stat > crit, f"the check failed to see a wrong distribution: chi2={stat:.1f} (df={df})"


def assert_design_power(probs: np.ndarray, n: int) -> None:
    """With n samples, any cell off by DELTA (absolute) is caught with probability >= 0.99.

    Moving DELTA into or out of cell a, the rest spread proportionally, gives the smallest
    non-centrality n * DELTA^2 / (p_a (1 - p_a)); the worst cell is the one nearest 0.5.
    """
    probs = np.asarray(probs, dtype=np.float64).ravel()
    pos = probs[probs > 0]
    df = len(pos) - 1
    lam = n * DELTA**2 / float(np.max(pos * (1 - pos)))
    if stats is not None:
        power = float(stats.ncx2.sf(stats.chi2.isf(ALPHA, df), df, lam))
    else:  # pragma: no cover - normal approximation of the non-central chi-square
        z = (_critical(df) - (df + lam)) / math.sqrt(2 * (df + 2 * lam))
        power = 0.5 * math.erfc(z / math.sqrt(2))
    assert power >= 0.99, f"n={n} detects a 1% error with power {power:.3f} only"


# ---------------------------------------------------------------------------- simulation helpers


def _draw(q_row: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n independent draws from q_row, vectorised (inverse CDF, never a zero-probability id)."""
    cdf = np.cumsum(q_row)
    idx = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    return np.minimum(idx, np.flatnonzero(q_row > 0)[-1])


def first_token_counts(
    verifier: Verifier,
    p: np.ndarray,
    q: np.ndarray | None,
    n: int,
    seed: int,
    fixed_draft: int | None = None,
) -> np.ndarray:
    """Histogram of the first emitted token of a one-token draft over n verifications.

    The draft token is sampled from q[0] (or fixed, for a deterministic draft with q None); the
    first emitted token is the draft token if accepted, else the correction.
    """
    rng_draft, rng_verify = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    if q is None:
        assert fixed_draft is not None
        drafts = np.full(n, fixed_draft)
    else:
        drafts = _draw(q[0], n, rng_draft)
    counts = np.zeros(p.shape[1], dtype=np.int64)
    for x in drafts.tolist():
        v = verifier([x], p, q, rng_verify)
        counts[x if v.n_accepted else v.next_token] += 1
    return counts


def _dirichlet(rng: np.random.Generator, v: int, rows: int, alpha: float = 1.0) -> np.ndarray:
    return rng.dirichlet(np.full(v, alpha), size=rows)


CASES = ["dirichlet", "disjoint", "deterministic", "identical", "truncated"]


def _case(name: str) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """(p with 2 rows, q with 1 row or None, fixed draft token) for each first-token case."""
    rng = np.random.default_rng(CASES.index(name) + 100)
    v = 20
    if name == "dirichlet":
        return _dirichlet(rng, v, 2), _dirichlet(rng, v, 1), None
    if name == "disjoint":  # p on tokens 0-9, q on 10-19: every draft is rejected
        p = np.zeros((2, v))
        p[:, :10] = _dirichlet(rng, 10, 2)
        q = np.zeros((1, v))
        q[0, 10:] = _dirichlet(rng, 10, 1)[0]
        return p, q, None
    if name == "deterministic":  # n-gram style draft: q None, one fixed token
        p = _dirichlet(rng, v, 2)
        return p, None, int(np.argsort(p[0])[v // 2])
    if name == "identical":  # q == p: everything accepted, nothing to correct
        p = _dirichlet(rng, v, 2)
        return p, p[:1].copy(), None
    if name == "truncated":  # temperature 0.7, top-k 5, top-p 0.8, same function for both
        params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8)
        target_logits = rng.standard_normal((2, v)) * 0.7
        draft_logits = target_logits[:1] + rng.standard_normal((1, v)) * 1.0
        return (
            probs_from_logits(target_logits, params),
            probs_from_logits(draft_logits, params),
            None,
        )
    raise KeyError(name)


# ----------------------------------------------------------------------------- broken verifiers


def broken_resample_from_p(
    draft: Sequence[int], p: np.ndarray, q: np.ndarray | None, rng: np.random.Generator
) -> Verdict:
    """Bug: on rejection, draws the correction from p instead of the residual max(p - q, 0)."""
    assert q is not None
    for i, x in enumerate(draft):
        if rng.random() * q[i, x] >= p[i, x]:
            return Verdict(i, sample(p[i], rng))
    return Verdict(len(draft), sample(p[len(draft)], rng))


def broken_off_by_one(
    draft: Sequence[int], p: np.ndarray, q: np.ndarray | None, rng: np.random.Generator
) -> Verdict:
    """Bug: checks draft[i] against target row i + 1 (the classic logits-shift mistake)."""
    assert q is not None
    k = len(draft)
    for i, x in enumerate(draft):
        row = p[min(i + 1, k)]
        if rng.random() * q[i, x] >= row[x]:
            residual = np.maximum(row - q[i], 0.0)
            return Verdict(i, sample(residual / residual.sum(), rng))
    return Verdict(k, sample(p[k], rng))


# ------------------------------------------------------------------------------- verify_greedy


def test_greedy_all_accepted_gives_bonus() -> None:
    assert verify_greedy([5, 6, 7], [5, 6, 7, 8]) == Verdict(n_accepted=3, next_token=8)


@pytest.mark.parametrize(
    ("draft", "target", "expected"),
    [
        ([5, 6, 7], [1, 6, 7, 8], Verdict(0, 1)),  # first token wrong
        ([5, 6, 7], [5, 2, 7, 8], Verdict(1, 2)),  # middle
        ([5, 6, 7], [5, 6, 9, 4], Verdict(2, 9)),  # last draft token wrong
        ([5, 6, 7], [5, 6, 6, 7], Verdict(2, 6)),  # shifted match must not count
        ([3, 3], [3, 4, 3], Verdict(1, 4)),  # acceptance stops at the first mismatch
    ],
)
def test_greedy_first_mismatch(draft: list[int], target: list[int], expected: Verdict) -> None:
    assert verify_greedy(draft, target) == expected


def test_greedy_empty_draft() -> None:
    assert verify_greedy([], [42]) == Verdict(0, 42)


def test_greedy_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="len\\(draft\\) \\+ 1"):
        verify_greedy([1, 2], [1, 2])


def test_greedy_speculative_loop_equals_plain_greedy() -> None:
    """End to end: greedy speculative decoding of a toy target reproduces plain greedy exactly."""
    vocab = 4

    def target_next(ctx: list[int]) -> int:  # deterministic toy model: argmax of the context
        return (sum(ctx[-3:]) * 7 + len(ctx) * 3 + (ctx[-1] if ctx else 1)) % vocab

    rng = np.random.default_rng(0)
    for _ in range(50):
        prompt = rng.integers(0, vocab, size=3).tolist()
        plain = list(prompt)
        for _ in range(40):
            plain.append(target_next(plain))
        spec = list(prompt)
        while len(spec) < len(plain):
            k = int(rng.integers(0, 5))
            # a drafter that is often right: the true continuation with random corruptions
            draft: list[int] = []
            for _ in range(k):
                t = target_next(spec + draft)
                draft.append(t if rng.random() < 0.7 else int(rng.integers(0, vocab)))
            argmax = [target_next(spec + draft[:i]) for i in range(k + 1)]
            v = verify_greedy(draft, argmax)
            spec += draft[: v.n_accepted] + [v.next_token]
        assert spec[: len(plain)] == plain


# --------------------------------------------------------------------- verify_sampled: exact tests


def test_sampled_empty_draft_samples_from_p0() -> None:
    p = np.array([[0.0, 0.0, 1.0, 0.0]])
    assert verify_sampled([], p, None, np.random.default_rng(0)) == Verdict(0, 2)
    assert verify_sampled([], p, np.zeros((0, 4)), np.random.default_rng(0)) == Verdict(0, 2)


def test_sampled_certain_target_accepts_all_and_adds_bonus() -> None:
    p = np.eye(5)[[1, 3, 0, 4]]  # target is certain of 1, 3, 0 then bonus 4
    q = np.full((3, 5), 0.2)
    for seed in range(20):
        assert verify_sampled([1, 3, 0], p, q, np.random.default_rng(seed)) == Verdict(3, 4)
        assert verify_sampled([1, 3, 0], p, None, np.random.default_rng(seed)) == Verdict(3, 4)


def test_sampled_zero_target_prob_always_rejects_and_corrects() -> None:
    p = np.array([[0.0, 0.5, 0.5, 0.0], [0.25] * 4])
    q = np.array([[0.7, 0.1, 0.1, 0.1]])
    for seed in range(200):
        v = verify_sampled([0], p, q, np.random.default_rng(seed))
        assert v.n_accepted == 0 and v.next_token in (1, 2)
        v = verify_sampled([3], p, None, np.random.default_rng(seed))
        assert v.n_accepted == 0 and v.next_token in (1, 2)


def test_sampled_padded_vocabularies() -> None:
    """Vq != Vp: missing q columns are 0, extra q columns ignored, ids >= Vp always rejected."""
    p = np.array([[0.1, 0.2, 0.3, 0.4], [0.25] * 4])
    q_wide = np.array([[0.0, 0.0, 0.0, 0.0, 0.5, 0.5]])  # draft vocab padded to 6
    q_narrow = np.array([[0.0, 1.0]])  # draft vocab of 2; p's columns 2, 3 have q = 0
    for seed in range(200):
        v = verify_sampled([5], p, q_wide, np.random.default_rng(seed))
        assert v.n_accepted == 0 and 0 <= v.next_token < 4  # residual is p itself
        v = verify_sampled([7], p, None, np.random.default_rng(seed))  # beyond both
        assert v.n_accepted == 0 and 0 <= v.next_token < 4
        v = verify_sampled([1], p, q_narrow, np.random.default_rng(seed))
        assert v.n_accepted == 1 or v.next_token in (0, 2, 3)  # residual has no mass on 1


def test_sampled_one_random_per_accept_test() -> None:
    """k accept tests + 1 bonus draw consume exactly k + 1 uniforms: reproducible streams."""
    p = np.eye(4)[[0, 1, 2, 3]]
    q = np.full((3, 4), 0.25)
    rng = np.random.default_rng(123)
    assert verify_sampled([0, 1, 2], p, q, rng) == Verdict(3, 3)
    ref = np.random.default_rng(123)
    ref.random(4)
    assert rng.random() == ref.random()


def test_sampled_same_seed_same_verdicts() -> None:
    rng = np.random.default_rng(7)
    p, q = _dirichlet(rng, 30, 4), _dirichlet(rng, 30, 3)
    draft = [int(np.argmax(row)) for row in q]
    a = [verify_sampled(draft, p, q, np.random.default_rng(s)) for s in range(100)]
    b = [verify_sampled(draft, p, q, np.random.default_rng(s)) for s in range(100)]
    assert a == b
    assert len({v.n_accepted for v in a}) > 1  # not trivially constant


class _FixedUniform:
    """Stands in for a Generator whose random() always returns the same value."""

    def __init__(self, u: float) -> None:
        self.u = u

    def random(self) -> float:
        return self.u


def test_sampled_empty_residual_falls_back_to_p() -> None:
    # q >= p everywhere (unnormalised draft row): a rejection leaves max(p - q, 0) == 0
    p = np.array([[0.5, 0.5], [0.5, 0.5]])
    q = np.array([[1.0, 1.0]])
    v = verify_sampled([0], p, q, _FixedUniform(0.9))  # type: ignore[arg-type]
    assert v == Verdict(0, 1)


@pytest.mark.parametrize(
    ("draft", "p", "q"),
    [
        ([1], np.full((1, 3), 1 / 3), None),  # p needs k + 1 rows
        ([1, 2], np.full((3, 3), 1 / 3), np.full((1, 3), 1 / 3)),  # q needs k rows
        ([-1], np.full((2, 3), 1 / 3), None),  # negative id
    ],
)
def test_sampled_bad_shapes_raise(draft: list[int], p: np.ndarray, q: np.ndarray | None) -> None:
    with pytest.raises(ValueError):
        verify_sampled(draft, p, q, np.random.default_rng(0))


# -------------------------------------------------------------- verify_sampled: statistical tests


@pytest.mark.parametrize("case", CASES)
def test_first_token_distribution_equals_p(case: str) -> None:
    p, q, fixed = _case(case)
    if case == "truncated":  # the case must really exercise truncation on both sides
        assert 2 <= np.count_nonzero(p[0]) < 5 and np.count_nonzero(q[0]) <= 5  # top-p cut top-5
        assert np.any((q[0] > 0) & (p[0] == 0))  # the draft proposes tokens the target cut
    counts = first_token_counts(verify_sampled, p, q, N_FIRST, seed=11, fixed_draft=fixed)
    assert_fits(counts, p[0])
    assert_design_power(p[0], N_FIRST)


@pytest.mark.parametrize("broken", [broken_resample_from_p, broken_off_by_one])
def test_negative_control_broken_verifier_is_rejected(broken: Verifier) -> None:
    """Same case, same sample size, same check: a wrong verifier must fail it."""
    p, q, _ = _case("dirichlet")  # verify_sampled passes on exactly this input (seed 11)
    assert_rejected(first_token_counts(broken, p, q, N_FIRST, seed=11), p[0])


def test_negative_control_one_percent_error_is_rejected() -> None:
    """A sampler off by 0.01 in the hardest cell (nearest 0.5) fails the check at N_FIRST."""
    p, _, _ = _case("dirichlet")
    p0 = p[0]
    a = int(np.argmax(p0 * (1 - p0)))
    wrong = p0 * (1 - DELTA / (1 - p0[a]))  # move DELTA into cell a, the rest proportionally
    wrong[a] = p0[a] + DELTA
    assert abs(wrong.sum() - 1) < 1e-12
    rng = np.random.default_rng(5)
    assert_rejected(np.bincount(_draw(wrong, N_FIRST, rng), minlength=len(p0)), p0)
    assert_fits(np.bincount(_draw(p0, N_FIRST, rng), minlength=len(p0)), p0)


def _pair_counts(verifier: Verifier, p: np.ndarray, q: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Joint histogram of the first two emitted tokens of a real two-round speculative loop.

    Target rows p[j] and draft rows q[j] depend on the position j only, so the target's law of
    the first two tokens is p[0] x p[1]. Each round drafts two tokens from q and verifies them;
    if the first round emits only one token, a second round drafts from positions 1 and 2.
    """
    v = p.shape[1]
    rng_draft, rng_verify = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    d = [_draw(q[j], n, rng_draft).tolist() for j in range(3)]
    e = [_draw(q[j], n, rng_draft).tolist() for j in range(3)]
    counts = np.zeros((v, v), dtype=np.int64)
    for t in range(n):
        verdict = verifier([d[0][t], d[1][t]], p[0:3], q[0:2], rng_verify)
        out = [d[0][t], d[1][t]][: verdict.n_accepted] + [verdict.next_token]
        if len(out) < 2:  # second round starts at position 1
            verdict = verifier([e[1][t], e[2][t]], p[1:4], q[1:3], rng_verify)
            out += [e[1][t], e[2][t]][: verdict.n_accepted] + [verdict.next_token]
        counts[out[0], out[1]] += 1
    return counts


def test_first_two_tokens_joint_distribution() -> None:
    rng = np.random.default_rng(2023)
    p, q = _dirichlet(rng, 6, 4), _dirichlet(rng, 6, 3)
    expected = np.outer(p[0], p[1])
    assert_design_power(expected, N_PAIR)
    assert_fits(_pair_counts(verify_sampled, p, q, N_PAIR, seed=3), expected)
    assert_rejected(_pair_counts(broken_off_by_one, p, q, N_PAIR, seed=3), expected)


# ---------------------------------------------------------------------------- probs_from_logits


def _reference_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Obvious full-sort implementation with the same tie rule (lowest id first)."""
    x = np.asarray(logits, dtype=np.float64) / params.temperature
    v = x.shape[0]
    ids = np.arange(v)
    keep = np.zeros(v, dtype=bool)
    k = params.top_k if 0 < params.top_k < v else v
    keep[np.lexsort((ids, -x))[:k]] = True
    e = np.where(keep, np.exp(x - x.max()), 0.0)
    e /= e.sum()
    if params.top_p < 1.0:
        order = np.lexsort((ids, -e))
        n_keep = min(int(np.count_nonzero(np.cumsum(e[order]) < params.top_p)) + 1, v)
        nucleus = np.zeros(v, dtype=bool)
        nucleus[order[:n_keep]] = True
        e = np.where(nucleus, e, 0.0)
        e /= e.sum()
    return e


def test_probs_rows_sum_to_one_float64() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 5000)) * 4).astype(np.float32)
    for params in [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=50),
        SamplingParams(temperature=1.3, top_p=0.9),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.8),
    ]:
        out = probs_from_logits(logits, params)
        assert out.dtype == np.float64 and out.shape == logits.shape
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        assert np.all(out >= 0)


def test_probs_greedy_is_one_hot_first_argmax() -> None:
    out = probs_from_logits(np.array([1.0, 5.0, 2.0, 5.0]), SamplingParams())
    np.testing.assert_array_equal(out, [0.0, 1.0, 0.0, 0.0])
    out2 = probs_from_logits(np.array([[0.0, -1.0], [3.0, 4.0]]), SamplingParams(top_k=1))
    np.testing.assert_array_equal(out2, [[1.0, 0.0], [0.0, 1.0]])
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


def test_probs_top_k_keeps_exactly_k_largest() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(1000)
    out = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=7))
    kept = np.flatnonzero(out)
    assert len(kept) == 7
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(logits)[-7:]))
    np.testing.assert_allclose(out, _reference_probs(logits, SamplingParams(1.0, 7)), atol=1e-15)
    # ties at the boundary: exactly k kept, lowest ids first
    tied = probs_from_logits(np.array([1.0, 3.0, 3.0, 3.0, 0.0]), SamplingParams(1.0, top_k=2))
    np.testing.assert_allclose(tied, [0.0, 0.5, 0.5, 0.0, 0.0])
    # top_k >= V is off
    full = probs_from_logits(np.zeros(4), SamplingParams(1.0, top_k=9))
    np.testing.assert_allclose(full, 0.25)


def test_probs_top_p_keeps_minimal_nucleus() -> None:
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs)

    def nucleus(top_p: float) -> np.ndarray:
        return probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))

    np.testing.assert_allclose(nucleus(0.3), [0, 1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(nucleus(0.75), [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=1e-12)
    np.testing.assert_allclose(nucleus(0.81), np.array([0, 0.5, 0.15, 0.3]) / 0.95, atol=1e-12)
    np.testing.assert_allclose(nucleus(0.99), probs, atol=1e-12)
    # ties inside the nucleus boundary: lowest id wins
    np.testing.assert_allclose(
        probs_from_logits(np.zeros(4), SamplingParams(1.0, top_p=0.4)), [0.5, 0.5, 0, 0]
    )


def test_probs_large_vocab_top_p_matches_full_sort() -> None:
    """The partial-sort nucleus search (grows past its first guess here) equals a full sort."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, 6000)) * 0.2  # flat: the nucleus holds thousands of ids
    logits[1, ::3] = 0.5  # many exact ties
    for params in [SamplingParams(1.0, top_p=0.95), SamplingParams(0.8, top_k=700, top_p=0.6)]:
        out = probs_from_logits(logits, params)
        for r in range(2):
            ref = _reference_probs(logits[r], params)
            np.testing.assert_array_equal(out[r] > 0, ref > 0)
            np.testing.assert_allclose(out[r], ref, atol=1e-14)
    assert np.count_nonzero(probs_from_logits(logits[0], SamplingParams(1.0, top_p=0.95))) > 1000
    # all 1000 ids tied and a nucleus of 50: exactly ids 0-49, however the search partitions
    uniform = probs_from_logits(np.zeros(1000), SamplingParams(1.0, top_p=0.0495))
    np.testing.assert_array_equal(np.flatnonzero(uniform), np.arange(50))


def test_probs_many_small_cases_match_reference() -> None:
    rng = np.random.default_rng(3)
    for _ in range(400):
        v = int(rng.integers(1, 40))
        logits = rng.integers(-3, 4, size=v).astype(np.float64)  # ties everywhere
        params = SamplingParams(
            temperature=float(rng.choice([0.3, 0.7, 1.0, 2.0])),
            top_k=int(rng.integers(0, v + 2)),
            top_p=float(rng.choice([0.1, 0.5, 0.8, 0.95, 1.0])),
        )
        out = probs_from_logits(logits, params)
        ref = _reference_probs(logits, params)
        np.testing.assert_array_equal(out > 0, ref > 0)
        np.testing.assert_allclose(out, ref, atol=1e-12)


def test_probs_temperature() -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0])
    soft = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(probs_from_logits(logits, SamplingParams(1.0)), soft, atol=1e-15)
    sharp = probs_from_logits(logits, SamplingParams(0.5))
    flat = probs_from_logits(logits, SamplingParams(2.0))
    assert sharp[0] > soft[0] > flat[0]
    np.testing.assert_allclose(sharp, soft**2 / (soft**2).sum(), atol=1e-15)
    # huge logits: max-subtraction keeps it finite
    big = probs_from_logits(np.array([1000.0, 999.0]), SamplingParams(0.1))
    assert np.all(np.isfinite(big)) and big[0] > 0.9999


def test_probs_2d_equals_rows_of_1d() -> None:
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((5, 300)) * 3
    for params in [SamplingParams(0.9), SamplingParams(0.9, 10, 0.7), SamplingParams(0.9, 0, 0.5)]:
        out = probs_from_logits(logits, params)
        for r in range(5):
            np.testing.assert_array_equal(out[r], probs_from_logits(logits[r], params))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=-0.1),
        SamplingParams(temperature=float("nan")),
        SamplingParams(temperature=float("inf")),
        SamplingParams(temperature=1.0, top_k=-1),
        SamplingParams(temperature=1.0, top_p=0.0),
        SamplingParams(temperature=1.0, top_p=1.5),
        SamplingParams(temperature=1.0, top_p=float("nan")),
    ],
)
def test_validate_rejects_bad_values(params: SamplingParams) -> None:
    with pytest.raises(ValueError) as err:
        params.validate()
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError):
        probs_from_logits(np.zeros(3), params)


def test_validate_accepts_good_values_and_rng_is_seeded() -> None:
    for params in [SamplingParams(), SamplingParams(0.7, 40, 0.9, seed=1), SamplingParams(2, 1, 1)]:
        params.validate()
    a, b = SamplingParams(seed=9).rng(), SamplingParams(seed=9).rng()
    assert a.random() == b.random()


# ------------------------------------------------------------------------------------- sample()


def test_sample_never_returns_zero_probability_index() -> None:
    probs = np.array([0.0, 0.3, 0.0, 0.7 - 1e-17, 0.0, 0.0, 0.0])
    rng = np.random.default_rng(0)
    seen = np.bincount([sample(probs, rng) for _ in range(50_000)], minlength=len(probs))
    assert set(np.flatnonzero(seen)) == {1, 3}
    # extreme uniforms: u = 0 and u just below 1 (u * total may round up to total)
    assert sample(probs, _FixedUniform(0.0)) == 1  # type: ignore[arg-type]
    assert sample(probs, _FixedUniform(1.0 - 2.0**-53)) == 3  # type: ignore[arg-type]
    assert sample(np.array([0.1, 0.2, 0.0]), _FixedUniform(0.999999999)) == 1  # type: ignore[arg-type]


def test_sample_matches_distribution_and_accepts_unnormalised() -> None:
    probs = np.array([0.1, 0.0, 0.4, 0.2, 0.3, 0.0])
    rng = np.random.default_rng(1)
    counts = np.bincount([sample(probs * 3.0, rng) for _ in range(40_000)], minlength=6)
    assert_fits(counts, probs)


def test_a_tiny_temperature_samples_as_greedy_instead_of_overflowing():
    """1e-320 (a client's "almost greedy") overflowed the division: a ValueError, an
    HTTP 500 in serve.  The row is shifted to a maximum of 0 first."""
    import warnings

    x = np.array([[1.0, 3.0, 2.0, 3.0 - 1e-3]], dtype=np.float32)
    for t in (1e-320, 1e-308, 1e-6):
        for k in (0, 2):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no overflow warning either
                p = probs_from_logits(x, SamplingParams(temperature=t, top_k=k))
            assert p.tolist() == [[0.0, 1.0, 0.0, 0.0]]


# ------------------------------------------------- full-vocabulary rows: searched by blocks
# A 150k vocabulary is searched by blocks of 1024 (block maxima for top-k and top-p, block
# sums for sampling): these rows are long enough for that path, and each case is checked
# against the obvious full-sort or full-CDF answer.

BIG_V = 151_936  # Qwen2.5's: 149 blocks, so top-k up to 74 and top-p search by blocks


def _big_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    peaked = (rng.standard_normal(BIG_V) * 3).astype(np.float32)
    peaked[[5, 9000, BIG_V - 1]] = [25.0, 24.0, 23.5]  # an LLM-like head, spread over blocks
    ties = np.round(rng.standard_normal(BIG_V), 1).astype(np.float32)  # ties at every k
    one_block = np.full(BIG_V, -30.0, dtype=np.float32)
    one_block[3072:3072 + 50] = np.linspace(0, 5, 50)  # the whole head inside one block
    return {"peaked": peaked, "flat": (rng.standard_normal(BIG_V) * 0.2).astype(np.float32),
            "ties": ties, "uniform": np.zeros(BIG_V, dtype=np.float32), "one_block": one_block}


@pytest.mark.parametrize("case", ["peaked", "flat", "ties", "uniform", "one_block"])
def test_full_vocabulary_rows_match_a_full_sort(case: str) -> None:
    row = _big_rows()[case]
    for params in [SamplingParams(0.8), SamplingParams(1.0, top_k=1), SamplingParams(0.7, 8),
                   SamplingParams(1.0, 40), SamplingParams(1.3, 5000),
                   SamplingParams(1.0, top_p=0.5), SamplingParams(0.8, top_p=0.95),
                   SamplingParams(0.7, 40, 0.9), SamplingParams(1.0, 9, 0.3)]:
        out = probs_from_logits(row, params)
        ref = _reference_probs(row, params)
        np.testing.assert_array_equal(out > 0, ref > 0, err_msg=f"{case} {params}")
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-15, err_msg=f"{case} {params}")


def test_block_sampling_picks_the_index_a_full_cdf_picks() -> None:
    rng = np.random.default_rng(8)
    row = rng.random(BIG_V) ** 8  # mass everywhere, uneven
    row[rng.random(BIG_V) < 0.5] = 0.0  # half the ids impossible
    row[4096:6144] = 0.0  # two empty blocks
    cdf = np.cumsum(row)
    for u in [*rng.random(300), 0.0, 1.0 - 2.0**-53]:
        want = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), BIG_V - 1)
        want = want if row[want] > 0 else int(np.flatnonzero(row[:want])[-1])
        got = sample(row, _FixedUniform(float(u)))  # type: ignore[arg-type]
        assert row[got] > 0
        assert got == want or abs(cdf[got] - u * cdf[-1]) < 1e-9 * cdf[-1], (u, got, want)


def test_block_sampling_never_picks_a_zero_and_fits_its_row() -> None:
    row = np.zeros(BIG_V)
    ids = [0, 1023, 1024, 7000, 12_345, BIG_V - 1]  # block edges, the first and last id
    row[ids] = [0.1, 0.05, 0.3, 0.2, 0.15, 0.2]
    for u in (0.0, 1e-18, 1.0 - 2.0**-53):  # the extremes stay on ids of the row
        assert sample(row, _FixedUniform(u)) in ids  # type: ignore[arg-type]
    rng = np.random.default_rng(9)
    counts = np.bincount([sample(row * 7.0, rng) for _ in range(30_000)], minlength=BIG_V)
    assert_fits(counts[ids], row[ids])
    assert counts.sum() == counts[ids].sum()


def test_verifying_computes_target_rows_up_to_the_first_rejection_only(monkeypatch) -> None:
    import specli.sampling

    rng = np.random.default_rng(10)
    logits = (rng.standard_normal((5, 3000)) * 2).astype(np.float32)
    params = SamplingParams(0.9, 0, 0.95)
    dense = probs_from_logits(logits, params)
    rows = ProbRows(logits, params)
    assert rows.shape == (5, 3000) and len(rows) == 5
    for i in (3, 0, 4, 3):
        np.testing.assert_array_equal(rows[i], dense[i])

    computed: list[int] = []  # the ndim of each logits array turned into probabilities

    def counting(x: np.ndarray, p: SamplingParams) -> np.ndarray:
        computed.append(x.ndim)
        return probs_from_logits(x, p)

    monkeypatch.setattr(specli.sampling, "probs_from_logits", counting)
    draft = [int(np.argmin(dense[0])), 1, 2, 3]  # p(draft[0]) is tiny: rejected at once
    q = np.zeros((4, 3000))
    q[np.arange(4), draft] = 1.0
    for seed in range(20):
        computed.clear()
        v = verify_sampled(draft, ProbRows(logits, params), list(q), np.random.default_rng(seed))
        assert computed == [1] * (v.n_accepted + 1), (v, computed)
        assert v == verify_sampled(draft, dense, q, np.random.default_rng(seed))


def test_a_greedy_drafts_confidence_is_its_softmax_probability_to_0_03_percent() -> None:
    from specli.sampling import top_probability

    rng = np.random.default_rng(11)
    v = 150_000
    bound = v * math.exp(-20.0)  # the terms left out, against a sum of at least 1
    rows = [(rng.standard_normal(v) * 3).astype(np.float32),  # many terms near the top
            np.concatenate([[8.0], rng.standard_normal(v - 1) * 0.5]).astype(np.float32),
            np.concatenate([[0.0], np.full(v - 1, -20.5)]).astype(np.float32)]  # worst case
    rows[0][123] = 14.0
    for row in rows:
        for tok in (int(np.argmax(row)), 1, 77):  # a guess need not be the argmax
            x = row.astype(np.float64)
            full = float(np.exp(x[tok] - x.max()) / np.exp(x - x.max()).sum())
            got = top_probability(row, tok)
            assert -1e-6 <= got / full - 1 <= bound + 1e-6, (tok, got, full)  # float32 sums
    assert top_probability(rows[2], 0) / (1 / (1 + (v - 1) * math.exp(-20.5))) - 1 > 1e-4
