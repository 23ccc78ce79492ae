"""The `specli` command's first step, before the CLI's imports (about 0.3 s of them).

Two things must happen before those imports: the measurement of how busy other
processes keep the cores starts (specli.cpu_load: the imports and model loads fill its
window, so it adds no wait), and Ctrl-C or `kill` during the imports ends the command
quietly (130, 143) rather than with a traceback.
"""

from __future__ import annotations

import signal
import sys

from .cpu_load import census


def main() -> None:
    census.start()
    signal.signal(signal.SIGTERM, interrupt)
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.exit(exit_code_for_interrupt())
    cli_main()


_signal = signal.SIGINT  # the signal behind the last KeyboardInterrupt


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM: the same clean stop as Ctrl-C (partial downloads removed, text flushed)."""
    global _signal
    _signal = signal.Signals(signum)
    raise KeyboardInterrupt


def exit_code_for_interrupt() -> int:
    """The shell's convention, 128 + the signal: 130 for Ctrl-C, 143 for `kill`."""
    return 128 + int(_signal)
