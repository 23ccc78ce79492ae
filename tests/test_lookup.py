"""Prompt lookup drafting: what it proposes, and that it stays lossless."""

from __future__ import annotations

import numpy as np

from specli.budget import FixedBudget
from specli.drafters.lookup import LookupDrafter
from specli.engine import Engine, GenerationConfig
from specli.fidelity import analyse, first_difference
from specli.runtime import encode_prompt
from specli.sampling import SamplingParams

GREEDY = SamplingParams()
RNG = np.random.default_rng(0)


def test_copies_what_followed_the_longest_recent_match():
    d = LookupDrafter(n_max=3)
    ctx = [1, 2, 3, 4, 5, 9, 9, 2, 3, 4, 6, 7, 8, 9, 2, 3, 4]
    # "2 3 4" occurred twice; the latest earlier occurrence is followed by 6 7 8
    assert d.propose(ctx, 3, GREEDY, RNG).tokens == [6, 7, 8]
    assert d.propose(ctx, 10, GREEDY, RNG).tokens == [6, 7, 8, 9, 2, 3, 4]  # up to the end


def test_falls_back_to_shorter_ngrams_and_to_nothing():
    d = LookupDrafter(n_max=3)
    assert d.propose([5, 6, 7, 1, 2, 7], 2, GREEDY, RNG).tokens == [1, 2]  # unigram "7"
    d.reset()
    assert d.propose([1, 2, 3, 4], 4, GREEDY, RNG).tokens == []  # nothing repeats
    assert d.propose([1, 2, 3, 4], 0, GREEDY, RNG).tokens == []


def test_index_follows_a_growing_and_a_changed_context():
    d = LookupDrafter(n_max=2)
    ctx = [1, 2, 3]
    assert d.propose(ctx, 2, GREEDY, RNG).tokens == []
    ctx += [1, 2]
    assert d.propose(ctx, 2, GREEDY, RNG).tokens == [3, 1]
    assert d.propose([7, 8, 7], 1, GREEDY, RNG).tokens == [8]  # new text: re-indexed


def test_keep_going_can_stop_a_draft_early():
    d = LookupDrafter()
    ctx = [1, 2, 3, 4, 5, 1, 2]
    draft = d.propose(ctx, 4, GREEDY, RNG, keep_going=lambda conf: len(conf) < 2)
    assert draft.tokens == [3, 4] and draft.probs is None and len(draft.confidence) == 2


def test_lookup_greedy_identity_on_a_repetitive_prompt(tiny_models):
    t = tiny_models["target"]
    text = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"
    prompt = encode_prompt(t, text)
    cfg = GenerationConfig(max_tokens=48, draft_max=6)
    plain = Engine(t).generate(prompt, cfg, "none")
    spec = Engine(t, LookupDrafter(), FixedBudget(6)).generate(prompt, cfg, "lookup")
    i = first_difference(plain.tokens, spec.tokens)
    if i is not None:
        assert analyse(t, prompt, plain.tokens, i).explained
    else:
        assert plain.tokens == spec.tokens
    assert spec.stats.drafted > 0
