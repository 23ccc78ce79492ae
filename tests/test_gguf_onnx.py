"""The torch-free GGUF -> ONNX exporter against llama.cpp, on tiny generated models.

llama.cpp (flash attention off, f32 KV cache: its batch-invariant settings) is the
reference: the exported graph must give the same logits, position by position, for the
llama arch (adjacent-pair rotary on permuted Q/K), the qwen2 arch (biases, rotate-half
rotary, tied embeddings), grouped and plain multi-head attention, linear rope scaling and
llama-3 rope frequency factors.  onnxruntime must also be batch-invariant: a token's
logits and KV rows are bit-identical however many tokens share its call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tinymodel import tokenizer_vocab, write_tiny_model

from specli.backends.base import LoadOptions
from specli.backends.gguf import GGUFModel
from specli.errors import SpecliError
from specli.export.gguf_onnx import SUPPORTED_ARCHS, export_gguf

TEXT = "hello the world of speculative decoding is fast and we test the model now"
ATOL = 1e-3  # measured differences are ~2e-5 on logits of magnitude ~40


# ------------------------------------------------------------------------------------
# a tiny GGUF writer for what tinymodel.py does not cover (qwen2, rope variants, Q8_0)
# ------------------------------------------------------------------------------------


def write_tiny(
    path: Path,
    arch: str = "qwen2",
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 96,
    tied: bool = True,
    embd_q8: bool = False,
    rope_scaling: tuple[str, float] | None = None,
    rope_freqs: bool = False,
    extra_tensor: str | None = None,
) -> Path:
    """qwen2: q/k/v biases, rotate-half rotary; ``tied``: no output.weight."""
    import gguf

    voc = tokenizer_vocab("a")
    n_vocab = len(voc["tokens"])
    d = n_embd // n_head
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    s = n_embd**-0.5
    t: dict[str, np.ndarray] = {"token_embd.weight": normal(n_vocab, n_embd, std=1.0)}
    for i in range(n_layer):
        b = f"blk.{i}."
        t[b + "attn_norm.weight"] = 1.0 + normal(n_embd, std=0.1)
        t[b + "attn_q.weight"] = normal(n_head * d, n_embd, std=s)
        t[b + "attn_k.weight"] = normal(n_head_kv * d, n_embd, std=s)
        t[b + "attn_v.weight"] = normal(n_head_kv * d, n_embd, std=s)
        if arch == "qwen2":
            t[b + "attn_q.bias"] = normal(n_head * d, std=0.5)
            t[b + "attn_k.bias"] = normal(n_head_kv * d, std=0.5)
            t[b + "attn_v.bias"] = normal(n_head_kv * d, std=0.5)
        t[b + "attn_output.weight"] = normal(n_embd, n_head * d, std=s)
        t[b + "ffn_norm.weight"] = 1.0 + normal(n_embd, std=0.1)
        t[b + "ffn_gate.weight"] = normal(n_ff, n_embd, std=s)
        t[b + "ffn_up.weight"] = normal(n_ff, n_embd, std=s)
        t[b + "ffn_down.weight"] = normal(n_embd, n_ff, std=n_ff**-0.5)
    t["output_norm.weight"] = np.ones(n_embd, np.float32)
    if not tied:
        t["output.weight"] = normal(n_vocab, n_embd, std=12.0 * s)
    if rope_freqs:
        t["rope_freqs.weight"] = np.linspace(1.0, 8.0, d // 2).astype(np.float32)
    if extra_tensor:
        t[extra_tensor] = np.ones(n_embd, np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
    w.add_layer_norm_rms_eps(1e-6)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        w.add_rope_scaling_factor(rope_scaling[1])
    w.add_tokenizer_model("llama")
    w.add_token_list(voc["tokens"])
    w.add_token_scores(voc["scores"])
    w.add_token_types(voc["types"])
    w.add_bos_token_id(voc["bos"])
    w.add_eos_token_id(voc["eos"])
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    for name, arr in t.items():
        if embd_q8 and name == "token_embd.weight":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------
# running both sides
# ------------------------------------------------------------------------------------


class Ort:
    """An exported decoder with its KV cache, fed like the ONNX backend feeds it."""

    def __init__(self, onnx_path: Path) -> None:
        cfg = json.loads((onnx_path.parent / "config.json").read_text())
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        self.s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        self.n_layer = cfg["num_hidden_layers"]
        self.kv_shape = (cfg["num_key_value_heads"], cfg["head_dim"])
        self.past = self.empty_past(1)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, *self.kv_shape[:1], 0, self.kv_shape[1]), np.float32)
                for _ in range(2 * self.n_layer)]

    def run(self, ids, mask, pos, past, positions=None) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": np.asarray(ids, np.int64),
                "attention_mask": np.asarray(mask, np.int64),
                "position_ids": np.asarray(pos, np.int64)}
        for i in range(self.n_layer):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        feed["logits_positions"] = np.asarray([] if positions is None else positions, np.int64)
        out = self.s.run(None, feed)
        return out[0], out[1:]

    def eval(self, tokens: list[int], positions=None) -> np.ndarray:
        """Append tokens to the single sequence; logits for every new token."""
        n_past = self.past[0].shape[2]
        n = n_past + len(tokens)
        logits, self.past = self.run([tokens], np.ones((1, n)), [np.arange(n_past, n)],
                                     self.past, positions)
        return logits[0]


def chunked(run, tokens: list[int], chunks: list[int]) -> np.ndarray:
    rows, at = [], 0
    for c in chunks:
        rows.append(run(tokens[at : at + c]))
        at += c
    assert at == len(tokens)
    return np.concatenate(rows)


def llama_cpp_logits(gguf_path: Path, tokens: list[int], chunks: list[int]) -> np.ndarray:
    m = GGUFModel(gguf_path, LoadOptions(n_ctx=256, n_threads=1, flash_attn="off", kv_type="f32"))
    try:
        return chunked(lambda ts: m.eval(ts, logits_for=range(len(ts))), tokens, chunks)
    finally:
        m.close()


def tokens_of(gguf_path: Path) -> list[int]:
    m = GGUFModel(gguf_path, LoadOptions(n_ctx=256, n_threads=1))
    try:
        return m.tokenize(TEXT, add_bos=True)
    finally:
        m.close()


def assert_matches_llama_cpp(gguf_path: Path, out_dir: Path) -> None:
    onnx_path = export_gguf(gguf_path, out_dir, quant="none")
    toks = tokens_of(gguf_path)
    assert len(toks) >= 12
    chunks = [5, 3, 1, 1, len(toks) - 10]  # prefill, a verify-sized batch, single steps
    ref = llama_cpp_logits(gguf_path, toks, chunks)
    got = chunked(Ort(onnx_path).eval, toks, chunks)
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    assert diff < ATOL, f"max |logit diff| {diff} vs llama.cpp (logits up to {np.abs(ref).max()})"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


# ------------------------------------------------------------------------------------
# equality with llama.cpp
# ------------------------------------------------------------------------------------


def test_llama_arch_matches_llama_cpp(tmp_path):
    """tinymodel's llama: permuted Q/K rows, adjacent-pair rotary in llama.cpp, GQA."""
    assert_matches_llama_cpp(write_tiny_model(tmp_path / "t.gguf", seed=3), tmp_path / "o")


