"""`specli bench`: the summary arithmetic on recorded rows, and a smoke run on tiny models."""

from __future__ import annotations

import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_default

from specli import bench as bm
from specli.errors import SpecliError

SPECLI = str(Path(sys.executable).parent / "specli")
ALL = "none,draft,draft@fixed:3,peer-none,peer-pld"


def row(i, cat, method, tok_s, wall, acc, matches=None):
    return {"prompt": i, "prompt_id": str(i), "category": cat, "method": method,
            "decode_tok_s": tok_s, "wall_s": wall, "mean_accepted": acc, "matches": matches}


# prompts 0, 1 in category "a", 2, 3 in "b"; `none` first on each prompt, as the bench runs
ROWS = [
    row(0, "a", "none", 10.0, 2.0, 1.0, True), row(0, "a", "draft", 20.0, 1.0, 3.0, True),
    row(0, "a", "peer-pld", 5.0, 4.0, 1.0, None),
    row(1, "a", "none", 20.0, 2.0, 1.0, True), row(1, "a", "draft", 10.0, 2.0, 2.0, False),
    row(1, "a", "peer-pld", 20.0, 2.0, 1.0, None),
    row(2, "b", "none", 10.0, 4.0, 1.0, True), row(2, "b", "draft", 40.0, 2.0, 1.5, True),
    row(2, "b", "peer-pld", None, 4.0, 1.0, None),  # no tokens after the first chunk
    row(3, "b", "none", 40.0, 4.0, 1.0, True), row(3, "b", "draft", 40.0, 4.0, 2.5, True),
    row(3, "b", "peer-pld", 80.0, 1.0, 1.0, None),
]


def test_summary_arithmetic_by_hand():
    s = bm.summarize(ROWS)
    assert s["methods"] == ["none", "draft", "peer-pld"] and s["categories"] == ["a", "b"]
    d, p, n = s["table"]["draft"], s["table"]["peer-pld"], s["table"]["none"]
    # draft decode ratios 2, 0.5 | 4, 1: geometric means 1, 2; overall (2*.5*4*1)^(1/4)
    assert d["a"]["speedup"] == pytest.approx(1.0)
    assert d["b"]["speedup"] == pytest.approx(2.0)
    assert d["overall"]["speedup"] == pytest.approx(math.sqrt(2))
    # wall ratios none/draft 2, 1 | 2, 1
    assert d["a"]["e2e_speedup"] == pytest.approx(math.sqrt(2))
    assert d["overall"]["e2e_speedup"] == pytest.approx(math.sqrt(2))
    # mean accepted: (3 + 2) / 2, (1.5 + 2.5) / 2, all four
    assert (d["a"]["mean_accepted"], d["b"]["mean_accepted"]) == (2.5, 2.0)
    assert d["overall"]["mean_accepted"] == pytest.approx(2.25)
    assert (d["a"]["identity_rate"], d["b"]["identity_rate"]) == (0.5, 1.0)
    assert d["overall"]["identity_rate"] == 0.75 and d["overall"]["prompts"] == 4
    # peer: ratios .5, 1 | (none), 2 -> a: sqrt(.5), b: 2, overall (.5*1*2)^(1/3) = 1
    assert p["a"]["speedup"] == pytest.approx(math.sqrt(0.5))
    assert p["b"]["speedup"] == pytest.approx(2.0)
    assert p["overall"]["speedup"] == pytest.approx(1.0)
    assert p["overall"]["e2e_speedup"] == pytest.approx((0.5 * 1 * 1 * 4) ** 0.25)
    assert p["overall"]["identity_rate"] is None  # sampled rows: identity undefined
    assert n["overall"]["speedup"] == 1.0 and n["overall"]["identity_rate"] == 1.0
    # geometric mean of the absolute decode speeds: (10*20*10*40)^(1/4)
    assert n["overall"]["decode_tok_s"] == pytest.approx(80000 ** 0.25)
    md = bm.render_markdown(s, {"command": "specli bench"})
    assert "| method | a | b | overall |" in md
    assert "| draft | 1.00x / 2.50 | 2.00x / 2.00 | 1.41x / 2.25 |" in md
    assert "| draft | 75% | 1.41x |" in md and "| peer-pld | n/a |" in md
    # a category no run of a method finished (Ctrl-C): "n/a", never "n/ax"
    cut = bm.summarize([r for r in ROWS if not (r["method"] == "draft" and r["category"] == "b")])
    md = bm.render_markdown(cut, {})
    assert "| draft | 1.00x / 2.50 | n/a / n/a |" in md and "n/ax" not in md


