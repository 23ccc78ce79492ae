"""Losslessness on the real Qwen2.5-Coder pair (1.5B target, 0.5B draft).

Greedy: speculative output must equal plain greedy output up to the first
divergence, and every divergence must be float noise by the rule in
specli.fidelity.  A negative control proves the check catches an off-by-one.
"""

from __future__ import annotations

import numpy as np
import pytest

from specli import engine as engine_mod
from specli.drafters.cross import same_tokenizer
from specli.drafters.model import ModelDrafter
from specli.engine import Engine, GenerationConfig
from specli.fidelity import analyse, first_difference
from specli.prompts import SPEC_BENCH_CATEGORIES, load_prompts, pick
from specli.runtime import encode_prompt
from specli.sampling import SamplingParams
from specli.verify import Verdict, verify_greedy

pytestmark = pytest.mark.real

N_TOKENS = 64
DRAFT_MAX = 4


def _prompts():
    return pick(load_prompts(), list(SPEC_BENCH_CATEGORIES), 1)  # 13 categories, 1 prompt each


def _compare(target, draft, prompt_text: str, cfg: GenerationConfig):
    prompt = encode_prompt(target, prompt_text)
    plain = Engine(target).generate(prompt, cfg, "none")
    spec = Engine(target, ModelDrafter(draft)).generate(prompt, cfg, "draft")
    return prompt, plain, spec


def _identity_row(target, prompt, plain, spec, label: str, window: int,
                  unexplained: list) -> str:
    """Greedy identity of one run against plain decoding, as a report row: identical, or
    a first divergence judged by the near-tie rule; one it does not explain is added to
    `unexplained`."""
    i = first_difference(plain.tokens, spec.tokens)
    if i is None:
        # no differing token: both must also have stopped at the same place
        assert plain.tokens == spec.tokens, (label, len(plain.tokens), len(spec.tokens))
        return (f"{label} identical ({len(plain.tokens)} tokens), "
                f"{spec.stats.mean_accepted:.2f} tokens per pass")
    d = analyse(target, prompt, plain.tokens, i, window=window)
    if not d.explained:
        unexplained.append((label, d))
    return (f"{label} diverges at {i:2d}: top-2 gap {d.gap:.3f} < noise {d.noise:.3f}"
            f" ? {d.explained}")


def test_pair_shares_tokenizer(qwen_pair):
    target, draft = qwen_pair
    assert same_tokenizer(target, draft)  # every token string equal


def test_greedy_identity_up_to_noise(qwen_pair, report):
    target, draft = qwen_pair
    cfg = GenerationConfig(max_tokens=N_TOKENS, draft_max=DRAFT_MAX)
    rows, unexplained = [], []
    drafted = accepted = 0
    for p in _prompts():
        prompt, plain, spec = _compare(target, draft, p.text, cfg)
        drafted += spec.stats.drafted
        accepted += spec.stats.accepted
        rows.append(_identity_row(target, prompt, plain, spec, f"{p.category:15s}",
                                  DRAFT_MAX + 4, unexplained))
    report("greedy identity, Qwen 1.5B target + 0.5B draft, 64 tokens", rows)
    assert len(rows) >= 10
    assert not unexplained, f"divergences not explained by batch noise: {unexplained}"
    assert drafted and accepted / drafted > 0.5  # the pair does agree; a broken drafter does not


def _off_by_one(draft, target_argmax):
    """A classic bug: accept one token past the first mismatch."""
    v = verify_greedy(draft, target_argmax)
    if v.n_accepted < len(draft):
        return Verdict(v.n_accepted + 1, target_argmax[v.n_accepted + 1])
    return v


def test_fidelity_check_catches_off_by_one(qwen_pair, monkeypatch, report):
    """Negative control: the identity test above must fail on a real bug."""
    target, draft = qwen_pair
    monkeypatch.setattr(engine_mod, "verify_greedy", _off_by_one)
    cfg = GenerationConfig(max_tokens=48, draft_max=DRAFT_MAX)
    caught, rows = 0, []
    for p in _prompts()[:3]:
        prompt, plain, spec = _compare(target, draft, p.text, cfg)
        i = first_difference(plain.tokens, spec.tokens)
        if i is None:
            rows.append(f"{p.category:15s} not caught: no divergence")
            continue
        d = analyse(target, prompt, plain.tokens, i, window=DRAFT_MAX + 4)
        caught += not d.explained
        rows.append(f"{p.category:15s} diverges at {i:2d}: gap {d.gap:.3f} vs noise {d.noise:.3f}"
                    f" -> {'caught' if not d.explained else 'NOT caught'}")
    report("negative control: off-by-one acceptance injected", rows)
    assert caught >= 2


