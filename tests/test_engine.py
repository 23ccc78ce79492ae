"""The engine on tiny generated GGUF models: fast, no download, real llama.cpp."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from specli.backends.base import LoadOptions
from specli.backends.gguf import GGUFModel, check_gguf_file
from specli.drafters.cross import same_tokenizer
from specli.drafters.model import ModelDrafter
from specli.engine import Engine, GenerationConfig, Result
from specli.errors import SpecliError
from specli.fidelity import analyse, first_difference
from specli.runtime import encode_prompt
from specli.sampling import SamplingParams
from specli.tokens import TextStream, detokenize

PROMPT = "Once upon a time, the little robot"


def _prompt(model) -> list[int]:
    return encode_prompt(model, PROMPT)


def test_plain_decoding_is_the_argmax_chain(tiny_models):
    """Method none must be exactly step-by-step greedy decoding."""
    t = tiny_models["target"]
    prompt = _prompt(t)
    res = Engine(t).generate(prompt, GenerationConfig(max_tokens=24), "none")
    t.truncate(0)
    t.eval(prompt[:-1])
    last, manual = prompt[-1], []
    for _ in range(len(res.tokens)):
        last = int(np.argmax(t.eval([last], [0])[0]))
        manual.append(last)
    assert res.tokens == manual
    assert res.stats.target_forwards == len(res.tokens)
    assert res.stats.mean_accepted == 1.0


@pytest.mark.parametrize("drafter", ["draft", "same"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_draft_equals_plain_up_to_noise(tiny_models, drafter, k):
    t, d = tiny_models["target"], tiny_models[drafter]
    prompt = _prompt(t)
    cfg = GenerationConfig(max_tokens=48, draft_max=k)
    plain = Engine(t).generate(prompt, cfg, "none")
    spec = Engine(t, ModelDrafter(d)).generate(prompt, cfg, "draft")
    i = first_difference(plain.tokens, spec.tokens)
    if i is None:
        assert plain.tokens == spec.tokens
    else:
        div = analyse(t, prompt, plain.tokens, i, window=k + 2)
        assert div.explained, div
    assert spec.stats.drafted > 0
    assert spec.stats.target_forwards < plain.stats.target_forwards
    if drafter == "same":  # an exact copy of the target agrees (nearly) always
        assert spec.stats.acceptance_rate > 0.9


def test_target_cache_tracks_context(tiny_models):
    """After a run, the target's KV holds the prompt and output minus the pending token."""
    t, d = tiny_models["target"], tiny_models["draft"]
    prompt = _prompt(t)
    res = Engine(t, ModelDrafter(d)).generate(prompt, GenerationConfig(max_tokens=30), "draft")
    full = prompt + res.tokens
    assert t.tokens == full[: len(t.tokens)]
    assert len(t.tokens) >= len(full) - 2


def test_rollback_is_exact(tiny_models):
    """Logits after eval + truncate + eval equal those of a fresh evaluation."""
    t = tiny_models["target"]
    prompt = _prompt(t)
    t.truncate(0)
    t.eval(prompt)
    fresh = t.eval([5], [0])[0]
    t.truncate(0)
    t.eval(prompt)
    t.eval([7, 8, 9, 10])  # a rejected draft
    t.truncate(len(prompt))
    again = t.eval([5], [0])[0]
    assert np.array_equal(fresh, again)


def test_failed_rollback_is_reported(tiny_models, monkeypatch):
    t = tiny_models["target"]
    t.truncate(0)
    t.eval(_prompt(t))
    monkeypatch.setattr(llama_cpp, "llama_memory_seq_rm", lambda *a: False)
    with pytest.raises(SpecliError, match="rollback"):
        t.truncate(2)


