"""Default thread counts leave out the cores other processes keep busy (specli.cpu_load,
specli.threads.free_cores): with one neighbour spinning on a 2-core machine, llama.cpp on
2 threads ran at 10 tok/s and on 1 thread at 19."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specli import cpu_load
from specli.cpu_load import Census, CpuTimes, busy_elsewhere, read_cpu_times
from specli.threads import free_cores

SPECLI = str(Path(sys.executable).parent / "specli")
TCK = os.sysconf("SC_CLK_TCK")


def _idlest_two() -> list[int]:
    """The two cores other processes used least over a moment (on a shared CI machine
    the test must start from idle cores to see what a neighbour changes)."""
    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= 2, "this test needs two cores"
    before = {c: read_cpu_times({c}) for c in cores}
    time.sleep(0.3)
    used = {c: read_cpu_times({c}).busy_s - before[c].busy_s for c in cores}
    return sorted(cores, key=used.__getitem__)[:2]


def _stat(path: Path, ticks: dict[int, list[int]]) -> None:
    """A /proc/stat with the given per-CPU fields (user nice system idle iowait irq
    softirq steal) and an aggregate line that must not be counted."""
    total = [sum(col) for col in zip(*ticks.values(), strict=True)]
    lines = ["cpu  " + " ".join(map(str, total + [0, 0]))]
    lines += [f"cpu{n} " + " ".join(map(str, f + [0, 0])) for n, f in ticks.items()]
    lines.append("intr 1 2 3")
    path.write_text("\n".join(lines) + "\n")


def test_busy_time_counts_the_given_cores_and_stolen_time_not_idle(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, {0: [10, 1, 5, 900, 7, 2, 3, 4], 1: [20, 0, 0, 50, 0, 0, 0, 0],
                 2: [1000, 0, 0, 0, 0, 0, 0, 0]})
    t = read_cpu_times({0, 1}, str(stat))
    assert t is not None
    assert t.busy_s == pytest.approx((10 + 1 + 5 + 2 + 3 + 4 + 20) / TCK)


def test_no_stat_file_means_nothing_measured(tmp_path):
    assert read_cpu_times({0}, str(tmp_path / "missing")) is None
    c = Census(str(tmp_path / "missing"))
    c.start()
    assert c.read() is None


def test_busy_elsewhere_is_everyone_less_this_process():
    a = CpuTimes(busy_s=10.0, own_s=1.0, at=100.0)
    b = CpuTimes(busy_s=11.5, own_s=1.5, at=101.0)
    assert busy_elsewhere(a, b) == pytest.approx(1.0)
    assert busy_elsewhere(a, CpuTimes(10.1, 1.5, 101.0)) == 0.0  # never negative
    assert busy_elsewhere(a, a) == 0.0


def test_census_waits_out_its_window_once_and_keeps_the_result(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, {0: [0] * 8, 1: [0] * 8})
    c = Census(str(stat))
    c.start()
    ticks = round(cpu_load.MIN_WINDOW_S * TCK)  # one core kept busy over the window
    _stat(stat, {0: [ticks] + [0] * 7, 1: [0] * 8})
    t0 = time.monotonic()
    first = c.read()
    assert time.monotonic() - t0 >= cpu_load.MIN_WINDOW_S * 0.9
    assert first is not None and 0.8 < first < 1.05
    _stat(stat, {0: [10 * ticks] + [0] * 7, 1: [0] * 8})
    t0 = time.monotonic()
    assert c.read() == first  # measured once per process
    assert time.monotonic() - t0 < 0.05


def test_this_process_own_work_is_not_counted():
    """Spinning in this process must not read as another process's load."""
    a = read_cpu_times()
    time.sleep(0.4)
    idle = busy_elsewhere(a, read_cpu_times())
    a = read_cpu_times()
    end = time.monotonic() + 0.4
    while time.monotonic() < end:
        pass
    spinning = busy_elsewhere(a, read_cpu_times())
    assert spinning < idle + 0.35, (idle, spinning)


def test_free_cores_counts_a_core_taken_from_half_of_it():
    assert free_cores(2, 0.0) == 2
    assert free_cores(2, 0.3) == 2  # a quarter-busy neighbour: 2 threads still won
    assert free_cores(2, 0.5) == 1
    assert free_cores(2, 1.0) == 1
    assert free_cores(2, 1.9) == 1  # never below one
    assert free_cores(16, 0.49) == 16
    assert free_cores(16, 1.5) == 14
    assert free_cores(16, 2.4) == 14


