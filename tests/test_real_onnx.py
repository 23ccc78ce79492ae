"""The ONNX backend on a real model: Qwen2.5-Coder-0.5B exported from its GGUF.

`make test` exports it first (`specli export qwen2.5-coder-0.5b-instruct`, int8, no
torch); if the export is missing these tests fail, they never skip.  Greedy output
with an ONNX target must equal its plain greedy output exactly for every drafter,
GGUF draft models included: onnxruntime's weight-only int8 kernels are batch-invariant, which
the first test checks on this very model.
"""

from __future__ import annotations

import numpy as np
import pytest

from specli.backends.base import LoadOptions
from specli.backends.onnx import ONNXModel
from specli.budget import FixedBudget
from specli.drafters.cross import same_tokenizer
from specli.drafters.hierarchy import HierarchyDrafter
from specli.drafters.lookup import LookupDrafter
from specli.drafters.model import ModelDrafter
from specli.engine import Engine, GenerationConfig
from specli.fidelity import analyse, first_difference
from specli.prompts import load_prompts, pick
from specli.runtime import encode_prompt
from specli.sampling import SamplingParams

pytestmark = pytest.mark.real

N_TOKENS = 48


def _export(name: str) -> ONNXModel:
    from specli.export import catalog

    entry = catalog.find(f"{name}-onnx-int8")
    if entry is None or not entry.present:
        pytest.fail(f"ONNX export of {name} missing; run `make test` (it exports it) or "
                    f"`specli export {name}`", pytrace=False)
    return ONNXModel(entry.path, LoadOptions(n_ctx=2048))


@pytest.fixture(scope="session")
def onnx_q05():
    m = _export("qwen2.5-coder-0.5b-instruct")
    yield m
    m.close()


@pytest.fixture(scope="module")
def onnx_q15():
    m = _export("qwen2.5-coder-1.5b-instruct")
    yield m
    m.close()


def _prompts(categories=("summarization", "coding", "rag")):
    return pick(load_prompts(), list(categories), 1)


def test_export_is_batch_invariant_and_rolls_back_exactly(onnx_q05):
    m = onnx_q05
    ids = encode_prompt(m, "Write a Python function that adds two numbers.")[:24]
    m.truncate(0)
    m.eval(ids[:16])
    batch = m.eval(ids[16:], range(len(ids) - 16))
    m.truncate(16)
    single = np.stack([m.eval([t], [0])[0] for t in ids[16:]])
    assert np.array_equal(batch, single)
    m.truncate(16)
    assert np.array_equal(m.eval(ids[16:], range(len(ids) - 16)), batch)
    m.truncate(0)


def test_tokenizer_template_and_stops_match_llama_cpp(onnx_q05, qwen_pair):
    o, g = onnx_q05, qwen_pair[1]  # the same 0.5B model as GGUF
    assert same_tokenizer(o, g)
    for p in _prompts(("coding", "translation", "math")):
        assert encode_prompt(o, p.text) == encode_prompt(g, p.text)
    specials = range(151640, 151670)
    assert [i for i in specials if o.is_eog(i)] == [i for i in specials if g.is_eog(i)]


def test_same_model_in_both_runtimes_writes_the_same_start(onnx_q05, qwen_pair, report):
    """8-bit weights hold the GGUF's dequantised Q4_K_M weights almost exactly; the two
    runtimes still round differently (llama.cpp quantises activations to 8 bits), so
    near-ties may flip: most of the greedy text must agree."""
    o, g = onnx_q05, qwen_pair[1]
    rows, agree = [], []
    for p in _prompts():
        prompt = encode_prompt(o, p.text)
        cfg = GenerationConfig(max_tokens=32)
        a = Engine(o).generate(prompt, cfg, "none").tokens
        b = Engine(g).generate(prompt, cfg, "none").tokens
        same = first_difference(a, b)
        agree.append(len(a) if same is None else same)
        rows.append(f"{p.category:14s} first {agree[-1]:2d} of 32 greedy tokens equal")
    report("ONNX int8 vs llama.cpp Q4_K_M, Qwen2.5-Coder-0.5B", rows)
    assert min(agree) >= 8 and sum(agree) >= 64


def test_greedy_identity_with_every_drafter(onnx_q05, qwen_pair, report):
    """ONNX target, and as drafters: lookup, hd (chains: no trees on ONNX) and the GGUF
    0.5B model (a mixed pair across runtimes)."""
    t = onnx_q05
    gguf_draft = qwen_pair[1]
    cfg = GenerationConfig(max_tokens=N_TOKENS, draft_max=4)
    rows, unexplained = [], []
    accepted = drafted = 0
    for p in _prompts():
        prompt = encode_prompt(t, p.text)
        plain = Engine(t).generate(prompt, cfg, "none")
        for name, drafter in (("lookup", LookupDrafter()),
                              ("hd", HierarchyDrafter(None, None, branches=1)),
                              ("gguf-0.5B", ModelDrafter(gguf_draft))):
            spec = Engine(t, drafter, FixedBudget(4)).generate(prompt, cfg, name)
            i = first_difference(plain.tokens, spec.tokens)
            if name == "gguf-0.5B":
                drafted += spec.stats.drafted
                accepted += spec.stats.accepted
            if i is None:
                assert plain.tokens == spec.tokens
                rows.append(f"{p.category:14s} {name:10s} identical, "
                            f"{spec.stats.mean_accepted:.2f} tokens per pass")
                continue
            d = analyse(t, prompt, plain.tokens, i)
            rows.append(f"{p.category:14s} {name:10s} diverges at {i}: gap {d.gap:.3f} "
                        f"noise {d.noise:.3f}")
            unexplained.append((p.category, name, d))
    report("greedy identity, ONNX Qwen 0.5B int8 target", rows)
    assert not unexplained, unexplained  # batch-invariant kernels: none is excusable
    assert drafted and accepted / drafted > 0.5


def test_seeded_sampling_replays_with_a_gguf_drafter(onnx_q05, qwen_pair):
    t, d = onnx_q05, qwen_pair[1]
    prompt = encode_prompt(t, _prompts(("writing",))[0].text)

    def run(seed):
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
        return Engine(t, ModelDrafter(d), FixedBudget(3)).generate(
            prompt, GenerationConfig(max_tokens=24, params=params), "draft")

    a, b, c = run(1), run(1), run(2)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert a.stats.accepted > 0


def test_gguf_draft_model_drafts_for_the_onnx_target(onnx_q15, qwen_pair, report):
    """The mixed pair the ONNX backend exists for: the 1.5B target in onnxruntime, the
    0.5B GGUF drafting in llama.cpp.  Output equals the ONNX target's plain greedy."""
    t, d = onnx_q15, qwen_pair[1]
    assert same_tokenizer(t, d)
    cfg = GenerationConfig(max_tokens=N_TOKENS, draft_max=4)
    rows = []
    drafted = accepted = 0
    for p in _prompts(("coding", "summarization")):
        prompt = encode_prompt(t, p.text)
        plain = Engine(t).generate(prompt, cfg, "none")
        spec = Engine(t, ModelDrafter(d), FixedBudget(4)).generate(prompt, cfg, "draft")
        assert spec.tokens == plain.tokens, (p.category, first_difference(plain.tokens,
                                                                          spec.tokens))
        drafted += spec.stats.drafted
        accepted += spec.stats.accepted
        rows.append(f"{p.category:14s} identical, {spec.stats.accepted}/{spec.stats.drafted} "
                    f"drafted tokens accepted")
    report("greedy identity, ONNX Qwen 1.5B int8 target + GGUF 0.5B draft", rows)
    assert accepted / drafted > 0.5
