"""Checks for tests/tinymodel.py: the tiny GGUF models load in llama.cpp and behave sanely."""

from __future__ import annotations

import ctypes
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodel  # noqa: E402
from tinymodel import IM_END, IM_START, tokenizer_vocab, write_tiny_model  # noqa: E402

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

UNICODE_TEXT = "Hello world, 123 ünïcode ✓"
PROMPT = "the quick brown fox said hello to the world"

_LOG: list[str] = []


class Tiny:
    """A model + context opened through llama-cpp-python's low-level API."""

    def __init__(self, path: Path, n_ctx: int = 512, exact: bool = False):
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model, f"failed to load {path}:\n{''.join(_LOG[-20:])}"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        # One thread: the model is tiny, and with 2+ threads each decode pays ggml's thread
        # barrier, which costs milliseconds per token when the CPUs are shared.
        cparams.n_threads = 1
        cparams.n_threads_batch = 1
        if exact:
            # CPU flash attention (on by default: "auto") rounds through F16 and its result
            # depends on the batch size (logit noise ~1e-3 relative); without it and with an
            # F32 KV cache, batched and one-token-at-a-time logits agree to ~1e-5.
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cparams.type_k = llama_cpp.GGML_TYPE_F32
            cparams.type_v = llama_cpp.GGML_TYPE_F32
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        assert self.ctx, f"failed to create a context for {path}:\n{''.join(_LOG[-20:])}"

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> Tiny:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tokenizer ----------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False):
        data = text.encode("utf-8")
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buf, len(buf), add_special, parse_special
        )
        assert n >= 0
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        assert n >= 0
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], remove_special: bool = True) -> str:
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_detokenize(
            self.vocab, arr, len(tokens), buf, len(buf), remove_special, False
        )
        assert n >= 0
        return buf.raw[:n].decode("utf-8")

    def token_text(self, token: int) -> str:
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8")

    # -- decoding -----------------------------------------------------------------------------
    def _reset(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def _logits(self, i: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        """Plain greedy decoding with llama_batch_get_one; returns tokens and top-2 gaps."""
        self._reset()
        arr = (llama_cpp.llama_token * len(prompt))(*prompt)
        assert (
            llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, len(prompt))) == 0
        )
        out: list[int] = []
        gaps: list[float] = []
        for _ in range(n):
            logits = self._logits(-1)
            top2 = np.sort(logits)[-2:]
            gaps.append(float(top2[1] - top2[0]))
            tok = int(np.argmax(logits))
            out.append(tok)
            one = (llama_cpp.llama_token * 1)(tok)
            assert llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
        return out, gaps

    def logits_all(self, tokens: list[int]) -> np.ndarray:
        """One llama_batch_init batch with logits at every position: (len(tokens), n_vocab)."""
        self._reset()
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = len(tokens)
            assert llama_cpp.llama_decode(self.ctx, batch) == 0
            return np.stack([self._logits(i) for i in range(len(tokens))])
        finally:
            llama_cpp.llama_batch_free(batch)

    def argmax_all(self, tokens: list[int]) -> list[int]:
        return [int(i) for i in self.logits_all(tokens).argmax(axis=1)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tinymodel.silence_llama_log(lambda level, text: _LOG.append(text))
    llama_cpp.llama_backend_init()
    d = tmp_path_factory.mktemp("tiny")
    a = write_tiny_model(d / "a.gguf", seed=0)
    yield {
        "a": a,
        "a_again": write_tiny_model(d / "a_again.gguf", seed=0),
        "a_seed1": write_tiny_model(d / "a_seed1.gguf", seed=1),
        "b": write_tiny_model(d / "b.gguf", seed=0, tokenizer="b"),
        "draft": write_tiny_model(d / "draft.gguf", seed=7, base=a, noise=0.05),
        "no_template": write_tiny_model(d / "nt.gguf", seed=0, chat_template=False),
    }
    tinymodel.restore_llama_log()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_loads_fast_and_small(models):
    path = models["a"]
    assert path.stat().st_size < 2 * 1024 * 1024
    t0 = time.perf_counter()
    with Tiny(path) as m:
        elapsed = time.perf_counter() - t0
        assert m.n_vocab == len(tokenizer_vocab("a")["tokens"])
        assert llama_cpp.llama_model_n_embd(m.model) == 64
    assert elapsed < 1.0
    # writing is deterministic: same seed, same bytes
    assert _sha(models["a"]) == _sha(models["a_again"])


@pytest.mark.parametrize("tok", ["a", "b"])
def test_tokenizer_round_trips_unicode(models, tok):
    with Tiny(models[tok]) as m:
        ids = m.tokenize(UNICODE_TEXT)
        assert ids[0] == llama_cpp.llama_vocab_bos(m.vocab)
        assert m.detokenize(ids) == UNICODE_TEXT
        assert b"".join(m.piece(t) for t in ids[1:]).decode("utf-8") == UNICODE_TEXT
        # word pieces are actually used (not only byte fallback)
        assert len(ids) < len(UNICODE_TEXT.encode("utf-8"))


def test_greedy_is_deterministic_across_loads_and_peaked(models):
    with Tiny(models["a"]) as m:
        prompt = m.tokenize(PROMPT)
        out1, gaps = m.greedy(prompt, 32)
    with Tiny(models["a_again"]) as m:
        out2, _ = m.greedy(prompt, 32)
    assert out1 == out2
    assert len(set(out1)) > 3  # not a single repeated token
    assert float(np.median(gaps)) > 0.5


def test_different_seeds_differ(models):
    with Tiny(models["a"]) as m:
        prompt = m.tokenize(PROMPT)
        out_a, _ = m.greedy(prompt, 32)
    with Tiny(models["a_seed1"]) as m:
        out_b, _ = m.greedy(prompt, 32)
    assert out_a != out_b


def test_batched_logits_match_greedy(models):
    """With flash attention off and an F32 KV cache, one batch over the whole sequence gives
    the same logits (to float noise) and argmaxes as token-by-token greedy decoding."""
    with Tiny(models["a"], exact=True) as m:
        prompt = m.tokenize(PROMPT)
        out, _ = m.greedy(prompt, 32)
        seq = prompt + out
        batched = m.logits_all(seq)
        m._reset()
        one_by_one = []
        for tok in seq:
            one = (llama_cpp.llama_token * 1)(tok)
            assert llama_cpp.llama_decode(m.ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
            one_by_one.append(m._logits(-1))
    assert list(batched.argmax(axis=1)[len(prompt) - 1 : -1]) == out
    assert np.abs(batched - np.stack(one_by_one)).max() < 1e-3


def test_noisy_draft_mostly_agrees_with_base(models):
    with Tiny(models["a"]) as base:
        prompt = base.tokenize(PROMPT)
        out, _ = base.greedy(prompt, 32)
        seq = prompt + out
        base_pred = base.argmax_all(seq)
        base_vocab = [base.token_text(i) for i in range(base.n_vocab)]
    with Tiny(models["draft"]) as draft:
        assert [draft.token_text(i) for i in range(draft.n_vocab)] == base_vocab
        draft_pred = draft.argmax_all(seq)
    gen = slice(len(prompt) - 1, len(seq) - 1)
    agree = np.mean(np.array(base_pred[gen]) == np.array(draft_pred[gen]))
    assert agree > 0.5
    assert _sha(models["draft"]) != _sha(models["a"])


def test_tokenizer_b_differs(models):
    with Tiny(models["a"]) as a:
        va = [a.token_text(i) for i in range(a.n_vocab)]
    with Tiny(models["b"]) as b:
        vb = [b.token_text(i) for i in range(b.n_vocab)]
    assert len(va) != len(vb)
    assert set(va) != set(vb)
    assert sum(x != y for x, y in zip(va, vb, strict=False)) > 100


@pytest.mark.parametrize("tok", ["a", "b"])
def test_end_of_generation_tokens(models, tok):
    with Tiny(models[tok]) as m:
        im_end = m.tokenize(IM_END, add_special=False, parse_special=True)
        im_start = m.tokenize(IM_START, add_special=False, parse_special=True)
        assert len(im_end) == 1 and len(im_start) == 1
        assert llama_cpp.llama_vocab_is_eog(m.vocab, im_end[0])
        assert llama_cpp.llama_vocab_is_control(m.vocab, im_end[0])
        assert not llama_cpp.llama_vocab_is_eog(m.vocab, im_start[0])
        assert llama_cpp.llama_vocab_is_control(m.vocab, im_start[0])
        eos = llama_cpp.llama_vocab_eos(m.vocab)
        assert m.token_text(eos) == "</s>"
        assert llama_cpp.llama_vocab_is_eog(m.vocab, eos)
        assert llama_cpp.llama_vocab_eot(m.vocab) == im_end[0]
        # parse_special=False keeps the control-token text as plain text
        assert len(m.tokenize(IM_END, add_special=False, parse_special=False)) > 1


def test_chat_template(models):
    with Tiny(models["a"]) as m:
        tmpl = llama_cpp.llama_model_chat_template(m.model, None)
        assert tmpl is not None and b"<|im_start|>" in tmpl
    with Tiny(models["no_template"]) as m:
        assert llama_cpp.llama_model_chat_template(m.model, None) is None


def test_high_level_llama_class(models):
    """The high-level Llama class loads the file and applies the ChatML template."""
    llm = llama_cpp.Llama(
        model_path=str(models["a"]),
        n_ctx=256,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
        seed=0,
    )
    try:
        res = llm.create_chat_completion(
            messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0.0
        )
        assert res["choices"][0]["finish_reason"] in ("stop", "length")
        toks = llm.tokenize(UNICODE_TEXT.encode(), add_bos=False)
        assert llm.detokenize(toks).decode("utf-8") == UNICODE_TEXT
    finally:
        llm.close()


def test_llama_errors_outside_a_load_reach_stderr(capfd):
    """A fatal llama.cpp error (a CUDA abort) logs its reason and then kills the process:
    that reason must reach stderr even without SPECLI_VERBOSE; errors during a load are
    summarised in one line instead, and other levels stay quiet."""
    from specli.backends import gguf

    cb = gguf._log_callback
    cb(4, b"CUDA error: an illegal memory access\n", None)
    cb(5, b"  current device: 0\n", None)  # continues the error
    cb(2, b"llama_context: n_ctx = 4096\n", None)  # info
    cb(5, b"  more info\n", None)  # continues the info
    with gguf._loading():
        cb(4, b"error loading model: bad file\n", None)
    err = capfd.readouterr().err
    if not gguf._VERBOSE:
        assert err == "CUDA error: an illegal memory access\n  current device: 0\n"
    assert "bad file" in gguf._last_error()
