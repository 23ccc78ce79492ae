#!/usr/bin/env python3
"""Random-weight llama GGUFs for timing speculative decoding where real models cannot go.

WHY: the GPU check (issue #8) runs on a machine with no network, and only 64 MiB travel
there: no real target fits.  The pipeline's speed (GPU target passes, CPU drafter steps,
their overlap) does not depend on what the weights mean, so this writes a RANDOM-WEIGHT
target and a drafter that agrees with it often.  Such timings measure the pipeline, not a
real model pair: acceptance is set by the construction (`--noise`), not learned.

Construction ("self-consistent" pair):
- The drafter is a random llama (width d, L_d layers).
- The target (width t >= d, L_t > L_d layers, same head size and GQA group, same
  vocabulary, embeddings and output head) starts with the drafter's layers embedded in its
  wider residual stream: drafter coordinates first, the rest zero, norm weights scaled by
  sqrt(d/t) so RMS norm over t coordinates gives the drafter's normalised values.  The
  extra heads and FFN rows of these layers compute but write nothing.  After them the
  target runs L_t - L_d extra random layers whose residual writes are scaled by
  noise / sqrt(L_t - L_d): at noise 0 the target computes the drafter's function exactly,
  and larger noise lowers the greedy agreement.
- Control tokens (end of turn, end of text) get zero output rows, so greedy generation
  never stops early and every run decodes the full -n tokens.

The drafter does not depend on --noise (same seed, shapes and tokenizer: the same bytes),
so pairs written at several noise levels can share one drafter file.

Subcommands:
  write OUT_DIR [--preset gpu|tune|small] [--noise X]   target.gguf, draft.gguf, models.json
        [--draft-shape S] [--target-shape S]           explicit shapes override the preset;
                                                       S = n_embd,n_layer,n_head,n_head_kv,n_ff
        [--quant-estimate q4_k_m] [--dry-run]          report RAM and disk (f16 files, plus a
                                                       quantised copy's estimate) and stop
  measure OUT_DIR [-n 64] [--gpu-layers 0]             greedy per-token agreement (needs
                                                       llama-cpp-python)
  export-tokenizer SRC.gguf OUT.json.gz                a GGUF's tokenizer, for `write`
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

try:  # before numpy: a CUDA+OpenMP llama.cpp build crashed when numpy was loaded first
    import llama_cpp  # noqa: F401
except ImportError:
    pass
import numpy as np

LABEL = "RANDOM-WEIGHT TIMING MODEL (not trained; for timing specli's pipeline only)"
HERE = Path(__file__).resolve().parent
DEFAULT_TOKENIZER = HERE.parent / ".gpu" / "smollm2-tokenizer.json.gz"
CONTROL = 3  # gguf.TokenType.CONTROL
LOGIT_STD = 12.0  # logits ~ N(0, 12^2): top-1/top-2 gaps of a few logits, far above f16 noise
# Measured here with `measure` (llama-cpp-python, CPU, 4 prompts x 64 tokens), greedy
# per-token agreement of the tune preset: noise 0.4 -> 0.76, 0.5 -> 0.70, 0.6 -> 0.62
# (small preset: 0.25 -> 0.76, 0.5 -> 0.59, 1.0 -> 0.26; 0 -> 1.00, the exact embedding).
DEFAULT_NOISE = 0.5


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def group(self) -> int:
        return self.n_head // self.n_head_kv

    def params(self, n_vocab: int) -> int:
        hd = self.head_dim
        attn = 2 * self.n_embd * self.n_head * hd + 2 * self.n_embd * self.n_head_kv * hd
        return self.n_layer * (attn + 3 * self.n_embd * self.n_ff) + 2 * n_vocab * self.n_embd

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'n_embd,n_layer,n_head,n_head_kv,n_ff' (ValueError saying what is wrong)."""
        parts = [x.strip() for x in text.replace(" ", ",").split(",") if x.strip()]
        if len(parts) != 5 or not all(x.isdigit() for x in parts):
            raise ValueError(f"{text!r} is not 5 positive integers "
                             "n_embd,n_layer,n_head,n_head_kv,n_ff")
        s = cls(*(int(x) for x in parts))
        s.check()
        return s

    def check(self) -> None:
        if min(asdict(self).values()) < 1:
            raise ValueError(f"{self}: every field must be at least 1")
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError(f"{self}: n_embd must divide by n_head and n_head by n_head_kv")
        if self.head_dim % 2:
            raise ValueError(f"{self}: the head size n_embd/n_head must be even (RoPE)")


