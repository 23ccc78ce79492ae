"""The generation thread of `specli serve`: one loaded model pair, one request at a time.

llama.cpp contexts are not thread-safe, so every model call (tokenizing, the chat
template's tokens, generation, hd's learning, closing) happens on this one thread,
fed by a bounded FIFO.  The web side talks to it only through `Job`s: it submits one
and reads its events from an asyncio queue; setting `Job.cancel` (a client gone)
ends the generation at the next round.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from . import runtime
from .engine import Engine, GenerationConfig, Result
from .errors import NoChatTemplate, SpecliError
from .openai_api import ApiError, GenRequest, StopScanner, finish_reason, specli_stats, usage
from .runtime import Loaded
from .tokens import TextStream, common_prefix, tokens_spelling

RETRY_AFTER_S = 2  # what a 503 tells the client to wait
SEAM = 4  # tokens at the end of a chat prompt that its next turn may spell differently


def shutting_down() -> ApiError:
    """The 503 every request the stopping server cannot answer gets."""
    return ApiError(503, "the server is shutting down", kind="server_error",
                    code="shutting_down")


@dataclass
class Job:
    """One request on its way through the generation thread.  Events, in order:
    ("start", n_prompt) or ("error", ApiError); then ("text", str)...; ("done", dict)."""

    req: GenRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload: Any) -> None:
        """From the generation thread into the event loop (gone at shutdown: dropped)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:
            pass


