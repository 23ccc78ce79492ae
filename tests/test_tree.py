"""Multi-candidate (tree) verification: exact greedy walks, the exact sampling law, and the
budget's choice of which candidate nodes are worth a target pass."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_verify import assert_design_power, assert_fits, assert_rejected

from specli.backends.base import LoadOptions
from specli.backends.gguf import GGUFModel
from specli.budget import CostModel, FixedBudget, best_tree
from specli.drafters.hierarchy import HierarchyDrafter
from specli.engine import Engine, GenerationConfig
from specli.errors import SpecliError
from specli.fidelity import analyse, first_difference
from specli.runtime import encode_prompt
from specli.sampling import SamplingParams, sample
from specli.tree import children_of
from specli.verify import (
    TreeVerdict,
    verify_greedy,
    verify_tree_greedy,
    verify_tree_sampled,
)

#   root ─ 2 ─ 1          nodes: 0:2  1:4  2:0  3:1 (under 0)  4:3 (under 0)  5:5 (under 1)
#        │   └ 3
#        ├ 4 ─ 5
#        └ 0
TOKENS = [2, 4, 0, 1, 3, 5]
PARENTS = [-1, -1, -1, 0, 0, 1]
V = 6


def test_children_in_draft_order_and_bad_parents():
    assert children_of(PARENTS) == {-1: [0, 1, 2], 0: [3, 4], 1: [5], 2: [], 3: [], 4: [], 5: []}
    with pytest.raises(ValueError, match="parents must precede"):
        children_of([-1, 2, 0])


@pytest.mark.parametrize(
    ("argmax", "expected"),
    [
        ([4, 1, 5, 9, 9, 9, 2], TreeVerdict([1, 5], 2)),  # second branch, to its leaf, bonus
        ([2, 3, 9, 9, 9, 7, 9], TreeVerdict([0, 4], 7)),  # first branch, second child
        ([2, 0, 9, 9, 9, 9, 9], TreeVerdict([0], 0)),  # no child of node 0 is 0
        ([5, 9, 9, 9, 9, 9, 9], TreeVerdict([], 5)),  # no root child matches
    ],
)
def test_greedy_follows_the_target_argmax_down_the_tree(argmax, expected):
    assert verify_tree_greedy(TOKENS, PARENTS, argmax) == expected


def test_greedy_on_a_chain_equals_chain_verification():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(0, 6))
        draft = rng.integers(0, 3, size=k).tolist()
        argmax = rng.integers(0, 3, size=k + 1).tolist()
        v = verify_greedy(draft, argmax)
        t = verify_tree_greedy(draft, list(range(-1, k - 1)), argmax)
        assert (len(t.path), t.next_token) == (v.n_accepted, v.next_token)
        assert t.path == list(range(v.n_accepted))


def _rows(rng):
    """A target that depends on what came before: row 0 after the root; `cond[y]` after a
    first token y.  Node rows follow their path, as a real model's would."""
    p0 = rng.dirichlet(np.ones(V))
    cond = rng.dirichlet(np.ones(V), size=V)
    deep = rng.dirichlet(np.ones(V))  # after two tokens (not checked: beyond the pair)
    rows = [p0] + [cond[TOKENS[i]] if PARENTS[i] == -1 else deep for i in range(len(TOKENS))]
    return np.array(rows), p0, cond


def _pair_counts(verifier, p, cond, n, seed) -> np.ndarray:
    """Joint histogram of the first two emitted tokens.  When the walk stops after one
    token, the next round (an empty tree after that token) supplies the second."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((V, V), dtype=np.int64)
    for _ in range(n):
        v = verifier(TOKENS, PARENTS, p, rng)
        out = [TOKENS[i] for i in v.path] + [v.next_token]
        if len(out) < 2:
            out.append(sample(cond[out[0]], rng))
        counts[out[0], out[1]] += 1
    return counts


def broken_no_renormalisation(tokens, parents, p, rng) -> TreeVerdict:
    """Bug: tries each child with its plain p(x), forgetting the rejected siblings' mass."""
    kids = children_of(parents)
    path, node = [], -1
    while True:
        r = np.array(p[node + 1], dtype=np.float64)
        acc = None
        for c in kids[node]:
            if rng.random() < r[tokens[c]]:
                acc = c
                break
            r[tokens[c]] = 0.0
        if acc is None:
            return TreeVerdict(path, sample(r, rng))
        path.append(acc)
        node = acc


def test_sampled_tree_emits_the_target_distribution_exactly():
    p, p0, cond = _rows(np.random.default_rng(7))
    expected = p0[:, None] * cond  # P(first = y, second = z) = p0(y) cond[y](z)
    n = 150_000
    assert_design_power(expected, n)
    assert_fits(_pair_counts(verify_tree_sampled, p, cond, n, seed=1), expected)
    assert_rejected(_pair_counts(broken_no_renormalisation, p, cond, n, seed=1), expected)


def test_sampled_tree_child_with_zero_probability_is_never_emitted():
    p = np.zeros((len(TOKENS) + 1, V))
    p[:, 3] = 1.0  # the target is certain of token 3 everywhere
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = verify_tree_sampled(TOKENS, PARENTS, p, rng)
        assert v == TreeVerdict([], 3)  # no root child is 3


