"""Default CPU thread split (specli/threads.py) and the calibration's pause handshake."""

from __future__ import annotations

import threading
import time

from specli.calibrate import _Pause
from specli.threads import DRAFTER_MAX_THREADS, drafter_threads, target_threads


def test_target_threads_every_core_unless_the_gpu_runs_it_all():
    assert target_threads(16, fully_offloaded=False) == 16
    assert target_threads(16, fully_offloaded=True) == 2
    assert target_threads(1, fully_offloaded=True) == 1
    assert target_threads(0, fully_offloaded=False) == 1


def test_drafter_threads_take_what_a_gpu_target_leaves():
    assert drafter_threads(16, target_cpu_threads=16) is None  # on the CPU: take turns
    assert drafter_threads(16, target_cpu_threads=2) == DRAFTER_MAX_THREADS
    assert drafter_threads(8, target_cpu_threads=2) == 5
    assert drafter_threads(2, target_cpu_threads=2) is None
    assert drafter_threads(2, target_cpu_threads=1) == 1


def test_pause_holds_a_fast_worker_promptly_and_it_resumes():
    """A worker whose steps release the GIL and loop at once (as a drafter's llama_decode
    calls do) must stop between steps when asked, every time, without starving the
    asker: a Lock around each step did starve it (minutes of calibration on a GPU box)."""
    pause = _Pause()
    steps = []

    def work() -> None:
        while pause.checkpoint():
            time.sleep(0.001)
            steps.append(time.perf_counter())

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    t0 = time.perf_counter()
    for _ in range(40):
        pause.hold()
        n = len(steps)
        time.sleep(0.003)
        assert len(steps) == n, "the worker stepped while held"
        pause.release()
        time.sleep(0.002)
    elapsed = time.perf_counter() - t0
    pause.stop()
    worker.join(2)
    assert not worker.is_alive()
    assert elapsed < 2.0, f"40 holds took {elapsed:.2f}s"
    assert len(steps) > 40  # it ran between the holds


def test_gguf_backend_gives_a_gpu_resident_target_two_threads(tmp_path, monkeypatch):
    """The wiring, on this CPU build: llama.cpp ignores -ngl here, so the GPU is faked
    to ask only what thread count the backend would choose.  All layers plus the output
    head (-ngl > n_layer) count as GPU-resident; -ngl = n_layer leaves the head on the CPU."""
    import llama_cpp
    from tinymodel import write_tiny_model  # tests/ is on sys.path (conftest.py)

    from specli.backends import gguf
    from specli.backends.base import LoadOptions
    from specli.backends.gguf import GGUFModel

    path = write_tiny_model(tmp_path / "tiny.gguf", n_layer=2)
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    monkeypatch.setattr(gguf, "default_cores", lambda: 6)  # as if on a 6-core machine
    cases = {99: 2, 3: 2, 2: 6, 0: 6}
    for ngl, want in cases.items():
        m = GGUFModel(path, LoadOptions(n_ctx=64, n_gpu_layers=ngl))
        try:
            assert m.n_threads == want, (ngl, m.n_threads)
        finally:
            m.close()
    m = GGUFModel(path, LoadOptions(n_ctx=64, n_gpu_layers=99, n_threads=3))
    try:
        assert m.n_threads == 3  # what the user asks for wins
    finally:
        m.close()


