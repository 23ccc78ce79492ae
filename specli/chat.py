"""Interactive (or scripted) multi-turn chat over the engine.

The whole conversation is re-rendered through the chat template each turn; the
engine keeps the KV prefix it shares with the previous turn, so only the new
turn is prefilled.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from rich.console import Console

from .engine import GenerationConfig, Result
from .errors import NoChatTemplate, SpecliError
from .report import stats_lines
from .runtime import Loaded, ctx_advice, encode_messages, more_context
from .session import blank, stream_text
from .textin import check_text, read_line

HELP = "commands: /stats  /reset  /exit   (Ctrl-C stops an answer, Ctrl-D quits)"


def _line_editing() -> None:
    """GNU readline for the typed turns, where Python has it: arrows edit the line and
    recall earlier turns, and a pasted line is read whole (without it the terminal's
    line discipline cut one at 4095 bytes, silently)."""
    try:
        import readline  # noqa: F401  (importing it is what turns it on for input())
    except ImportError:  # Windows, or a Python built without it
        pass


class ChatSession:
    def __init__(
        self,
        loaded: Loaded,
        cfg: GenerationConfig,
        *,
        system: str | None,
        write: Callable[[str], None],
        err: Console,
    ) -> None:
        self.loaded = loaded
        self.cfg = GenerationConfig(
            max_tokens=cfg.max_tokens, params=cfg.params, draft_max=cfg.draft_max,
            reuse_prefix=True,
        )
        self.system = system
        self.write = write
        self.err = err
        self.messages: list[dict[str, str]] = []
        self.strict = False  # a turn that cannot be answered raises (a script's)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.learned = 0  # conversation tokens a drafter with memory has already seen
        self.last: Result | None = None  # /stats after /reset: nothing yet, not the old

    def run(self, stdin: TextIO) -> None:
        """Turns from a terminal, or one per line from a script.  A script's turn that
        cannot be answered (a line longer than the context) ends it with that error, as
        generate would: a pipeline must not carry on, exit 0, as if it had been answered."""
        interactive = stdin.isatty()
        self._check_system()
        self.strict = not interactive
        if interactive:
            _line_editing()
            self.err.print(f"specli chat ({self.loaded.method}); {HELP}", markup=False)
        while True:
            try:
                line = self._ask() if interactive else read_line(stdin)
                if interactive:
                    line = check_text(line, "that line")
            except EOFError:
                break
            except SpecliError as e:
                if not interactive:
                    raise  # a script's bad bytes end it, as they would in generate
                self.err.print(f"({e}; not sent)", markup=False)
                continue
            except KeyboardInterrupt:
                self.err.print("\n(Ctrl-D or /exit to quit)", markup=False)
                continue
            if not interactive and line == "":
                break  # end of the script
            line = line.rstrip("\r\n")  # a script written on Windows too
            if blank(line):
                continue
            if line.startswith("/"):
                if self.command(line.strip()):
                    break
                continue
            self.answer(line)
        if interactive:
            self.err.print("bye", markup=False)

    def _ask(self) -> str:
        """A turn typed at the terminal.  The prompt goes to stderr when stdout is not
        the terminal (`specli chat > answers.txt`): stdout carries only the answers."""
        if sys.stdout.isatty():
            return input(">>> ")
        self.err.print(">>> ", end="", markup=False)
        return input()

    def _check_system(self) -> None:
        """A model with no chat template, and a --system message that leaves no room for a
        turn, fail once, at the start (a --system message used to fail every turn)."""
        target = self.loaded.target
        try:
            n = len(encode_messages(target, [*self.messages, {"role": "user", "content": "Hi"}]))
        except NoChatTemplate as e:  # its advice, --raw, is generate's: chat has no such flag
            raise SpecliError(f"{e.model} has no chat template, which chat needs; to send "
                              "text as is: specli generate --raw") from None
        if self.system and n >= target.n_ctx:
            raise SpecliError(f"the --system message and a one-word turn are {n} tokens; "
                              f"the context holds {target.n_ctx}: "
                              f"{ctx_advice(self.loaded, 'shorten it')}")

    def _fit(self) -> list[int]:
        """The conversation's tokens, its oldest turns dropped (the system message kept)
        while it leaves the answer less room than it may take (-n, at most a quarter of
        the context): a long chat goes on instead of refusing every turn once full."""
        target = self.loaded.target
        room = min(self.cfg.max_tokens, target.n_ctx // 4)
        first = 1 if self.system else 0  # the oldest turn after the system message
        dropped = 0
        while True:
            tokens = encode_messages(target, self.messages)
            if len(tokens) + room <= target.n_ctx or len(self.messages) - first <= 1:
                break
            del self.messages[first]  # a user's message and the answer to it
            if len(self.messages) - first > 1 and self.messages[first]["role"] == "assistant":
                del self.messages[first]
            dropped += 1
        # the newest message alone may not fit
        self.loaded.engine.check_prompt(tokens, ctx_advice(self.loaded))
        if dropped:
            self.learned = len(tokens)  # hd then learns the answer (the rest it has seen)
            turns = "turn" if dropped == 1 else f"{dropped} turns"
            self.err.print(f"(the oldest {turns} left the conversation to fit --ctx "
                           f"{target.n_ctx}; /reset starts afresh)", markup=False)
        return tokens

    def command(self, cmd: str) -> bool:
        """Run a slash command; True means leave."""
        if cmd in ("/exit", "/quit", "/bye"):
            return True
        if cmd == "/reset":
            self.reset()
            self.err.print("(conversation cleared)", markup=False)
        elif cmd == "/stats":
            if self.last is None:
                self.err.print("(no answer yet)", markup=False)
            else:
                lines = stats_lines(self.last, self.loaded.placements())
                self.err.print("\n".join(lines), markup=False)
        else:
            self.err.print(f"unknown command {cmd}; {HELP}", markup=False)
        return False

    def answer(self, user_text: str) -> None:
        loaded = self.loaded
        self.messages.append({"role": "user", "content": user_text})
        try:
            tokens = self._fit()
        except SpecliError as e:
            self.messages.pop()
            if self.strict:
                raise
            self.err.print(f"specli: {e} (not sent)", markup=False)
            return
        res = Result(method=loaded.method)
        loaded.fit_threads()  # to the cores other processes left free meanwhile
        text = stream_text(loaded, tokens, self.cfg, res, self.write)  # Ctrl-C: stops it
        loaded.finish(tokens, res, start=self.learned)  # hd learns across turns and sessions
        self.learned = len(tokens) + len(res.tokens)
        self.write("\n")
        self.messages.append({"role": "assistant", "content": text})
        self.last = res
        if res.stop_reason == "interrupted":
            self.err.print("(stopped)", markup=False)
        elif res.stop_reason == "context":
            self.err.print(f"(the context is full: the answer stops here; /reset starts "
                           f"afresh; --ctx is {loaded.target.n_ctx}: {more_context(loaded)})",
                           markup=False)
        sys.stdout.flush()
