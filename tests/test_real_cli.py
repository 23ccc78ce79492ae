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


def test_ctrl_c_stops_generate_cleanly(qwen_pair):
    target, draft = qwen_pair
    proc = subprocess.Popen(
        [SPECLI, "generate", target.path, "-d", draft.path, "-p", LONG, "-n", "600", "--stats"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    first = _wait_for_output(proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert b"Traceback" not in err
    assert b"stop: interrupted" in err  # the stats of what was generated are kept
    assert (first + out).strip()


def test_ctrl_c_in_chat_keeps_the_session(qwen_pair):
    target, draft = qwen_pair
    proc = subprocess.Popen(
        [SPECLI, "chat", target.path, "-d", draft.path, "-n", "600"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdin.write((LONG + "\n").encode())
    proc.stdin.flush()
    _wait_for_output(proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    out, err = proc.communicate(b"/stats\nSay OK.\n/exit\n", timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert b"(stopped)" in err and b"stop: interrupted" in err