def test_generate_leaves_out_a_core_a_neighbour_keeps_busy(tiny_paths, env):
    """The whole path: specli and a spinning process pinned to the same two cores; the
    default is one thread, and --stats/--json say why.  (Before: 2 threads.)"""
    cores = _idlest_two()
    pair = set(cores)
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cores[0]}))
    try:
        time.sleep(0.3)
        out = subprocess.run(
            [SPECLI, "generate", str(tiny_paths["target"]), "-m", "none", "-p", "hi", "-n", "4",
             "--json"], capture_output=True, text=True, env=env, timeout=120,
            preexec_fn=lambda: os.sched_setaffinity(0, pair))
        forced = subprocess.run(
            [SPECLI, "generate", str(tiny_paths["target"]), "-m", "none", "-p", "hi", "-n", "4",
             "--json", "--threads", "2"], capture_output=True, text=True, env=env, timeout=120,
            preexec_fn=lambda: os.sched_setaffinity(0, pair))
        devices = subprocess.run([SPECLI, "devices", "--json"], capture_output=True, text=True,
                                 env=env, timeout=120,
                                 preexec_fn=lambda: os.sched_setaffinity(0, pair))
    finally:
        spin.kill()
        spin.wait()
    assert devices.returncode == 0, devices.stderr
    report = json.loads(devices.stdout)
    assert report["cpu_cores"] == 2 and report["default_threads"] == 1, report
    assert report["cpu_busy_elsewhere"] > 0.5
    assert out.returncode == 0, out.stderr
    where = json.loads(out.stdout)["devices"]["target"]
    assert where.startswith("llama.cpp CPU, 1 thread ("), where
    assert "other processes kept" in where and "of 2 cores busy" in where
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["devices"]["target"] == "llama.cpp CPU, 2 threads"


def test_watch_reads_others_since_its_last_reading(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, {0: [0] * 8})
    w = cpu_load.Watch(str(stat))
    assert w.look() is None  # too soon: too few ticks to read
    time.sleep(cpu_load.MIN_WINDOW_S)
    _stat(stat, {0: [round(0.5 * cpu_load.MIN_WINDOW_S * TCK)] + [0] * 7})
    first = w.look()
    assert first is not None and 0.3 < first < 0.55
    time.sleep(cpu_load.MIN_WINDOW_S)
    assert w.look() == pytest.approx(0.0, abs=0.05)  # nothing more since that reading


def test_a_loaded_model_follows_the_free_cores_unless_threads_were_given(tiny_paths):
    import llama_cpp

    from specli.backends.base import LoadOptions
    from specli.backends.gguf import GGUFModel

    m = GGUFModel(tiny_paths["target"], LoadOptions(n_ctx=64))
    given = GGUFModel(tiny_paths["target"], LoadOptions(n_ctx=64, n_threads=2))
    try:
        m.fit_free_cores(1, "busy elsewhere")
        assert m.n_threads == 1 and llama_cpp.llama_n_threads(m._ctx) == 1
        assert m.placement == "llama.cpp CPU, 1 thread (busy elsewhere)"
        m.fit_free_cores(3)
        assert m.n_threads == 3 and llama_cpp.llama_n_threads(m._ctx) == 3
        assert m.placement == "llama.cpp CPU, 3 threads"
        given.fit_free_cores(1, "busy elsewhere")
        assert given.n_threads == 2 and llama_cpp.llama_n_threads(given._ctx) == 2
    finally:
        m.close()
        given.close()


def test_chat_gives_back_a_core_while_a_neighbour_spins(tiny_paths, env):
    """A chat lives on between answers: its threads follow the load others put on the
    cores meanwhile, down when a neighbour starts spinning, up again when it stops."""
    cores = _idlest_two()
    pair = set(cores)
    proc = subprocess.Popen(
        [SPECLI, "chat", str(tiny_paths["target"]), "-m", "none", "-n", "4"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, preexec_fn=lambda: os.sched_setaffinity(0, pair))
    spin = None
    try:
        def turn(text: str) -> None:  # each answer's threads follow the time since the last
            proc.stdin.write(text + "\n/stats\n")
            proc.stdin.flush()
            time.sleep(0.5)  # the answer takes a few ms

        turn("Hello there.")
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                preexec_fn=lambda: os.sched_setaffinity(0, {cores[0]}))
        time.sleep(3.0)
        turn("And again.")  # a neighbour spun through most of the time since the last answer
        spin.kill()
        spin.wait()
        time.sleep(4.0)
        turn("Once more.")  # and through little of it since this one
        _, err = proc.communicate("/exit\n", timeout=60)
    finally:
        if spin is not None and spin.poll() is None:
            spin.kill()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    places = [ln for ln in err.splitlines() if ln.startswith("target on ")]
    assert len(places) == 3, err
    assert places[0] == "target on llama.cpp CPU, 2 threads", places
    assert places[1].startswith("target on llama.cpp CPU, 1 thread (other processes kept"), places
    assert "busy lately" in places[1]
    assert places[2] == "target on llama.cpp CPU, 2 threads", places


