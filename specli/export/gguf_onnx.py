"""Export a GGUF decoder (llama, qwen2) to an ONNX decoder with a KV cache, without torch.

Why: specli's ONNX backend runs decoders exported by optimum; this writes the same I/O
contract straight from a GGUF file (``gguf`` reads and dequantises the tensors, the graph
is built with ``onnx.helper``), so exporting needs no torch/transformers/optimum.

Contract (as optimum's ``text-generation-with-past``, plus ``logits_positions``):
  inputs  ``input_ids`` [batch, seq], ``attention_mask`` [batch, past+seq],
          ``position_ids`` [batch, seq] (int64), ``past_key_values.{i}.key|value``
          [batch, n_kv_heads, past, head_dim] (float32, past may be 0), and
          ``logits_positions`` [n_out] (int64, required; indices into seq, negative
          allowed; an empty array means every position, as optimum's export computes)
  outputs ``logits`` [batch, n_out, vocab], ``present.{i}.key|value``
          [batch, n_kv_heads, past+seq, head_dim], keys after rotary embedding.
Masking as in Hugging Face: the query in cache slot past+s sees slots <= past+s whose
attention_mask is 1; position_ids only drive the rotary embedding and must stay below
max_position_embeddings (the cos/sin tables are precomputed in float64 up to there).
The graph is batch-invariant on onnxruntime's CPU provider (fp32, int4, int8): a token's
logits and KV rows are bit-identical however many tokens share its call.

llama.cpp's ``llama`` arch ropes adjacent pairs of its (permuted) Q/K rows; we undo that
permutation when reading, so both archs use rotate-half rotary and the KV cache has
Hugging Face's layout.  Weights stream one tensor at a time into ``model.onnx.data``; int4
and int8 weights go through onnxruntime's MatMulNBits quantiser one MatMul at a time, so
the fp32 model never has to sit in memory whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specli.errors import SpecliError

__all__ = ["QUANTS", "SUPPORTED_ARCHS", "GGUFHparams", "export_gguf", "read_hparams"]

SUPPORTED_ARCHS: tuple[str, ...] = ("llama", "qwen2")
# none: fp32.  int4/int8: MatMulNBits weight-only (block 32, accuracy_level 4).
QUANTS: tuple[str, ...] = ("none", "int4", "int8")

Progress = Callable[[str, int, int], None]

_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_OPSET = 17
_BLOCK = 32
_ACCURACY_LEVEL = 4
_SYMMETRIC = False  # measured on Qwen2.5-0.5B: same speed and agreement as symmetric
_QUANT_BITS = {"none": 0, "int4": 4, "int8": 8}
_INLINE_BYTES = 1024  # smaller initializers stay inside model.onnx
_ALIGN = 4096  # external tensors start page-aligned, so onnxruntime can map them
_NEG = float(np.finfo(np.float32).min)  # masked scores: exp() gives exactly 0, never NaN


@dataclass(frozen=True)
class GGUFHparams:
    """What the graph needs from a GGUF file's metadata (names as llama.cpp reads them)."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_freq_scale: float  # linear rope scaling: positions are multiplied by this
    tied: bool  # no output.weight: the LM head is the token embedding
    bos: int | None
    eos: int | None


