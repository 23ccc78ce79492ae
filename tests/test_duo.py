"""duo: the drafter drafts the next round in its own thread while the target verifies.

Fake Markov backends (numpy tables, optional sleeps standing for compute) give exact laws
and controllable timing: drafting overlaps verification, a drafter that errs or hangs
ends the generation with a SpecliError, early work that is wrong every round changes
nothing, and sampled output follows the target's law exactly (chi-square).  Tiny GGUF
models check the same on llama.cpp, multi-sequence drafts included.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_cli import run
from test_verify import assert_design_power, assert_fits, assert_rejected

from specli.backends.base import LoadOptions
from specli.backends.gguf import GGUFModel
from specli.budget import (
    Acceptance,
    CostModel,
    FixedBudget,
    Outcome,
    OverlapBudget,
    Plan,
    best_length,
    best_overlap_length,
    overlap_rate,
    overlapped_verify,
    rate,
)
from specli.drafters.duo import Drafted, DuoDrafter, _Job
from specli.engine import Engine, GenerationConfig
from specli.errors import SpecliError
from specli.fidelity import analyse, first_difference
from specli.runtime import encode_prompt
from specli.sampling import SamplingParams


class Markov:
    """A fake Backend whose next-token logits depend on the last token only (`table`), so
    every continuation's exact law is known.  `step_s` of sleep per call stands for
    compute (time.sleep releases the GIL, as llama_decode does); calls are logged with
    their thread and start/end times."""

    name = "fake"
    path = "fake.gguf"
    bos = None
    add_bos = False
    catch_up_stepwise = 0

    def __init__(self, table: np.ndarray, who: str, log: list | None = None,
                 step_s: float = 0.0, n_ctx: int = 512) -> None:
        self.table = np.asarray(table, dtype=np.float32)
        self.n_vocab = self.table.shape[0]
        self.n_ctx = n_ctx
        self.tokens: list[int] = []
        self.who, self.log, self.step_s = who, log, step_s
        self.fail_after: int | None = None  # raise on the call after that many
        self.block: threading.Event | None = None  # hang until set
        self.calls = 0

    def eval(self, tokens: Sequence[int], logits_for: Sequence[int] = ()) -> np.ndarray:
        t0 = time.perf_counter()
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated drafter crash")
        if self.block is not None:
            self.block.wait()
        if self.step_s:
            time.sleep(self.step_s)
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise SpecliError("context full")
        self.tokens += list(tokens)
        if self.log is not None:
            self.log.append((self.who, threading.get_ident(), t0, time.perf_counter()))
        return np.stack([self.table[tokens[i]] for i in logits_for]) if logits_for else \
            np.empty((0, self.n_vocab), dtype=np.float32)

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def is_eog(self, token: int) -> bool:
        return False

    @property
    def max_branches(self) -> int:
        return 1

    def close(self) -> None:
        pass


def _table(seed: int, v: int, scale: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(v, v)) * scale


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _duo(target: Markov, draft: Markov, k: int, **kw) -> tuple[Engine, DuoDrafter]:
    drafter = DuoDrafter(draft, **kw)
    return Engine(target, drafter, FixedBudget(k)), drafter


class WrongGuess(DuoDrafter):
    """Its early work is wrong every round: the token it bets the target picks next is
    replaced by another one, so nothing drafted in the background can ever be used."""

    def _guess_and_grow(self, job: _Job, k, params, rng, rule) -> Drafted:
        out = super()._guess_and_grow(job, k, params, rng, rule)
        if job.guess is not None:
            job.guess = (job.guess + 1) % self.model.n_vocab
        return out


# ------------------------------------------------------------------- greedy, fake backends


def test_greedy_duo_equals_plain_and_uses_its_early_work():
    table = _table(0, 16)
    target, draft = Markov(table, "target"), Markov(table, "draft")  # the drafter agrees
    cfg = GenerationConfig(max_tokens=40, draft_max=4)
    plain = Engine(target).generate([3], cfg, "none")
    eng, d = _duo(target, draft, 4)
    try:
        res = eng.generate([3], cfg, "duo")
    finally:
        d.close()
    assert res.tokens == plain.tokens
    assert d.hits >= 5 and d.hits >= d.speculated - 2  # an exact drafter: (almost) every bet wins
    assert res.stats.target_forwards <= 9  # 5 tokens a pass


def test_early_work_wrong_every_round_changes_nothing():
    table = _table(1, 16)
    cfg = GenerationConfig(max_tokens=40, draft_max=3)
    plain = Engine(Markov(table, "target")).generate([5], cfg, "none")
    target, draft = Markov(table, "target"), Markov(table, "draft")
    d = WrongGuess(draft)
    try:
        res = Engine(target, d, FixedBudget(3)).generate([5], cfg, "duo")
    finally:
        d.close()
    assert res.tokens == plain.tokens
    assert d.speculated >= 5 and d.hits == 0  # it bet every round and never won
    assert res.stats.accepted == res.stats.drafted  # the drafts themselves (made anew) were right


def test_a_drafter_that_disagrees_changes_nothing():
    target_t, draft_t = _table(2, 12), _table(3, 12)  # unrelated models
    cfg = GenerationConfig(max_tokens=40, draft_max=3)
    plain = Engine(Markov(target_t, "target")).generate([1], cfg, "none")
    eng, d = _duo(Markov(target_t, "target"), Markov(draft_t, "draft"), 3)
    try:
        res = eng.generate([1], cfg, "duo")
    finally:
        d.close()
    assert res.tokens == plain.tokens
    assert res.stats.accepted < res.stats.drafted


# ----------------------------------------------------------------------------- concurrency


def test_drafting_overlaps_verification():
    """Timestamps: draft-model calls run on one thread, never the main one, and while
    target passes are under way."""
    table = _table(4, 16)
    log: list = []
    target = Markov(table, "target", log, step_s=0.03)
    draft = Markov(table, "draft", log, step_s=0.01)
    eng, d = _duo(target, draft, 3)
    try:
        res = eng.generate([2], GenerationConfig(max_tokens=24, draft_max=3), "duo")
    finally:
        d.close()
    main = threading.get_ident()
    verify = [(a, b) for who, _, a, b in log if who == "target"]
    drafting = [(tid, a, b) for who, tid, a, b in log if who == "draft"]
    assert {tid for tid, _, _ in drafting} != {main} and len({t for t, _, _ in drafting}) == 1
    assert {tid for who, tid, _, _ in log if who == "target"} == {main}
    inside = sum(any(a < s < b for a, b in verify) for _, s, _ in drafting)
    assert inside >= 5, f"only {inside} of {len(drafting)} draft calls began during a verify pass"
    assert d.hits >= 3 and res.stats.n_generated == 24
    # and they did run side by side: less time than the calls took one after another
    busy = sum(b - a for a, b in verify) + sum(b - a for _, a, b in drafting)
    assert res.stats.wall_s < busy - 0.05


def test_an_exception_in_the_drafter_ends_the_generation_with_an_error():
    table = _table(5, 16)
    for fail_after in (0, 3, 7):  # the first foreground draft; later, speculation or not
        draft = Markov(table, "draft", step_s=0.005)
        draft.fail_after = fail_after
        eng, d = _duo(Markov(table, "target", step_s=0.01), draft, 3)
        t0 = time.perf_counter()
        try:
            with pytest.raises(SpecliError, match="duo drafter failed: RuntimeError: simulated"):
                eng.generate([2], GenerationConfig(max_tokens=200, draft_max=3), "duo")
            with pytest.raises(SpecliError):  # and stays failed: its model is suspect
                eng.generate([2], GenerationConfig(max_tokens=5, draft_max=3), "duo")
        finally:
            d.close()
        assert time.perf_counter() - t0 < 5
        assert d.stopped


def test_a_hung_drafter_ends_the_generation_with_an_error():
    table = _table(6, 16)
    draft = Markov(table, "draft")
    eng, d = _duo(Markov(table, "target"), draft, 3, timeout_s=0.5)
    draft.block = threading.Event()
    t0 = time.perf_counter()
    try:
        with pytest.raises(SpecliError, match="did not answer"):
            eng.generate([2], GenerationConfig(max_tokens=20, draft_max=3), "duo")
        assert time.perf_counter() - t0 < 3
    finally:
        draft.block.set()  # let the thread go, then it can stop
        d.close()
    assert d.stopped


# --------------------------------------------------------------------------------- sampling


V = 3
T_SAMPLE = np.log(np.array([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5]]))
Q_SAMPLE = np.log(np.array([[0.6, 0.25, 0.15], [0.25, 0.45, 0.3], [0.3, 0.3, 0.4]]))
N_SAMPLES = 80_000  # detects a 1% error in any cell with power 0.99; ~3 ms each on a
# 2-vCPU VM (thread hand-offs), ~5 min of the CI run: kept, as duo's exactness proof
START = 0


def _pair_law() -> np.ndarray:
    """P(x3 = a, x4 = b): the 4th and 5th tokens after the prompt [START], which the second
    round drafts, from the speculation when the first round was all accepted."""
    p = _softmax(T_SAMPLE)
    first3 = np.linalg.matrix_power(p, 3)[START]
    return first3[:, None] * p


class BadRows(DuoDrafter):
    """A bug for the negative control: early-work drafts report the wrong q."""

    def _guess_and_grow(self, job, k, params, rng, rule) -> Drafted:
        out = super()._guess_and_grow(job, k, params, rng, rule)
        out.rows = [np.full_like(r, 1.0 / len(r)) for r in out.rows]
        return out


def _sample_pairs(drafter_cls: type[DuoDrafter], n: int) -> tuple[np.ndarray, int]:
    target, draft = Markov(T_SAMPLE, "target"), Markov(Q_SAMPLE, "draft")
    d = drafter_cls(draft)
    eng = Engine(target, d, FixedBudget(2))
    counts = np.zeros((V, V), dtype=np.int64)
    try:
        for s in range(n):
            params = SamplingParams(temperature=1.0, seed=s)
            toks = eng.generate([START], GenerationConfig(5, params, draft_max=2), "duo").tokens
            counts[toks[2], toks[3]] += 1
    finally:
        d.close()
    return counts, d.hits


def test_sampled_duo_follows_the_target_law_exactly():
    expected = _pair_law()
    assert_design_power(expected, N_SAMPLES)
    counts, hits = _sample_pairs(DuoDrafter, N_SAMPLES)
    assert hits > N_SAMPLES // 10  # early work was used often enough to matter
    assert_fits(counts, expected)
    bad, _ = _sample_pairs(BadRows, N_SAMPLES // 4)  # a quarter of the samples suffice
    assert_rejected(bad, expected)


def test_seeded_sampling_replays_whatever_the_timing():
    """The worker's generators are spawned in order from the run's and each job's length
    is fixed when submitted: the same seed gives the same text at any thread timing."""
    outs = []
    for step in (0.0, 0.004, 0.0):
        target = Markov(T_SAMPLE, "target", step_s=step)
        draft = Markov(Q_SAMPLE, "draft", step_s=0.004 - step)
        eng, d = _duo(target, draft, 3)
        params = SamplingParams(temperature=0.8, seed=11)
        try:
            outs.append(eng.generate([1], GenerationConfig(30, params, draft_max=3), "duo").tokens)
        finally:
            d.close()
    assert outs[0] == outs[1] == outs[2]


# ----------------------------------------------------------------------------- the budget


STEP = 0.03
CPU = CostModel([STEP * x for x in (1, 1.66, 1.9, 2.22, 2.5, 2.76, 3.7, 4.67)], 0.6 * STEP,
                overlap_verify=1.9, overlap_draft=0.8 * STEP)  # measured-like: shared cores
GPU = CostModel([STEP * (1 + 0.01 * i) for i in range(16)], 0.3 * STEP,
                overlap_verify=1.0, overlap_draft=0.3 * STEP)  # CPU drafter, GPU target


def test_overlapped_verify_slows_only_while_both_run():
    c = CostModel([1.0, 2.0], 0.1, overlap_verify=2.0)
    assert overlapped_verify(c, 1, 0.0) == 1.0
    assert overlapped_verify(c, 1, 0.5) == pytest.approx(1.25)  # 0.5 s at half speed
    assert overlapped_verify(c, 1, 9.0) == pytest.approx(2.0)  # beside it all the way


def test_overlap_pays_on_a_gpu_and_matches_drafting_to_verification():
    p = [0.85] * 17
    k = best_overlap_length(GPU, p, 16)
    assert k > 0
    # drafting the next round (guess + k tokens) fits in about one verification
    assert abs((k + 1) * GPU.beside_draft() - GPU.verify_cost(k + 1)) <= GPU.beside_draft()
    assert overlap_rate(GPU, p[:k], p[k]) > rate(GPU, p[:best_length(GPU, p, 16)])
    assert overlap_rate(GPU, p[:k], p[k]) > 1.5 * rate(GPU, [])


def test_overlap_does_not_pay_on_a_shared_cpu():
    p = [0.85] * 9
    assert best_overlap_length(CPU, p, 8, min_gain=1.05) == 0
    b = OverlapBudget(CPU)
    assert all(b.plan(8).k == 0 for _ in range(10))  # plain steps (probes aside)


def test_overlap_budget_learns_and_its_background_rule_is_frozen():
    b = OverlapBudget(GPU, Acceptance())
    rule = b.background_rule()
    before = rule([0.9, 0.9])
    for _ in range(60):  # everything rejected from now on
        b.observe(Outcome([0.9, 0.9], 0, 2))
    assert rule([0.9, 0.9]) == before  # the worker's copy does not move under it
    assert b.plan(8).k == 0 or b._probing


# ------------------------------------------------------------------- llama.cpp, tiny models


@pytest.fixture(scope="module")
def tree_target(tiny_paths):
    m = GGUFModel(tiny_paths["target"], LoadOptions(n_ctx=512, n_threads=1, flash_attn="off",
                                                     kv_type="f32", branches=3))
    yield m
    m.close()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_tiny_greedy_duo_equals_plain_up_to_noise(tiny_models, tree_target, k):
    t, d = tree_target, tiny_models["draft"]
    prompt = encode_prompt(t, "Once upon a time, the little robot")
    cfg = GenerationConfig(max_tokens=48, draft_max=k)
    plain = Engine(t).generate(prompt, cfg, "none")
    drafter = DuoDrafter(d, branches=t.max_branches)
    try:
        res = Engine(t, drafter, FixedBudget(k)).generate(prompt, cfg, "duo")
    finally:
        drafter.close()
    i = first_difference(plain.tokens, res.tokens)
    if i is None:
        assert plain.tokens == res.tokens
    else:
        assert analyse(t, prompt, plain.tokens, i, window=3 * k + 2).explained
    assert res.stats.accepted > 0 and drafter.speculated > 0


def test_tiny_multi_sequence_drafts_are_verified_as_trees(tiny_models, tree_target, monkeypatch):
    t, d = tree_target, tiny_models["draft"]
    trees = []
    real = t.eval_tree
    monkeypatch.setattr(t, "eval_tree", lambda *a: trees.append(a) or real(*a))
    prompt = encode_prompt(t, "the water")
    cfg = GenerationConfig(max_tokens=64, draft_max=6)
    plain = Engine(t).generate(prompt, cfg, "none")
    drafter = DuoDrafter(d, branches=3)
    try:
        res = Engine(t, drafter, FixedBudget(6)).generate(prompt, cfg, "duo")
    finally:
        drafter.close()
    assert drafter.trees > 0 and trees, "the drafter never doubted its first token"
    assert all(len({i for i, par in enumerate(a[2]) if par == -1}) >= 2 for a in trees)
    i = first_difference(plain.tokens, res.tokens)
    assert i is None or analyse(t, prompt, plain.tokens, i, window=20).explained


def test_tiny_seeded_sampling_is_reproducible_and_differs_by_seed(tiny_models, tree_target):
    t, d = tree_target, tiny_models["draft"]
    prompt = encode_prompt(t, "Hello")

    def gen(seed: int) -> list[int]:
        drafter = DuoDrafter(d, branches=3)
        params = SamplingParams(temperature=0.9, top_k=20, seed=seed)
        try:
            eng = Engine(t, drafter, FixedBudget(3))
            return eng.generate(prompt, GenerationConfig(32, params, draft_max=3), "duo").tokens
        finally:
            drafter.close()

    a, b, c = gen(3), gen(3), gen(4)
    assert a == b and a != c


# ------------------------------------------------------------------------------------ CLI


def test_cli_duo_generates_with_stats_and_draft_flags(tiny_paths, env):
    t, d = str(tiny_paths["target"]), str(tiny_paths["draft"])
    p = run(["generate", t, "-d", d, "-m", "duo", "--budget", "fixed:3", "-p", "Hello there",
             "-n", "16", "--draft-threads", "1", "--draft-gpu-layers", "0", "--stats"], env)
    assert p.returncode == 0, p.stderr
    assert "method duo" in p.stderr and "drafted beside verification" in p.stderr
    for _ in range(3):  # costs timed beside a busy neighbour (CI's own) are not saved
        j = run(["generate", t, "-d", d, "-m", "duo", "-p", "Hello", "-n", "8", "--json"], env)
        assert j.returncode == 0, j.stderr  # budget auto: calibrates the pair side by side
        assert json.loads(j.stdout)["method"] == "duo"
        if "not saved" not in j.stderr:
            break
    cal = list((env_home(env) / "calibration").glob("*.json"))
    assert any("overlap_verify" in json.loads(f.read_text()) for f in cal)


def test_cli_duo_needs_a_same_tokenizer_draft(tiny_paths, env):
    t, o = str(tiny_paths["target"]), str(tiny_paths["other"])
    p = run(["generate", t, "-d", o, "-m", "duo", "-p", "Hi", "-n", "4"], env)
    assert p.returncode == 1 and "duo needs a draft model with the target's tokenizer" in p.stderr


def test_help_shows_the_draft_placement_flags(env):
    for cmd in ("generate", "chat", "bench"):
        p = run([cmd, "--help"], env)
        assert "--draft-threads" in p.stdout and "--draft-gpu-layers" in p.stdout, cmd


def env_home(env: dict) -> Path:
    return Path(env["SPECLI_HOME"])


def test_duo_is_free_when_its_budget_declines_and_drafts_in_turn_where_overlap_cannot_pay():
    """Issue 14: while the budget declines, no thread of duo's runs and the draft model
    takes no step; where the measured costs say a pass beside the drafter runs twice as
    slow (two models sharing a 2-core CPU), duo drafts in turn on the caller's thread,
    with no thread and no background work at all."""
    from specli.budget import Acceptance, CostModel, OverlapBudget

    table = _table(7, 16)
    log: list = []
    never = OverlapBudget(CostModel([0.01] * 9, 1.0, overlap_verify=1.0))  # drafts cost 100x
    eng = Engine(Markov(table, "target", log), DuoDrafter(Markov(table, "draft", log)), never)
    threads = set(threading.enumerate())
    res = eng.generate([2], GenerationConfig(max_tokens=30, draft_max=4), "duo")
    assert res.stats.rounds_by == {"none": 30} and res.stats.drafted == 0
    assert not [w for w, *_ in log if w == "draft"]  # not one draft-model call
    assert set(threading.enumerate()) == threads  # and no thread started

    shared = CostModel([0.01 * (1 + 0.5 * i) for i in range(9)], 0.001, overlap_verify=2.0,
                       overlap_draft=0.002)
    turn = OverlapBudget(shared, Acceptance(prior_mean=0.95), min_gain=1.0)
    log.clear()
    drafter = DuoDrafter(Markov(table, "draft", log))
    eng = Engine(Markov(table, "target", log), drafter, turn)
    res = eng.generate([2], GenerationConfig(max_tokens=30, draft_max=4), "duo")
    assert res.stats.drafted > 0 and drafter.beside_rounds == 0 and drafter.speculated == 0
    main = threading.get_ident()
    assert {tid for w, tid, *_ in log if w == "draft"} == {main}
    assert set(threading.enumerate()) == threads


class Script(FixedBudget):
    """Plans each round from a script: 'b' beside, 't' in turn, '.' a plain step."""

    def __init__(self, script: str, k: int = 3) -> None:
        super().__init__(k)
        self.script, self.round = script, -1

    def plan(self, k_cap: int, lag: int = 0, left: int = 1 << 30) -> Plan:
        self.round += 1
        step = self.script[self.round] if self.round < len(self.script) else "."
        if step == ".":
            return Plan(0)
        return replace(super().plan(k_cap, lag, left), in_turn=step == "t")


class Watching(Markov):
    """Notes, at each eval, the round, whether duo's thread lives and the calling thread."""

    def __init__(self, table: np.ndarray, who: str, budget: Script) -> None:
        super().__init__(table, who)
        self.budget, self.seen = budget, []

    def eval(self, tokens: Sequence[int], logits_for: Sequence[int] = ()) -> np.ndarray:
        alive = any(t.name == "specli-duo-drafter" for t in threading.enumerate())
        self.seen.append((self.budget.round, alive, threading.get_ident()))
        return super().eval(tokens, logits_for)


