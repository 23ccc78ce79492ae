"""The method table (specli.methods): one parser for what users write, and a new drafter
added as one class plus one registry entry, then run through generate and bench."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from specli import bench as bm
from specli import methods, runtime
from specli.backends.base import LoadOptions
from specli.drafters.base import BaseDrafter, Draft
from specli.engine import Engine, GenerationConfig
from specli.errors import SpecliError
from specli.methods import Method
from specli.prompts import Prompt
from specli.sampling import SamplingParams


def test_parse_what_users_write():
    assert methods.parse("draft").base == "draft"
    s = methods.parse(" hd@fixed:3 ")
    assert (s.text, s.base, s.budget, s.model) == ("hd@fixed:3", "hd", "fixed:3", None)
    s = methods.parse("draft/smollm2-135m-instruct@fixed:2", peers=True)
    assert (s.base, s.model, s.budget) == ("draft", "smollm2-135m-instruct", "fixed:2")
    assert methods.parse("peer-pld", peers=True).method is None
    for bad, peers in (("fast", False), ("auto@fixed:2", False), ("none@fixed:1", False),
                       ("peer-pld", False), ("draft/x", False), ("hd/x", True),
                       ("draft/", True), ("draft@fixed:0", False), ("peer-pld@fixed:2", True)):
        with pytest.raises(SpecliError, match="unknown method"):
            methods.parse(bad, peers=peers)
    assert methods.get("duo").trees and methods.get("duo").same_tokenizer
    assert not methods.get("lookup").draft_model
    assert all(f"{name}:" in methods.help_text() for name in methods.METHODS)


class Repeat(BaseDrafter):
    """Guesses the last token again, k times (right in runs of one token)."""

    name = "repeat"

    def propose(self, context, k, params, rng, keep_going=None) -> Draft:
        return Draft([context[-1]] * k)


@pytest.fixture
def repeat_method():
    methods.register(Method(
        "repeat", "guess the last token again", lambda loaded, budget: Engine(
            loaded.target, Repeat(), loaded.make_budget(budget, free_drafts=True))))
    yield
    del methods.METHODS["repeat"]


def test_a_new_drafter_is_one_class_and_one_entry(repeat_method, tiny_paths, tmp_path,
                                                  monkeypatch):
    monkeypatch.setenv("SPECLI_HOME", str(tmp_path / "home"))
    opts = LoadOptions(n_ctx=512, n_threads=1, flash_attn="off", kv_type="f32")
    target = str(tiny_paths["target"])
    prompt = runtime.encode_prompt
    plain = runtime.load(target, None, "none", opts, history=False)
    try:
        tokens = prompt(plain.target, "Once upon a time")
        want = plain.engine.generate(tokens, GenerationConfig(max_tokens=24), "none").tokens
    finally:
        plain.close()
    # generate's path: runtime.load by name, the budget fixed and calibrated alike
    for budget in ("fixed:3", "auto"):
        loaded = runtime.load(target, None, "repeat", opts, budget=budget, history=False)
        try:
            res = loaded.engine.generate(tokens, GenerationConfig(max_tokens=24), "repeat")
            assert res.tokens == want  # lossless, however wrong the guesses
            assert budget == "auto" or res.stats.drafted > 0
        finally:
            loaded.close()
    # bench's path: parsed, run beside none, judged identical
    loaded = runtime.load(target, None, "none", opts, history=False)
    try:
        out = tmp_path / "bench"
        plan = bm.Plan([Prompt("p1", "alpha", "Once upon a time")],
                       bm.parse_methods("repeat@fixed:3,repeat"), 16, SamplingParams(), 4, 1,
                       "auto", out)
        summary, interrupted = bm.run(loaded, plan, Console(quiet=True))
    finally:
        loaded.close()
    assert not interrupted and summary["methods"] == ["none", "repeat@fixed:3", "repeat"]
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["none", "repeat@fixed:3", "repeat"]
    assert all(r["identical"] for r in rows) and rows[1]["drafted"] > 0


def test_a_broken_history_leaves_the_default_method_working(tiny_paths, tmp_path,
                                                            monkeypatch):
    """$SPECLI_HOME under a file, or a corrupt history: auto and hd generate, with one
    warning on the console, and the same tokens as plain decoding."""
    opts = LoadOptions(n_ctx=512, n_threads=1, flash_attn="off", kv_type="f32")
    target = str(tiny_paths["target"])
    cfg = GenerationConfig(max_tokens=12)
    (tmp_path / "file.gguf").write_bytes(b"x")
    corrupt = tmp_path / "corrupt"
    for home in (tmp_path / "file.gguf" / "sub", corrupt):
        monkeypatch.setenv("SPECLI_HOME", str(home))
        for method, budget in (("auto", "auto"), ("hd", "fixed:3")):
            if home == corrupt:  # a garbage file where the history belongs
                corrupt.joinpath("history").mkdir(parents=True, exist_ok=True)
                for stale in corrupt.joinpath("history").iterdir():
                    stale.unlink()
                fp = _fingerprint(target, opts)
                corrupt.joinpath("history", f"{fp}.sqlite").write_bytes(b"garbage" * 500)
            out = Console(record=True, width=400)
            loaded = runtime.load(target, None, method, opts, console=out, budget=budget)
            try:
                tokens = runtime.encode_prompt(loaded.target, "Once upon a time")
                res = loaded.engine.generate(tokens, cfg, method)
                with loaded.one_off_engine():
                    pass
                plain = runtime.Engine(loaded.target).generate(tokens, cfg, "none")
            finally:
                loaded.close()
            assert res.tokens == plain.tokens
            warned = [ln for ln in out.export_text().splitlines() if "your history" in ln]
            assert len(warned) == 1 and warned[0].startswith("warning: ")
            assert "--no-history" in warned[0] and ".sqlite" in warned[0]


def _fingerprint(path: str, opts: LoadOptions) -> str:
    from specli.backends.gguf import GGUFModel
    from specli.ngram import tokenizer_fingerprint

    model = GGUFModel(path, opts)
    try:
        return tokenizer_fingerprint(model)
    finally:
        model.close()