def test_sampling_is_reproducible_with_seed(qwen_pair):
    target, draft = qwen_pair
    text = "Write a short poem about speculative decoding."
    prompt = encode_prompt(target, text)

    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
        cfg = GenerationConfig(max_tokens=40, params=params, draft_max=DRAFT_MAX)
        return Engine(target, ModelDrafter(draft)).generate(prompt, cfg, "draft").tokens

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c


def test_sampled_first_token_follows_target(qwen_pair):
    """On the real pair, the first sampled token's frequencies under speculative
    sampling match the target's own distribution (exactness itself is proven on
    synthetic distributions in test_verify.py; this checks the wiring)."""
    from specli.sampling import probs_from_logits

    target, draft = qwen_pair
    prompt = encode_prompt(target, "Name a colour.")
    target.truncate(0)
    target.eval(prompt[:-1])
    logits = target.eval(prompt[-1:], [0])[0]  # exactly as plain decoding sees it
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=8))
    rank = {int(tok): r for r, tok in enumerate(np.argsort(-logits)[:16])}
    counts: dict[int, int] = {}
    n = 300
    eng = Engine(target, ModelDrafter(draft))
    for s in range(n):
        params = SamplingParams(temperature=1.0, top_k=8, seed=s)
        cfg = GenerationConfig(max_tokens=2, params=params, draft_max=2, reuse_prefix=True)
        tok = eng.generate(prompt, cfg, "draft").tokens[0]
        counts[tok] = counts.get(tok, 0) + 1
    # the verify batch's float noise may swap the 8th and 9th likeliest tokens, no more
    assert all(rank.get(tok, 99) < 10 for tok in counts), counts
    # 300 samples: every token with p > 0.2 is seen near its rate
    for tok in np.flatnonzero(p > 0.2).tolist():
        assert abs(counts.get(tok, 0) / n - p[tok]) < 0.1, (tok, p[tok], counts.get(tok, 0) / n)


def test_lookup_hd_trees_and_cascade_greedy_identity(qwen_pair, report, monkeypatch):
    """Training-free drafters on the real 1.5B target, drafting every round (fixed:6):
    lookup, hd with one chain, hd with candidate trees (3 branches verified in one pass),
    and the draft+hd cascade.  Plain greedy output up to the near-tie rule, on
    input-grounded prompts."""
    from specli.budget import FixedBudget
    from specli.drafters.hierarchy import HierarchyDrafter
    from specli.drafters.lookup import LookupDrafter

    target, draft = qwen_pair
    trees = []
    real_eval_tree = target.eval_tree
    monkeypatch.setattr(target, "eval_tree", lambda *a: trees.append(a) or real_eval_tree(*a))
    cfg = GenerationConfig(max_tokens=N_TOKENS, draft_max=6)
    rows, unexplained, accepted = [], [], 0
    for p in pick(load_prompts(), ["summarization", "extraction", "rag"], 1):
        prompt = encode_prompt(target, p.text)
        plain = Engine(target).generate(prompt, cfg, "none")
        drafters = {"lookup": LookupDrafter(), "hd": HierarchyDrafter(),
                    "hd-trees": HierarchyDrafter(branches=3),
                    "draft+hd": ModelDrafter(draft, HierarchyDrafter())}
        for name, drafter in drafters.items():
            spec = Engine(target, drafter, FixedBudget(6)).generate(prompt, cfg, name)
            accepted += spec.stats.accepted
            rows.append(_identity_row(target, prompt, plain, spec,
                                      f"{p.category:14s} {name:8s}", 3 * 6 + 4, unexplained))
    rows.append(f"{len(trees)} target passes verified candidate trees")
    report("greedy identity, lookup, hd, hd trees and draft+hd on the 1.5B target", rows)
    assert not unexplained, unexplained
    assert accepted > 0 and trees, "no pass verified more than one candidate"


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_cross_tokenizer_greedy_identity(qwen_pair, cross_drafters, report, name):
    """SLEM with a drafter of another tokenizer, drafting every round (fixed:4)."""
    from specli.budget import FixedBudget
    from specli.drafters.cross import CrossDrafter

    target, _ = qwen_pair
    other = cross_drafters[name]
    assert not same_tokenizer(target, other)
    cfg = GenerationConfig(max_tokens=48, draft_max=4)
    rows, unexplained, drafted, accepted = [], [], 0, 0
    for p in pick(load_prompts(), ["coding", "summarization", "qa"], 1):
        prompt = encode_prompt(target, p.text)
        plain = Engine(target).generate(prompt, cfg, "none")
        spec = Engine(target, CrossDrafter(target, other), FixedBudget(4)).generate(
            prompt, cfg, "draft")
        drafted += spec.stats.drafted
        accepted += spec.stats.accepted
        rows.append(_identity_row(target, prompt, plain, spec, f"{p.category:14s}", 8,
                                  unexplained))
    rows.append(f"accepted {accepted} of {drafted} drafted tokens")
    report(f"greedy identity, 1.5B target with {name} (cross-tokenizer), 48 tokens", rows)
    assert not unexplained, unexplained
    assert drafted and accepted / drafted > 0.2  # the drafter's text does help


