"""Static-shape decoding (backends/openvino_static.py) on OpenVINO's CPU plugin: no NPU needed.

The graphs an Intel NPU would run (KV buffer of C slots, verify window of K+1 tokens,
prefill chunks of P) run here on OpenVINO's CPU plugin, which the test extra installs:
these tests never skip.  Tolerances: the static path computes float32 activations (int8
exports: int8 weights, float32 activations), as onnxruntime does for the same export
with MatMulNBits at accuracy level 0, but sums in another order (masked slots, other
kernels): measured 2.4e-5 on logits up to 49, so 1e-4 is the bound.  specli's int8
exports ask onnxruntime for int8 activations (level 4, faster on CPUs), so the dynamic
reference for int8 runs the same weights at level 0 (`fp32_activations`).  A token's
logits at any row of the window, or after any rollback, differ from its one-at-a-time
logits by float noise of the same size (never by a masked slot's value).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import told

from specli.backends import open_model
from specli.backends.base import LoadOptions
from specli.backends.onnx import ONNXModel
from specli.backends.openvino_static import StaticModel, StaticSpec, pick_device, write_static
from specli.budget import CostModel, FixedBudget, best_length
from specli.drafters.cross import CrossDrafter
from specli.drafters.hierarchy import HierarchyDrafter
from specli.drafters.lookup import LookupDrafter
from specli.drafters.model import ModelDrafter
from specli.engine import Engine, GenerationConfig
from specli.errors import SpecliError
from specli.export.gguf_onnx import export_gguf
from specli.export.tokenizer import write_tokenizer_files
from specli.fidelity import analyse, first_difference

SPECLI = str(Path(sys.executable).parent / "specli")
TOL = 1e-4  # static vs dynamic logits, and row/rollback noise (see the module docstring)
SPEC = StaticSpec(window=4, prefill=16)
TEXT = "the model of the world is a draft of the target and the model of the world " * 3


@pytest.fixture(scope="module")
def exports(tiny_paths, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("static")
    out = {}
    for q in ("none", "int8"):
        (d / q).mkdir()
        export_gguf(tiny_paths["target"], d / q, quant=q)
        write_tokenizer_files(tiny_paths["target"], d / q)
        out[q] = d / q
    return out


def fp32_activations(folder: Path, dest: Path) -> Path:
    """The export in `folder` with its MatMulNBits nodes at accuracy level 0 (float32
    activations, as the static path computes), in `dest`: the weights are hard-linked
    (onnxruntime refuses external data behind a symlink), copied only across file
    systems.  The same int8 weights then meet the same float32 activations in both paths."""
    import onnx

    dest.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name != "model.onnx" and not (dest / f.name).exists():
            try:
                os.link(f.resolve(), dest / f.name)
            except OSError:
                shutil.copy2(f.resolve(), dest / f.name)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
                changed += 1
    assert changed, "no MatMulNBits accuracy_level to change"
    onnx.save(model, str(dest / "model.onnx"))
    return dest


def _static(folder: Path, ctx: int = 128, spec: StaticSpec = SPEC) -> StaticModel:
    return StaticModel(folder, LoadOptions(n_ctx=ctx, n_threads=1, device="cpu"), spec=spec)


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_static_logits_equal_dynamic(exports, quant, tmp_path):
    """Every position of a prompt longer than 3 prefill chunks, fed in one eval (prefill
    chunks of P, then windows of K+1) and again in uneven pieces."""
    ref_folder = exports[quant] if quant == "none" else fp32_activations(exports[quant],
                                                                         tmp_path / "fp32")
    dyn = ONNXModel(ref_folder, LoadOptions(n_ctx=128, n_threads=1))
    st = _static(exports[quant])
    assert st.placement.startswith("OpenVINO CPU plugin, static shapes (ctx 128, window 4+1")
    ids = dyn.tokenize(TEXT, add_bos=True)[:60]
    assert len(ids) > 3 * SPEC.prefill
    ref = dyn.eval(ids, range(len(ids)))
    got = st.eval(ids, range(len(ids)))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < TOL
    st.truncate(0)
    st.eval(ids[:37])  # two prefill chunks, then windows; no logits
    pieces = [st.eval(ids[a:b], range(b - a)) for a, b in ((37, 38), (38, 43), (43, 60))]
    assert np.abs(np.concatenate(pieces) - ref[37:]).max() < TOL
    dyn.close()
    st.close()


def test_rollback_is_exact_and_rows_are_noise_only(exports):
    st = _static(exports["int8"])
    ids = st.tokenize(TEXT, add_bos=True)[:50]
    st.eval(ids[:30])
    first = st.eval(ids[30:35], range(5))
    st.truncate(30)
    st.eval([7, 8, 9, 10, 11, 12, 13], range(7))  # other tokens in slots 30.., then dropped
    st.truncate(30)
    assert np.array_equal(st.eval(ids[30:35], range(5)), first)  # bit-exact rollback
    assert st.tokens == ids[:35]
    single = []
    st.truncate(30)
    for t in ids[30:35]:
        single.append(st.eval([t], [0])[0])
    assert np.abs(np.stack(single) - first).max() < TOL
    st.close()


def test_capacity_fills_with_a_clean_stop(exports, tiny_models):
    st = _static(exports["none"], ctx=48)
    prompt = st.tokenize(TEXT, add_bos=True)[:30]
    for drafter, budget in ((None, None), (LookupDrafter(), FixedBudget(4)),
                            (ModelDrafter(tiny_models["draft"]), FixedBudget(4))):
        res = Engine(st, drafter, budget).generate(prompt, GenerationConfig(max_tokens=100), "x")
        assert res.stop_reason == "context"
        # the buffer filled (a round's last token needs no slot), never overrun
        assert 48 <= len(prompt) + len(res.tokens) <= 49 and 47 <= len(st.tokens) <= 48
    with pytest.raises(SpecliError, match="raise --ctx"):
        Engine(st).check_prompt(list(range(48)))
    st.truncate(0)
    with pytest.raises(SpecliError, match="capacity 48"):
        st.eval(list(range(49)))
    st.close()


def test_every_method_equals_plain_decoding(exports, tiny_models, tiny_paths):
    """static none == dynamic none; lookup, hd, a draft model and a drafter with another
    tokenizer on the static target == static none (near-ties within the measured noise
    only, as fidelity.analyse rules)."""
    st = _static(exports["none"], ctx=256)
    dyn = ONNXModel(exports["none"], LoadOptions(n_ctx=256, n_threads=1))
    prompt = st.tokenize("the draft of the world", add_bos=True)
    cfg = GenerationConfig(max_tokens=40, draft_max=SPEC.window)
    plain = Engine(st).generate(prompt, cfg, "none").tokens
    assert plain == Engine(dyn).generate(prompt, cfg, "none").tokens
    drafters = {"lookup": LookupDrafter(), "hd": HierarchyDrafter(None, None, branches=1),
                "draft": ModelDrafter(tiny_models["draft"]),
                "cross": CrossDrafter(st, tiny_models["other"])}
    for name, drafter in drafters.items():
        res = Engine(st, drafter, FixedBudget(SPEC.window)).generate(prompt, cfg, name)
        i = first_difference(plain, res.tokens)
        if i is not None:
            d = analyse(st, prompt, plain, i, window=SPEC.window)
            assert d.explained, (name, d)
        if name == "draft":
            assert res.stats.drafted > 0 and res.stats.accepted > 0
    dyn.close()
    st.close()


def test_a_pass_up_to_k_plus_1_is_one_call_and_the_budget_drafts_k(exports):
    """A pass over 1..K+1 tokens is one and the same compiled call (so its cost is flat:
    measured in benchmarks/static_vs_dynamic.py); K+2 needs two.  On such a flat curve the
    budget drafts the whole window, never more (fit_draft_max caps --draft-max at K)."""
    st = _static(exports["int8"])
    st.eval(st.tokenize(TEXT, add_bos=True)[:20])
    for n, calls in ((1, 1), (SPEC.window + 1, 1), (SPEC.window + 2, 2)):
        st.truncate(20)
        before = st.calls
        st.eval(list(range(5, 5 + n)), range(n))
        assert st.calls - before == calls, n
    flat = CostModel([0.1] * (SPEC.window + 1), 0.0)
    assert best_length(flat, [0.9] * SPEC.window, SPEC.window) == SPEC.window
    st.close()


def test_open_model_routes_static_exports_and_bad_devices(exports, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    for f in exports["none"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    write_static(folder, StaticSpec(window=3, prefill=8))
    m = open_model(folder, LoadOptions(n_ctx=64, n_threads=1, device="cpu"))
    assert isinstance(m, StaticModel) and m.window == 3 and m.n_ctx == 64
    m.close()
    assert isinstance(open_model(exports["none"], LoadOptions(n_ctx=64, n_threads=1)),
                      ONNXModel)
    with pytest.raises(SpecliError, match="no NPU.*--device cpu"):
        pick_device("npu", ["CPU", "GPU"])
    assert pick_device("auto", ["CPU", "NPU"]) == "NPU" and pick_device("auto", ["CPU"]) == "CPU"
    with pytest.raises(SpecliError, match="--prefill"):
        StaticSpec(window=8, prefill=4).check()


def _cli(args, env):
    return subprocess.run([SPECLI, *args], capture_output=True, text=True, env=env,
                          timeout=180, stdin=subprocess.DEVNULL)


def test_cli_static_export_window_and_npu_errors(tiny_paths, env):
    p = _cli(["export", str(tiny_paths["target"]), "--quant", "none", "--static", "--window",
              "2", "--prefill", "8", "--name", "tiny-static"], env)
    assert p.returncode == 0, p.stderr
    assert json.loads(Path(p.stdout.strip(), "static.json").read_text()) == {
        "window": 2, "prefill": 8}
    base = ["generate", "tiny-static", "-p", "hello world", "-n", "8", "--ctx", "64",
            "--json", "--device", "cpu"]
    p = _cli([*base, "-m", "lookup"], env)  # default -k 8 shrinks to the window
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["devices"]["target"].startswith("OpenVINO CPU plugin")
    for extra, needles in ((["-k", "4"], ["--draft-max 4", "window 2", "-k 2", "--window 4"]),
                           (["--device", "npu"], ["no NPU", "--device cpu"]),
                           (["-p", "hello " * 80], ["context holds 64", "--ctx"])):
        p = _cli([*base, *extra], env)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert len(told(p.stderr)) == 1, p.stderr
        assert all(n in p.stderr for n in needles), p.stderr
    p = _cli(["devices", "--json"], env)
    info = json.loads(p.stdout)["openvino"]
    assert "CPU" in info["devices"] and info["npu"] == ("NPU" in info["devices"])
    assert info["static"]["cpu"] == "OpenVINO CPU plugin, static shapes"