def test_best_tree_keeps_the_likeliest_nodes_the_costs_pay_for():
    # probabilities per node given its parent was accepted; path probabilities
    # 0: .6, 1: .3, 2: .05, 3: .6*.9=.54, 4: .6*.05=.03, 5: .3*.5=.15
    p = [0.6, 0.3, 0.05, 0.9, 0.05, 0.5]
    flat = CostModel([1.0] * 64, 0.0)  # a GPU: extra tokens in a pass cost nothing
    assert best_tree(flat, PARENTS, p) == [0, 1, 2, 3, 4, 5]
    steep = CostModel([1.0 + n for n in range(64)], 0.0)  # each extra token costs a step
    assert best_tree(steep, PARENTS, p) == []
    # a pass of 2 or 3 tokens costs 1.5 steps, more than 3 costs 3: node 0 then node 3
    mid = CostModel([1.0, 1.5, 1.5] + [3.0] * 61, 0.0)
    assert best_tree(mid, PARENTS, p) == [0, 3]
    # a node is kept only with its parent: never a child whose path is cut
    kept = best_tree(CostModel([1.0, 1.2, 1.3, 1.35, 9.0] + [9.0] * 59, 0.0), PARENTS, p)
    assert kept == [0, 1, 3]
    assert all(PARENTS[i] == -1 or PARENTS[i] in kept for i in kept)


# ------------------------------------------------------------- llama.cpp sequences, tiny model

TREE = {  # node: (token, parent)   a-b-c, a-f, d-e
    "tokens": [11, 12, 13, 14, 15, 16],
    "parents": [-1, 0, 1, -1, 3, 0],
}


@pytest.fixture(scope="module")
def tree_pair(tiny_paths):
    """The tiny target twice: with 3 sequences (trees) and with 1 (chains, the reference)."""
    opts = LoadOptions(n_ctx=512, n_threads=1, flash_attn="off", kv_type="f32")
    tree = GGUFModel(tiny_paths["target"], replace(opts, branches=3))
    ref = GGUFModel(tiny_paths["target"], opts)
    yield tree, ref
    tree.close()
    ref.close()


def _chain_logits(ref, prompt, chain, extra=()):
    ref.truncate(0)
    ref.eval(prompt[:-1])
    seq = [prompt[-1], *chain, *extra]
    return ref.eval(seq, range(len(seq)))


@pytest.mark.parametrize("path", [[], [0], [0, 1, 2], [0, 5], [3, 4], [3]])
def test_one_pass_over_a_tree_equals_each_branch_alone(tree_pair, path):
    tree, ref = tree_pair
    prompt = encode_prompt(tree, "Once upon a time")
    tokens, parents = TREE["tokens"], TREE["parents"]
    tree.truncate(0)
    tree.eval(prompt[:-1])
    logits = tree.eval_tree(prompt[-1], tokens, parents)
    for leaf_path in ([0, 1, 2], [0, 5], [3, 4]):  # every branch, compared row by row
        want = _chain_logits(ref, prompt, [tokens[i] for i in leaf_path])
        got = logits[[0, *(i + 1 for i in leaf_path)]]
        np.testing.assert_allclose(got, want, atol=1e-4)
    # keep one path: the cache is then as if that chain alone had been decoded
    tree.keep_path(path)
    kept = [tokens[i] for i in path]
    assert tree.tokens == [*prompt, *kept]
    after = tree.eval([7, 8], [0, 1])
    want = _chain_logits(ref, prompt, kept, [7, 8])[-2:]
    np.testing.assert_allclose(after, want, atol=1e-4)


def test_tree_bigger_than_the_sequences_is_refused(tree_pair):
    tree, _ = tree_pair
    tree.truncate(0)
    tree.eval([1, 2, 3])
    with pytest.raises(SpecliError, match="4 branches"):
        tree.eval_tree(4, [5, 6, 7, 8], [-1, -1, -1, -1])


def test_engine_with_candidate_trees_equals_plain_greedy(tree_pair, monkeypatch, tmp_path):
    tree, _ = tree_pair
    text = ("the cat sat on the mat. the dog sat on the rug. the cat ran to the dog. "
            "the dog sat on the mat. the cat sat on the")
    prompt = encode_prompt(tree, text)
    cfg = GenerationConfig(max_tokens=48, draft_max=6)
    plain = Engine(tree).generate(prompt, cfg, "none")
    passes = []
    real = tree.eval_tree
    monkeypatch.setattr(tree, "eval_tree", lambda *a: passes.append(a) or real(*a))
    hd = HierarchyDrafter(branches=3)
    spec = Engine(tree, hd, FixedBudget(6)).generate(prompt, cfg, "hd")
    assert passes, "no round verified more than one branch"
    # --stats' "hd sources" counts what the target judged, branches too: never more
    # accepted than drafted (it printed "70/35" when only the main chain was counted)
    assert sum(d for d, _ in hd.tokens.values()) == spec.stats.drafted
    assert sum(a for _, a in hd.tokens.values()) == spec.stats.accepted
    assert all(a <= d for d, a in hd.tokens.values()), hd.describe()
    i = first_difference(plain.tokens, spec.tokens)
    if i is not None:
        assert analyse(tree, prompt, plain.tokens, i).explained
    else:
        assert plain.tokens == spec.tokens
    # sampled and seeded: reproducible through the tree path as well
    seeded = GenerationConfig(max_tokens=32, draft_max=6, params=SamplingParams(0.8, seed=5))
    runs = [Engine(tree, HierarchyDrafter(branches=3), FixedBudget(6)).generate(
        prompt, seeded, "hd").tokens for _ in range(2)]
    assert runs[0] == runs[1]


def test_siblings_share_one_acceptance():
    from specli.budget import exclusive

    # three candidates for the same next token, each judged 0.6 alone: together they can
    # not be accepted 1.8 times; weighted by confidence share they sum to at most 0.6
    p = exclusive([-1, -1, -1, 0], [0.6, 0.6, 0.6, 0.9], [0.5, 0.3, 0.2, 0.8])
    assert p[:3] == pytest.approx([0.3, 0.18, 0.12]) and p[3] == 0.9
    assert sum(p[:3]) <= 0.6
