#!/usr/bin/env python3
"""Step through the llama.cpp calls speculative decoding makes, one line per call, to find
which one a GPU build rejects (issue #8: `draft` and `duo` aborted with a CUDA error inside
`llama_decode` while plain decoding ran).

WHY a separate script: an abort kills the process, so each configuration runs in its own
process (`gpu_check.sh` loops over them) and the last "step" line printed before the abort
names the call.  It drives specli's own GGUFModel, so the calls are exactly the engine's.

    python scripts/gpu_probe.py TARGET.gguf [--draft DRAFT.gguf] [-ngl 99] [--branches 3]
        [--flash auto|on|off] [--kv f16|f32] [--sizes 2,5,8,17]

`speed TARGET DRAFT` times drafting and verification per CPU thread split (see `speed`).
`quantize SRC DST TYPE` writes a quantised copy with llama.cpp's own quantiser (TYPE: q4_k_m,
q8_0, ...), so a random-weight f16 timing model can be timed as users run real ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import llama_cpp  # before numpy (see specli/__init__.py)

FTYPES = {
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
}


def step(msg: str) -> None:
    print(f"[probe {time.perf_counter() - T0:7.3f}s] {msg}", flush=True)


T0 = time.perf_counter()


def quantize(src: str, dst: str, kind: str, threads: int) -> int:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = threads
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    step(f"quantize {src} -> {dst} ({kind}): rc {rc}, {time.perf_counter() - t:.1f}s")
    return int(rc != 0)


def probe(a: argparse.Namespace) -> int:
    from specli.backends.base import LoadOptions
    from specli.backends.gguf import GGUFModel

    sizes = [int(x) for x in a.sizes.split(",") if x]
    step(f"config: target {a.target} ngl {a.ngl} branches {a.branches} flash {a.flash} "
         f"kv {a.kv} draft {a.draft or '-'} sizes {sizes}")
    t_opts = LoadOptions(n_ctx=2048, n_threads=a.threads, n_gpu_layers=a.ngl,
                         branches=a.branches, flash_attn=a.flash, kv_type=a.kv)
    step("load target")
    target = GGUFModel(a.target, t_opts)
    step(f"target loaded: {target.placement}")
    draft = None
    if a.draft:
        step("load draft (CPU-pinned)")
        draft = GGUFModel(a.draft, LoadOptions(n_ctx=2048, n_threads=a.threads, n_gpu_layers=0))
        step(f"draft loaded: {draft.placement}")
    prompt = target.tokenize("def fibonacci(n):\n    " * 8, add_bos=True)[:56]
    step(f"target prefill {len(prompt)} tokens")
    last = target.eval(prompt, logits_for=[len(prompt) - 1])
    step(f"ok, argmax {int(last[-1].argmax())}")
    if draft is not None:
        step(f"draft prefill {len(prompt)} tokens")
        draft.eval(prompt, logits_for=[len(prompt) - 1])
        step("ok")
    base = len(target.tokens)
    nxt = int(last[-1].argmax())
    for s in sizes:
        toks = [nxt] + [int(t) for t in prompt[1:s]]
        step(f"target verify batch of {s} tokens, logits for all rows")
        out = target.eval(toks, logits_for=range(s))
        step(f"ok {out.shape}; truncate to {base}")
        target.truncate(base)
        if draft is not None:
            step(f"draft: {s} single-token steps")
            for t in toks:
                draft.eval([t], logits_for=[0])
            draft.truncate(base)
            step("ok")
    if a.branches > 1:
        step("target eval_tree: 2 branches of 2 tokens")
        out = target.eval_tree(nxt, [prompt[1], prompt[2], prompt[3], prompt[4]], [-1, 0, -1, 2])
        step(f"ok {out.shape}; keep_path [0, 1]")
        target.keep_path([0, 1])
        target.truncate(base)
        step("ok")
    step("target: 16 single-token steps")
    for _ in range(16):
        nxt = int(target.eval([nxt], logits_for=[0])[0].argmax())
    step("PASS")
    return 0


def speed(a: argparse.Namespace) -> int:
    """Drafter and target timings per thread split, drafting after verifying (draft) and
    beside it in another thread (duo): which CPU thread counts suit this machine.  The
    last line is `SPEED {json}` with every measurement and the split with the fastest
    draft round."""
    import json
    import threading

    import numpy as np

    from specli.backends.base import LoadOptions
    from specli.backends.gguf import GGUFModel

    target = GGUFModel(a.target, LoadOptions(n_ctx=2048, n_gpu_layers=a.ngl, branches=a.branches))
    draft = GGUFModel(a.draft, LoadOptions(n_ctx=2048, n_gpu_layers=0))
    prompt = target.tokenize("def fibonacci(n):\n    " * 8, add_bos=True)[:56]
    target.eval(prompt, [len(prompt) - 1])
    draft.eval(prompt, [len(prompt) - 1])
    base, k, rounds = len(prompt), 4, 12

    def draft_round() -> None:
        for t in prompt[1 : k + 1]:
            int(np.argmax(draft.eval([t], [0])[0]))
        draft.truncate(base)

    def verify() -> None:
        target.eval(prompt[1 : k + 2], range(k + 1))
        target.truncate(base)

    results = []
    for t_threads in [int(x) for x in a.target_threads.split(",")]:
        for d_threads in [int(x) for x in a.draft_threads.split(",")]:
            llama_cpp.llama_set_n_threads(target._ctx, t_threads, t_threads)
            llama_cpp.llama_set_n_threads(draft._ctx, d_threads, d_threads)
            for _ in range(2):  # warm-up
                draft_round()
                verify()
            d_times, v_times = [], []
            for _ in range(rounds):  # sequential, as `draft`
                t0 = time.perf_counter()
                draft_round()
                t1 = time.perf_counter()
                verify()
                d_times.append(t1 - t0)
                v_times.append(time.perf_counter() - t1)
            stop = threading.Event()
            beside: list[float] = []

            def drafting(stop: threading.Event = stop, beside: list[float] = beside) -> None:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    draft_round()
                    beside.append(time.perf_counter() - t0)

            worker = threading.Thread(target=drafting)
            worker.start()
            vb = []
            for _ in range(rounds):  # side by side, as `duo`
                t0 = time.perf_counter()
                verify()
                vb.append(time.perf_counter() - t0)
            stop.set()
            worker.join()
            r = {"target_threads": t_threads, "draft_threads": d_threads,
                 "draft_ms_per_token": 1000 * float(np.median(d_times)) / k,
                 "verify_ms": 1000 * float(np.median(v_times)),
                 "draft_ms_per_token_beside": 1000 * float(np.median(beside)) / k if beside
                 else None,
                 "verify_ms_beside": 1000 * float(np.median(vb))}
            results.append(r)
            step(" ".join(f"{key} {val:.2f}" if isinstance(val, float) else f"{key} {val}"
                          for key, val in r.items()))
    best = min(results, key=lambda r: k * r["draft_ms_per_token"] + r["verify_ms"])
    print("SPEED " + json.dumps({"k": k, "results": results, "best": best}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quantize"]:
        src, dst, kind = argv[1:4]  # all cores (was 8)
        return quantize(src, dst, kind, threads=os.cpu_count() or 8)
    if argv[:1] == ["speed"]:
        p = argparse.ArgumentParser(prog="gpu_probe.py speed")
        p.add_argument("target")
        p.add_argument("draft")
        p.add_argument("-ngl", "--gpu-layers", dest="ngl", type=int, default=99)
        p.add_argument("--branches", type=int, default=3)
        p.add_argument("--target-threads", default="2,16")
        p.add_argument("--draft-threads", default="2,4,8,16")
        return speed(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target")
    p.add_argument("--draft")
    p.add_argument("-ngl", "--gpu-layers", dest="ngl", type=int, default=99)
    p.add_argument("--branches", type=int, default=3)
    p.add_argument("--flash", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--kv", default="f16", choices=["f16", "f32"])
    p.add_argument("--sizes", default="2,5,8,17")
    p.add_argument("--threads", type=int, default=8)
    return probe(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
