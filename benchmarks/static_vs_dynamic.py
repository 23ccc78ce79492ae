"""Static shapes (OpenVINO CPU plugin) against the dynamic ONNX path (onnxruntime CPU).

Runs the same `specli export` int8 folder both ways, in one process, on this machine:
plain greedy decode speed on a few Spec-Bench prompts, and the verify-cost curve (time of
one target pass over n = 1..2(K+1) tokens at a short context; expected flat up to K+1 on
the static path, two calls beyond).  Writes summary.json into
benchmarks/results/2026-11-28-cpu2-static/.  Not a test: numbers of one noisy machine.

    .venv/bin/python benchmarks/static_vs_dynamic.py [EXPORT_NAME] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from specli.backends.base import LoadOptions
from specli.backends.onnx import ONNXModel
from specli.backends.openvino_static import StaticModel, StaticSpec
from specli.engine import Engine, GenerationConfig
from specli.export import catalog
from specli.prompts import load_prompts, pick
from specli.runtime import encode_prompt

OUT = Path(__file__).parent / "results" / "2026-11-28-cpu2-static"


def curve(model, base: list[int], n_max: int, repeats: int = 5) -> list[float]:
    """Median ms of one pass over n tokens (logits for all of them), n = 1..n_max."""
    model.truncate(0)
    model.eval(base)
    out = []
    for n in range(1, n_max + 1):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.eval(base[:n], range(n))
            times.append(time.perf_counter() - t0)
            model.truncate(len(base))
        out.append(round(1000 * statistics.median(times), 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export", nargs="?", default="qwen2.5-coder-1.5b-instruct-onnx-int8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--categories", default="coding,math,writing")
    a = ap.parse_args()
    entry = catalog.find(a.export)
    path = entry.path if entry else a.export
    prompts = pick(load_prompts(), a.categories.split(","), 1)
    opts = LoadOptions(n_ctx=max(a.ctx), n_threads=2)
    models = {"dynamic (onnxruntime CPU)": ONNXModel(path, opts)}
    load_s = {}
    for c in a.ctx:
        t0 = time.perf_counter()
        models[f"static ctx {c} (OpenVINO CPU)"] = StaticModel(
            path, LoadOptions(n_ctx=c, n_threads=2, device="cpu"),
            spec=StaticSpec(a.window, 64))
        load_s[c] = round(time.perf_counter() - t0, 1)
    cfg = GenerationConfig(max_tokens=a.tokens)
    rows: dict[str, dict] = {name: {"decode_tok_s": [], "texts": []} for name in models}
    for p in prompts:  # interleaved per prompt
        for name, m in models.items():
            prompt = encode_prompt(m, p.text)
            res = Engine(m).generate(prompt, cfg, "none")
            rows[name]["decode_tok_s"].append(round(res.stats.decode_tok_s, 2))
            rows[name]["texts"].append(res.tokens)
    ref = rows["dynamic (onnxruntime CPU)"]["texts"]
    base = encode_prompt(models["dynamic (onnxruntime CPU)"], prompts[0].text)[:40]
    summary = {"export": path, "tokens": a.tokens, "window": a.window, "threads": 2,
               "prompts": [p.category for p in prompts], "static_load_s": load_s,
               "methods": {}}
    for name, m in models.items():
        r = rows[name]
        summary["methods"][name] = {
            "decode_tok_s": r["decode_tok_s"],
            "decode_tok_s_geomean": round(statistics.geometric_mean(r["decode_tok_s"]), 2),
            "greedy_identical_to_dynamic": [t == u for t, u in zip(r["texts"], ref,
                                                                   strict=True)],
            "verify_ms_by_n": curve(m, base, 2 * (a.window + 1)),
        }
        m.close()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
