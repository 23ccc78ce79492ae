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

Subcommands:
  write OUT_DIR [--preset gpu|tune|small] [--noise X]   target.gguf, draft.gguf, models.json
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
import sys
import time
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
        """'n_embd,n_layer,n_head,n_head_kv,n_ff'."""
        return cls(*(int(x) for x in text.split(",")))


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
        if s.n_embd % s.n_head or s.n_head % s.n_head_kv:
            raise ValueError(f"{s}: n_embd must divide by n_head and n_head by n_head_kv")
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


def draft_tensors(rand: Rand, s: Shape, n_vocab: int, control: np.ndarray) -> dict:
    """A random llama: weights ~ N(0, 1/fan_in), embeddings N(0, 1), logits ~ N(0, 12^2)."""
    d, hd = s.n_embd, s.head_dim
    w = {_name("embd"): rand.normal((n_vocab, d), 1.0)}
    for i in range(s.n_layer):
        w[_name("attn_norm", i)] = np.ones(d, np.float32)
        w[_name("attn_q", i)] = rand.normal((s.n_head * hd, d), d**-0.5)
        w[_name("attn_k", i)] = rand.normal((s.n_head_kv * hd, d), d**-0.5)
        w[_name("attn_v", i)] = rand.normal((s.n_head_kv * hd, d), d**-0.5)
        w[_name("attn_output", i)] = rand.normal((d, s.n_head * hd), (s.n_head * hd) ** -0.5)
        w[_name("ffn_norm", i)] = np.ones(d, np.float32)
        w[_name("ffn_gate", i)] = rand.normal((s.n_ff, d), d**-0.5)
        w[_name("ffn_up", i)] = rand.normal((s.n_ff, d), d**-0.5)
        w[_name("ffn_down", i)] = rand.normal((d, s.n_ff), s.n_ff**-0.5)
    w[_name("onorm")] = np.ones(d, np.float32)
    out = rand.normal((n_vocab, d), LOGIT_STD * d**-0.5)
    out[control] = 0  # never chosen greedily: runs always reach -n tokens
    w[_name("out")] = out
    return w


def target_tensors(rand: Rand, dw: dict, ds: Shape, ts: Shape, noise: float):
    """Yield the target's tensors: the drafter embedded, then extra layers (module doc)."""
    d, t, hd = ds.n_embd, ts.n_embd, ts.head_dim
    qd = ds.n_head * hd  # the drafter's query rows
    scale = np.float32(math.sqrt(d / t))  # RMS over t coordinates, d of them non-zero

    def pad(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
        out = np.zeros((rows, cols), np.float16)
        out[: a.shape[0], : a.shape[1]] = a
        return out

    def under(a: np.ndarray, shape: tuple[int, int], std: float) -> np.ndarray:
        """Random, with the drafter's block in the top-left corner."""
        out = rand.normal(shape, std)
        out[: a.shape[0], : a.shape[1]] = a
        return out

    yield _name("embd"), pad(dw[_name("embd")], dw[_name("embd")].shape[0], t)
    for i in range(ds.n_layer):  # the drafter's layers, computing at width t
        g = lambda k, i=i: dw[_name(k, i)]  # noqa: E731
        yield _name("attn_norm", i), np.full(t, scale, np.float32)
        yield _name("attn_q", i), under(g("attn_q"), (ts.n_head * hd, t), t**-0.5)
        yield _name("attn_k", i), under(g("attn_k"), (ts.n_head_kv * hd, t), t**-0.5)
        yield _name("attn_v", i), under(g("attn_v"), (ts.n_head_kv * hd, t), t**-0.5)
        # the extra heads and coordinates are computed but never written
        yield _name("attn_output", i), pad(g("attn_output")[:, :qd], t, ts.n_head * hd)
        yield _name("ffn_norm", i), np.full(t, scale, np.float32)
        yield _name("ffn_gate", i), under(g("ffn_gate"), (ts.n_ff, t), t**-0.5)
        yield _name("ffn_up", i), under(g("ffn_up"), (ts.n_ff, t), t**-0.5)
        yield _name("ffn_down", i), pad(g("ffn_down"), t, ts.n_ff)
    n_extra = ts.n_layer - ds.n_layer
    a = noise / math.sqrt(n_extra)  # total perturbation ~ noise, whatever the extra depth
    for i in range(ds.n_layer, ts.n_layer):
        yield _name("attn_norm", i), np.ones(t, np.float32)
        yield _name("attn_q", i), rand.normal((ts.n_head * hd, t), t**-0.5)
        yield _name("attn_k", i), rand.normal((ts.n_head_kv * hd, t), t**-0.5)
        yield _name("attn_v", i), rand.normal((ts.n_head_kv * hd, t), t**-0.5)
        yield _name("attn_output", i), rand.normal((t, ts.n_head * hd),
                                                    a * (ts.n_head * hd) ** -0.5)
        yield _name("ffn_norm", i), np.ones(t, np.float32)
        yield _name("ffn_gate", i), rand.normal((ts.n_ff, t), t**-0.5)
        yield _name("ffn_up", i), rand.normal((ts.n_ff, t), t**-0.5)
        yield _name("ffn_down", i), rand.normal((t, ts.n_ff), a * ts.n_ff**-0.5)
    yield _name("onorm"), np.full(t, scale, np.float32)
    out = dw[_name("out")]
    yield _name("out"), pad(out, out.shape[0], t)


def write_gguf(path: Path, shape: Shape, tok: dict, tensors, role: str, info: dict) -> None:
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
    for name, arr in tensors:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_pair(out_dir: Path, draft: Shape, target: Shape, tok: dict, noise: float,
               seed: int, threads: int) -> dict:
    check_pair(draft, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_vocab = len(tok["tokens"])
    control = np.array([t == CONTROL for t in tok["token_type"]])
    rand = Rand(seed, threads)
    info = {"noise": noise, "seed": seed, "draft_shape": asdict(draft),
            "target_shape": asdict(target), "tokenizer": tok.get("source")}
    t0 = time.perf_counter()
    dw = draft_tensors(rand, draft, n_vocab, control)
    write_gguf(out_dir / "draft.gguf", draft, tok, dw.items(), "drafter", info)
    t1 = time.perf_counter()
    write_gguf(out_dir / "target.gguf", target, tok,
               target_tensors(rand, dw, draft, target, noise), "target", info)
    t2 = time.perf_counter()
    rand.pool.shutdown()
    meta = {
        "label": LABEL, **info,
        "draft_params": draft.params(n_vocab), "target_params": target.params(n_vocab),
        "draft_bytes": (out_dir / "draft.gguf").stat().st_size,
        "target_bytes": (out_dir / "target.gguf").stat().st_size,
        "draft_write_s": round(t1 - t0, 2), "target_write_s": round(t2 - t1, 2),
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
    w.add_argument("--preset", choices=sorted(PRESETS), default="small")
    w.add_argument("--draft", type=Shape.parse, help="n_embd,n_layer,n_head,n_head_kv,n_ff")
    w.add_argument("--target", type=Shape.parse, help="n_embd,n_layer,n_head,n_head_kv,n_ff")
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
        write_pair(args.out_dir, args.draft or draft, args.target or target,
                   load_tokenizer(args.tokenizer), args.noise, args.seed, args.threads)
    else:
        res = measure(args.out_dir, args.tokens, args.gpu_layers, args.threads)
        (args.out_dir / "agreement.json").write_text(json.dumps(res) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
