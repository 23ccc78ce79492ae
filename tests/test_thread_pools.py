"""Drafting at its standalone speed, and no thread of ours busy while nothing is generated.

llama.cpp's pip builds run on OpenMP (libgomp), which keeps a thread pool for every thread
that ever ran a model.  When the pools together hold more threads than there are cores,
libgomp sleeps on a futex at every barrier instead of spinning, and a one-token step of
a small model ran 5-7x slower on this machine (0.22-0.28 ms -> 1.2-1.5 ms) for as long as
duo's idle drafting thread was alive; with OMP_WAIT_POLICY=ACTIVE that idle thread's pool
instead spun a core forever.  Both are measured here in fresh processes (specli.threads).
Both tests failed before duo's thread began to end with each generation: step ratio 6.8x
after a duo generation, idle CPU 101% of a core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodel import write_tiny_model

from specli.threads import available_cores

SCRIPT = r"""
import ctypes, json, os, resource, statistics, sys, time
sys.path.insert(0, {tests!r})
import specli  # llama_cpp before numpy
from specli.backends.base import LoadOptions
from specli.calibrate import load_or_measure
from specli.engine import GenerationConfig
from specli.runtime import load
from tinymodel import silence_llama_log

silence_llama_log()
target_threads, draft_threads = {target_threads}, {draft_threads}
loaded = load({target!r}, {draft!r}, "duo", LoadOptions(n_ctx=1024, n_threads=target_threads),
              budget="fixed:4", draft_threads=draft_threads)
draft = loaded.draft
prompt = list(range(5, 40))

def release():
    "Hand this (the main) thread's OpenMP pool back: the measurement's own, not specli's."
    try:
        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD).omp_pause_resource_all(1)
    except (OSError, AttributeError):
        pass

def step_ms():
    # one-token step of the draft model on this (the main) thread: the best of 15
    # medians, each with a pool made anew (where the OS puts its worker moves a median by
    # up to 30% here) and spread over about a second (one burst of load cannot make it)
    best = []
    for _ in range(15):
        time.sleep(0.03)
        draft.truncate(0)
        draft.eval(prompt[:20])
        times = []
        for i in range(100):
            t0 = time.perf_counter()
            draft.eval([10 + i % 50], [0])
            times.append(time.perf_counter() - t0)
        best.append(statistics.median(times[10:]))
        release()
    draft.truncate(0)
    return 1000 * min(best)

def threads():
    "Threads of this process now (OpenMP workers included)."
    return len(os.listdir("/proc/self/task"))

def idle_cpu():
    "CPU time of the whole process over one idle second, in cores."
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(1.0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)

out = {{"fresh": step_ms(), "idle_before": idle_cpu(), "threads_fresh": threads()}}
res = loaded.engine.generate(prompt, GenerationConfig(max_tokens=160), "duo")
out["rounds_beside"] = loaded.engine.drafter.speculated
out["idle_after_duo"] = idle_cpu()
out["after_duo"] = step_ms()
out["threads_after_duo"] = threads()
load_or_measure(loaded.target, draft, loaded.opts, force=True, draft_opts=loaded.duo_opts,
                overlap=True)
out["after_calibration"] = step_ms()
out["threads_after_calibration"] = threads()
out["idle_after_calibration"] = idle_cpu()
loaded.close()
out["idle_after_close"] = idle_cpu()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """Big enough that a step is ~0.2 ms of real work, small enough to load in ms."""
    d = tmp_path_factory.mktemp("pools")
    shape = dict(n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512)
    target = write_tiny_model(d / "target.gguf", seed=3, **shape)
    draft = write_tiny_model(d / "draft.gguf", seed=3, base=target, noise=0.05)
    return target, draft