def test_repeats_keep_the_fastest_run_and_judge_every_run():
    rep = [
        {**row(0, "a", "none", 12.0, 1.9, 1.0, True), "repeat": 1},  # faster than repeat 0
        {**row(0, "a", "draft", 15.0, 1.5, 3.0, False), "repeat": 1},  # slower; diverged
    ]
    s = bm.summarize(ROWS + rep)
    d = s["table"]["draft"]
    # prompt 0: draft's best 20 vs none's best 12 (not 10); the others as before
    assert d["a"]["speedup"] == pytest.approx(math.sqrt(20 / 12 * 0.5))
    assert d["a"]["prompts"] == 2 and d["a"]["runs"] == 3
    assert d["a"]["identity_rate"] == pytest.approx(1 / 3)  # every run judged
    assert d["a"]["mean_accepted"] == 2.5  # from the fastest runs
    assert bm.run_order(["none", "x", "y"], 2) == [
        (0, "none"), (0, "x"), (0, "y"), (1, "y"), (1, "x"), (1, "none")]


def test_geomean_and_clock():
    assert bm.geomean([]) is None
    assert bm.geomean([2.0, 8.0]) == pytest.approx(4.0)
    c = bm.Clock(start=10.0, first=11.0, n_first=5, end=13.0)  # a 5-token first round
    assert c.fields(9) == {"prefill_s": 1.0, "decode_s": 2.0, "decode_tok_s": 2.0,
                           "wall_s": 3.0}
    assert bm.Clock(start=0.0, first=1.0, n_first=1, end=1.5).fields(1)["decode_tok_s"] is None


def test_parse_methods_puts_the_reference_first():
    assert bm.parse_methods("peer-pld, draft,draft") == ["none", "peer-pld", "draft"]
    with pytest.raises(SpecliError, match="unknown method 'fast'"):
        bm.parse_methods("none,fast")
    assert bm.parse_methods("draft/a.gguf,draft/b@fixed:2") == [
        "none", "draft/a.gguf", "draft/b@fixed:2"]
    for bad in ("hd/a.gguf", "draft/", "draft/a@fixed:0"):
        with pytest.raises(SpecliError, match="unknown method"):
            bm.parse_methods(bad)


def test_plot_needs_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    assert bm.plot_speedup(bm.summarize(ROWS), tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def prompts_file(tmp_path):
    f = tmp_path / "prompts.jsonl"
    texts = [("alpha", "Hello there, tell me a story"), ("alpha", "Once upon a time"),
             ("beta", "Why is the sky blue?"), ("beta", "Tell me about cats and dogs"),
             ("beta", "not picked with --limit 2")]
    f.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) + "\n"
                         for i, (c, t) in enumerate(texts)))
    return f


def bench_args(tiny_paths, prompts_file, out, *extra):
    return [SPECLI, "bench", str(tiny_paths["target"]), "--draft", str(tiny_paths["draft"]),
            "--prompts", str(prompts_file), "--limit", "2", "-n", "8", "--ctx", "512",
            "--threads", "1", "--out", str(out), *extra]