def _duo_compare(target, draft, prompt, cfg, drafter_cls=None):
    from specli.budget import FixedBudget
    from specli.drafters.duo import DuoDrafter

    plain = Engine(target).generate(prompt, cfg, "none")
    cls = drafter_cls or DuoDrafter
    duo = cls(draft, branches=target.max_branches)
    try:
        spec = Engine(target, duo, FixedBudget(cfg.draft_max)).generate(prompt, cfg, "duo")
    finally:
        duo.close()
    return plain, spec, duo


def test_duo_greedy_identity_up_to_noise(qwen_pair, report):
    """duo drafting every round (fixed:4) while the target verifies, multi-sequence drafts
    on (the target holds 3 sequences); then a drafter whose early work is wrong every
    round (its bet on the target's next token is always replaced by another)."""
    from test_duo import WrongGuess

    target, draft = qwen_pair
    cfg = GenerationConfig(max_tokens=N_TOKENS, draft_max=DRAFT_MAX)
    rows, unexplained = [], []
    hits = trees = accepted = 0
    runs = [(p, None) for p in _prompts()[:4]] + [(p, WrongGuess) for p in _prompts()[6:8]]
    for p, cls in runs:
        prompt = encode_prompt(target, p.text)
        plain, spec, duo = _duo_compare(target, draft, prompt, cfg, cls)
        name = "duo" if cls is None else "duo, wrong bets"
        if cls is None:
            hits, trees = hits + duo.hits, trees + duo.trees
        else:
            assert duo.hits == 0 and duo.speculated > 0
        accepted += spec.stats.accepted
        rows.append(_identity_row(target, prompt, plain, spec, f"{p.category:15s} {name:15s}",
                                  DRAFT_MAX + 4, unexplained))
    rows.append(f"early work used in {hits} rounds; {trees} multi-sequence drafts")
    report("greedy identity, duo, Qwen 1.5B target + 0.5B draft beside it, 64 tokens", rows)
    assert not unexplained, unexplained
    assert hits > 0 and accepted > 0


def test_duo_sampling_is_reproducible_with_seed(qwen_pair):
    from specli.budget import FixedBudget
    from specli.drafters.duo import DuoDrafter

    target, draft = qwen_pair
    prompt = encode_prompt(target, "Write a short poem about speculative decoding.")

    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
        cfg = GenerationConfig(max_tokens=40, params=params, draft_max=DRAFT_MAX)
        duo = DuoDrafter(draft, branches=target.max_branches)
        try:
            return Engine(target, duo, FixedBudget(DRAFT_MAX)).generate(prompt, cfg, "duo").tokens
        finally:
            duo.close()

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c
