"""A draft model with another tokenizer: SLEM (greedy), TLI (sampling) and the text
bookkeeping between two tokenizations, on tiny models with different vocabularies."""

from __future__ import annotations

import numpy as np
import pytest
from test_verify import assert_fits

from specli.budget import FixedBudget
from specli.drafters.cross import CrossDrafter, _covered, decode_text, same_tokenizer
from specli.engine import Engine, GenerationConfig
from specli.fidelity import analyse, first_difference
from specli.runtime import encode_prompt
from specli.sampling import SamplingParams

PROMPT = "Once upon a time, the little robot"


@pytest.fixture
def pair(tiny_models):
    t, other = tiny_models["target"], tiny_models["other"]
    assert not same_tokenizer(t, other)
    return t, other


def test_utf8_and_covered_text():
    assert decode_text("né".encode()[:-1]) == ("n", 1)  # half of é waits for the rest
    assert decode_text("né".encode()) == ("né", 3)
    assert decode_text(b"a\xffb") == ("ab", 3)  # an invalid byte is skipped
    assert _covered(5, [b"ab", b" cd"]) == [2, 5]
    # a tokenizer that adds a leading space: charged to the first token
    assert _covered(5, [b" ab", b" cd"]) == [2, 5]
    assert _covered(2, [b" ", b"ab"]) == [0, 2]


def test_drafter_context_follows_the_text_and_keeps_accepted_drafts(pair):
    t, other = pair
    cd = CrossDrafter(t, other)
    ctx = encode_prompt(t, PROMPT)
    d_ctx = cd.drafter_context(ctx)
    text = b"".join(t.token_bytes(x, special=True) for x in ctx)
    assert b"".join(other.token_bytes(x, special=True) for x in d_ctx) == text
    # the drafter drafts; the target accepts text equal to the first drafted tokens
    d = cd.propose(ctx, 6, SamplingParams(), np.random.default_rng(0))
    assert d.tokens and d.probs is None
    drafted = cd._d_tokens[len(d_ctx):]
    accepted_text = b"".join(other.token_bytes(x) for x in drafted[:3])
    tail = _spell(t, [other.token_bytes(x) for x in drafted[:3]])
    d_ctx2 = cd.drafter_context(ctx + tail)
    # its own first drafted tokens (less one) are kept: no re-tokenization of them
    assert d_ctx2[: len(d_ctx) + 2] == d_ctx + drafted[:2]
    assert b"".join(other.token_bytes(x, special=True) for x in d_ctx2) == text + accepted_text
    # a rejected draft is rolled back: a different continuation re-tokenizes from there
    d_ctx3 = cd.drafter_context(ctx + t.tokenize(" zebra", add_bos=False, special=False))
    assert d_ctx3[: len(d_ctx) - 1] == d_ctx[:-1]
    assert b"".join(other.token_bytes(x, special=True) for x in d_ctx3) == text + b" zebra"


def _spell(t, pieces: list[bytes]) -> list[int]:
    """Target tokens with exactly these bytes (byte-fallback tokens for invalid UTF-8),
    as the target may itself have produced them."""
    out = []
    for p in pieces:
        try:
            out += t.tokenize(p.decode(), add_bos=False, special=False)
        except UnicodeDecodeError:
            out += [next(i for i in range(t.n_vocab) if t.token_bytes(i) == bytes([b]))
                    for b in p]
    return out


def test_slem_drafts_are_target_tokens_spelling_the_drafters_text(pair):
    t, other = pair
    cd = CrossDrafter(t, other)
    ctx = encode_prompt(t, PROMPT)
    d = cd.propose(ctx, 8, SamplingParams(), np.random.default_rng(0))
    drafted = cd._d_tokens[cd._n_text:]
    draft_text = decode_text(b"".join(other.token_bytes(x) for x in drafted))[0].encode()
    ours = b"".join(t.token_bytes(x) for x in d.tokens)
    assert d.tokens and draft_text.startswith(ours) and len(ours) < len(draft_text)
    assert len(d.tokens) <= 8 and len(d.confidence) == len(d.tokens)


def test_greedy_cross_drafting_equals_plain_decoding(pair):
    t, other = pair
    prompt = encode_prompt(t, PROMPT)
    cfg = GenerationConfig(max_tokens=40, draft_max=6)
    plain = Engine(t).generate(prompt, cfg, "none")
    spec = Engine(t, CrossDrafter(t, other), FixedBudget(6)).generate(prompt, cfg, "draft")
    assert spec.stats.drafted > 0
    i = first_difference(plain.tokens, spec.tokens)
    if i is not None:
        assert analyse(t, prompt, plain.tokens, i).explained
    else:
        assert plain.tokens == spec.tokens
    assert "cross-tokenizer drafting" in spec.drafter_note


def test_tli_shares_only_common_strings_and_samples_the_law_it_reports(pair):
    t, other = pair
    cd = CrossDrafter(t, other)
    d_ids, t_ids = cd.shared()
    assert 0 < len(d_ids) < other.n_vocab
    for di, ti in zip(d_ids[::25], t_ids[::25], strict=True):
        assert other.token_bytes(int(di)) == t.token_bytes(int(ti)) != b""
    target_pieces = {t.token_bytes(j) for j in range(t.n_vocab)}
    only_b = [i for i in range(other.n_vocab)
              if other.token_bytes(i) and other.token_bytes(i) not in target_pieces]
    assert only_b and not set(only_b) & set(d_ids.tolist())  # tokens only one side has
    assert any(len(other.token_bytes(int(i))) > 2 for i in d_ids)  # multi-character ones

    ctx = encode_prompt(t, PROMPT)
    params = SamplingParams(temperature=1.0)
    rng = np.random.default_rng(4)
    counts = np.zeros(t.n_vocab)
    row = None
    n = 4000
    for _ in range(n):
        d = cd.propose(ctx, 1, params, rng)
        counts[d.tokens[0]] += 1
        if row is None:
            row = d.probs[0]
        assert np.array_equal(d.probs[0], row)  # the same context, the same reported law
    assert row.sum() == pytest.approx(1.0) and not row[np.setdiff1d(range(t.n_vocab), t_ids)].any()
    assert_fits(counts, row)


def test_sampled_cross_drafting_is_seeded_and_runs(pair):
    t, other = pair
    prompt = encode_prompt(t, PROMPT)
    cfg = GenerationConfig(max_tokens=24, draft_max=4, params=SamplingParams(0.8, seed=3))
    runs = [Engine(t, CrossDrafter(t, other), FixedBudget(4)).generate(prompt, cfg, "draft")
            for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and runs[0].stats.drafted > 0
