"""specli's plain decoding vs llama-cpp-python's own `Llama.create_completion`.

Same model, same threads, same chat-formatted prompt tokens, greedy, interleaved
rounds so machine drift hits both alike.  Decode speed is measured from the first
streamed token to the last (prefill and the first token excluded for both), and
reported as a ratio in the same run.

    .venv/bin/python benchmarks/plain_vs_peer.py [MODEL] [-n 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from llama_cpp import Llama

from specli.backends.base import LoadOptions
from specli.backends.gguf import GGUFModel, default_threads
from specli.engine import Engine, GenerationConfig, Result
from specli.pull import resolve_model
from specli.registry import load_registry
from specli.runtime import encode_prompt

PROMPT = "Write a Python function that checks whether a string is a palindrome, with tests."


def specli_decode(engine: Engine, prompt: list[int], n: int) -> tuple[float, int]:
    res = Result(method="none")
    stamps = []
    for chunk in engine.stream(prompt, GenerationConfig(max_tokens=n), res):
        stamps.append((time.perf_counter(), len(chunk)))
    done = sum(c for _, c in stamps[1:])
    return done / (stamps[-1][0] - stamps[0][0]), len(res.tokens)


def peer_decode(llm: Llama, prompt: list[int], n: int) -> tuple[float, int]:
    llm.reset()
    stamps = []
    for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, stream=True):
        if chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"] is None:
            stamps.append(time.perf_counter())  # the closing chunk carries no token
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    path = str(resolve_model(a.model, registry=load_registry()))
    threads = default_threads()
    ours = GGUFModel(path, LoadOptions(n_ctx=2048, n_threads=threads))
    peer = Llama(path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = encode_prompt(ours, PROMPT)
    engine = Engine(ours)
    specli_decode(engine, prompt, 8)  # warm-up, not counted
    peer_decode(peer, prompt, 8)
    s_rates, p_rates = [], []
    for r in range(a.rounds):
        s, ns = specli_decode(engine, prompt, a.n)
        p, np_ = peer_decode(peer, prompt, a.n)
        s_rates.append(s)
        p_rates.append(p)
        print(f"round {r + 1}: specli {s:.2f} tok/s ({ns} tokens)  peer {p:.2f} tok/s ({np_})")
    s, p = statistics.median(s_rates), statistics.median(p_rates)
    print(f"median decode: specli {s:.2f} tok/s, llama-cpp-python create_completion {p:.2f} tok/s,"
          f" ratio {s / p:.3f} ({threads} threads)")


if __name__ == "__main__":
    main()
