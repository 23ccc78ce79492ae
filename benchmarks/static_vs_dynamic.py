"""Static shapes (OpenVINO CPU plugin) against the dynamic ONNX path (onnxruntime CPU).

Runs the same `specli export` int8 folder both ways, in one process, on this machine:
plain greedy decode speed on a few Spec-Bench prompts, and the verify-cost curve (time of
one target pass over n = 1..2(K+1) tokens at a short context; expected flat up to K+1 on
the static path, two calls beyond).  Then the first static target drafted for by the
0.5B export (dynamic onnxruntime) under the budget calibrated on the static target: on
a flat curve it should draft up to K, and its text must equal static plain decoding's.
Writes summary.json into benchmarks/results/2026-11-28-cpu2-static/.  Not a test: the
numbers of one noisy machine.

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
from specli.budget import AdaptiveBudget
from specli.calibrate import measure
from specli.drafters.model import ModelDrafter
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
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct-onnx-int8")
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
    static_name = f"static ctx {a.ctx[0]} (OpenVINO CPU)"
    static = models[static_name]
    d_entry = catalog.find(a.draft)
    draft = ONNXModel(d_entry.path if d_entry else a.draft, LoadOptions(n_ctx=max(a.ctx),
                                                                        n_threads=2))
    cost = measure(static, draft, k_max=a.window + 1)
    spec_engine = Engine(static, ModelDrafter(draft), AdaptiveBudget(cost))
    spec = {"decode_tok_s": [], "mean_accepted": [], "identical_to_static_plain": []}
    for p, plain in zip(prompts, rows[static_name]["texts"], strict=True):
        res = spec_engine.generate(encode_prompt(static, p.text), cfg, "draft")
        spec["decode_tok_s"].append(round(res.stats.decode_tok_s, 2))
        spec["mean_accepted"].append(round(res.stats.mean_accepted, 2))
        spec["identical_to_static_plain"].append(res.tokens == plain)
    spec["speedup_vs_static_plain"] = round(
        statistics.geometric_mean(spec["decode_tok_s"])
        / statistics.geometric_mean(rows[static_name]["decode_tok_s"]), 2)
    spec["calibrated_verify_ms_by_n"] = [round(1000 * v, 1) for v in cost.verify]
    spec["calibrated_draft_ms"] = round(1000 * cost.draft, 1)
    draft.close()
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
    summary[f"{static_name} + draft {a.draft} (budget)"] = spec
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
