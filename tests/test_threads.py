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
    monkeypatch.setattr(gguf, "available_cores", lambda: 6)  # as if on a 6-core machine
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
    monkeypatch.setattr(gguf, "available_cores", lambda: 6)
    monkeypatch.setattr(runtime, "available_cores", lambda: 6)
    for threads, want_target, want_draft in ((None, 2, 3), (4, 4, 4)):
        opts = LoadOptions(n_ctx=256, n_gpu_layers=99, n_threads=threads)
        loaded = runtime.load(str(target), str(draft), "duo", opts, budget="fixed:2",
                              history=False)
        try:
            assert loaded.target.n_threads == want_target
            assert loaded.draft.n_threads == want_draft
        finally:
            loaded.close()
