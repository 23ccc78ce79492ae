"""The lineup's pick (`--method auto`): which member drafts each round, on synthetic
budgets, so every decision is exact and the test runs in milliseconds."""

from __future__ import annotations

import json
from collections.abc import Sequence

from test_budget import AMX_CPU, GPU_TARGET

from specli.budget import Acceptance, AdaptiveBudget, CostModel, Outcome
from specli.drafters.base import BaseDrafter, Draft
from specli.lineup import Lineup, Member, Pick


class Named(BaseDrafter):
    """A drafter that is only a name: these tests never ask it for a draft."""

    def __init__(self, name: str) -> None:
        self.name = name

    def propose(self, context: Sequence[int], k: int, params, rng, keep_going=None) -> Draft:
        raise AssertionError("not asked in these tests")


def _first(team: Lineup, context: Sequence[int], k_cap: int, left: int) -> Pick | None:
    """The member that drafts when every picked drafter finds a draft: the first."""
    picks = team.picks(context, k_cap, left)
    return picks[0] if picks else None


def _doubtful() -> Acceptance:
    """Estimates turned against drafting by a run of drafts rejected outright."""
    acc = Acceptance()
    for _ in range(30):
        acc.update([0.9], 0)
    return acc


def _never() -> Acceptance:
    """Estimates so long wrong that a token found now and then does not move them."""
    return Acceptance(prior_mean=0.01, prior_weight=500)


def test_a_due_probe_is_not_starved_by_a_member_whose_drafts_cost_nothing():
    """Issue 14's H200 check: auto stopped drafting after two prompts while duo alone ran
    at 1.24x.  Once duo's estimates turned against it, its probes fell due in the same
    rounds as hd's; judged by those estimates hd (free drafts) won every such round, duo's
    wait began again, and duo never drafted again.  A due probe now keeps its claim until
    it gets a round, and of two due probes the one that waited longer goes first.  (Old
    code: duo never drafts in these 400 rounds.)"""
    free = CostModel(GPU_TARGET.verify, 0.0)
    # hd: its probes find a token every time (so it probes every 16 rounds) but its
    # estimates, long wrong, stay too low to draft otherwise
    hd = Member("hd", Named("hd"), AdaptiveBudget(free, _never(), explore_every=16))
    model = Member("duo", Named("duo"), AdaptiveBudget(GPU_TARGET, _doubtful(), explore_every=16))
    team = Lineup([hd, model], name="auto")
    picks: list[str] = []
    for _ in range(400):
        pick = _first(team, [1, 2, 3], 8, 1000)
        if pick is None:
            picks.append("none")
            team.observe(None, Outcome([], 0))
            continue
        picks.append(pick.member.name)
        k = pick.plan.k
        n_ok = k if pick.member is model else 1  # the draft model's probes: all right

        team.observe(pick, Outcome([0.9] * min(k, n_ok + 1), n_ok, k))
    first = picks.index("duo")
    assert first <= 40, picks[:48]  # its first probe, within a round or two of falling due
    later = picks[first + 1:]
    assert later.count("duo") > 0.5 * len(later)  # its estimates recover: it drafts


def test_probes_take_turns_and_never_interrupt_a_member_that_pays():
    """Two members that both probe: neither waits while the other probes again and again.
    Probes take rounds that would be plain steps: a member whose estimates say drafting
    pays drafts every round."""
    a = Member("a", Named("a"), AdaptiveBudget(GPU_TARGET, _never(), explore_every=4))
    b = Member("b", Named("b"), AdaptiveBudget(GPU_TARGET, _never(), explore_every=4))
    sure = Member("sure", Named("sure"),
                  AdaptiveBudget(GPU_TARGET, Acceptance(prior_mean=0.9), explore_every=4))
    team = Lineup([a, b], name="auto")
    probes = []
    for _ in range(64):
        pick = _first(team, [1], 8, 1000)
        if pick is not None:
            probes.append(pick.member.name)
            team.observe(pick, Outcome([0.9, 0.9], 1, 8))  # a token found: probe again soon
        else:
            team.observe(None, Outcome([], 0))
    assert len(probes) >= 8 and abs(probes.count("a") - probes.count("b")) <= 1

    team = Lineup([a, b, sure], name="auto")
    names = []
    for _ in range(64):
        pick = _first(team, [1], 8, 1000)
        assert pick is not None
        names.append(pick.member.name)
        team.observe(pick, Outcome([0.9] * 8, 7 if pick.member is sure else 1, 8))
    assert names == ["sure"] * 64