def test_llama_multi_head_attention_matches_llama_cpp(tmp_path):
    """n_head_kv == n_head: the graph duplicates queries to keep MatMuls off the GEMV path."""
    g = write_tiny_model(tmp_path / "t.gguf", seed=4, n_head=4, n_head_kv=4)
    assert_matches_llama_cpp(g, tmp_path / "o")


def test_llama_rope_freq_factors_match_llama_cpp(tmp_path):
    g = write_tiny(tmp_path / "t.gguf", "llama", rope_freqs=True, tied=False, seed=5)
    assert_matches_llama_cpp(g, tmp_path / "o")


def test_qwen2_tied_matches_llama_cpp(tmp_path):
    """qwen2: q/k/v biases, rotate-half rotary, LM head = token embedding."""
    assert_matches_llama_cpp(write_tiny(tmp_path / "t.gguf", seed=6), tmp_path / "o")


def test_qwen2_q8_0_embedding_matches_llama_cpp(tmp_path):
    """A quantised tensor (Q8_0 embedding; get_rows dequantises exactly in llama.cpp)."""
    g = write_tiny(tmp_path / "t.gguf", tied=False, embd_q8=True, seed=7)
    assert_matches_llama_cpp(g, tmp_path / "o")


def test_qwen2_linear_rope_scaling_matches_llama_cpp(tmp_path):
    g = write_tiny(tmp_path / "t.gguf", rope_scaling=("linear", 4.0), seed=8)
    assert_matches_llama_cpp(g, tmp_path / "o")
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