def test_stops_on_end_of_generation(tiny_models, monkeypatch):
    t, d = tiny_models["target"], tiny_models["draft"]
    prompt = _prompt(t)
    plain = Engine(t).generate(prompt, GenerationConfig(max_tokens=20), "none")
    stop_tok = plain.tokens[6]
    first = plain.tokens.index(stop_tok)
    monkeypatch.setattr(t, "is_eog", lambda tok: tok == stop_tok)
    for drafter in (None, ModelDrafter(d)):
        res = Engine(t, drafter).generate(prompt, GenerationConfig(max_tokens=20), "x")
        assert res.stop_reason == "eos"
        assert res.tokens == plain.tokens[:first]


def test_max_tokens_and_context_limit(tiny_paths):
    small = GGUFModel(tiny_paths["target"], LoadOptions(n_ctx=48, n_threads=1, flash_attn="off"))
    draft = GGUFModel(tiny_paths["draft"], LoadOptions(n_ctx=48, n_threads=1, flash_attn="off"))
    try:
        prompt = _prompt(small)
        eng = Engine(small, ModelDrafter(draft))
        res = eng.generate(prompt, GenerationConfig(max_tokens=5), "draft")
        assert (len(res.tokens), res.stop_reason) == (5, "length")
        res = eng.generate(prompt, GenerationConfig(max_tokens=1000, draft_max=6), "draft")
        assert res.stop_reason == "context"
        # the context's edge cuts every method at one length (a draft accepted there used
        # to add a token past it that plain decoding never writes)
        plain = Engine(small).generate(prompt, GenerationConfig(max_tokens=1000), "none")
        assert plain.stop_reason == "context"
        assert len(prompt) + len(res.tokens) == len(prompt) + len(plain.tokens) == 48
        assert res.tokens == plain.tokens
        with pytest.raises(SpecliError, match="context holds"):
            eng.check_prompt(list(range(48)))
        with pytest.raises(SpecliError, match="empty prompt"):
            eng.check_prompt([])
    finally:
        small.close()
        draft.close()


def test_a_stop_asked_during_prefill_ends_it_between_batches(tiny_paths):
    """A server's shutdown or a client leaving must not wait for a long prompt's whole
    prefill (it outlasted uvicorn's grace period: a 500 and a crash at exit).  Asked to
    stop, the engine ends between batches; what was evaluated stays in the cache, and
    a later run that reuses it writes the same tokens as a fresh one."""
    t = GGUFModel(tiny_paths["target"],
                  LoadOptions(n_ctx=512, n_batch=16, n_threads=1, flash_attn="off"))
    try:
        prompt = encode_prompt(t, PROMPT * 6)
        assert len(prompt) > 4 * 16
        asked = []
        res = Result(method="none")
        cfg = GenerationConfig(max_tokens=8, stop=lambda: asked.append(1) or len(asked) > 3)
        assert list(Engine(t).stream(prompt, cfg, res)) == []
        assert res.stop_reason == "interrupted" and res.tokens == []
        assert t.tokens == prompt[: 3 * 16]  # three batches, then the stop
        again = Engine(t).generate(prompt, GenerationConfig(max_tokens=8, reuse_prefix=True),
                                   "none")
        assert again.stats.n_prefilled == len(prompt) - 1 - 3 * 16
        fresh = Engine(t).generate(prompt, GenerationConfig(max_tokens=8), "none")
        assert again.tokens == fresh.tokens and len(fresh.tokens) == 8
        never = GenerationConfig(max_tokens=8, stop=lambda: False)
        assert Engine(t).generate(prompt, never, "none").tokens == fresh.tokens
    finally:
        t.close()


def test_sampling_reproducible_and_uses_draft_distributions(tiny_models):
    t, d = tiny_models["target"], tiny_models["draft"]
    prompt = _prompt(t)

    def run(seed):
        params = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=seed)
        return Engine(t, ModelDrafter(d)).generate(
            prompt, GenerationConfig(max_tokens=40, params=params), "draft"
        )

    a, b, c = run(3), run(3), run(4)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert a.stats.accepted > 0
    draft = ModelDrafter(d).propose(prompt, 3, SamplingParams(temperature=1.0, seed=0),
                                    np.random.default_rng(0))
    assert draft.probs is not None
    probs = np.stack(draft.probs)  # one row per drafted token, each q it was sampled from
    assert probs.shape == (len(draft.tokens), d.n_vocab)
    assert np.allclose(probs.sum(axis=1), 1.0)