def _run(pair, tmp_path, target_threads: int, draft_threads: int, **env_extra) -> dict:
    target, draft = pair
    code = SCRIPT.format(tests=str(Path(__file__).parent), target=str(target),
                         draft=str(draft), target_threads=target_threads,
                         draft_threads=draft_threads)
    env = {**os.environ, "SPECLI_HOME": str(tmp_path / "home"), **env_extra}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _slowdown(r: dict) -> float:
    return max(r["after_duo"], r["after_calibration"]) / r["fresh"]


def test_a_drafter_step_keeps_its_fresh_speed_after_duo_and_calibration(pair, tmp_path, report):
    """Every core for both models (as on a CPU-only machine): the drafter's pool beside
    the main thread's would be more threads than cores while the drafting thread lived.

    Two checks.  Exact: after a duo generation and after a calibration the process holds
    no more threads than it did fresh (the old code kept duo's thread's pool: 4 against
    3 here).  Timed: the step within 25% of fresh.  A median moves by up to 30% with where
    the OS places a new pool's worker, and two readings a minute apart drift as much (a
    clean-clone CI run, 2026-11-28: fresh 0.165 and 0.169 ms, after a calibration 0.221
    and 0.252, where the next three runs read 0.174-0.183 after 0.182-0.209), so a miss is
    measured again in a new process, up to three runs, and all must miss to fail; the old
    code measured 3.4x and 6.8x, far outside."""
    cores = available_cores()
    runs = [_run(pair, tmp_path, cores, cores)]
    while _slowdown(runs[-1]) > 1.25 and len(runs) < 3:
        runs.append(_run(pair, tmp_path, cores, cores))
    report("drafter step in the same process (ms, best of 15 medians)", [
        f"fresh {r['fresh']:.3f}, after a duo generation {r['after_duo']:.3f}, "
        f"after a calibration {r['after_calibration']:.3f} ({cores} threads each); "
        f"threads {r['threads_fresh']} fresh, {r['threads_after_duo']} after duo, "
        f"{r['threads_after_calibration']} after calibration" for r in runs])
    for r in runs:
        assert r["rounds_beside"] > 10  # the generation did draft beside verification
        assert r["threads_after_duo"] <= r["threads_fresh"], r
        assert r["threads_after_calibration"] <= r["threads_fresh"], r
    best = min(runs, key=_slowdown)
    assert best["after_duo"] <= 1.25 * best["fresh"], runs
    assert best["after_calibration"] <= 1.25 * best["fresh"], runs


@pytest.mark.parametrize("policy", ["default", "ACTIVE"])
def test_no_thread_burns_cpu_while_duo_sits_idle_or_after_it(pair, tmp_path, report, policy):
    """A target on one thread and the drafter on the other cores (the split duo uses when
    the target leaves cores free): with actively waiting OpenMP an idle drafting thread
    that outlived its generation kept a core spinning."""
    cores = available_cores()
    extra = {} if policy == "default" else {"OMP_WAIT_POLICY": policy}
    r = _run(pair, tmp_path, 1, max(1, cores - 1) if cores > 2 else cores, **extra)
    idle = {k: v for k, v in r.items() if k.startswith("idle")}
    report(f"process CPU over one idle second (cores), OpenMP wait policy {policy}",
           [", ".join(f"{k} {v:.3f}" for k, v in idle.items())])
    for key, cpu in idle.items():
        assert cpu < 0.05, (key, r)


def test_cold_draft_step_script_times_the_step_after_each_interruption(pair):
    """scripts/cold_draft_step.py (how a CPU's caches, not specli, can make an in-pipeline
    draft step slower than calibrated) runs on real GGUF files and reports every case
    against the back-to-back step."""
    target, draft = pair
    script = Path(__file__).parent.parent / "scripts" / "cold_draft_step.py"
    proc = subprocess.run([sys.executable, str(script), str(target), str(draft),
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("draft step after")]
    assert len(rows) == 7, proc.stdout
    assert rows[0].endswith("1.00x") and "back to back" in rows[0]
    ms = [float(r.split()[-3]) for r in rows]
    assert all(m > 0 for m in ms), proc.stdout