# ------------------------------------------------------------------------------------
# batch invariance, logits_positions, batches with padding
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("gx") / "t.gguf", seed=1)


@pytest.mark.parametrize("quant", ["none", "int4", "int8"])
def test_batch_equals_one_at_a_time_exactly(tiny_gguf, tmp_path, quant):
    """Prefill 5 then 3 at once == 8 single steps, bit for bit, logits and KV cache."""
    onnx_path = export_gguf(tiny_gguf, tmp_path / quant, quant=quant)
    toks = tokens_of(tiny_gguf)[:8]
    a = Ort(onnx_path)
    batched = np.concatenate([a.eval(toks[:5]), a.eval(toks[5:])])
    b = Ort(onnx_path)
    single = np.concatenate([b.eval([t]) for t in toks])
    assert np.array_equal(batched, single), float(np.abs(batched - single).max())
    assert all(np.array_equal(x, y) for x, y in zip(a.past, b.past, strict=True))
    assert a.past[0].shape == (1, 2, 8, 16)


def test_quantised_exports_stay_close_to_fp32(tiny_gguf, tmp_path):
    """Relative RMS logit error of the MatMulNBits exports (measured on this model: int8
    0.016, int4 0.16; a mis-laid-out weight gives ~1.4)."""
    toks = tokens_of(tiny_gguf)
    ref = Ort(export_gguf(tiny_gguf, tmp_path / "f", quant="none")).eval(toks)
    for quant, bound in (("int8", 0.05), ("int4", 0.3)):
        got = Ort(export_gguf(tiny_gguf, tmp_path / quant, quant=quant)).eval(toks)
        rel = float(np.sqrt(((got - ref) ** 2).mean() / (ref**2).mean()))
        assert rel < bound, (quant, rel)
        assert b"MatMulNBits" in (tmp_path / quant / "model.onnx").read_bytes()


def test_logits_positions(tiny_gguf, tmp_path):
    onnx_path = export_gguf(tiny_gguf, tmp_path / "o", quant="none")
    toks = tokens_of(tiny_gguf)[:7]
    s = Ort(onnx_path)
    past = s.empty_past(1)
    mask, pos = np.ones((1, 7)), [np.arange(7)]
    every, _ = s.run([toks], mask, pos, past, positions=[])  # empty: every position
    assert every.shape[1] == 7
    some, present = s.run([toks], mask, pos, past, positions=[6, 2, -7])
    assert some.shape == (1, 3, every.shape[2])
    assert np.array_equal(some[0], every[0][[6, 2, 0]])
    assert present[0].shape == (1, 2, 7, 16)  # the cache still covers every token
    one, _ = s.run([toks], mask, pos, past, positions=[6])
    assert np.array_equal(one[0, 0], every[0, 6])