def test_bench_smoke_writes_everything(tiny_paths, env, prompts_file, tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(bench_args(tiny_paths, prompts_file, out, "--methods", ALL),
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 5
    assert [r["method"] for r in rows[:5]] == ALL.split(",")  # interleaved per prompt
    for r in rows:
        assert r["n_generated"] >= 8 and r["decode_tok_s"] > 0 and r["target_forwards"] >= 1
        assert r["identical"] is not None  # greedy: the peers' token ids were recovered
        assert len(r["tokens"]) == r["n_generated"]
        if r["method"] == "none":
            assert r["identical"] and r["mean_accepted"] == 1.0
    assert any(r["drafted"] > 0 for r in rows if r["method"] == "draft@fixed:3")
    for r in rows:  # every specli row: its own costs (peers: none recorded)
        if not r["method"].startswith("peer-"):
            assert r["ms_per_pass"] > 0 and r["pass_size"] >= 1.0
    fixed = [r for r in rows if r["method"] == "draft@fixed:3"]
    assert all(r["draft_steps"] > 0 and r["ms_per_draft_step"] > 0 for r in fixed)
    # all of drafting per drafted token holds the model's steps and the work around them
    assert all(r["ms_per_drafted_token"] * r["drafted"] > r["ms_per_draft_step"] * r["draft_steps"]
               for r in fixed if r["drafted"])
    # a fixed length has no budget of its own: its pair is calibrated for the comparison
    assert all(r["calibrated_ms_per_draft_step"] >= r["calibrated_ms_per_draft_step_back_to_back"]
               > 0 for r in fixed)
    assert all(r["draft_steps"] == 0 for r in rows if r["method"] == "none")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["table"]["draft@fixed:3"]["overall"]["ms_per_draft_step"] > 0
    assert summary["categories"] == ["alpha", "beta"]
    assert set(summary["table"]["peer-pld"]) == {"alpha", "beta", "overall"}
    assert summary["meta"]["n_tokens"] == 8 and summary["meta"]["target"] == "target.gguf"
    md = (out / "summary.md").read_text()
    assert "| method | alpha | beta | overall |" in md and "| peer-none |" in md
    assert "Costs inside the pipeline beside the calibrated standalone costs" in md
    assert "| drafting per drafted token | rest of a round |" in md
    assert md in p.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "speedup.png").stat().st_size > 1000
    else:
        assert bm.PLOT_HINT in p.stderr


def test_bench_compares_drafters_with_other_tokenizers(tiny_paths, env, prompts_file,
                                                      tmp_path):
    """draft/MODEL: several draft models, one of another tokenizer, in one run; hd trees."""
    out = tmp_path / "out"
    other = str(tiny_paths["other"])
    methods = f"none,draft/{other}@fixed:3,draft/{other},hd@fixed:4,auto"
    p = subprocess.run(bench_args(tiny_paths, prompts_file, out, "--methods", methods,
                                  "--repeats", "2"),
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 5 * 2 and {r["repeat"] for r in rows} == {0, 1}
    assert any(r["drafted"] > 0 for r in rows if r["method"] == f"draft/{other}@fixed:3")
    assert all(r["matches"] for r in rows), [r for r in rows if not r["matches"]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["table"][f"draft/{other}"]["overall"]["runs"] == 8
    assert summary["meta"]["repeats"] == 2


def test_bench_draft_model_method_needs_no_draft_flag(tiny_paths, env, prompts_file,
                                                     tmp_path):
    """draft/MODEL names its own draft model: no -d needed (it used to ask for one)."""
    out = tmp_path / "out"
    args = bench_args(tiny_paths, prompts_file, out, "--methods",
                      f"none,draft/{tiny_paths['draft']}@fixed:2", "--categories", "beta")
    at = args.index("--draft")
    del args[at:at + 2]
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert any(r["drafted"] > 0 for r in rows if r["method"].startswith("draft/"))


def test_bench_defaults_without_a_draft_model_and_a_rerun_keeps_the_first(tiny_paths, env,
                                                                        prompts_file, tmp_path):
    """The default methods held `draft`: a target with no registered draft and no -d
    failed ("the draft method needs a draft model").  It now benches what can run."""
    out = tmp_path / "out"
    args = bench_args(tiny_paths, prompts_file, out, "--categories", "beta")
    at = args.index("--draft")
    del args[at:at + 2]
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "note: no draft model for this target" in p.stderr
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows[:4]] == ["none", "hd", "peer-none", "peer-pld"]
    # the same --out again: the first run's files are kept aside, not overwritten
    first = (out / "summary.json").read_text()
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    (kept,) = out.glob("previous-*")
    assert f"held an earlier bench's results: moved to {kept}" in p.stderr
    assert (kept / "summary.json").read_text() == first
    assert (kept / "results.jsonl").read_text().count("\n") == len(rows)
    assert (out / "results.jsonl").exists() and (out / "summary.md").exists()


def test_bench_sampled_has_no_identity(tiny_paths, env, prompts_file, tmp_path):
    out = tmp_path / "out"
    args = bench_args(tiny_paths, prompts_file, out, "--methods", "none,peer-none",
                      "--categories", "beta", "-t", "0.8")
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and {r["category"] for r in rows} == {"beta"}
    assert all(r["identical"] is None for r in rows)


def test_ctrl_c_still_writes_the_summary(tiny_paths, env, tmp_path):
    many = tmp_path / "many.jsonl"  # enough work (seconds) to be interrupted mid-run
    many.write_text("".join(json.dumps({"category": "c", "turns": [f"Story number {i}"]}) + "\n"
                            for i in range(60)))
    out = tmp_path / "out"
    args = bench_args(tiny_paths, many, out, "--methods", "none,draft")
    args[args.index("--limit") + 1] = "60"
    args[args.index("-n") + 1] = "400"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default,
                            env=env)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (results.exists() and results.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["interrupted"].startswith("yes")
    assert (out / "summary.md").exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--methods", "none,fast"], "unknown method"),
        (["--categories", "gamma"], "unknown categories"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_bench_bad_input_is_one_line(tiny_paths, env, prompts_file, tmp_path, extra, needle):
    args = bench_args(tiny_paths, prompts_file, tmp_path / "out", *extra)
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and needle in lines[0], p.stderr


def test_bench_missing_prompts_file(tiny_paths, env, tmp_path):
    args = bench_args(tiny_paths, tmp_path / "nope.jsonl", tmp_path / "out")
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and "cannot read prompts" in lines[0], p.stderr
    assert not (tmp_path / "out").exists()


def test_prompts_files_are_read_as_prompt_files_are(tmp_path):
    """--prompts: a non-UTF-8 file is a one-line error naming it; a leading byte-order
    mark is dropped (json.loads refused the first row); bad rows name their line."""
    from specli.prompts import load_prompts

    rows = [{"category": "a", "turns": ["Résumé"]}, {"category": "b", "turns": ["Hi"]}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(text.encode("latin-1"))
    with pytest.raises(SpecliError, match="is not UTF-8 text") as e:
        load_prompts(latin)
    assert str(latin) in str(e.value) and "\n" not in str(e.value)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [(p.category, p.text) for p in load_prompts(bom)] == [("a", "Résumé"), ("b", "Hi")]
    one = tmp_path / "one.jsonl"
    one.write_text('{"turns": "Hi there"}\n', encoding="utf-8")  # one turn, not a list
    assert [p.text for p in load_prompts(one)] == ["Hi there"]
    for bad, needle in (('{"turns": [5]}', "expected JSON"), ("[1]", "expected JSON"),
                        ('{"turns": null}', "expected JSON"),  # benched "None" as the prompt
                        ('{"turns": 5}', "expected JSON"),
                        ('{"turns": ["\\ud800"]}', "unpaired surrogate"),
                        ('{"turns": ["\\udcff"]}', "not UTF-8 text")):
        f = tmp_path / "bad.jsonl"
        f.write_text('{"turns": ["fine"]}\n' + bad + "\n", encoding="utf-8")
        with pytest.raises(SpecliError, match=needle) as e:
            load_prompts(f)
        assert f"{f}:2" in str(e.value)


def test_bench_prompts_not_utf8_is_one_line(tiny_paths, env, prompts_file, tmp_path):
    prompts_file.write_bytes(prompts_file.read_bytes() + "Résumé".encode("latin-1"))
    args = bench_args(tiny_paths, prompts_file, tmp_path / "out")
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "is not UTF-8 text" in lines[0] and str(prompts_file) in lines[0], p.stderr