def test_tokenizers_are_compared_by_their_strings(tiny_models):
    assert not same_tokenizer(tiny_models["target"], tiny_models["other"])
    assert same_tokenizer(tiny_models["target"], tiny_models["draft"])


def test_not_gguf_and_missing_files(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    with pytest.raises(SpecliError, match="not a GGUF"):
        check_gguf_file(bad)
    with pytest.raises(SpecliError, match="not found"):
        check_gguf_file(tmp_path / "missing.gguf")
    with pytest.raises(SpecliError, match="directory"):
        check_gguf_file(tmp_path)


def test_text_stream_never_splits_a_character():
    pieces = {1: "héllo ".encode()[:2], 2: "héllo ".encode()[2:], 3: "✓".encode()[:1],
              4: "✓".encode()[1:]}
    stream = TextStream(pieces.__getitem__)
    out = [stream.push([1]), stream.push([2]), stream.push([3])]
    assert out == ["h", "éllo ", ""]  # the half of ✓ is held back
    assert stream.push([4]) + stream.flush() == "✓"
    assert detokenize(pieces.__getitem__, [1, 2, 3, 4]) == "héllo ✓"
    # cut after the first byte of ✓ (a length limit): the half character is dropped
    assert detokenize(pieces.__getitem__, [1, 2, 3]) == "héllo "
    assert detokenize(pieces.__getitem__, [1, 3, 2]) == "h\ufffd\ufffdllo "  # invalid: shown


def test_chat_template_is_applied(tiny_models):
    t = tiny_models["target"]
    text = t.chat_prompt([{"role": "user", "content": "hi"}])
    assert "hi" in text and text != "hi"
    raw = encode_prompt(t, "hi", raw=True)
    templ = encode_prompt(t, "hi")
    assert len(templ) > len(raw)


def test_stats_time_the_draft_model_steps_and_set_them_beside_the_calibration(tiny_models):
    """Every one-token step of the draft model during a generation is counted and timed
    (Stats.draft_steps, ms_per_draft_step), and --stats sets that beside the calibrated
    standalone step, and the passes beside the calibrated pass."""
    from specli.budget import AdaptiveBudget, CostModel
    from specli.report import stats_lines

    t, d = tiny_models["target"], tiny_models["draft"]
    calls: list[int] = []
    real = d.eval

    class Counting:  # the draft model, counting its one-token evals
        def __getattr__(self, name):
            return getattr(d, name)

        def eval(self, tokens, logits_for=()):
            calls.append(len(tokens))
            return real(tokens, logits_for)

    cost = CostModel([0.01 * (1 + 0.1 * i) for i in range(9)], 0.001, draft_alone=0.0008)
    budget = AdaptiveBudget(cost, min_gain=1.0, optimistic_p=0.99, explore_every=1)
    engine = Engine(t, ModelDrafter(Counting()), budget)  # type: ignore[arg-type]
    res = engine.generate(_prompt(t), GenerationConfig(max_tokens=30), "draft")
    s = res.stats
    assert s.drafted > 0
    assert s.draft_steps == calls.count(1) > 0
    assert 0 < s.ms_per_draft_step < 1000 * s.draft_s / max(1, s.draft_rounds)
    assert s.pass_tokens == s.target_forwards + s.drafted and s.pass_size > 1.0
    assert s.ms_per_pass == pytest.approx(1000 * s.verify_s / s.target_forwards)
    assert res.calibrated is cost
    text = "\n".join(stats_lines(res))
    assert f"draft model steps: {s.draft_steps} at {s.ms_per_draft_step:.2f} ms each" in text
    assert "(calibrated after a target pass: 1.00 ms," in text
    assert "back to back 0.80 ms)" in text
    assert "target passes:" in text and "calibrated alone," in text
    # the rest of the wall time, per round: what a round costs beyond its model work
    rest = 1000 * (s.decode_s - s.draft_s - s.verify_s) / s.target_forwards
    assert s.ms_per_round_other == pytest.approx(rest) and 0 < rest < 1000 * s.decode_s
    assert f"the rest of a round (budgets, bookkeeping) {rest:.3f} ms" in text
    # all of drafting per drafted token: the model's steps and the work around them
    per_token = 1000 * s.draft_s / s.drafted
    assert s.ms_per_drafted_token == pytest.approx(per_token)
    assert s.ms_per_drafted_token > 1000 * s.draft_step_s / s.drafted  # model steps are a part
    assert f"drafting: {per_token:.2f} ms per drafted token" in text


def test_ctrl_c_while_llama_cpp_logs_a_load_stops_the_load(tiny_paths, monkeypatch, capfd):
    """Ctrl-C during a load runs its handler inside llama.cpp's log callback, where
    ctypes used to print the KeyboardInterrupt and drop it: the load went on and the
    whole answer was written, exit 0.  It must stop the run once the load is back."""
    import os
    import signal

    from specli.backends import gguf

    class Interrupting(list):  # the log tail: Ctrl-C arrives as llama.cpp logs a line
        def append(self, line):
            if not self:
                os.kill(os.getpid(), signal.SIGINT)
            super().append(line)

    monkeypatch.setattr(gguf, "_LOG_TAIL", Interrupting())
    # as in a terminal: a background job (`make test &`) starts with SIGINT ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            GGUFModel(tiny_paths["target"], LoadOptions(n_ctx=64, n_threads=1))
        assert "Exception ignored" not in capfd.readouterr().err  # nothing printed and dropped
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, before)
    monkeypatch.undo()
    GGUFModel(tiny_paths["target"], LoadOptions(n_ctx=64, n_threads=1)).close()  # loads again