def test_padded_batch_matches_separate_sequences(tiny_gguf, tmp_path):
    """Left padding: masked keys are invisible, positions come from position_ids."""
    s = Ort(export_gguf(tiny_gguf, tmp_path / "o", quant="none"))
    toks = tokens_of(tiny_gguf)
    a, b = toks[:6], toks[3:7]
    ids = [a, [0, 0, *b]]
    mask = [[1] * 6, [0, 0, 1, 1, 1, 1]]
    pos = [list(range(6)), [0, 0, 0, 1, 2, 3]]
    both, present = s.run(ids, mask, pos, s.empty_past(2))
    alone_a, _ = s.run([a], [[1] * 6], [list(range(6))], s.empty_past(1))
    alone_b, _ = s.run([b], [[1] * 4], [list(range(4))], s.empty_past(1))
    np.testing.assert_allclose(both[0], alone_a[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(both[1, 2:], alone_b[0], atol=1e-4, rtol=0)
    # one decode step for both rows, with the cache
    step, _ = s.run([[toks[6]], [toks[7]]], [[1] * 7, [0, 0, 1, 1, 1, 1, 1]], [[6], [4]], present)
    ref_a = s.run([a + [toks[6]]], [[1] * 7], [list(range(7))], s.empty_past(1))[0][0, -1]
    ref_b = s.run([b + [toks[7]]], [[1] * 5], [list(range(5))], s.empty_past(1))[0][0, -1]
    np.testing.assert_allclose(step[0, 0], ref_a, atol=1e-4, rtol=0)
    np.testing.assert_allclose(step[1, 0], ref_b, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------
# files, config, progress, refusals
# ------------------------------------------------------------------------------------


def test_output_files_config_and_progress(tiny_gguf, tmp_path):
    import hashlib

    calls: list[tuple[str, int, int]] = []
    onnx_path = export_gguf(tiny_gguf, tmp_path / "o", quant="int4",
                            progress=lambda *a: calls.append(a))
    assert onnx_path == tmp_path / "o" / "model.onnx"
    assert (tmp_path / "o" / "model.onnx.data").stat().st_size > 100_000  # weights outside
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["hidden_size"], cfg["intermediate_size"]) == (2, 4, 2, 16, 64, 128)
    assert cfg["vocab_size"] == len(tokenizer_vocab("a")["tokens"])
    assert cfg["max_position_embeddings"] == 2048 and cfg["rope_theta"] == 10000.0
    assert cfg["tie_word_embeddings"] is False and cfg["rms_norm_eps"] == pytest.approx(1e-5)
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert cfg["specli"] == {"exporter": "specli-gguf", "source_sha256": sha, "quant": "int4"}
    steps = [c[0] for c in calls]
    assert steps[0] == "hash" and steps[-1] == "save"
    weights = [c for c in calls if c[0] == "weights"]
    assert weights[-1][1] == weights[-1][2] == 4 and len(weights) == 4
    names = [i.name for i in Ort(onnx_path).s.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:7] == ["past_key_values.0.key", "past_key_values.0.value",
                          "past_key_values.1.key", "past_key_values.1.value"]
    assert names[-1] == "logits_positions"
    onnx.checker.check_model(str(onnx_path))


def test_tied_config(tmp_path):
    export_gguf(write_tiny(tmp_path / "t.gguf"), tmp_path / "o", quant="none")
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True


def test_refuses_unsupported_architecture(tmp_path):
    import gguf

    p = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(p), "gemma3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SpecliError, match="architecture 'gemma3'"):
        export_gguf(p, tmp_path / "o", quant="none")
    assert "gemma3" not in SUPPORTED_ARCHS and {"llama", "qwen2"} <= set(SUPPORTED_ARCHS)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"extra_tensor": "blk.0.attn_q_norm.weight"}, "blk.0.attn_q_norm.weight"),
        ({"rope_scaling": ("yarn", 4.0)}, "rope scaling 'yarn'"),
    ],
)
def test_refuses_what_the_graph_cannot_express(tmp_path, kwargs, match):
    g = write_tiny(tmp_path / "t.gguf", **kwargs)
    with pytest.raises(SpecliError, match=match):
        export_gguf(g, tmp_path / "o", quant="none")


def test_refuses_bad_inputs(tiny_gguf, tmp_path):
    with pytest.raises(SpecliError, match="quantisation"):
        export_gguf(tiny_gguf, tmp_path / "o", quant="int3")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(SpecliError, match="not a readable GGUF"):
        export_gguf(junk, tmp_path / "o")
    with pytest.raises(SpecliError, match="no such GGUF"):
        export_gguf(tmp_path / "missing.gguf", tmp_path / "o")


def test_failed_export_leaves_no_mismatched_files(tiny_gguf, tmp_path, monkeypatch):
    """An export that dies half-way (Ctrl-C, a full disk) must not leave an older
    model.onnx next to a newer, partial model.onnx.data."""
    import specli.export.gguf_onnx as gx

    out = tmp_path / "o"
    export_gguf(tiny_gguf, out, quant="none")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gx, "_mlp", boom)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_gguf, out, quant="int4")
    assert sorted(p.name for p in out.iterdir()) == []