def test_specli_trace_writes_each_round_with_every_budget_state(tmp_path, monkeypatch):
    """SPECLI_TRACE=FILE: the GPU check's record of why auto drafted what it did."""
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("SPECLI_TRACE", str(trace))
    hd = Member("hd", Named("hd"), AdaptiveBudget(CostModel(GPU_TARGET.verify, 0.0), _never(),
                                                  explore_every=2))
    duo = Member("duo", Named("duo"), AdaptiveBudget(GPU_TARGET, _never(), explore_every=2))
    team = Lineup([hd, duo], name="auto")
    for _ in range(4):
        pick = _first(team, [1], 8, 100)
        team.observe(pick, Outcome([0.9], 0, 1, (0.001, 0.005), caught_up=3) if pick
                     else Outcome([], 0, 0, (0.0, 0.005), plain_before=3))
    # kept in memory while the generation runs (a line written every round cost ~165 us
    # a round, 3% of a GPU step), written when it pauses (the file is made at the start:
    # a path that cannot be written fails then, not after the answer)
    assert trace.read_text() == ""
    team.pause()
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3, 4]
    assert [x["pick"] for x in lines] == [None, "hd", "duo", None]
    assert lines[1]["probe"] and lines[1]["lag"] == 0 and lines[1]["seconds"] == [0.001, 0.005]
    assert lines[1]["confidence"] == [0.9] and lines[0]["confidence"] == []
    assert lines[0]["plain_before"] == 3 and lines[1]["plain_before"] is None
    assert set(lines[2]["budgets"]) == {"hd", "duo"}
    assert lines[2]["budgets"]["duo"]["p"][0] < 0.05 and lines[2]["budgets"]["duo"]["gap"] == 4