class Worker:
    """Owns `loaded` from start to close; runs queued jobs one by one."""

    def __init__(self, loaded: Loaded, draft_max: int, queue_size: int) -> None:
        self.loaded = loaded
        self.draft_max = draft_max
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.stopping = threading.Event()
        self.current: Job | None = None
        # the main engine's previous prompt, and that prompt with its answer
        self.last_prompt: list[int] = []
        self.last_context: list[int] = []
        self.thread = threading.Thread(target=self._loop, name="specli-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, or refuse at once (503 and Retry-After) when full or stopping."""
        if self.stopping.is_set():
            raise shutting_down()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            waiting = f"{self.jobs.maxsize} request{'s' * (self.jobs.maxsize != 1)}"
            raise ApiError(503, f"the server is busy: its queue ({waiting}) is full; retry "
                           "later", kind="server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def busy(self) -> bool:
        return self.current is not None

    def stop(self) -> None:
        """Stop taking jobs: the running one ends at its next round, waiting ones are
        refused; the thread then closes the models and exits.  Idempotent."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if (job := self.current) is not None:
            job.cancel.set()
        self._refuse_waiting()
        self.jobs.put(None)

    def _refuse_waiting(self) -> None:
        """Answer whatever is still queued with a 503 (the server is going away)."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit("error", shutting_down())

    def join(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _loop(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                if job.cancel.is_set():  # its client left while it waited
                    job.emit("error", ApiError(408, "the client left", code="cancelled"))
                    continue
                self.current = job
                try:
                    self._run(job)
                except Exception as e:  # a bug or a backend failure: this request only
                    log_failure(e)
                    job.emit("error", ApiError(500, f"generation failed: {type(e).__name__}",
                                               kind="server_error", code="internal_error"))
                finally:
                    self.current = None
        finally:
            self._refuse_waiting()  # a request that slipped in as the server stopped
            self.loaded.close()

    def _encode(self, req: GenRequest) -> list[int]:
        target = self.loaded.target
        param = "messages" if req.messages is not None else "prompt"
        tokens: list[int] = []
        try:
            if req.messages is not None:
                tokens = runtime.encode_messages(target, req.messages)
            else:
                assert req.prompt is not None
                tokens = runtime.encode_prompt(target, req.prompt, raw=True)
            self.loaded.engine.check_prompt(tokens, runtime.ctx_advice(self.loaded))
        except NoChatTemplate as e:  # its advice, --raw, is a flag no client can pass
            raise ApiError(400, f"{e.model} has no chat template, so it takes no messages; "
                           "send text as is to /v1/completions", param=param,
                           code="invalid_prompt") from None
        except SpecliError as e:  # OpenAI's code for a prompt the context cannot hold
            long = len(tokens) >= target.n_ctx
            raise ApiError(400, str(e), param=param, code="context_length_exceeded" if long
                           else "invalid_prompt") from None
        return tokens

    def _run(self, job: Job) -> None:
        try:
            tokens = self._encode(job.req)
        except ApiError as e:
            job.emit("error", e)
            return
        job.emit("start", len(tokens))
        # a seeded sampled request gets a fresh engine (new budgets, no history) so the
        # same seed gives the same text every time, as `specli generate --seed` does
        seeded = job.req.params.seed is not None and not job.req.params.greedy
        reuse = not seeded and _extends(tokens, self.last_prompt)
        start = common_prefix(self.last_context, tokens) if reuse else 0
        cfg = GenerationConfig(max_tokens=job.req.max_tokens, params=job.req.params,
                               draft_max=self.draft_max, reuse_prefix=reuse,
                               stop=lambda: job.cancel.is_set() or self.stopping.is_set())
        res = Result(method=self.loaded.method)
        self.loaded.fit_threads()  # to the cores other processes left free meanwhile
        one_off = self.loaded.one_off_engine() if seeded else nullcontext(self.loaded.engine)
        with one_off as engine:
            try:
                hit = self._generate(job, engine, tokens, cfg, res)
            finally:
                if seeded:
                    self.last_prompt = self.last_context = []
                else:
                    self.loaded.finish(tokens, res, start)  # hd's history learns
                    self.last_prompt, self.last_context = tokens, [*tokens, *res.tokens]
        if hit:
            res.stop_reason = "stop"
        job.emit("done", {"finish_reason": finish_reason(res.stop_reason),
                          "usage": usage(len(tokens), res), "specli": specli_stats(res)})

    def _generate(self, job: Job, engine: Engine, tokens: list[int], cfg: GenerationConfig,
                  res: Result) -> bool:
        """Stream the answer's text as events until done, a stop string, or cancelled
        (the client left, or shutdown).  True when a stop string ended it; the answer's
        tokens then end with the one that completed it (a round may have gone past: its
        tokens are neither counted in usage nor remembered)."""
        token_bytes = self.loaded.target.token_bytes
        text = TextStream(token_bytes)
        stops = StopScanner(job.req.stop)
        gen = engine.stream(tokens, cfg, res)
        try:
            for chunk in gen:
                _send(job, stops.push(text.push(chunk)))
                self.loaded.keep_fit()  # a long answer follows the load on the cores
                if stops.hit:
                    break
                if job.cancel.is_set() or self.stopping.is_set():
                    res.stop_reason = "interrupted"
                    return False
            else:
                _send(job, stops.push(text.flush()) + stops.flush())
        finally:
            gen.close()  # the engine's own cleanup runs now, on this thread
        if stops.hit:
            del res.tokens[tokens_spelling(token_bytes, res.tokens, stops.end):]
        return stops.hit



def _extends(tokens: list[int], previous: list[int]) -> bool:
    """A chat's next turn: the new prompt starts with the previous prompt, but for its
    last few tokens (the answer that follows them may tokenize across the seam)."""
    return bool(previous) and common_prefix(previous, tokens) >= max(1, len(previous) - SEAM)


def _send(job: Job, piece: str) -> None:
    if piece:
        job.emit("text", piece)


def log_failure(e: BaseException, what: str = "generation failed") -> None:
    """One line on the server's stderr (the traceback with SPECLI_DEBUG=1); the client
    only ever gets the error's type."""
    if os.environ.get("SPECLI_DEBUG"):
        traceback.print_exception(e)
    print(f"specli serve: {what}: {type(e).__name__}: {e}", file=sys.stderr)
