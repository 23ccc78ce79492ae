"""The lineup's pick (`--method auto`): which member drafts each round, on synthetic
budgets, so every decision is exact and the test runs in milliseconds."""

from __future__ import annotations

import json
from collections.abc import Sequence

from test_budget import GPU_TARGET

from specli.budget import Acceptance, AdaptiveBudget, CostModel, Outcome
from specli.drafters.base import BaseDrafter, Draft
from specli.lineup import Lineup, Member


class Named(BaseDrafter):
    """A drafter that is only a name: these tests never ask it for a draft."""

    def __init__(self, name: str) -> None:
        self.name = name

    def propose(self, context: Sequence[int], k: int, params, rng, keep_going=None) -> Draft:
        raise AssertionError("not asked in these tests")


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
        pick = team.pick([1, 2, 3], 8, 1000)
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
        pick = team.pick([1], 8, 1000)
        if pick is not None:
            probes.append(pick.member.name)
            team.observe(pick, Outcome([0.9, 0.9], 1, 8))  # a token found: probe again soon
        else:
            team.observe(None, Outcome([], 0))
    assert len(probes) >= 8 and abs(probes.count("a") - probes.count("b")) <= 1

    team = Lineup([a, b, sure], name="auto")
    names = []
    for _ in range(64):
        pick = team.pick([1], 8, 1000)
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
        pick = team.pick([1], 8, 100)
        team.observe(pick, Outcome([0.9], 0, 1, (0.001, 0.005), caught_up=3) if pick
                     else Outcome([], 0, 0, (0.0, 0.005)))
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3, 4]
    assert [x["pick"] for x in lines] == [None, "hd", "duo", None]
    assert lines[1]["probe"] and lines[1]["lag"] == 0 and lines[1]["seconds"] == [0.001, 0.005]
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