def test_duo_thread_ends_once_a_round_does_not_draft_beside():
    """Within a generation the drafting thread ends as soon as a round neither drafts
    beside nor leaves it work: a thread that ran the draft model keeps an OpenMP pool,
    and on the 2-core AMX VM the timing pair's target passes ran 9.4 ms against 3.9 for
    plain decoding (median) in the duo runs that drafted at all (duo 0.40-0.42x in three
    categories).  Drafts in turn then run on the caller's thread; beside, on a new one."""
    table = _table(9, 16)
    script = "bbb" + "....." + "ttt" + "bb" + "....."
    budget = Script(script)
    target, draft = Watching(table, "target", budget), Watching(table, "draft", budget)
    drafter = DuoDrafter(draft)
    cfg = GenerationConfig(max_tokens=40, draft_max=3)
    plain = Engine(Markov(table, "target")).generate([4], cfg, "none")
    res = Engine(target, drafter, budget).generate([4], cfg, "duo")
    assert res.tokens == plain.tokens
    by_round = {r: alive for r, alive, _ in target.seen if r >= 0}
    assert all(by_round[r] for r in (0, 1, 2))  # beside: the thread drafts the next round
    # the first plain step after a bet the target followed still finds it (the bet is
    # dropped after that pass), the rest of the run of plain steps and the turns do not
    assert not any(by_round[r] for r in range(4, 11)), by_round
    main = threading.get_ident()
    drafted_on = {r: tid for r, _, tid in draft.seen}
    assert {drafted_on[r] for r in (8, 9, 10)} == {main}  # in turn: the caller's thread
    assert main not in {drafted_on[r] for r in (0, 11)}  # beside: a thread of its own
    assert drafter.beside_rounds == 5
    assert not any(t.name == "specli-duo-drafter" for t in threading.enumerate())

    # where its pool fits beside the target's (a GPU machine), the thread stays, as before
    budget = Script(script)
    target, draft = Watching(table, "target", budget), Watching(table, "draft", budget)
    drafter = DuoDrafter(draft, end_idle_thread=False)
    res = Engine(target, drafter, budget).generate([4], cfg, "duo")
    assert res.tokens == plain.tokens
    assert all(alive for r, alive, _ in target.seen if 0 <= r < 13)
    assert not any(t.name == "specli-duo-drafter" for t in threading.enumerate())