def test_a_cgroup_cpu_limit_caps_the_cores(tmp_path):
    from specli.threads import cpu_quota

    v2 = tmp_path / "v2"
    v2.mkdir()
    assert cpu_quota(str(v2)) is None  # no limit files: no limit
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(str(v2)) is None
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert cpu_quota(str(v2)) == 3  # 2.5 cores' worth: rounded up
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert cpu_quota(str(v2)) == 1
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(str(v1.parent)) is None
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    assert cpu_quota(str(v1.parent)) == 2


def test_a_limited_container_on_a_busy_host_keeps_its_cores(monkeypatch):
    """--cpus=2 on a 64-core host: 2 threads while the host has idle cores, fewer only
    when others leave fewer than that."""
    from specli import threads

    monkeypatch.setattr(threads, "allowed_cores", lambda: 64)
    monkeypatch.setattr(threads, "cpu_quota", lambda: 2)
    assert threads.available_cores() == 2
    assert threads.usable_cores(0.0) == 2
    assert threads.usable_cores(30.0) == 2  # 34 cores idle on the host
    assert threads.usable_cores(62.7) == 1
    assert threads.cores_note(30.0) == ""
    assert threads.cores_note(62.7).startswith("other processes kept 62.7 of 64 cores busy")
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)
    assert threads.available_cores() == 64 and threads.usable_cores(30.0) == 34


def test_a_calibration_timed_beside_a_busy_neighbour_is_used_not_saved(tiny_models, tmp_path,
                                                                        monkeypatch):
    """Saved, such costs would steer every later run until a plain step disagreed by
    1.5x (a 2-thread step beside a spinning process: 1.25x here, under that)."""
    from specli import calibrate
    from specli.backends.base import LoadOptions

    monkeypatch.setenv("SPECLI_HOME", str(tmp_path))
    t, d = tiny_models["target"], tiny_models["draft"]
    opts = LoadOptions(n_ctx=512, n_threads=1)
    path = calibrate.calibration_path(calibrate.cache_key(t, d, opts))
    notes: list[str] = []
    monkeypatch.setattr(calibrate, "disturbed", lambda before, after: 1.2)
    cost, measured = calibrate.load_or_measure(t, d, opts, note=notes.append)
    assert measured and cost.verify[0] > 0
    assert not path.exists()
    assert notes == ["note: other processes kept 1.2 cores busy while calibrating, so these "
                     "costs are used but not saved (measured again next time)"]
    monkeypatch.setattr(calibrate, "disturbed", lambda before, after: None)
    _, measured = calibrate.load_or_measure(t, d, opts, note=notes.append)
    assert measured and path.exists() and len(notes) == 1


def test_disturbed_counts_a_neighbour_from_half_a_core():
    from specli.calibrate import disturbed

    a = CpuTimes(busy_s=0.0, own_s=0.0, at=0.0)
    assert disturbed(a, CpuTimes(0.45, 0.0, 1.0)) is None
    assert disturbed(a, CpuTimes(1.5, 1.0, 1.0)) == pytest.approx(0.5)
    assert disturbed(a, CpuTimes(0.1, 0.0, 0.1)) is None  # too short to read
    assert disturbed(None, a) is None and disturbed(a, None) is None


def test_disturbed_sees_a_real_spinning_neighbour():
    from specli.calibrate import disturbed

    cores = _idlest_two()
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cores[0]}))
    try:
        time.sleep(0.2)
        before = read_cpu_times()
        time.sleep(0.5)
        busy = disturbed(before, read_cpu_times())
    finally:
        spin.kill()
        spin.wait()
        os.sched_setaffinity(0, mine)
    assert busy is not None and busy > 0.7, busy


class _Looks:
    """A Watch that reads back given loads (cores' worth others used), one per look."""

    def __init__(self, *busy: float) -> None:
        self.busy = list(busy)

    def look(self) -> float | None:
        return self.busy.pop(0) if self.busy else None