def test_kill_during_a_load_reaches_the_commands_handler(tiny_paths, monkeypatch):
    """A SIGTERM held through a load is handed to the handler specli.entry set, so the
    command exits 143 as for any `kill`, not Ctrl-C's 130 (it did: the held signal came
    back as a bare KeyboardInterrupt)."""
    import os
    import signal

    from specli import entry
    from specli.backends import gguf

    class Killing(list):
        def append(self, line):
            if not self:
                os.kill(os.getpid(), signal.SIGTERM)
            super().append(line)

    before = signal.signal(signal.SIGTERM, entry.interrupt)
    monkeypatch.setattr(entry, "_signal", signal.SIGINT)
    monkeypatch.setattr(gguf, "_LOG_TAIL", Killing())
    try:
        with pytest.raises(KeyboardInterrupt):
            GGUFModel(tiny_paths["target"], LoadOptions(n_ctx=64, n_threads=1))
        assert entry.exit_code_for_interrupt() == 143
        assert signal.getsignal(signal.SIGTERM) is entry.interrupt  # put back
    finally:
        signal.signal(signal.SIGTERM, before)


def test_logits_rows_come_back_in_the_order_asked(tiny_models):
    """eval copies the decode's output rows in one block (llama_get_logits): each must be
    the row of the token it was asked for, as llama_get_logits_ith reads it."""
    import ctypes

    t = tiny_models["target"]
    row = ctypes.c_float * t.n_vocab

    def logits_ith(j: int) -> np.ndarray:  # llama.cpp's own lookup of batch token j's row
        addr = ctypes.cast(llama_cpp.llama_get_logits_ith(t._ctx, j), ctypes.c_void_p).value
        return np.frombuffer(row.from_address(addr), dtype=np.float32)

    tokens = (_prompt(t) * 4)[:24]
    for sel in ([0, 3, 7, 23], [5], list(range(24)), [22, 23]):
        t.truncate(0)
        out = t.eval(tokens, sel)
        assert out.shape == (len(sel), t.n_vocab)
        for i, j in enumerate(sel):
            assert np.array_equal(out[i], logits_ith(j)), (sel, j)
    t.truncate(0)