def test_trace_report_sets_passes_by_shape_change_and_drafting_by_lag():
    """scripts/trace_report.py: how the GPU check's traces show what a change of pass
    shape and a catch-up cost inside the pipeline."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / "trace_report.py"
    spec = importlib.util.spec_from_file_location("trace_report", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    budgets = {"duo": {"draft_scale": 1.0}}
    lines = [{"round": r, "pick": pick, "verified": k, "lag": lag, "ready": False,
              "seconds": s, "budgets": budgets}
             for r, pick, k, lag, s in [(1, None, 0, 0, [0.0, 0.005]),
                                        (2, "duo", 3, 2, [0.003, 0.007]),
                                        (3, "duo", 3, 1, [0.0015, 0.006]),
                                        (4, None, 0, 0, [0.0, 0.006])]]
    fixed = {"draft": {"draft_scale": None}}  # another method, its rounds interleaved
    lines[2:2] = [{**lines[0], "budgets": fixed}, {**lines[0], "round": 2, "budgets": fixed}]
    out = mod.report(lines)
    assert out[:3] == ["## draft (fixed)", out[1], "   1 tokens: 5.00 (1) / n/a"]
    assert "## duo" in out
    assert "   4 tokens: 6.00 (1) / 7.00 (1)" in out
    assert "   1 tokens: n/a / 6.00 (1)" in out  # round 1 has no pass before it
    assert "drafting ms per drafted token (rounds): lag 0-1: 0.50 (1), lag 2: 1.00 (1)" in out


class Echo:
    """A near-free model whose greedy token after position i is a fixed function of the
    token there: two of them agree on every token (logits near one-hot)."""

    name = path = placement = "echo"
    n_vocab, n_ctx, bos, add_bos, max_branches, catch_up_stepwise = 64, 4096, None, False, 1, 0

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def is_eog(self, token: int) -> bool:
        return False

    def eval(self, tokens, logits_for=()):
        import numpy as np

        start = len(self.tokens)
        self.tokens += list(tokens)
        rows = list(logits_for)
        out = np.zeros((len(rows), self.n_vocab), dtype=np.float32)
        for r, i in enumerate(rows):
            out[r, (self.tokens[start + i] * 7 + start + i) % self.n_vocab] = 30.0
        return out

    def truncate(self, n: int) -> None:
        del self.tokens[n:]


class Nothing(BaseDrafter):
    """An n-gram drafter that finds nothing in this context (hd, most rounds)."""

    name = "hd"

    def __init__(self) -> None:
        self.asked = 0

    def propose(self, context: Sequence[int], k: int, params, rng, keep_going=None) -> Draft:
        self.asked += 1
        return Draft()


def test_a_round_goes_to_the_next_member_when_the_first_finds_no_draft():
    """hd's drafts cost nothing, so its budget ranks it first every round; in a context
    where it finds nothing the round used to be a plain step, and a draft model whose
    drafts pay (here every token is accepted) never drafted: auto stayed at plain speed.
    Now the next member drafts, until its estimates rank it first.  (Seeded sampling:
    the budgets plan from the given costs, not from these near-free models' timings.)"""
    from specli.drafters.model import ModelDrafter
    from specli.engine import Engine, GenerationConfig, Result
    from specli.sampling import SamplingParams

    hd = Nothing()
    members = [Member("hd", hd, AdaptiveBudget(CostModel(GPU_TARGET.verify, 0.0))),
               Member("draft", ModelDrafter(Echo()), AdaptiveBudget(GPU_TARGET))]
    team = Lineup(members, name="auto")
    assert [p.member.name for p in team.picks([1, 2, 3], 8, 100)] == ["hd", "draft"]

    engine = Engine(Echo(), lineup=Lineup(members, name="auto"))
    res = Result(method="auto")
    cfg = GenerationConfig(max_tokens=120, params=SamplingParams(temperature=1.0, seed=1))
    for _ in engine.stream([5, 9, 11], cfg, res):
        pass
    st = res.stats
    assert hd.asked >= 1  # asked first until the draft model's estimates beat free drafts
    assert st.rounds_by.get("draft", 0) >= st.target_forwards - 2, st.rounds_by
    assert st.n_generated / st.target_forwards > 4  # long drafts, all accepted


def test_hd_verifies_no_draft_its_confidences_say_will_fail():
    """The 2-core AMX machine (2026-11-29): on a 23-token Spec-Bench qa answer, auto's hd
    verified drafts whose first token had been seen once after the last token (right 1
    time in 4 in Spec-Bench answers), each a pass over 2-4 tokens costing 1.5-1.6 plain
    steps, and every one was rejected: 0.88x.  Here the target's tokens never repeat the
    context's continuations, so every draft hd finds is such a guess.  Now the budget
    trims each chain to the prefix its confidences say pays: none, so every round is a
    plain step.  (Old code: hd verified drafts from the first rounds.  Seeded sampling:
    the budget plans from the given costs, not from this near-free model's timings.)"""
    from specli.drafters.hierarchy import HierarchyDrafter
    from specli.engine import Engine, GenerationConfig, Result
    from specli.sampling import SamplingParams

    budget = AdaptiveBudget(CostModel(AMX_CPU.verify, 0.0), Acceptance(calibrated=True))
    hd = HierarchyDrafter(branches=1)
    engine = Engine(Echo(), hd, budget)
    res = Result(method="hd")
    cfg = GenerationConfig(max_tokens=24, params=SamplingParams(temperature=1.0, seed=1))
    prompt = [3, 17, 5, 17, 9, 40, 5, 22, 31, 9, 12, 3, 40]
    for _ in engine.stream(prompt, cfg, res):
        pass
    st = res.stats
    assert st.n_generated == 24
    assert st.drafted == 0 and st.target_forwards == 24, st.rounds_by
