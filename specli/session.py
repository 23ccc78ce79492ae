"""What generate, chat, bench and calibrate share, written once: which models to load
and how (`ModelOptions`, one loading path), an answer streamed to the user
(`stream_text`), and what counts as an empty prompt (`blank`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console

from . import runtime
from .backends.base import LoadOptions
from .engine import GenerationConfig, Result
from .runtime import Loaded
from .tokens import TextStream


@dataclass(frozen=True)
class ModelOptions:
    """The model and loading options the commands share, so they all load alike.

    Defaults are runtime.load's and LoadOptions' own: options a command does not have
    (calibrate's --branches, bench's history) then load as they always did."""

    model: str | None = None
    draft: str | None = None
    method: str = "auto"
    ctx: int = 4096
    threads: int | None = None
    gpu_layers: int = 0
    device: str = "auto"
    branches: int = 1
    budget: str = "auto"
    corpus: str | None = None
    history: bool = True
    tree: bool | None = None  # None: when the method may draft trees
    draft_threads: int | None = None
    draft_gpu_layers: int | None = None

    def load_options(self) -> LoadOptions:
        """The target's LoadOptions (runtime derives the draft model's from them)."""
        return LoadOptions(n_ctx=self.ctx, n_threads=self.threads, n_gpu_layers=self.gpu_layers,
                           branches=self.branches, device=self.device)

    def load(self, console: Console | None) -> Loaded:
        """The one way a command loads its models (and reports progress on `console`)."""
        return runtime.load(
            self.model, self.draft, self.method, self.load_options(), console,
            budget=self.budget, corpus=self.corpus, history=self.history, tree=self.tree,
            draft_threads=self.draft_threads, draft_gpu_layers=self.draft_gpu_layers,
        )


def blank(text: str) -> bool:
    """Nothing but whitespace: nothing to answer (generate refuses it, chat skips it)."""
    return not text.strip()


def stream_text(
    loaded: Loaded,
    tokens: Sequence[int],
    cfg: GenerationConfig,
    res: Result,
    write: Callable[[str], None] | None = None,
) -> str:
    """Generate from `tokens`, passing the text to `write` as it is accepted (whole
    characters only: bytes that end mid-character wait for the next piece, the rest at
    the end); None collects it unwritten (--json). Returns the whole text.

    Ctrl-C ends the answer, not the caller: `res.stop_reason` becomes "interrupted" and
    the text so far is returned (generate then exits 130, chat keeps the session).
    Whatever `write` raises (a closed pipe) propagates."""
    stream = TextStream(loaded.target.token_bytes)
    pieces: list[str] = []
    try:
        for chunk in loaded.engine.stream(tokens, cfg, res):
            pieces.append(_put(stream.push(chunk), write))
            loaded.keep_fit()  # a long answer follows the load others put on the cores
    except KeyboardInterrupt:
        res.stop_reason = "interrupted"
    pieces.append(_put(stream.flush(), write))
    return "".join(pieces)


def _put(piece: str, write: Callable[[str], None] | None) -> str:
    if write is not None:
        write(piece)
    return piece
