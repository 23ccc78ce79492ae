"""CPU weights around a faulting AMX unit (backends/amx.py, backends/gguf_tensors.py).

On a 2-core Xeon VM with AMX (2026-11-28) llama.cpp's AMX kernels died with SIGSEGV on
the first batch of two or more tokens: every prompt, in specli and in llama-cpp-python.
`test_a_batch_runs_in_a_fresh_process` is the regression test: on that machine, before
the fix, its child died of the fault.  The rest hold on any machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CROSS_DRAFTS, REAL_DRAFT, REAL_TARGET

from specli.backends import amx
from specli.backends.gguf_tensors import Tensor, TensorTable, read_tensor_table

Q4_0, Q4_K, Q6_K, Q8_0, F32 = 2, 12, 14, 8, 0


def _real_path(name: str) -> Path:
    from specli.pull import ensure
    from specli.registry import load_registry

    try:
        return ensure(load_registry().get(name))
    except Exception as e:  # fail loudly: a real-model test that cannot run is a failure
        pytest.fail(f"real model {name} unavailable ({e}); run `make test`", pytrace=False)


@pytest.mark.parametrize("name", [REAL_TARGET, REAL_DRAFT, *CROSS_DRAFTS])
def test_the_tensor_table_is_the_gguf_packages(name: str) -> None:
    gguf = pytest.importorskip("gguf")  # a test extra: installed by `make test`
    path = _real_path(name)
    ours = read_tensor_table(path)
    theirs = gguf.GGUFReader(path)
    assert [(t.name, t.dims, t.type) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in theirs.tensors
    ]
    arch = str(theirs.fields["general.architecture"].contents())
    assert ours.n_layer == int(theirs.fields[f"{arch}.block_count"].contents())


def test_a_file_that_is_not_gguf_or_is_cut_short_is_a_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        read_tensor_table(bad)
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="cut short"):
        read_tensor_table(bad)


def _table(n_layer: int = 3) -> TensorTable:
    tensors = [Tensor("token_embd.weight", (64, 1000), Q4_K),
               Tensor("output.weight", (64, 1000), Q4_K)]
    for i in range(n_layer):
        tensors += [
            Tensor(f"blk.{i}.attn_norm.weight", (64,), F32),
            Tensor(f"blk.{i}.attn_q.weight", (64, 64), Q4_K),
            Tensor(f"blk.{i}.attn_k.weight", (64, 12), Q4_K),  # 12 rows: not repacked
            Tensor(f"blk.{i}.attn_v.weight", (64, 64), Q6_K if i % 2 else Q4_0),
            Tensor(f"blk.{i}.ffn_down.weight", (128, 64), Q8_0),  # no x86 repacking
            Tensor(f"blk.{i}.ssm_x.weight", (64, 64), Q4_K),  # not a known matmul weight
        ]
    return TensorTable(tuple(tensors), n_layer)


def _named(patterns: list[str], table: TensorTable) -> set[str]:
    return {t.name for t in table.tensors if any(re.search(p, t.name) for p in patterns)}


def test_the_weights_repacked_without_amx_are_the_cpu_matmul_weights_ggml_repacks() -> None:
    table = _table()
    assert _named(amx.repack_patterns(table, 0), table) == {
        "output.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight", "blk.2.attn_q.weight",
        "blk.0.attn_v.weight", "blk.2.attn_v.weight",
    }
    # the last 2 blocks and the output layer on a GPU: only block 0's weights stay here
    on_cpu = {"blk.0.attn_q.weight", "blk.0.attn_v.weight"}
    assert _named(amx.repack_patterns(table, 3), table) == on_cpu
    assert _named(amx.repack_patterns(table, 99), table) == set()


def test_on_cpu_follows_llama_cpps_offload_of_the_last_layers() -> None:
    assert amx.on_cpu("output.weight", 28, 0) and amx.on_cpu("blk.27.ffn_up.weight", 28, 0)
    assert not amx.on_cpu("output.weight", 28, 1)  # one layer offloaded: the output layer
    assert amx.on_cpu("blk.27.ffn_up.weight", 28, 1)
    # 3 layers offloaded: the output layer and blocks 26 and 27
    assert amx.on_cpu("blk.25.ffn_up.weight", 28, 3)
    assert not amx.on_cpu("blk.26.ffn_up.weight", 28, 3)
    assert not amx.on_cpu("blk.0.ffn_up.weight", None, 3)  # unknown block count: hands off


def test_uses_amx_needs_a_type_with_amx_kernels_and_whole_tiles() -> None:
    assert amx.uses_amx(Tensor("w", (64, 64), Q6_K))
    assert not amx.uses_amx(Tensor("w", (64, 48), Q6_K))
    assert not amx.uses_amx(Tensor("w", (64, 64), F32))


@pytest.mark.parametrize(("child", "expected"), [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", False),
    ("import os, signal; os.kill(os.getpid(), signal.SIGILL)", False),
    ("raise SystemExit(0)", True),
    ("raise SystemExit(3)", None),  # a model that would not load: says nothing about AMX
    ("import time; time.sleep(30)", None),  # too slow: says nothing either
])
def test_the_probe_tells_a_fault_from_other_failures(monkeypatch, child: str, expected) -> None:
    monkeypatch.setattr(amx, "_CHILD", child)
    assert amx.probe("unused.gguf", timeout_s=3) is expected


def test_the_answer_is_asked_once_per_machine_and_unknowns_again(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SPECLI_AMX", raising=False)
    answers, calls = [None, False, True], []
    monkeypatch.setattr(amx, "probe", lambda path: calls.append(path) or answers[len(calls) - 1])
    cache = tmp_path / "amx.json"
    assert amx.amx_works("m.gguf", cache) is False  # unknown: the safe way, not kept
    assert not cache.exists()
    assert amx.amx_works("m.gguf", cache) is False  # a fault: kept
    assert amx.amx_works("other.gguf", cache) is False and len(calls) == 2
    assert json.loads(cache.read_text()) == {amx.machine_key(): False}
    monkeypatch.setenv("SPECLI_AMX", "on")
    assert amx.amx_works("m.gguf", cache) is True and len(calls) == 2
    monkeypatch.setenv("SPECLI_AMX", "off")
    cache.unlink()
    assert amx.amx_works("m.gguf", cache) is False and len(calls) == 2 and not cache.exists()


def test_a_plan_keeps_weights_off_amx_and_computes_what_steps_do(monkeypatch, capfd) -> None:
    """The plan's parameters on the real 1.5B: llama.cpp fills CPU_REPACK and no AMX
    buffer, and a 6-token batch gives the logits six plain steps give (a weight repacked
    in the wrong layout would give noise)."""
    from specli.backends import gguf
    from specli.backends.base import LoadOptions

    path = _real_path(REAL_TARGET)  # Q4_K in 7 kinds of weight (the 0.5B's rows mostly
    bufts = amx.cpu_extra_buffers()  # are not whole Q4_K blocks: Q5_0 and Q8_0 instead)
    if "CPU_REPACK" not in bufts:
        pytest.fail(f"this llama.cpp build has no CPU_REPACK buffer ({sorted(bufts)})")
    plan = amx.plan_for(read_tensor_table(path), 0, bufts["CPU_REPACK"], "a test's plan")
    assert len(plan.patterns) >= 5
    monkeypatch.setattr(gguf, "plan_weights", lambda *a: plan)
    monkeypatch.setattr(gguf, "_VERBOSE", True)  # llama.cpp's log to stderr
    model = gguf.GGUFModel(path, LoadOptions(n_ctx=256, n_threads=2))
    monkeypatch.setattr(gguf, "_VERBOSE", False)
    log = capfd.readouterr().err
    try:
        assert re.search(r"CPU_REPACK model buffer size = +[1-9]", log)
        assert "AMX model buffer" not in log
        assert "a test's plan" in model.placement
        tokens = model.tokenize("def add(a, b):\n    return", add_bos=False)
        batch = model.eval(tokens, logits_for=range(len(tokens)))
        model.reset()
        steps = np.stack([model.eval([t], logits_for=[0])[0] for t in tokens])
    finally:
        model.close()
    assert batch.shape == steps.shape
    assert (batch.argmax(-1) == steps.argmax(-1)).all()
    assert np.abs(batch - steps).max() < 0.05 * np.abs(steps).max()


def test_a_batch_runs_in_a_fresh_process(tmp_path: Path) -> None:
    """A fresh process and cache load the real target on the CPU and evaluate a 6-token
    batch.  On an AMX machine whose tile unit faults, this died with SIGSEGV before the
    fix; on a CPU without AMX it is a plain load."""
    path = _real_path(REAL_TARGET)
    code = (
        "import sys\n"
        "from specli.backends import amx\n"
        "from specli.backends.base import LoadOptions\n"
        "from specli.backends.gguf import GGUFModel\n"
        "m = GGUFModel(sys.argv[1], LoadOptions(n_ctx=256, n_threads=2))\n"
        "m.eval(m.tokenize('def add(a, b):', add_bos=False), logits_for=[0])\n"
        "print(m.placement)\n"
        "print(sorted(amx.cpu_extra_buffers()))\n"
    )
    env = {**os.environ, "SPECLI_HOME": str(tmp_path)}
    env.pop("SPECLI_AMX", None)
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, f"child ended {run.returncode}: {run.stderr[-2000:]}"
    placement, bufts = run.stdout.splitlines()[-2:]
    cached = tmp_path / "amx.json"
    if "AMX" in bufts:  # the machine was asked, and the answer is what the model ran with
        works = json.loads(cached.read_text())
        assert len(works) == 1
        assert ("AMX faulted in a check" in placement) is (list(works.values()) == [False])
    else:
        assert not cached.exists() and "AMX" not in placement