# ------------------------------------------------------------------------------------
# reading the GGUF file
# ------------------------------------------------------------------------------------


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise SpecliError(f"no such GGUF file: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated file, ...
        raise SpecliError(f"{path} is not a readable GGUF file ({e})") from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _scalar(reader, key: str, default=None, *, required: bool = False):
    v = _field(reader, key)
    if v is None:
        if required:
            raise SpecliError(f"GGUF metadata lacks {key}: cannot export")
        return default
    if isinstance(v, list):  # per-layer arrays (llama.cpp allows them): must be uniform
        if len(set(v)) != 1:
            raise SpecliError(f"{key} varies per layer ({sorted(set(v))}): not supported")
        v = v[0]
    return v


def read_hparams(reader) -> GGUFHparams:
    """Hyper-parameters, with llama.cpp's defaults; anything the graph cannot express
    (MoE, YaRN/LongRoPE, partial rotary) is refused with one clear line."""
    arch = str(_field(reader, "general.architecture", "?"))
    if arch not in SUPPORTED_ARCHS:
        raise SpecliError(
            f"cannot export architecture '{arch}' to ONNX (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    a = arch
    n_embd = int(_scalar(reader, f"{a}.embedding_length", required=True))
    n_head = int(_scalar(reader, f"{a}.attention.head_count", required=True))
    n_head_kv = int(_scalar(reader, f"{a}.attention.head_count_kv", n_head))
    head_dim = int(_scalar(reader, f"{a}.attention.key_length", n_embd // n_head))
    v_dim = int(_scalar(reader, f"{a}.attention.value_length", n_embd // n_head))
    n_rot = int(_scalar(reader, f"{a}.rope.dimension_count", head_dim))
    if v_dim != head_dim or n_rot != head_dim:
        raise SpecliError(f"{a}: key/value/rotary dims {head_dim}/{v_dim}/{n_rot} differ")
    if n_head % n_head_kv or head_dim % 2:
        raise SpecliError(f"{a}: {n_head} heads, {n_head_kv} KV heads, head_dim {head_dim}")
    if int(_scalar(reader, f"{a}.expert_count", 0) or 0) > 0:
        raise SpecliError(f"{a}: mixture-of-experts models cannot be exported")
    scaling = str(_scalar(reader, f"{a}.rope.scaling.type", "linear"))
    factor = _scalar(reader, f"{a}.rope.scaling.factor")
    if factor is None:
        factor = _scalar(reader, f"{a}.rope.scale_linear", 0.0)  # llama.cpp's old key
    factor = float(factor or 0.0)
    if scaling not in ("none", "linear") and factor not in (0.0, 1.0):
        raise SpecliError(f"{a}: rope scaling '{scaling}' is not supported")
    attn_factor = float(_scalar(reader, f"{a}.rope.scaling.attn_factor", 1.0))
    if attn_factor != 1.0:
        raise SpecliError(f"{a}: rope attn_factor {attn_factor} is not supported")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise SpecliError("GGUF file has no token_embd.weight: not a decoder")
    bos, eos = _scalar(reader, "tokenizer.ggml.bos_token_id"), _scalar(
        reader, "tokenizer.ggml.eos_token_id"
    )
    return GGUFHparams(
        arch=arch,
        n_layer=int(_scalar(reader, f"{a}.block_count", required=True)),
        n_embd=n_embd,
        n_ff=int(_scalar(reader, f"{a}.feed_forward_length", required=True)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_vocab=int(tensors["token_embd.weight"].shape[1]),  # ggml ne: [n_embd, n_vocab]
        n_ctx_train=int(_scalar(reader, f"{a}.context_length", 2048)),
        rms_eps=float(_scalar(reader, f"{a}.attention.layer_norm_rms_epsilon", required=True)),
        rope_base=float(_scalar(reader, f"{a}.rope.freq_base", 10000.0)),
        rope_freq_scale=1.0 if factor == 0.0 else 1.0 / factor,
        tied="output.weight" not in tensors,
        bos=None if bos is None else int(bos),
        eos=None if eos is None else int(eos),
    )


class _Tensors:
    """Dequantised float32 tensors by GGUF name, read one at a time and tracked, so that a
    tensor the graph does not use is an error rather than silently wrong output."""

    def __init__(self, tensors: list, hp: GGUFHparams) -> None:
        self._by_name = {t.name: t for t in tensors}
        self._hp = hp
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> np.ndarray:
        """numpy layout (rows = ggml's last dim): a weight is (out_features, in_features)."""
        from gguf import quants

        t = self._by_name.get(name)
        if t is None:
            raise SpecliError(f"GGUF file lacks tensor {name}")
        self.used.add(name)
        try:
            x = quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError as e:
            raise SpecliError(f"{name}: cannot dequantise {t.tensor_type.name}") from e
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        x = np.asarray(x, dtype=np.float32).reshape(shape)
        if self._hp.arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            x = _unpermute(x, self._hp.n_head)
        elif self._hp.arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            x = _unpermute(x, self._hp.n_head_kv)
        return x

    def unused(self) -> list[str]:
        return sorted(set(self._by_name) - self.used)

    def check_known(self, hp: GGUFHparams) -> None:
        """Refuse, before any work, tensors the graph would not read (q/k norms, MoE...)."""
        known = {"token_embd.weight", "output_norm.weight", "output.weight", "output.bias",
                 "rope_freqs.weight"}
        for i in range(hp.n_layer):
            known |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm")}
            for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                      "ffn_down"):
                known |= {f"blk.{i}.{n}.weight", f"blk.{i}.{n}.bias"}
        if hp.tied:
            known.discard("output.bias")
        if unknown := sorted(set(self._by_name) - known):
            raise SpecliError(
                f"GGUF tensors this exporter does not understand: {', '.join(unknown[:6])}"
                + (f" (+{len(unknown) - 6} more)" if len(unknown) > 6 else "")
            )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's llama arch ropes adjacent pairs (2i, 2i+1) of each head's rows, because
    its converter permuted Hugging Face's Q/K rows; put pair i back at rows (i, i + d/2) so
    rotate-half rotary applies (the same rotation, and Hugging Face's key layout)."""
    rows = w.shape[0]
    d = rows // n_head
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_head, d // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
    )


# ------------------------------------------------------------------------------------
# writing weights and nodes
# ------------------------------------------------------------------------------------


class _DataFile:
    """Appends initializers to model.onnx.data and returns protos that point into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")  # closed by close()
        self._offset = 0

    def tensor(self, name: str, arr: np.ndarray):
        from onnx import TensorProto, helper, numpy_helper

        arr = np.ascontiguousarray(arr)
        if arr.nbytes < _INLINE_BYTES:
            return numpy_helper.from_array(arr, name)
        pad = -self._offset % _ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self._offset += pad
        self._f.write(memoryview(arr).cast("B"))
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", self._offset),
                     ("length", arr.nbytes)):
            t.external_data.add(key=k, value=str(v))
        self._offset += arr.nbytes
        return t

    def close(self) -> None:
        self._f.close()


class _Graph:
    """Nodes and initializers of the decoder graph, with unique value names."""

    def __init__(self, data: _DataFile, quant: str) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.data = data
        self._n = 0
        self._bits = _QUANT_BITS[quant]
        self._quantizers: dict[int, object] = {}

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        return self.ops(op_type, *inputs, n_out=1, **attrs)[0]

    def ops(self, op_type: str, *inputs: str, n_out: int, **attrs) -> list[str]:
        from onnx import helper

        self._n += 1
        name = f"/{op_type}_{self._n}"
        outs = [name] if n_out == 1 else [f"{name}_{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs

    def const(self, value, name: str | None = None, dtype=np.int64) -> str:
        self._n += 1
        name = name or f"const_{self._n}"
        self.inits.append(self.data.tensor(name, np.asarray(value, dtype=dtype)))
        return name

    def weight(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(self.data.tensor(name, arr))
        return name

    def linear(self, x: str, t: _Tensors, src: str, name: str) -> str:
        """x @ W.T (+ b) for GGUF tensors ``src``.weight (out, in) and optional ``src``.bias;
        ``name`` names the ONNX weight.  Loaded here so that only one fp32 copy lives."""
        bits = self._bits
        wt = np.ascontiguousarray(t.get(f"{src}.weight").T)  # (in, out), as MatMul wants
        if not bits:
            y = self.op("MatMul", x, self.weight(f"{name}.weight", wt))
        else:
            from onnx import numpy_helper

            init = numpy_helper.from_array(wt, f"{name}.weight")
            del wt
            y = self._quantized_matmul(x, init, bits)
        if t.has(f"{src}.bias"):
            y = self.op("Add", y, self.weight(f"{name}.bias", t.get(f"{src}.bias")))
        return y

    def _quantized_matmul(self, x: str, init, bits: int) -> str:
        """onnxruntime's MatMulNBits quantiser, applied to one MatMul at a time."""
        from onnx import helper, numpy_helper

        self._n += 1
        out = f"/MatMul_{self._n}"
        name = init.name
        node = helper.make_node("MatMul", [x, name], [out], name=out)
        mini = helper.make_graph([node], "one_matmul", [], [], [init])
        del init
        if bits not in self._quantizers:
            self._quantizers[bits] = _make_quantizer(bits)
        new_nodes = self._quantizers[bits].quantize(node, [mini])
        if [n.op_type for n in new_nodes] != ["MatMulNBits"]:
            raise SpecliError(f"onnxruntime's quantiser left {name} unquantised")
        needed = {i for n in new_nodes for i in n.input}
        for t in mini.initializer:
            if t.name in needed and t.name != name:
                self.inits.append(self.data.tensor(t.name, numpy_helper.to_array(t)))
        self.nodes.extend(new_nodes)
        return out


def _make_quantizer(bits: int):
    # importing the quantiser runs logging.basicConfig(level=INFO) on the root logger and
    # it logs every MatMul: undo the first, mute the second
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(mq.__name__).setLevel(logging.WARNING)
    cfg = mq.DefaultWeightOnlyQuantConfig(
        block_size=_BLOCK, is_symmetric=_SYMMETRIC, accuracy_level=_ACCURACY_LEVEL, bits=bits
    )
    return mq.DefaultWeightOnlyQuantizer(cfg)


# ------------------------------------------------------------------------------------
# the decoder graph
# ------------------------------------------------------------------------------------


def _rope_tables(hp: GGUFHparams, freq_factors: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """cos and sign-folded sin per position, [n_ctx_train, head_dim], computed in float64:
    rotate-half rotary is then x * cos + swap_halves(x) * sin_signed."""
    half = hp.head_dim // 2
    inv = hp.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / hp.head_dim)
    if freq_factors is not None:  # llama 3 style per-frequency divisors (rope_freqs.weight)
        inv = inv / freq_factors.astype(np.float64).reshape(half)
    pos = np.arange(hp.n_ctx_train, dtype=np.float64) * hp.rope_freq_scale
    theta = pos[:, None] * inv[None, :]
    cos, sin = np.cos(theta), np.sin(theta)
    cos_full = np.concatenate([cos, cos], axis=1).astype(np.float32)
    sin_signed = np.concatenate([-sin, sin], axis=1).astype(np.float32)
    return cos_full, sin_signed


def _rms_norm(g: _Graph, x: str, name: str, w: np.ndarray, eps: float) -> str:
    """x / sqrt(mean(x^2) + eps) * w, written so onnxruntime fuses it."""
    sq = g.op("Pow", x, g.const(2.0, dtype=np.float32))  # Pow, not Mul: the fused pattern
    mean = g.op("ReduceMean", sq, axes=[-1], keepdims=1)
    denom = g.op("Sqrt", g.op("Add", mean, g.const(eps, dtype=np.float32)))
    return g.op("Mul", g.op("Div", x, denom), g.weight(name, w))


def _rotary(g: _Graph, x: str, cos: str, sin: str, half: int) -> str:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, 1, seq, head_dim]."""
    a, b = g.ops("Split", x, g.const([half, half]), n_out=2, axis=-1)
    swapped = g.op("Concat", b, a, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", swapped, sin))


def _attention(g, hp, t, i, h, cos, sin, allowed, past_k, past_v) -> tuple[str, str, str]:
    """Grouped-query attention with the cache; returns (output, present_k, present_v)."""
    pre = f"blk.{i}."
    hf = f"model.layers.{i}.self_attn."
    d, nh, nkv = hp.head_dim, hp.n_head, hp.n_head_kv

    def proj(kind: str, hf_name: str, heads: int) -> str:
        y = g.linear(h, t, f"{pre}attn_{kind}", f"{hf}{hf_name}")
        y = g.op("Reshape", y, g.const([0, 0, heads, d]))
        return g.op("Transpose", y, perm=[0, 2, 1, 3])  # [batch, heads, seq, d]

    q = _rotary(g, proj("q", "q_proj", nh), cos, sin, d // 2)
    k = _rotary(g, proj("k", "k_proj", nkv), cos, sin, d // 2)
    v = proj("v", "v_proj", nkv)
    present_k = g.op("Concat", past_k, k, axis=2)
    present_v = g.op("Concat", past_v, v, axis=2)
    # Every MatMul below must see at least 2 rows: onnxruntime's one-row (GEMV) path sums
    # in another order, and a token's logits would then depend on how many tokens share
    # its call.  Rows are (group, position) pairs; a model without grouping (MHA) gets
    # its queries twice.  (One key, T == 1, is harmless: softmax of one score is 1.)
    groups = nh // nkv
    rows = max(groups, 2)
    qg = g.op("Reshape", q, g.const([0, nkv, -1, d]))  # [b, kv, groups * seq, d]
    if groups == 1:
        qg = g.op("Concat", qg, qg, axis=2)
    kt = g.op("Transpose", present_k, perm=[0, 1, 3, 2])
    scores = g.op("MatMul", qg, kt)  # [b, kv, rows * seq, total]
    scores = g.op("Mul", scores, g.const(1.0 / np.sqrt(d), dtype=np.float32))
    scores = g.op("Where", allowed, scores, g.const(_NEG, dtype=np.float32))
    probs = g.op("Softmax", scores, axis=-1)
    ctx = g.op("MatMul", probs, present_v)  # [b, kv, rows * seq, d]
    if groups == 1:
        ctx = g.op("Gather", g.op("Reshape", ctx, g.const([0, nkv, rows, -1, d])),
                   g.const(0), axis=2)
    ctx = g.op("Reshape", ctx, g.const([0, nh, -1, d]))
    ctx = g.op("Transpose", ctx, perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", ctx, g.const([0, 0, nh * d]))
    out = g.linear(ctx, t, f"{pre}attn_output", f"{hf}o_proj")
    return out, present_k, present_v


def _mlp(g: _Graph, t: _Tensors, i: int, h: str) -> str:
    """SwiGLU: down(silu(gate(h)) * up(h)), llama.cpp's LLM_FFN_SILU + LLM_FFN_PAR."""
    pre, hf = f"blk.{i}.", f"model.layers.{i}.mlp."

    def lin(kind: str, hf_name: str, x: str) -> str:
        return g.linear(x, t, f"{pre}ffn_{kind}", f"{hf}{hf_name}")

    gate = lin("gate", "gate_proj", h)
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), lin("up", "up_proj", h))
    return lin("down", "down_proj", act)


def _io(hp: GGUFHparams):
    from onnx import TensorProto, helper

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv_past = ["batch", hp.n_head_kv, "past", hp.head_dim]
    kv_total = ["batch", hp.n_head_kv, "total", hp.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "n_out", hp.n_vocab])]
    for i in range(hp.n_layer):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32,
                                                        kv_past))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, kv_total))
    inputs.append(helper.make_tensor_value_info("logits_positions", i64, ["n_out"]))
    return inputs, outputs


