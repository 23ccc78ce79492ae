"""Issue 17 on real models: the static-shape path (OpenVINO's CPU plugin, the graphs an
Intel NPU would run) against the dynamic ONNX path, Qwen2.5-Coder-1.5B int8 as the target.

Greedy output through the static target must equal the dynamic path's greedy output for
5 Spec-Bench prompts x 64 tokens with `none`, `hd` and the 0.5B draft model, up to
near-ties: the two paths sum the same float32 math in another order (test_static.py
bounds the logit difference by 1e-4 and measures ~2e-5), so at a first differing token
the dynamic path's own top-2 logit gap must be under 2e-4 (then either token is a
greedy choice within float noise); any other difference fails.  `make test` makes the
exports; if they are missing this fails loudly.
"""

from __future__ import annotations

import pytest

from specli.backends.base import LoadOptions
from specli.backends.onnx import ONNXModel
from specli.backends.openvino_static import StaticModel, StaticSpec
from specli.budget import AdaptiveBudget, CostModel
from specli.calibrate import measure
from specli.drafters.hierarchy import HierarchyDrafter
from specli.drafters.model import ModelDrafter
from specli.engine import Engine, GenerationConfig
from specli.fidelity import analyse, first_difference
from specli.prompts import load_prompts, pick
from specli.runtime import encode_prompt

pytestmark = pytest.mark.real

N_TOKENS = 64
NEAR_TIE = 2e-4  # twice test_static.py's bound on static vs dynamic logits
CTX = 512  # the static KV buffer: every Spec-Bench prompt below plus 64 tokens fits
WINDOW = 8


def _folder(name: str):
    from specli.export import catalog

    entry = catalog.find(f"{name}-onnx-int8")
    if entry is None or not entry.present:
        pytest.fail(f"ONNX export of {name} missing; run `make test` (it exports it)",
                    pytrace=False)
    return entry.path


@pytest.fixture(scope="module")
def paths():
    target = _folder("qwen2.5-coder-1.5b-instruct")
    static = StaticModel(target, LoadOptions(n_ctx=CTX, device="cpu"),
                         spec=StaticSpec(window=WINDOW, prefill=64))
    dynamic = ONNXModel(target, LoadOptions(n_ctx=CTX))
    draft = ONNXModel(_folder("qwen2.5-coder-0.5b-instruct"), LoadOptions(n_ctx=CTX))
    yield static, dynamic, draft
    for m in (static, dynamic, draft):
        m.close()


@pytest.mark.xfail(strict=True, reason=(
    "issue 17 open: measured 2026-11-28, the 0.5B-drafted output through the static 1.5B "
    "left the dynamic path's greedy text at a top-2 gap of 0.12 (writing, token 33): the "
    "static path's multi-token passes are not yet batch-invariant on the real model "
    "(strict: this fails the suite the day it passes, so the mark must come off)"))
def test_static_greedy_equals_the_dynamic_path_for_none_hd_and_the_draft_model(paths, report):
    static, dynamic, draft = paths
    prompts = pick(load_prompts(), ["writing", "coding", "math", "extraction", "rag"], 1)
    cfg = GenerationConfig(max_tokens=N_TOKENS, draft_max=WINDOW)
    # the budget on the static target's own measured costs: a pass costs the same for 1
    # or K+1 tokens, so it should draft (the 0.5B costs a fraction of a static pass here)
    cost: CostModel = measure(static, draft, k_max=WINDOW + 1)
    flat = cost.verify[WINDOW] / cost.verify[0]
    assert flat < 1.3, f"a pass over {WINDOW + 1} tokens cost {flat:.2f}x one token"
    engines = {
        "none": Engine(static),
        "hd": Engine(static, HierarchyDrafter(), AdaptiveBudget(CostModel(cost.verify, 0.0))),
        "draft": Engine(static, ModelDrafter(draft), AdaptiveBudget(cost)),
    }
    lines, near_ties, drafted = [], 0, {m: 0 for m in engines}
    for p in prompts:
        tokens = encode_prompt(dynamic, p.text)
        assert len(tokens) + N_TOKENS < CTX
        ref = Engine(dynamic).generate(tokens, cfg, "none").tokens
        for method, engine in engines.items():
            out = engine.generate(tokens, cfg, method)
            drafted[method] += out.stats.drafted
            i = first_difference(ref, out.tokens)
            if i is not None:
                verdict = analyse(dynamic, tokens, ref, i, window=1)
                assert verdict.reproduced and verdict.gap < NEAR_TIE, (p.category, method,
                                                                        i, verdict)
                near_ties += 1
            else:
                assert out.tokens == ref
            lines.append(f"{p.category} {method}: {len(out.tokens)} tokens, "
                         f"{out.stats.mean_accepted:.2f} per pass, "
                         f"{'identical' if i is None else f'near-tie at {i}'}")
    assert drafted["draft"] > 0  # the budget drafted on the flat curve
    report("static vs dynamic greedy (1.5B int8, OpenVINO CPU, ctx 512, window 8)",
           "\n".join([*lines, f"near-ties: {near_ties} of {len(lines)}; cost curve "
                      f"{flat:.2f}x at {WINDOW + 1} tokens"]))