def _answer_with_fits(loaded, n: int) -> tuple[list[str], list[tuple[str, int]]]:
    """stream_text's events in order: "text" per piece written, "fit NAME" per refit."""
    from specli.engine import GenerationConfig, Result
    from specli.sampling import SamplingParams
    from specli.session import stream_text

    events: list[str] = []
    fits: list[tuple[str, int]] = []
    models = {"target": loaded.target, "draft": loaded.draft}
    for name, m in models.items():
        if m is not None:
            fit = m.fit_free_cores

            def recorded(cores, why="", _fit=fit, _name=name):
                events.append(f"fit {_name}")
                fits.append((_name, cores))
                _fit(cores, why)

            m.fit_free_cores = recorded
    tokens = loaded.target.tokenize("Once upon a time", add_bos=True)
    stream_text(loaded, tokens, GenerationConfig(n, SamplingParams(), 4), Result("x"),
                lambda piece: events.append("text"))
    return events, fits


def test_a_long_answer_follows_the_load_between_its_chunks(tiny_paths, monkeypatch, tmp_path):
    """A generation outlasts the load it started with: between chunks, at most once every
    REFIT_EVERY_S, the target's threads follow the cores others left free."""
    from specli import runtime
    from specli.backends.base import LoadOptions
    from specli.threads import usable_cores

    monkeypatch.setenv("SPECLI_HOME", str(tmp_path))
    loaded = runtime.load(str(tiny_paths["target"]), None, "none", LoadOptions(n_ctx=256),
                          history=False)
    try:
        loaded._watch = _Looks(0.0, 1.9)
        monkeypatch.setattr(runtime, "REFIT_EVERY_S", 1e9)  # not yet due: no look at all
        events, _ = _answer_with_fits(loaded, 6)
        assert events == ["text"] * len(events) and loaded._watch.busy == [0.0, 1.9]

        monkeypatch.setattr(runtime, "REFIT_EVERY_S", 0.0)  # due after every chunk
        events, fits = _answer_with_fits(loaded, 6)
    finally:
        loaded.close()
    assert fits == [("target", usable_cores(0.0)), ("target", usable_cores(1.9))]
    assert events[:4] == ["text", "fit target", "text", "fit target"], events
    assert loaded.target.n_threads == usable_cores(1.9)
    assert "busy lately" in loaded.target.placement


def test_mid_answer_refits_leave_a_duo_drafter_model_alone(tiny_paths, monkeypatch, tmp_path):
    """duo's draft model runs on its own thread while the target verifies: between chunks
    only the target's threads change (llama_set_n_threads on a model another thread is
    inside would race); between answers both do."""
    from specli import runtime
    from specli.backends.base import LoadOptions

    monkeypatch.setenv("SPECLI_HOME", str(tmp_path))
    monkeypatch.setattr(runtime, "REFIT_EVERY_S", 0.0)
    loaded = runtime.load(str(tiny_paths["target"]), str(tiny_paths["draft"]), "duo",
                          LoadOptions(n_ctx=256), budget="fixed:2", history=False)
    try:
        loaded._watch = _Looks(1.0, 1.0, 1.0)
        events, fits = _answer_with_fits(loaded, 6)
        assert {name for name, _ in fits} == {"target"}, fits
        assert "text" in events
        loaded._watch = _Looks(1.0)
        loaded.fit_threads()  # between answers: every model
    finally:
        loaded.close()
    assert {name for name, _ in fits[-2:]} == {"target", "draft"}, fits


@pytest.mark.real
def test_generate_gives_back_a_core_when_a_neighbour_starts_mid_answer(qwen_pair, env):
    """The whole path on the real target: the answer starts on 2 idle cores, a process
    starts spinning on one of them, and the rest of the answer runs on 1 thread.
    (Before: the thread count chosen at the start held to the end, 2 against 1 spinner.)"""
    import select

    target, _ = qwen_pair
    cores = _idlest_two()
    pair = set(cores)
    proc = subprocess.Popen(
        [SPECLI, "generate", target.path, "-m", "none", "-n", "160", "--stats",
         "-p", "Write a long essay about the history of computing."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, pair))
    spin = None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.poll() is None, "no answer started"
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                preexec_fn=lambda: os.sched_setaffinity(0, {cores[0]}))
        _, err = proc.communicate(timeout=300)
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
        if proc.poll() is None:
            proc.kill()
    text = err.decode()
    assert proc.returncode == 0, text
    place = next(ln for ln in text.splitlines() if ln.startswith("target on "))
    assert place.startswith("target on llama.cpp CPU, 1 thread (other processes kept"), text
    assert "busy lately" in place