def test_duo_drafter_gets_the_cores_a_gpu_target_leaves(tmp_path, monkeypatch):
    """runtime.load: with the target GPU-resident (faked, as above) on a 6-core machine,
    duo's drafter gets 6 - 2 - 1 = 3 threads; told --threads, both keep it."""
    import llama_cpp
    from tinymodel import write_tiny_model  # tests/ is on sys.path (conftest.py)

    from specli import runtime
    from specli.backends import gguf
    from specli.backends.base import LoadOptions

    target = write_tiny_model(tmp_path / "t.gguf", n_layer=2)
    draft = write_tiny_model(tmp_path / "d.gguf", base=target, noise=0.1)
    monkeypatch.setenv("SPECLI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    monkeypatch.setattr(gguf, "default_cores", lambda: 6)
    monkeypatch.setattr(runtime, "default_cores", lambda: 6)
    for threads, want_target, want_draft in ((None, 2, 3), (4, 4, 4)):
        opts = LoadOptions(n_ctx=256, n_gpu_layers=99, n_threads=threads)
        loaded = runtime.load(str(target), str(draft), "duo", opts, budget="fixed:2",
                              history=False, draft_gpu_layers=0)  # told: the CPU
        try:
            assert not loaded.duo_placement  # nothing measured when told where
            assert loaded.target.n_threads == want_target
            assert loaded.draft.n_threads == want_draft
        finally:
            loaded.close()


def test_duo_drafter_placed_by_measurement_when_the_target_is_on_a_gpu(tmp_path, monkeypatch):
    """runtime.load with a (faked) GPU target and no --draft-gpu-layers: the draft model is
    calibrated in both places, the one choose_placement prefers is kept (the other copy
    closed) and --stats says what was measured.  On this CPU build both places run on the
    CPU, so which wins is a coin toss: the wiring is what is tested."""
    import llama_cpp
    from tinymodel import write_tiny_model

    from specli import runtime
    from specli.backends.base import LoadOptions
    from specli.calibrate import cache_key, calibration_path
    from specli.engine import GenerationConfig

    target = write_tiny_model(tmp_path / "t.gguf", n_layer=2)
    draft = write_tiny_model(tmp_path / "d.gguf", base=target, noise=0.1)
    monkeypatch.setenv("SPECLI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    chosen: list = []
    real = runtime.choose_placement

    def spy(costs, k_max=8):
        chosen.append((dict(costs), real(costs, k_max)))
        return chosen[-1][1]

    monkeypatch.setattr(runtime, "choose_placement", spy)
    # a busy neighbour (CI's own processes) would keep the calibrations unsaved
    monkeypatch.setattr("specli.calibrate.disturbed", lambda before, after: None)
    opts = LoadOptions(n_ctx=256, n_gpu_layers=99)
    loaded = runtime.load(str(target), str(draft), "duo", opts, history=False)
    try:
        assert len(chosen) == 1
        costs, (best, speedups) = chosen[0]
        assert set(costs) == set(speedups) == {"CPU", "GPU"}
        assert all(c.draft > 0 and c.verify for c in costs.values())
        want_layers = 0 if best == "CPU" else runtime.ALL_LAYERS
        assert loaded.duo_opts.n_gpu_layers == want_layers
        assert loaded.engine.drafter.model is loaded.draft
        assert loaded.draft.placement in loaded.duo_placement
        assert "placed by measurement: CPU" in loaded.duo_placement
        assert "duo drafter" in loaded.placements()
        # both calibrations are cached: the next load measures nothing
        key = cache_key(loaded.target, loaded.draft, loaded.opts, loaded.duo_opts, True)
        assert calibration_path(key).exists()
        res = loaded.engine.generate([1, 5, 6, 7], GenerationConfig(max_tokens=12), "duo")
        assert res.stats.n_generated == 12
    finally:
        loaded.close()
    told = runtime.load(str(target), str(draft), "duo", opts, history=False, draft_gpu_layers=0)
    try:
        assert len(chosen) == 1 and not told.duo_placement  # -ngld given: nothing measured
    finally:
        told.close()
    # loaded for another method (the bench loads "draft"), duo's copy is placed when first
    # asked for, and the draft method's own model stays where it was
    other = runtime.load(str(target), str(draft), "draft", opts, budget="fixed:2",
                         history=False)
    try:
        assert not other.duo_placement
        engine = other.make_engine("duo", "fixed:2")
        assert len(chosen) == 2 and "placed by measurement" in other.duo_placement
        assert engine.drafter.model is not other.draft
    finally:
        other.close()


def test_a_drafter_of_another_thread_count_drafts_on_its_own_thread(tmp_path, monkeypatch):
    """Target and draft model with different CPU thread counts: the draft model runs on a
    thread of its own (libgomp would otherwise end and recreate its workers every round),
    only during a generation, and the output stays the target's own greedy output."""
    from tinymodel import write_tiny_model

    from specli import runtime
    from specli.backends.base import LoadOptions
    from specli.engine import GenerationConfig
    from specli.threads import drafter_needs_own_thread

    assert drafter_needs_own_thread(2, 8) and drafter_needs_own_thread(8, 2)
    assert not drafter_needs_own_thread(2, 2) and not drafter_needs_own_thread(1, 8)
    assert not drafter_needs_own_thread(None, 4)

    target = write_tiny_model(tmp_path / "t.gguf", n_layer=2)
    draft = write_tiny_model(tmp_path / "d.gguf", base=target, noise=0.05)
    monkeypatch.setenv("SPECLI_HOME", str(tmp_path / "home"))
    opts = LoadOptions(n_ctx=256, n_threads=2, flash_attn="off", kv_type="f32")
    prompt = [1, 5, 6, 7, 8]
    plain = runtime.load(str(target), None, "none", opts, history=False)
    try:
        want = plain.engine.generate(prompt, GenerationConfig(max_tokens=40), "none")
    finally:
        plain.close()
    loaded = runtime.load(str(target), str(draft), "draft", opts, budget="fixed:3",
                          history=False, draft_threads=3)
    try:
        drafter = loaded.engine.drafter
        assert drafter.own_thread
        seen: set[int] = set()
        real_eval = loaded.draft.eval

        def eval_(tokens, logits_for=()):
            seen.add(threading.get_ident())
            return real_eval(tokens, logits_for)

        monkeypatch.setattr(loaded.draft, "eval", eval_)
        res = loaded.engine.generate(prompt, GenerationConfig(max_tokens=40), "draft")
        assert res.tokens == want.tokens
        assert res.stats.drafted > 0
        assert seen and threading.get_ident() not in seen
        assert not [t for t in threading.enumerate() if t.name == "specli-drafter"]
    finally:
        loaded.close()


def test_duo_ends_its_idle_thread_only_where_the_pools_outnumber_the_cores(tmp_path,
                                                                           monkeypatch):
    """duo's thread ends within a generation once idle only where its OpenMP pool and the
    target's together outnumber the cores (the 2-core case it was measured on); with the
    target on a GPU and the drafter on cores it leaves free, the thread stays, as it did
    when the H200 was measured."""
    import llama_cpp
    from tinymodel import write_tiny_model

    from specli import runtime
    from specli.backends import gguf
    from specli.backends.base import LoadOptions
    from specli.threads import pools_outnumber_cores

    assert pools_outnumber_cores(2, 2, cores=2) and pools_outnumber_cores(None, None, cores=4)
    assert pools_outnumber_cores(2, None, cores=16)  # None: every core
    assert not pools_outnumber_cores(2, 8, cores=16) and not pools_outnumber_cores(1, 1, cores=2)

    target = write_tiny_model(tmp_path / "t.gguf", n_layer=2)
    draft = write_tiny_model(tmp_path / "d.gguf", base=target, noise=0.1)
    monkeypatch.setenv("SPECLI_HOME", str(tmp_path / "home"))
    cases = [  # (GPU offload faked, cores, target threads, draft GPU layers): ends?
        (False, None, 2, 0, pools_outnumber_cores(2, 2)),  # this machine, as told
        (True, 16, None, 99, False),  # GPU drafter, 2 threads each (as the target) on 16
        (True, 6, 6, 0, True),  # every core for both
    ]
    for gpu, cores, threads, dgl, ends in cases:
        monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda gpu=gpu: gpu)
        if cores is not None:
            for mod in (gguf, runtime):
                monkeypatch.setattr(mod, "default_cores", lambda cores=cores: cores)
            monkeypatch.setattr("specli.threads.available_cores", lambda cores=cores: cores)
        opts = LoadOptions(n_ctx=256, n_gpu_layers=99 if gpu else 0, n_threads=threads)
        loaded = runtime.load(str(target), str(draft), "duo", opts, budget="fixed:2",
                              history=False, draft_gpu_layers=dgl)
        try:
            d = loaded.engine.drafter
            assert d.end_idle_thread is ends and not d.own_thread, (gpu, cores, threads)
            if cores == 16:
                assert loaded.target.n_threads == loaded.duo_model().n_threads == 2
        finally:
            loaded.close()