# (drafter, target).  gpu: target ~1.9B params (3.8 GB f16: a GPU step of several ms),
# drafter ~86M (a few ms per token on 8 CPU threads).  tune: the gpu drafter with a narrow
# target of the same depth, for tuning --noise on a small CPU (agreement depends on the
# drafter and the extra layers' count, hardly on the target's width).  small: tests.
PRESETS: dict[str, tuple[Shape, Shape]] = {
    "gpu": (Shape(512, 12, 8, 2, 1536), Shape(2560, 24, 40, 10, 6912)),
    "tune": (Shape(512, 12, 8, 2, 1536), Shape(1024, 24, 16, 4, 2048)),
    "small": (Shape(256, 4, 4, 1, 512), Shape(512, 8, 8, 2, 1024)),
}


def check_pair(draft: Shape, target: Shape) -> None:
    for s in (draft, target):
        s.check()
    if draft.head_dim != target.head_dim or draft.group != target.group:
        raise ValueError("drafter and target need the same head size and GQA group")
    if (target.n_embd < draft.n_embd or target.n_head < draft.n_head
            or target.n_ff < draft.n_ff or target.n_layer <= draft.n_layer):
        raise ValueError("the target must be at least as wide as the drafter and deeper")


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def export_tokenizer(src: Path, out: Path) -> dict:
    """The tokenizer keys of a GGUF as JSON (gzip): all `write` needs from a real model."""
    import gguf

    r = gguf.GGUFReader(str(src))

    def get(key: str, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    tok = {
        "source": src.name,
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens"),
        "token_type": [int(x) for x in get("tokenizer.ggml.token_type")],
        "merges": get("tokenizer.ggml.merges", []),
        "bos": get("tokenizer.ggml.bos_token_id"),
        "eos": get("tokenizer.ggml.eos_token_id"),
        "unk": get("tokenizer.ggml.unknown_token_id"),
        "pad": get("tokenizer.ggml.padding_token_id"),
        "add_bos": get("tokenizer.ggml.add_bos_token", False),
        "add_space_prefix": get("tokenizer.ggml.add_space_prefix", False),
        "chat_template": get("tokenizer.chat_template"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as gz:
        gz.write(json.dumps(tok).encode("utf-8"))  # mtime 0: the same bytes every time
    n_ctrl = sum(t == CONTROL for t in tok["token_type"])
    print(f"tokenizer of {src.name}: {len(tok['tokens'])} tokens, {len(tok['merges'])} merges, "
          f"{n_ctrl} control tokens -> {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return tok


def load_tokenizer(path: Path) -> dict:
    """A tokenizer JSON written by export-tokenizer, or read straight from a GGUF."""
    if path.suffix == ".gguf":
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            return export_tokenizer(path, Path(d) / "tok.json.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def _add_tokenizer(w, tok: dict) -> None:
    w.add_tokenizer_model(tok["model"])
    if tok.get("pre"):
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["token_type"])
    if tok.get("merges"):
        w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                     ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        if tok.get(key) is not None:
            add(int(tok[key]))
    w.add_add_bos_token(bool(tok.get("add_bos")))
    w.add_add_space_prefix(bool(tok.get("add_space_prefix")))
    if tok.get("chat_template"):
        w.add_chat_template(tok["chat_template"])


# --------------------------------------------------------------------------------------------
# random tensors, fast: rows are filled by a thread pool (numpy's generators release the GIL)
# --------------------------------------------------------------------------------------------


class Rand:
    """Deterministic Gaussian f16 tensors: each call gets its own seed sequence, each chunk
    of rows its own generator, so the result does not depend on the thread count."""

    CHUNK = 1 << 22  # values per task

    def __init__(self, seed: int, threads: int) -> None:
        self.seed, self.calls = seed, 0
        self.pool = ThreadPoolExecutor(max(1, threads))

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        self.calls += 1
        out = np.empty(shape, dtype=np.float16)
        flat = out.reshape(-1)
        bounds = list(range(0, flat.size, self.CHUNK)) + [flat.size]
        call = self.calls

        def fill(i: int) -> None:
            rng = np.random.default_rng([self.seed, call, i])
            x = rng.standard_normal(bounds[i + 1] - bounds[i], dtype=np.float32)
            x *= std
            flat[bounds[i]: bounds[i + 1]] = x

        list(self.pool.map(fill, range(len(bounds) - 1)))
        return out


def _name(kind: str, layer: int | None = None) -> str:
    base = {"embd": "token_embd", "onorm": "output_norm", "out": "output"}.get(kind)
    return f"{base}.weight" if base else f"blk.{layer}.{kind}.weight"


# A tensor to write: (name, shape, dtype, make).  `make()` builds the array when the writer
# reaches it, so a file is streamed to disk a tensor at a time (a 6B f16 target is 12 GB:
# never all in memory), and shapes and sizes are known before anything is generated.  The
# makers run in list order, which keeps Rand's call sequence, hence the bytes, fixed.
Spec = tuple[str, tuple[int, ...], type, Callable[[], np.ndarray]]
F16, F32 = np.float16, np.float32


def draft_specs(rand: Rand | None, s: Shape, n_vocab: int, control: np.ndarray | None
                ) -> list[Spec]:
    """A random llama: weights ~ N(0, 1/fan_in), embeddings N(0, 1), logits ~ N(0, 12^2)."""
    d, hd = s.n_embd, s.head_dim

    def normal(shape: tuple[int, ...], std: float) -> Callable[[], np.ndarray]:
        return lambda: rand.normal(shape, std)

    def ones(n: int) -> Callable[[], np.ndarray]:
        return lambda: np.ones(n, F32)

    def output() -> np.ndarray:
        out = rand.normal((n_vocab, d), LOGIT_STD * d**-0.5)
        out[control] = 0  # never chosen greedily: runs always reach -n tokens
        return out

    specs: list[Spec] = [(_name("embd"), (n_vocab, d), F16, normal((n_vocab, d), 1.0))]
    for i in range(s.n_layer):
        for kind, shape, std in (
                ("attn_norm", (d,), None),
                ("attn_q", (s.n_head * hd, d), d**-0.5),
                ("attn_k", (s.n_head_kv * hd, d), d**-0.5),
                ("attn_v", (s.n_head_kv * hd, d), d**-0.5),
                ("attn_output", (d, s.n_head * hd), (s.n_head * hd) ** -0.5),
                ("ffn_norm", (d,), None),
                ("ffn_gate", (s.n_ff, d), d**-0.5),
                ("ffn_up", (s.n_ff, d), d**-0.5),
                ("ffn_down", (d, s.n_ff), s.n_ff**-0.5)):
            if std is None:
                specs.append((_name(kind, i), shape, F32, ones(d)))
            else:
                specs.append((_name(kind, i), shape, F16, normal(shape, std)))
    specs.append((_name("onorm"), (d,), F32, ones(d)))
    specs.append((_name("out"), (n_vocab, d), F16, output))
    return specs


def draft_tensors(rand: Rand, s: Shape, n_vocab: int, control: np.ndarray) -> dict:
    """The drafter's arrays (small: the target is built from them)."""
    return {name: make() for name, _, _, make in draft_specs(rand, s, n_vocab, control)}


def target_specs(rand: Rand | None, dw: dict | None, ds: Shape, ts: Shape, noise: float,
                 n_vocab: int) -> list[Spec]:
    """The target's tensors: the drafter embedded, then extra layers (module doc).  `dw`
    (the drafter's arrays) is only read when the makers run."""
    d, t, hd = ds.n_embd, ts.n_embd, ts.head_dim
    qd = ds.n_head * hd  # the drafter's query rows
    scale = np.float32(math.sqrt(d / t))  # RMS over t coordinates, d of them non-zero
    qt, kvt = ts.n_head * hd, ts.n_head_kv * hd

    def pad(key: str, shape: tuple[int, int], cols: int | None = None):
        def make() -> np.ndarray:
            a = dw[key] if cols is None else dw[key][:, :cols]
            out = np.zeros(shape, F16)
            out[: a.shape[0], : a.shape[1]] = a
            return out
        return make

    def under(key: str, shape: tuple[int, int], std: float):
        """Random, with the drafter's block in the top-left corner."""
        def make() -> np.ndarray:
            a = dw[key]
            out = rand.normal(shape, std)
            out[: a.shape[0], : a.shape[1]] = a
            return out
        return make

    def normal(shape: tuple[int, ...], std: float):
        return lambda: rand.normal(shape, std)

    def full(value: float):
        return lambda: np.full(t, value, F32)

    specs: list[Spec] = [(_name("embd"), (n_vocab, t), F16, pad(_name("embd"), (n_vocab, t)))]
    for i in range(ds.n_layer):  # the drafter's layers, computing at width t
        specs += [
            (_name("attn_norm", i), (t,), F32, full(scale)),
            (_name("attn_q", i), (qt, t), F16, under(_name("attn_q", i), (qt, t), t**-0.5)),
            (_name("attn_k", i), (kvt, t), F16, under(_name("attn_k", i), (kvt, t), t**-0.5)),
            (_name("attn_v", i), (kvt, t), F16, under(_name("attn_v", i), (kvt, t), t**-0.5)),
            # the extra heads and coordinates are computed but never written
            (_name("attn_output", i), (t, qt), F16, pad(_name("attn_output", i), (t, qt), qd)),
            (_name("ffn_norm", i), (t,), F32, full(scale)),
            (_name("ffn_gate", i), (ts.n_ff, t), F16,
             under(_name("ffn_gate", i), (ts.n_ff, t), t**-0.5)),
            (_name("ffn_up", i), (ts.n_ff, t), F16,
             under(_name("ffn_up", i), (ts.n_ff, t), t**-0.5)),
            (_name("ffn_down", i), (t, ts.n_ff), F16, pad(_name("ffn_down", i), (t, ts.n_ff))),
        ]
    n_extra = ts.n_layer - ds.n_layer
    a = noise / math.sqrt(n_extra)  # total perturbation ~ noise, whatever the extra depth
    for i in range(ds.n_layer, ts.n_layer):  # the only tensors that depend on the noise
        specs += [
            (_name("attn_norm", i), (t,), F32, full(1.0)),
            (_name("attn_q", i), (qt, t), F16, normal((qt, t), t**-0.5)),
            (_name("attn_k", i), (kvt, t), F16, normal((kvt, t), t**-0.5)),
            (_name("attn_v", i), (kvt, t), F16, normal((kvt, t), t**-0.5)),
            (_name("attn_output", i), (t, qt), F16, normal((t, qt), a * qt**-0.5)),
            (_name("ffn_norm", i), (t,), F32, full(1.0)),
            (_name("ffn_gate", i), (ts.n_ff, t), F16, normal((ts.n_ff, t), t**-0.5)),
            (_name("ffn_up", i), (ts.n_ff, t), F16, normal((ts.n_ff, t), t**-0.5)),
            (_name("ffn_down", i), (t, ts.n_ff), F16, normal((t, ts.n_ff), a * ts.n_ff**-0.5)),
        ]
    specs.append((_name("onorm"), (t,), F32, full(scale)))
    specs.append((_name("out"), (n_vocab, t), F16, pad(_name("out"), (n_vocab, t))))
    return specs


def specs_bytes(specs: list[Spec]) -> int:
    return sum(math.prod(shape) * np.dtype(dt).itemsize for _, shape, dt, _ in specs)


def largest_bytes(specs: list[Spec]) -> int:
    return max(math.prod(shape) * np.dtype(dt).itemsize for _, shape, dt, _ in specs)


def write_gguf(path: Path, shape: Shape, tok: dict, specs: list[Spec], role: str,
               info: dict) -> None:
    """Header and tensor table first, then each tensor as it is made: at most two tensors in
    memory (the one being written, the next one being generated beside it)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"specli timing {role} ({LABEL})")
    w.add_string("specli.timing_model", json.dumps({"label": LABEL, "role": role, **info}))
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    w.add_vocab_size(len(tok["tokens"]))
    w.add_context_length(8192)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    _add_tokenizer(w, tok)
    for name, shp, dt, _ in specs:
        w.add_tensor_info(name, shp, np.dtype(dt), math.prod(shp) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with ThreadPoolExecutor(1) as ahead:  # one worker: the makers run in order
        nxt = ahead.submit(specs[0][3])
        for i, (name, shp, dt, _) in enumerate(specs):
            arr = nxt.result()
            if i + 1 < len(specs):
                nxt = ahead.submit(specs[i + 1][3])
            if arr.shape != tuple(shp) or arr.dtype != np.dtype(dt):
                raise AssertionError(f"{name}: made {arr.shape} {arr.dtype}, planned {shp} {dt}")
            w.write_tensor_data(arr)
            del arr
    w.close()


QUANT_BITS = {"q4_0": 4.55, "q4_k_m": 4.9, "q8_0": 8.5}  # llama.cpp, bits per weight, about
GB = 1e9


def plan_pair(out_dir: Path, draft: Shape, target: Shape, n_vocab: int, tok_bytes: int,
              quant: str | None) -> dict:
    """Sizes before writing: the f16 files, a quantised copy's estimate, peak memory, and the
    free disk under out_dir (files of an earlier pair there count as free: overwritten)."""
    ds = draft_specs(None, draft, n_vocab, None)
    ts = target_specs(None, None, draft, target, 0.0, n_vocab)
    draft_b, target_b = specs_bytes(ds) + tok_bytes, specs_bytes(ts) + tok_bytes
    need = draft_b + target_b
    quant_b = 0
    if quant:
        bits = QUANT_BITS[quant]
        quant_b = int((draft.params(n_vocab) + target.params(n_vocab)) * bits / 8)
        need += quant_b
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    free += sum((out_dir / f).stat().st_size for f in ("draft.gguf", "target.gguf")
                if (out_dir / f).is_file())
    # in memory: the drafter's arrays, the tensor being written and the next one
    ram = specs_bytes(ds) + 2 * largest_bytes(ts)
    plan = {"draft_bytes_planned": draft_b, "target_bytes_planned": target_b,
            "quant": quant, "quant_bytes_estimated": quant_b, "disk_needed": need,
            "disk_free": free, "peak_ram_estimated": ram}
    q = f" + {quant} copies ~{quant_b / GB:.1f} GB (estimate)" if quant else ""
    print(f"plan: drafter {draft.params(n_vocab) / 1e6:.0f}M params ({draft_b / GB:.2f} GB f16), "
          f"target {target.params(n_vocab) / 1e9:.2f}B params ({target_b / GB:.2f} GB f16); "
          f"disk {need / GB:.1f} GB (f16{q}) of {free / GB:.1f} GB free under {probe}; "
          f"peak memory ~{ram / GB:.1f} GB")
    return plan


def write_pair(out_dir: Path, draft: Shape, target: Shape, tok: dict, noise: float,
               seed: int, threads: int, quant: str | None = None, dry_run: bool = False
               ) -> dict:
    check_pair(draft, target)
    n_vocab = len(tok["tokens"])
    tok_bytes = sum(len(x.encode("utf-8")) + 12 for x in tok["tokens"]) + sum(
        len(x) + 8 for x in tok.get("merges") or []) + len(tok.get("chat_template") or "")
    plan = plan_pair(out_dir, draft, target, n_vocab, tok_bytes, quant)
    if plan["disk_needed"] > plan["disk_free"]:
        raise OSError(f"not enough disk under {out_dir}: {plan['disk_needed'] / GB:.1f} GB "
                      f"needed, {plan['disk_free'] / GB:.1f} GB free")
    if dry_run:
        print("PLAN " + json.dumps(plan))  # for scripts/gpu_check.sh's time and disk plan
        return plan
    out_dir.mkdir(parents=True, exist_ok=True)
    control = np.array([t == CONTROL for t in tok["token_type"]])
    rand = Rand(seed, threads)
    info = {"noise": noise, "seed": seed, "draft_shape": asdict(draft),
            "target_shape": asdict(target), "tokenizer": tok.get("source")}
    # the drafter's own file leaves the noise out: one drafter serves every noise level
    draft_info = {k: v for k, v in info.items() if k != "noise"}
    t0 = time.perf_counter()
    dw = draft_tensors(rand, draft, n_vocab, control)
    write_gguf(out_dir / "draft.gguf", draft, tok,
               [(k, v.shape, v.dtype.type, lambda v=v: v) for k, v in dw.items()],
               "drafter", draft_info)
    t1 = time.perf_counter()
    write_gguf(out_dir / "target.gguf", target, tok,
               target_specs(rand, dw, draft, target, noise, n_vocab), "target", info)
    t2 = time.perf_counter()
    rand.pool.shutdown()
    meta = {
        "label": LABEL, **info,
        "draft_params": draft.params(n_vocab), "target_params": target.params(n_vocab),
        "draft_bytes": (out_dir / "draft.gguf").stat().st_size,
        "target_bytes": (out_dir / "target.gguf").stat().st_size,
        "draft_write_s": round(t1 - t0, 2), "target_write_s": round(t2 - t1, 2),
        "disk_free_before": plan["disk_free"],
    }
    (out_dir / "models.json").write_text(json.dumps(meta) + "\n", "utf-8")
    print(f"{LABEL}\n  drafter {draft}: {meta['draft_params'] / 1e6:.0f}M params, "
          f"{meta['draft_bytes'] / 1e6:.0f} MB, {meta['draft_write_s']} s\n"
          f"  target  {target}: {meta['target_params'] / 1e6:.0f}M params, "
          f"{meta['target_bytes'] / 1e6:.0f} MB, {meta['target_write_s']} s\n"
          f"  noise {noise}, seed {seed}, vocabulary {n_vocab} ({tok.get('source')}) -> {out_dir}")
    return meta


# --------------------------------------------------------------------------------------------
# measuring agreement
# --------------------------------------------------------------------------------------------

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Summarize the main causes of the French Revolution in three sentences.",
    "Translate to German: The weather is nice today and we are going to the lake.",
    "A train leaves at 9:40 and arrives at 13:05. How long is the journey?",
]


def measure(out_dir: Path, n_tokens: int, gpu_layers: int, threads: int) -> dict:
    """Greedy per-token agreement: how often the drafter's argmax, teacher-forced on the
    target's own greedy output, equals the target's next token.  With independent
    acceptance a and draft length k, a target pass yields (1 - a^(k+1)) / (1 - a) tokens."""
    import llama_cpp

    def load(path: Path, ngl: int) -> llama_cpp.Llama:
        return llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True,
                               n_gpu_layers=ngl, n_threads=threads, n_threads_batch=threads,
                               verbose=False)

    target, draft = load(out_dir / "target.gguf", gpu_layers), load(out_dir / "draft.gguf", 0)
    agree = total = distinct = 0
    t0 = time.perf_counter()
    for text in PROMPTS:
        prompt = target.tokenize(text.encode(), add_bos=False, special=False)
        target.reset()
        target.eval(prompt)
        gen: list[int] = []
        for _ in range(n_tokens):
            gen.append(int(np.argmax(target.scores[target.n_tokens - 1])))
            target.eval([gen[-1]])
        draft.reset()
        draft.eval(prompt + gen[:-1])
        n0 = len(prompt) - 1
        guess = np.argmax(draft.scores[n0: n0 + n_tokens], axis=1)
        agree += int(np.sum(guess == np.array(gen)))
        total += n_tokens
        distinct += len(set(gen))
    a = agree / total
    res = {"agreement": a, "tokens": total, "distinct_per_prompt": distinct / len(PROMPTS),
           "seconds": round(time.perf_counter() - t0, 1)}
    per_pass = {k: (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1.0 for k in (2, 4, 8)}
    print(f"greedy per-token agreement {a:.3f} over {total} tokens "
          f"({res['distinct_per_prompt']:.0f} distinct tokens per {n_tokens}-token answer); "
          "tokens per target pass at draft length 2/4/8 if independent: "
          + "/".join(f"{v:.2f}" for v in per_pass.values()) + f" [{res['seconds']} s]")
    return res


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write target.gguf, draft.gguf and models.json")
    w.add_argument("out_dir", type=Path)
    w.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="drafter and target shapes (default small); see --draft-shape")
    w.add_argument("--draft-shape", "--draft", dest="draft", metavar="S",
                   help="n_embd,n_layer,n_head,n_head_kv,n_ff: overrides the preset's drafter "
                        "(e.g. 512,12,8,2,1536)")
    w.add_argument("--target-shape", "--target", dest="target", metavar="S",
                   help="likewise for the target (e.g. 4096,32,64,16,11008: 6.1B, 12.2 GB f16)")
    w.add_argument("--quant-estimate", choices=sorted(QUANT_BITS),
                   help="count a quantised copy of the pair (written later, e.g. by "
                        "gpu_probe.py quantize) in the disk report and check")
    w.add_argument("--dry-run", action="store_true",
                   help="print the sizes and the disk check, write nothing")
    w.add_argument("--noise", type=float, default=DEFAULT_NOISE,
                   help="strength of the target's extra layers (0: target == drafter)")
    w.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                   help="export-tokenizer's JSON, or any GGUF to take the tokenizer from")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    m = sub.add_parser("measure", help="greedy per-token agreement with llama-cpp-python")
    m.add_argument("out_dir", type=Path)
    m.add_argument("-n", "--tokens", type=int, default=64)
    m.add_argument("--gpu-layers", type=int, default=0, help="target layers on the GPU")
    m.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    e = sub.add_parser("export-tokenizer", help="a GGUF's tokenizer as gzipped JSON")
    e.add_argument("src", type=Path)
    e.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "export-tokenizer":
        export_tokenizer(args.src, args.out)
    elif args.cmd == "write":
        draft, target = PRESETS[args.preset]
        try:  # a bad shape or pair: one line, exit 2 (as argparse's own errors)
            draft = Shape.parse(args.draft) if args.draft else draft
            target = Shape.parse(args.target) if args.target else target
            check_pair(draft, target)
        except ValueError as e:
            print(f"{p.prog} write: error: {e}", file=sys.stderr)
            return 2
        if args.noise < 0:
            print(f"{p.prog} write: error: --noise must be >= 0", file=sys.stderr)
            return 2
        try:
            write_pair(args.out_dir, draft, target, load_tokenizer(args.tokenizer), args.noise,
                       args.seed, args.threads, args.quant_estimate, args.dry_run)
        except OSError as e:
            print(f"{p.prog} write: error: {e}", file=sys.stderr)
            return 1
    else:
        res = measure(args.out_dir, args.tokens, args.gpu_layers, args.threads)
        (args.out_dir / "agreement.json").write_text(json.dumps(res) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
