"""The ONNX backend on tiny decoders the tests export themselves (no torch, no download).

The tiny GGUF models of tinymodel.py go through `specli export`'s own exporter, so the
same weights run in llama.cpp and in onnxruntime: logits, tokens, templates and stop
tokens can be compared one to one, and a GGUF drafter can draft for the ONNX target.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from specli.backends import open_model
from specli.backends.base import LoadOptions
from specli.backends.onnx import ONNXModel
from specli.budget import FixedBudget
from specli.drafters.cross import same_tokenizer
from specli.drafters.lookup import LookupDrafter
from specli.drafters.model import ModelDrafter
from specli.engine import Engine, GenerationConfig
from specli.errors import SpecliError
from specli.export.gguf_onnx import export_gguf
from specli.export.tokenizer import write_tokenizer_files
from specli.runtime import encode_prompt
from specli.sampling import SamplingParams, probs_from_logits

SPECLI = str(Path(sys.executable).parent / "specli")
OPTS = LoadOptions(n_ctx=512, n_threads=1)
PROMPT = "the model of the world is a draft of the target and the model of the world"


def _export(gguf: Path, out: Path, quant: str) -> Path:
    out.mkdir(parents=True)
    export_gguf(gguf, out, quant=quant)
    write_tokenizer_files(gguf, out)
    return out


@pytest.fixture(scope="session")
def onnx_dirs(tiny_paths, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    return {q: _export(tiny_paths["target"], d / q, q) for q in ("none", "int4")}


@pytest.fixture(scope="session")
def onnx_target(onnx_dirs):
    m = ONNXModel(onnx_dirs["none"], OPTS)
    yield m
    m.close()


def test_same_model_in_both_runtimes(onnx_target, tiny_models):
    o, g = onnx_target, tiny_models["target"]
    assert o.placement.startswith("onnxruntime CPUExecutionProvider")
    ids = g.tokenize(PROMPT, add_bos=True)
    assert o.tokenize(PROMPT, add_bos=True) == ids
    assert o.tokenize("<|im_start|>hi", add_bos=False, special=True) != o.tokenize(
        "<|im_start|>hi", add_bos=False, special=False)
    assert [o.token_bytes(i) for i in range(g.n_vocab)] == [g.token_bytes(i)
                                                            for i in range(g.n_vocab)]
    assert [i for i in range(o.n_vocab) if o.is_eog(i)] == [
        i for i in range(g.n_vocab) if g.is_eog(i)]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert o.chat_prompt(msgs) == g.chat_prompt(msgs)
    assert same_tokenizer(o, g) and o.add_bos == g.add_bos
    o.truncate(0)
    g.truncate(0)
    a = o.eval(ids, range(len(ids)))
    b = g.eval(ids, range(len(ids)))
    g.truncate(0)
    assert a.shape == b.shape
    assert np.abs(a - b).max() < 1e-3  # same weights, two runtimes: float noise only


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_rollback_and_batches_are_exact(onnx_dirs, quant):
    """onnxruntime's CPU kernels: a token's logits are bit-identical alone or in a batch,
    and after rolling the KV cache back."""
    m = ONNXModel(onnx_dirs[quant], OPTS)
    ids = m.tokenize(PROMPT, add_bos=True)
    full = m.eval(ids, range(len(ids)))
    m.truncate(0)
    one_by_one = np.stack([m.eval([t], [0])[0] for t in ids])
    assert np.array_equal(full, one_by_one)
    for keep in (len(ids) - 1, 5, 1, 0):
        m.truncate(keep)
        assert m.tokens == ids[:keep]
        again = m.eval(ids[keep:], range(len(ids) - keep))
        assert np.array_equal(again, full[keep:])
    # only the asked-for rows, in order; none at all is an empty array
    m.truncate(3)
    rows = m.eval(ids[3:9], [5, 0, 2])
    assert np.array_equal(rows, full[[3, 5, 8]])
    assert m.eval(ids[9:12]).shape == (0, m.n_vocab)
    # a prompt longer than one call is fed in chunks: the same rows come back
    m.truncate(0)
    m.n_batch = 4
    assert np.array_equal(m.eval(ids, [len(ids) - 1, 2, 5]), full[[2, 5, len(ids) - 1]])
    m.close()


def test_context_limit_and_no_trees(onnx_target):
    m = onnx_target
    m.truncate(0)
    with pytest.raises(SpecliError, match="context full"):
        m.eval([5] * (m.n_ctx + 1))
    assert m.tokens == [] and m.max_branches == 1
    with pytest.raises(SpecliError, match="chains only"):
        m.eval_tree(1, [2, 3], [-1, -1])


def _greedy(target, drafter=None, budget=None, n=48):
    prompt = encode_prompt(target, PROMPT)
    cfg = GenerationConfig(max_tokens=n, draft_max=4)
    return Engine(target, drafter, budget).generate(prompt, cfg, "x")


def test_greedy_identity_with_an_onnx_target(onnx_target, tiny_models):
    """Lookup and a GGUF draft model drafting for the ONNX target: exactly the target's
    plain greedy output (onnxruntime is batch-invariant, so no near-ties to excuse)."""
    plain = _greedy(onnx_target)
    assert len(plain.tokens) > 10
    gguf_draft = tiny_models["draft"]
    for drafter in (LookupDrafter(), ModelDrafter(gguf_draft)):
        spec = _greedy(onnx_target, drafter, FixedBudget(4))
        assert spec.tokens == plain.tokens, type(drafter).__name__
        assert spec.stats.drafted > 0
    spec = _greedy(onnx_target, ModelDrafter(gguf_draft), FixedBudget(4))
    assert spec.stats.accepted > 0  # the noisy copy agrees: drafts were really used


def test_sampled_output_follows_the_onnx_target_exactly(onnx_target, tiny_models):
    """Chi-square on the joint law of the first two tokens: a GGUF draft proposes one,
    the ONNX target verifies, residual resampling corrects."""
    from scipy import stats

    t, d = onnx_target, tiny_models["draft"]
    prompt = encode_prompt(t, PROMPT)
    base = SamplingParams(temperature=1.0, top_k=3)
    t.truncate(0)
    p1 = probs_from_logits(t.eval(prompt, [len(prompt) - 1]), base)[0]
    expected: dict[tuple[int, int], float] = {}
    for a in np.flatnonzero(p1):
        t.truncate(len(prompt))
        p2 = probs_from_logits(t.eval([int(a)], [0]), base)[0]
        for b in np.flatnonzero(p2):
            expected[(int(a), int(b))] = float(p1[a] * p2[b])
    t.truncate(0)
    n = 1200
    counts = dict.fromkeys(expected, 0)
    drafter = ModelDrafter(d)
    for seed in range(n):
        params = SamplingParams(temperature=1.0, top_k=3, seed=seed)
        res = Engine(t, drafter, FixedBudget(1)).generate(
            prompt, GenerationConfig(max_tokens=2, params=params), "draft")
        counts[tuple(res.tokens)] += 1  # an unexpected pair raises KeyError: a real bug
    keys = sorted(expected)
    obs = np.array([counts[k] for k in keys])
    exp = np.array([expected[k] for k in keys]) * n
    assert stats.chisquare(obs, exp).pvalue > 1e-3, list(zip(keys, obs, exp.round(1), strict=True))


def test_open_model_picks_the_runtime_by_path(onnx_dirs, tiny_paths):
    m = open_model(onnx_dirs["none"], OPTS)
    assert m.name == "onnxruntime"
    m.close()
    m = open_model(onnx_dirs["none"] / "model.onnx", OPTS)  # the file itself works too
    assert m.name == "onnxruntime"
    m.close()
    g = open_model(tiny_paths["target"], OPTS)
    assert g.name == "llama.cpp"
    g.close()


def test_unusable_provider_falls_back_only_for_auto(onnx_dirs, monkeypatch):
    import onnxruntime as ort

    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", *real])
    m = ONNXModel(onnx_dirs["none"], OPTS)  # auto: CUDA wanted, CPU used, and said so
    assert m.provider == "CPUExecutionProvider"
    assert "CUDAExecutionProvider" in m.placement
    m.close()
    with pytest.raises(SpecliError, match="--device gpu"):
        ONNXModel(onnx_dirs["none"], LoadOptions(n_ctx=512, n_threads=1, device="gpu"))


def test_npu_is_refused_with_the_reason(onnx_dirs, monkeypatch):
    import onnxruntime as ort

    from specli.backends import onnx as onnx_backend

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnx_backend, "openvino_devices", lambda _: ["CPU", "GPU", "NPU"])
    with pytest.raises(SpecliError, match="static shapes"):
        ONNXModel(onnx_dirs["none"], LoadOptions(n_ctx=512, n_threads=1, device="npu"))


def test_broken_export_folders_are_one_line_errors(onnx_dirs, tmp_path):
    with pytest.raises(SpecliError, match="no .onnx model"):
        ONNXModel(tmp_path, OPTS)
    bad = tmp_path / "notok"
    bad.mkdir()
    (bad / "model.onnx").write_bytes((onnx_dirs["none"] / "model.onnx").read_bytes())
    with pytest.raises(SpecliError, match="tokenizer.json"):
        ONNXModel(bad, OPTS)
    import shutil

    listed = shutil.copytree(onnx_dirs["none"], tmp_path / "listed")
    (listed / "config.json").write_text("[1, 2]")  # JSON, but not an object (was exit 70)
    with pytest.raises(SpecliError, match="config.json: expected a JSON object, got list"):
        ONNXModel(listed, OPTS)


@pytest.mark.parametrize("name", ["../../escaped", "../x", "a/b", "..", ".", "", ".hidden",
                                  "a\\b", "x" * 101])
def test_export_names_are_plain_names(name, tiny_paths, tmp_path, monkeypatch):
    """--name names a folder under $SPECLI_HOME/exports: it must not lead out of it."""
    from specli.export import catalog
    from specli.export.exporter import export_model

    monkeypatch.setenv("SPECLI_HOME", str(tmp_path / "a" / "home"))
    with pytest.raises(SpecliError, match="invalid export name") as e:
        export_model(str(tiny_paths["target"]), quant="none", name=name, force=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "a" / "escaped").exists() and not (tmp_path / "a" / "x").exists()
    assert catalog.load() == {}


@pytest.mark.parametrize("raw", [[1, 2], {"a": 5}, {"a": {"name": "a"}}, "text", None,
                                 {"a": {"name": "a", "path": 3, "source": "s", "quant": "none",
                                        "exporter": "e", "batch_invariant": True}}])
def test_a_bad_exports_list_is_one_line_naming_the_file(raw, tmp_path, monkeypatch):
    """exports.json edited by hand or by another program: `specli models` and every
    model name resolution fail in one line that says what to do, not with a crash."""
    from specli.export import catalog
    from specli.pull import render_models, resolve_model
    from specli.registry import load_registry

    monkeypatch.setenv("SPECLI_HOME", str(tmp_path))
    (tmp_path / "exports.json").write_text(json.dumps(raw), encoding="utf-8")
    for call in (catalog.load, lambda: resolve_model("nosuch", registry=load_registry()),
                 lambda: render_models(load_registry(), Console(quiet=True))):
        with pytest.raises(SpecliError, match="not a valid exports list") as e:
            call()
        assert str(tmp_path / "exports.json") in str(e.value) and "delete it" in str(e.value)


def test_an_exports_list_from_a_later_specli_still_reads(tmp_path, monkeypatch):
    from specli.export import catalog

    monkeypatch.setenv("SPECLI_HOME", str(tmp_path))
    entry = {"name": "a", "path": "p", "source": "s", "quant": "none", "exporter": "e",
             "batch_invariant": True, "created": "", "added_later": 1}
    (tmp_path / "exports.json").write_text(json.dumps({"a": entry}), encoding="utf-8")
    assert catalog.load()["a"].path == "p"


def _cli(args, env, timeout=120):
    return subprocess.run([SPECLI, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_cli_export_register_generate_mixed_pair(tiny_paths, env, tmp_path):
    """specli export a GGUF, find it in `specli models`, generate with it by name while
    a GGUF model drafts, and see where each ran in --json."""
    p = _cli(["export", str(tiny_paths["target"]), "--quant", "none", "--name", "tiny-onnx"],
             env)
    assert p.returncode == 0, p.stderr
    out = Path(p.stdout.strip())
    assert (out / "model.onnx").exists() and (out / "specli.json").exists()
    assert "exported tiny-onnx" in p.stderr
    p = _cli(["models"], env)
    assert p.returncode == 0 and "tiny-onnx" in p.stdout
    p = _cli(["export", str(tiny_paths["target"]), "--name", "tiny-onnx"], env)
    assert p.returncode != 0 and "--force" in p.stderr and "Traceback" not in p.stderr
    # the name taken elsewhere: refused, not silently moved (the old export orphaned)
    p = _cli(["export", str(tiny_paths["target"]), "--quant", "none", "--name", "tiny-onnx",
              "-o", str(tmp_path / "elsewhere")], env)
    assert p.returncode != 0 and "already stands for" in p.stderr, p.stderr
    assert not (tmp_path / "elsewhere").exists()
    args = ["generate", "tiny-onnx", "--draft", str(tiny_paths["draft"]), "--method", "draft",
            "-p", "hello world", "-n", "16", "--json", "--budget", "fixed:3"]
    p = _cli(args, env)
    assert p.returncode == 0, p.stderr
    obj = json.loads(p.stdout)
    assert obj["devices"]["target"].startswith("onnxruntime CPUExecutionProvider")
    assert obj["devices"]["draft"].startswith("llama.cpp CPU")
    assert obj["n_generated"] > 0 and obj["stats"]["drafted"] > 0
    p = _cli(["generate", str(out), "-p", "hello", "-n", "4", "--device", "npu"], env)
    assert p.returncode != 0 and "npu" in p.stderr and "Traceback" not in p.stderr


def test_index_build_for_an_onnx_export(tiny_paths, onnx_target, env, tmp_path):
    """An ONNX model drafts from a corpus only if the index holds its tokenizer's ids:
    `index build --model` takes an export by path or by name, as generate does."""
    from specli.ngram import NgramStore, tokenizer_fingerprint

    p = _cli(["export", str(tiny_paths["target"]), "--quant", "none", "--name", "ix"], env)
    assert p.returncode == 0, p.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text(PROMPT + "\n", encoding="utf-8")
    for model, name in ((p.stdout.strip(), "by-path"), ("ix", "by-name")):
        p = _cli(["index", "build", str(notes), "--model", model, "-o", name], env)
        assert p.returncode == 0 and "continuations of" in p.stderr, p.stderr
        store = NgramStore(Path(p.stdout.strip()), tokenizer_fingerprint(onnx_target),
                           readonly=True)  # opens: the export's tokenizer
        store.close()


def test_cli_devices_reports_both_runtimes(env):
    p = _cli(["devices", "--json"], env)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert "CPUExecutionProvider" in info["onnxruntime"]["providers"]
    assert info["onnxruntime"]["device"]["auto"] == "CPUExecutionProvider"
    assert isinstance(info["llama.cpp"]["gpu_offload"], bool)