def _build(g: _Graph, hp: GGUFHparams, t: _Tensors, tick: Callable[[], None]) -> None:
    """Emit the whole decoder; weights are read, written and dropped one at a time."""
    factors = t.get("rope_freqs.weight") if t.has("rope_freqs.weight") else None
    cos_t, sin_t = _rope_tables(hp, factors)
    cos = g.op("Unsqueeze", g.op("Gather", g.weight("rope.cos", cos_t), "position_ids"),
               g.const([1]))
    sin = g.op("Unsqueeze", g.op("Gather", g.weight("rope.sin", sin_t), "position_ids"),
               g.const([1]))
    # As Hugging Face (and so optimum's exports) do it: cache slot j is visible to the
    # query in slot past + s iff j <= past + s and attention_mask[j] == 1; position_ids
    # only rotate.  (So left padding works with positions that restart after the pad.)
    total = g.op("Squeeze", g.op("Shape", "attention_mask", start=1, end=2), g.const([0]))
    seq = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2), g.const([0]))
    kslot = g.op("Range", g.const(0), total, g.const(1))
    qslot = g.op("Range", g.op("Sub", total, seq), total, g.const(1))
    causal = g.op("LessOrEqual", kslot, g.op("Unsqueeze", qslot, g.const([1])))  # [seq, total]
    keep = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=9), g.const([1]))  # 9: bool
    allowed = g.op("Unsqueeze", g.op("And", causal, keep), g.const([1]))  # [b, 1, seq, total]
    allowed = g.op("Tile", allowed, g.const([1, 1, max(hp.n_head // hp.n_head_kv, 2), 1]))

    x = g.op("Gather", g.weight("model.embed_tokens.weight", t.get("token_embd.weight")),
             "input_ids")
    tick()
    for i in range(hp.n_layer):
        pre, hf = f"blk.{i}.", f"model.layers.{i}."
        h = _rms_norm(g, x, f"{hf}input_layernorm.weight", t.get(f"{pre}attn_norm.weight"),
                      hp.rms_eps)
        attn, pk, pv = _attention(g, hp, t, i, h, cos, sin, allowed,
                                  f"past_key_values.{i}.key", f"past_key_values.{i}.value")
        g.nodes.append(_identity(pk, f"present.{i}.key"))
        g.nodes.append(_identity(pv, f"present.{i}.value"))
        x = g.op("Add", x, attn)
        h = _rms_norm(g, x, f"{hf}post_attention_layernorm.weight",
                      t.get(f"{pre}ffn_norm.weight"), hp.rms_eps)
        x = g.op("Add", x, _mlp(g, t, i, h))
        tick()

    x = g.op("Gather", x, _positions(g), axis=1)  # before the LM head: no wasted rows
    x = _rms_norm(g, x, "model.norm.weight", t.get("output_norm.weight"), hp.rms_eps)
    logits = g.linear(x, t, "token_embd" if hp.tied else "output", "lm_head")
    g.nodes.append(_identity(logits, "logits"))
    tick()


def _positions(g: _Graph) -> str:
    """logits_positions, or 0..seq-1 when it is empty (without an If node)."""
    seq = g.op("Shape", "input_ids", start=1, end=2)
    every = g.op("Range", g.const(0), g.op("Squeeze", seq, g.const([0])), g.const(1))
    n = g.op("Shape", "logits_positions")
    end = g.op("Where", g.op("Greater", n, g.const([0])), n, seq)
    both = g.op("Concat", "logits_positions", every, axis=0)
    return g.op("Slice", both, g.const([0]), end, g.const([0]))


def _identity(src: str, dst: str):
    from onnx import helper

    return helper.make_node("Identity", [src], [dst], name=f"/out/{dst}")


# ------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------


def _sha256(path: Path, progress: Progress | None) -> str:
    h = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress("hash", done, total)
    return h.hexdigest()


def _config(hp: GGUFHparams, sha: str, quant: str) -> dict:
    cfg = {
        "model_type": hp.arch,
        "architectures": [_HF_ARCH[hp.arch]],
        "num_hidden_layers": hp.n_layer,
        "num_attention_heads": hp.n_head,
        "num_key_value_heads": hp.n_head_kv,
        "head_dim": hp.head_dim,
        "hidden_size": hp.n_embd,
        "intermediate_size": hp.n_ff,
        "vocab_size": hp.n_vocab,
        "max_position_embeddings": hp.n_ctx_train,
        "rms_norm_eps": hp.rms_eps,
        "rope_theta": hp.rope_base,
        "tie_word_embeddings": hp.tied,
        "specli": {"exporter": "specli-gguf", "source_sha256": sha, "quant": quant},
    }
    if hp.rope_freq_scale != 1.0:
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": 1.0 / hp.rope_freq_scale}
    if hp.bos is not None:
        cfg["bos_token_id"] = hp.bos
    if hp.eos is not None:
        cfg["eos_token_id"] = hp.eos
    return cfg


def export_gguf(
    gguf_path: Path, out_dir: Path, quant: str = "int4", progress: Progress | None = None
) -> Path:
    """Export ``gguf_path`` to ``out_dir``/model.onnx (+ model.onnx.data, config.json) and
    return the model.onnx path.  ``progress(step, done, total)`` is called for the steps
    "hash", "weights" (one per layer, plus embeddings and head) and "save"."""
    import onnx
    from onnx import helper

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if quant not in QUANTS:
        raise SpecliError(f"unknown quantisation '{quant}' (choose from {', '.join(QUANTS)})")
    reader = _open(gguf_path)
    hp = read_hparams(reader)
    tensors = _Tensors(reader.tensors, hp)
    del reader  # its parsed metadata (the tokenizer) is ~0.5 GB for a 152k vocabulary
    tensors.check_known(hp)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, data_path = out_dir / "model.onnx", out_dir / "model.onnx.data"
    for old in (onnx_path, out_dir / "config.json"):  # never pair a graph with other data
        old.unlink(missing_ok=True)
    sha = _sha256(gguf_path, progress)

    total_steps, done = hp.n_layer + 2, [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress("weights", done[0], total_steps)

    data = _DataFile(data_path)
    try:
        g = _Graph(data, quant)
        _build(g, hp, tensors, tick)
        if unused := tensors.unused():  # check_known's list and the graph disagree
            raise SpecliError(f"GGUF tensors left unread: {', '.join(unused)}")
    except BaseException:
        data.close()
        data_path.unlink(missing_ok=True)
        raise
    data.close()

    inputs, outputs = _io(hp)
    graph = helper.make_graph(g.nodes, f"specli-{hp.arch}", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", _OPSET)]
    if quant != "none":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="specli-gguf")
    model.ir_version = 8
    if progress:
        progress("save", 0, 1)
    tmp = onnx_path.with_suffix(".onnx.tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, onnx_path)
    (out_dir / "config.json").write_text(json.dumps(_config(hp, sha, quant), indent=2) + "\n")
    if progress:
        progress("save", 1, 1)
    return onnx_path
