"""`specli serve`: an OpenAI-compatible HTTP server over one loaded model pair.

The web side (FastAPI on uvicorn's event loop) parses, authenticates and streams;
every model call runs on the one generation thread (specli/serve_worker.py).  Safe by
default: loopback only, optional bearer key, capped bodies and answers, OpenAI's
error JSON for every refusal and never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .errors import SpecliError
from .openai_api import SSE_DONE, Answer, ApiError, parse_json, parse_request, sse
from .serve_worker import Job, Worker, log_failure, shutting_down

POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is there


@dataclass(frozen=True)
class Settings:
    model_id: str  # the name /v1/models lists
    aliases: frozenset[str]  # other names a request may use for it (the path given)
    api_key: str | None
    max_body_bytes: int
    max_tokens_cap: int
    cors_origins: tuple[str, ...] = ()  # web pages whose scripts may call the API


def model_id(name: str) -> str:
    """A registry name as is; a GGUF path by its file name."""
    return Path(name).name if ("/" in name or name.endswith(".gguf")) else name


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(worker: Worker, settings: Settings) -> FastAPI:
    """The routes; `worker` runs the generations."""
    app = FastAPI(title="specli", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return error_response(ApiError(e.status_code, str(e.detail), code=code))

    app.add_middleware(_QuietErrors)
    if settings.cors_origins:  # outside _QuietErrors: it answers browsers' preflights
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(_TrailingSlash)  # the outermost: every route, preflights too

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_id, "method": worker.loaded.method,
                "busy": worker.busy(), "waiting": worker.jobs.qsize()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, settings)
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model",
                                            "created": started, "owned_by": "specli"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        _authorize(request, settings)
        if name not in settings.aliases | {settings.model_id}:
            raise ApiError(404, f"the model '{name}' does not exist; this server has "
                           f"'{settings.model_id}'", param="model", code="model_not_found")
        return {"id": settings.model_id, "object": "model", "created": started,
                "owned_by": "specli"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(request, "chat", worker, settings)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(request, "completion", worker, settings)

    return app


class _TrailingSlash:
    """`/v1/chat/completions/` is `/v1/chat/completions`: Starlette answered it with a
    307 redirect and an empty body, which curl and httpx do not follow for a POST."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            raw = scope.get("raw_path") or path.encode()
            scope = {**scope, "path": path.rstrip("/") or "/",
                     "raw_path": raw.rstrip(b"/") or b"/"}
        await self.app(scope, receive, send)


class _QuietErrors:
    """An unexpected error: OpenAI's 500 JSON and one line on stderr.  An exception
    handler for Exception would not do (Starlette re-raises after it and uvicorn prints
    the whole traceback), nor would an "http" middleware (it hides a client's disconnect
    from the running request).  Plain ASGI, so neither happens.

    A request cancelled under it is the server going away before the request ended (a
    second Ctrl-C, or a grace period run out): its client gets a 503 or, mid-stream, an
    error event and [DONE], and uvicorn no traceback to print."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, events = False, False

        async def send_(message: dict) -> None:
            nonlocal started, events
            if message["type"] == "http.response.start":
                started = True
                events = (b"content-type", b"text/event-stream") in [
                    (k.lower(), v.split(b";")[0].strip()) for k, v in message["headers"]]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except asyncio.CancelledError:
            gone = shutting_down()
            with contextlib.suppress(Exception):
                if not started:
                    await error_response(gone)(scope, receive, send)
                else:  # the answer is under way: end it (a JSON body is already sent)
                    tail = sse(gone.body()) + SSE_DONE if events else ""
                    await send({"type": "http.response.body", "body": tail.encode(),
                                "more_body": False})
        except Exception as e:
            log_failure(e, "request failed")
            if not started:  # else the answer is under way: it just ends
                await error_response(ApiError(500, "internal server error",
                                              kind="server_error",
                                              code="internal_error"))(scope, receive, send)


def _authorize(request: Request, settings: Settings) -> None:
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, key = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                             settings.api_key.encode()):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                       code="invalid_api_key")


async def _read_body(request: Request, cap: int) -> bytes:
    """The body, refused with 413 past `cap` bytes (declared or actually sent)."""
    too_big = ApiError(413, f"the request body is larger than {cap} bytes",
                       code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > cap:
            raise too_big
        parts.append(part)
    return b"".join(parts)


async def _complete(request: Request, kind: str, worker: Worker, settings: Settings) -> Response:
    _authorize(request, settings)
    body = parse_json(await _read_body(request, settings.max_body_bytes))
    req = parse_request(body, kind, settings.max_tokens_cap)
    if req.model and req.model not in settings.aliases | {settings.model_id}:
        raise ApiError(404, f"the model '{req.model}' does not exist; this server has "
                       f"'{settings.model_id}'", param="model", code="model_not_found")
    job = Job(req, asyncio.get_running_loop())
    worker.submit(job)
    watcher = asyncio.create_task(_watch(job, request))
    try:
        event, payload = await job.events.get()
        if event == "error":
            return error_response(payload)
        answer = Answer(kind, settings.model_id, usage_asked=req.include_usage)
        if req.stream:  # from here on Starlette watches the connection itself
            return StreamingResponse(_stream(job, answer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(job, answer)
    finally:
        watcher.cancel()


async def _watch(job: Job, request: Request) -> None:
    """Cancel the job when its client disconnects while it waits or runs unstreamed."""
    while not job.cancel.is_set():
        await asyncio.sleep(POLL_S)
        if await request.is_disconnected():
            job.cancel.set()


async def _collect(job: Job, answer: Answer) -> Response:
    pieces: list[str] = []
    while True:
        event, payload = await job.events.get()
        if event == "text":
            pieces.append(payload)
        elif event == "error":
            return error_response(payload)
        else:
            return JSONResponse(answer.full("".join(pieces), payload["finish_reason"],
                                            payload["usage"], payload["specli"]))


async def _stream(job: Job, answer: Answer) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; usage in a chunk of its own after
    the last when asked for (stream_options).  A client that disconnects cancels this
    generator, and with it the job."""
    try:
        if answer.kind == "chat":
            yield sse(answer.chunk("", role=True))
        while True:
            event, payload = await job.events.get()
            if event == "text":
                yield sse(answer.chunk(payload))
            elif event == "error":
                yield sse(payload.body())
                break
            else:
                yield sse(answer.chunk(None if answer.kind == "chat" else "",
                                       payload["finish_reason"], extra=payload["specli"]))
                if job.req.include_usage:
                    yield sse(answer.usage_chunk(payload["usage"]))
                break
        yield SSE_DONE
    finally:
        job.cancel.set()  # finished: no effect; the client left: the job ends


class _Server(uvicorn.Server):
    """uvicorn's server, whose SIGINT/SIGTERM also ends the running generation (else a
    long answer would hold the graceful shutdown until its end)."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.worker.stop()
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """Listen before loading the models: a taken port fails in a second, not after."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise SpecliError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def serve(worker: Worker, settings: Settings, sock: socket.socket) -> None:
    """Run until SIGINT/SIGTERM; then the running answer ends, the generation thread
    closes the models, and this returns (exit 0)."""
    app = create_app(worker, settings)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=10)
    server = _Server(config, worker)
    # uvicorn re-raises the signal that stopped it once done: let that one pass quietly
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    worker.start()
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        worker.join(timeout=30)
