"""The cascade (draft+hd) and `--method auto` on tiny real models, and the cascade's
sampling law on synthetic logits."""

from __future__ import annotations

import numpy as np
from test_verify import assert_design_power, assert_fits, assert_rejected

from specli.budget import AdaptiveBudget, CostModel
from specli.drafters.hierarchy import HierarchyDrafter
from specli.drafters.model import ModelDrafter
from specli.engine import Engine, GenerationConfig
from specli.fidelity import analyse, first_difference
from specli.lineup import Lineup, Member
from specli.runtime import encode_prompt
from specli.sampling import SamplingParams, draft_token, probs_from_logits

STEP = 0.026
CPU = CostModel([STEP * x for x in (1, 1.66, 1.9, 2.22, 2.5, 2.76, 3.7, 4.67)], 0.6 * STEP)
GPU = CostModel([STEP * (1 + 0.01 * i) for i in range(16)], 0.05 * STEP)
FREE = CostModel(GPU.verify, 0.0)
TEXT = ("the cat sat on the mat. the dog sat on the rug. the cat ran to the dog. "
        "the dog sat on the mat. the cat sat on the")


def _identical_up_to_noise(t, prompt, plain, spec):
    i = first_difference(plain.tokens, spec.tokens)
    if i is None:
        assert plain.tokens == spec.tokens
    else:
        assert analyse(t, prompt, plain.tokens, i).explained


def _own_words(d) -> list[int]:
    """A context holding the draft model's own earlier continuations, so n-gram lookup
    can guess what it will say next (a random tiny model has no other regularity)."""
    ctx: list[int] = []
    for text in ("the cat sat on the mat. the dog sat on the rug.", "Once upon a time"):
        p = encode_prompt(d, text)
        ctx += p + Engine(d).generate(p, GenerationConfig(max_tokens=60), "none").tokens
    return ctx[:-48]  # stop inside the second continuation


def test_cascade_drafts_what_the_draft_model_alone_drafts(tiny_models):
    t, d = tiny_models["target"], tiny_models["draft"]
    prompt = _own_words(d)
    greedy = SamplingParams()
    rng = np.random.default_rng(0)
    alone = ModelDrafter(d).propose(prompt, 8, greedy, rng).tokens
    cascade = ModelDrafter(d, HierarchyDrafter())
    with_guesses = cascade.propose(prompt, 8, greedy, rng).tokens
    assert with_guesses == alone
    assert cascade.guessed > 0 and cascade.guess_hits > 0, "the n-gram guesses never helped"
    assert d.tokens[: len(prompt)] == prompt  # the draft model's cache still holds the context

    cfg = GenerationConfig(max_tokens=40, draft_max=6)
    plain = Engine(t).generate(prompt, cfg, "none")
    res = Engine(t, ModelDrafter(d, HierarchyDrafter()), AdaptiveBudget(GPU)).generate(
        prompt, cfg, "draft+hd")
    _identical_up_to_noise(t, prompt, plain, res)
    assert res.stats.draft_rounds > 0 and "cascade: n-gram lookup guessed" in res.drafter_note


def _choose_counts(logits, params, guess, n, seed):
    rng = np.random.default_rng(seed)
    counts = np.zeros(logits.shape[0], dtype=np.int64)
    for _ in range(n):
        counts[draft_token(logits, params, rng, guess)[0]] += 1
    return counts


def test_a_guess_leaves_the_draft_model_law_unchanged():
    """A drafted token must be distributed as q whatever was guessed, or the target's
    speculative sampling (which is told q) would not be exact."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(12) * 1.5
    params = SamplingParams(temperature=0.8, top_k=8)
    q = probs_from_logits(logits, params)
    n = 60_000
    assert_design_power(q, n)
    likely, unlikely, outside = int(np.argmax(q)), int(np.argsort(q)[-6]), int(np.argmin(q))
    for guess in (likely, unlikely, outside, None):
        assert_fits(_choose_counts(logits, params, guess, n, seed=guess or 0), q)
    # negative control: on a rejected guess, drawing from q itself (not q without the
    # guess) gives the guess too much mass, and the same test sees it
    rng2 = np.random.default_rng(1)
    biased = np.zeros_like(q)
    for _ in range(n):
        tok = likely if rng2.random() < q[likely] else int(rng2.choice(len(q), p=q))
        biased[tok] += 1
    assert_rejected(biased, q)


def _auto(t, d, cost_draft, cost_hd):
    hd = HierarchyDrafter(branches=1)
    return Engine(t, lineup=Lineup([
        Member("hd", hd, AdaptiveBudget(cost_hd)),
        Member("draft", ModelDrafter(d), AdaptiveBudget(cost_draft)),
        Member("draft+hd", ModelDrafter(d, hd), AdaptiveBudget(cost_draft)),
    ], learner=hd, name="auto"))


def test_auto_takes_plain_steps_when_nothing_pays_and_drafts_when_it_does(tiny_models):
    t, d = tiny_models["target"], tiny_models["draft"]
    prompt = encode_prompt(t, TEXT)
    cfg = GenerationConfig(max_tokens=40, draft_max=6)
    plain = Engine(t).generate(prompt, cfg, "none")

    steep = CostModel([STEP * (1 + n) for n in range(16)], 0.6 * STEP)  # every token a step
    never = _auto(t, d, steep, CostModel(steep.verify, 0.0)).generate(prompt, cfg, "auto")
    assert never.tokens == plain.tokens
    assert never.stats.rounds_by == {"none": never.stats.target_forwards}
    assert never.budget == "auto" and "hd:" in never.cost_note

    eager = _auto(t, d, GPU, FREE).generate(prompt, cfg, "auto")
    _identical_up_to_noise(t, prompt, plain, eager)
    used = set(eager.stats.rounds_by) - {"none"}
    assert used and used <= {"hd", "draft", "draft+hd"}
    assert eager.stats.mean_accepted > 1.5
    assert "auto chose each round among: none, hd, draft, draft+hd" in eager.drafter_note
