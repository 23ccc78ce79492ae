"""Ctrl-C on the real pair: long enough generations to interrupt mid-answer."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_default

pytestmark = pytest.mark.real

SPECLI = str(Path(sys.executable).parent / "specli")
LONG = "Write a detailed, long essay about the history of computing, from the abacus to GPUs."


def _wait_for_output(proc: subprocess.Popen, timeout: float = 120) -> bytes:
    """Block until the process has streamed some text (the model is generating)."""
    end = time.time() + timeout
    while time.time() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            return os.read(proc.stdout.fileno(), 4096)
        assert proc.poll() is None, proc.stderr.read().decode()
    raise AssertionError("no output before the timeout")


@pytest.fixture
def spawn():
    """Start specli as a user would; whatever a failed test leaves running is killed."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str], stdin) -> subprocess.Popen:
        procs.append(subprocess.Popen([SPECLI, *args], stdin=stdin, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, preexec_fn=sigint_default))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_kill_stops_generate_cleanly(qwen_pair, spawn, sig, code):
    """`kill` gets Ctrl-C's clean stop, with the shell's exit code for it (128 + 15)."""
    target, draft = qwen_pair
    proc = spawn(["generate", target.path, "-d", draft.path, "-p", LONG, "-n", "600", "--stats"],
                 subprocess.DEVNULL)
    first = _wait_for_output(proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert b"Traceback" not in err
    assert b"stop: interrupted" in err  # the stats of what was generated are kept
    assert (first + out).strip()


def test_ctrl_c_in_chat_keeps_the_session(qwen_pair, spawn):
    target, draft = qwen_pair
    proc = spawn(["chat", target.path, "-d", draft.path, "-n", "600"], subprocess.PIPE)
    proc.stdin.write((LONG + "\n").encode())
    proc.stdin.flush()
    _wait_for_output(proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    out, err = proc.communicate(b"/stats\nSay OK.\n/exit\n", timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert b"(stopped)" in err and b"stop: interrupted" in err
