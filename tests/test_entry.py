"""The command's first step (specli.entry): an interrupt while the CLI is still importing
ends quietly, and `kill` exits 143 (128 + SIGTERM) where Ctrl-C exits 130."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_default

SPECLI = str(Path(sys.executable).parent / "specli")


def _loaded_llama(pid: int) -> bool:
    """llama.cpp's library is mapped: the package's first import is done and the CLI's
    own imports (about 0.3 s here) are under way."""
    try:
        return "libllama" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_during_the_imports_ends_quietly(sig, code, env, tiny_paths):
    """Before specli.entry, Ctrl-C here printed a traceback of the import.  (On a machine
    fast enough to finish importing first, the signal lands while specli waits for the
    prompt on stdin: the same exit code is expected there too.)"""
    proc = subprocess.Popen([SPECLI, "generate", str(tiny_paths["target"])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 30
        while not _loaded_llama(proc.pid):
            assert time.monotonic() < deadline and proc.poll() is None, "never started"
            time.sleep(0.002)
        time.sleep(0.03)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"Traceback" not in err, err.decode()
    # before specli.entry sets its handler, `kill` ends the process by the signal itself,
    # which a shell reports as the same 143
    assert proc.returncode in ((code, -sig) if sig == signal.SIGTERM else (code,)), err.decode()


def test_kill_while_waiting_for_the_prompt_exits_143(env, tiny_paths):
    proc = subprocess.Popen([SPECLI, "generate", str(tiny_paths["target"])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, preexec_fn=sigint_default)
    time.sleep(3)  # imports done: specli reads the prompt from the open pipe
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err.decode()
    assert b"Traceback" not in err
