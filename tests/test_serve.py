"""`specli serve` as a client meets it: the real server in a subprocess, driven with the
official openai client (and httpx for what the client hides), on tiny generated models;
one test on the real Qwen pair checks greedy answers against `specli generate`."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import sigint_default
from tinymodel import write_tiny_model

SPECLI = str(Path(sys.executable).parent / "specli")
FAST = ["-m", "draft", "--budget", "fixed:3", "--no-history", "--ctx", "2048",
        "--threads", "1"]
CHAT = [{"role": "user", "content": "Hello there, how are you?"}]


class Server:
    """A `specli serve` subprocess on a free loopback port (--port 0, read back)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path,
                 timeout: float = 180) -> None:
        self.log = log
        self.proc = subprocess.Popen([SPECLI, "serve", *args, "--port", "0"],
                                     stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env,
                                     preexec_fn=sigint_default)
        end = time.time() + timeout
        while not (m := re.search(r"http://\S+/v1", log.read_text())):
            assert self.proc.poll() is None, log.read_text()
            assert time.time() < end, "the server did not start: " + log.read_text()
            time.sleep(0.1)
        self.url = m.group(0)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=kw.pop("api_key", "none"),
                             max_retries=0, timeout=kw.pop("timeout", 60), **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)

    def rss_kib(self) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def menv(tmp_path_factory) -> dict[str, str]:
    e = dict(os.environ)
    e["SPECLI_HOME"] = str(tmp_path_factory.mktemp("home"))
    e["HF_HUB_OFFLINE"] = "1"
    for k in ("SPECLI_DEBUG", "SPECLI_API_KEY"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="module")
def tiny_server(tiny_paths, menv, tmp_path_factory):
    """One server for most tests: tiny target + draft, --queue 2."""
    t, d = str(tiny_paths["target"]), str(tiny_paths["draft"])
    s = Server([t, "-d", d, *FAST, "--queue", "2", "--max-tokens-cap", "256"], menv,
               tmp_path_factory.mktemp("log") / "serve.log")
    yield s
    assert s.stop() == 0, s.log.read_text()
    assert "Traceback" not in s.log.read_text()


def generate_json(args: list[str], env: dict[str, str]) -> dict:
    p = subprocess.run([SPECLI, "generate", *args, "--json"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def stream_chat(client: openai.OpenAI, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_chat_and_completions_equal_generate(tiny_server, tiny_paths, menv):
    c = tiny_server.client()
    model = c.models.list().data[0].id
    assert model == "target.gguf"
    r = c.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0)
    text, chunks = stream_chat(c, model=model, messages=CHAT, max_tokens=16, temperature=0)
    t, d = str(tiny_paths["target"]), str(tiny_paths["draft"])
    ref = generate_json([t, "-d", d, *FAST, "-p", CHAT[0]["content"], "-n", "16"], menv)
    assert r.choices[0].message.content == text == ref["text"]
    assert r.usage.completion_tokens == ref["n_generated"]
    assert r.usage.prompt_tokens == ref["n_prompt"]
    assert r.choices[0].finish_reason == ("length" if ref["stop_reason"] == "length" else "stop")
    last = chunks[-1].model_dump()
    assert last["usage"] is None and last["specli"]["method"] == "draft"  # usage not asked
    extra = r.model_dump()["specli"]
    assert extra["method"] == "draft" and "acceptance_rate" in extra
    assert extra["tokens_per_pass"] >= 1 and sum(extra["rounds_by"].values()) > 0
    # asked for (stream_options): one more chunk, no choices, the usage (OpenAI's shape)
    asked, chunks = stream_chat(c, model=model, messages=CHAT, max_tokens=16, temperature=0,
                                stream_options={"include_usage": True})
    assert asked == text and chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert c.models.retrieve(model).id == model  # GET /v1/models/{id}
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-5")

    p = c.completions.create(model=model, prompt="Once upon a time", max_tokens=12,
                             temperature=0)
    s = c.completions.create(model=model, prompt="Once upon a time", max_tokens=12,
                             temperature=0, stream=True)
    streamed = "".join(ch.choices[0].text for ch in s)
    ref = generate_json([t, "-d", d, *FAST, "--raw", "-p", "Once upon a time", "-n", "12"],
                        menv)
    assert p.choices[0].text == streamed == ref["text"]
    assert p.usage.prompt_tokens == ref["n_prompt"]


def test_stop_strings(tiny_server):
    c = tiny_server.client()

    def text_of(n: int) -> str:
        return c.completions.create(model="target.gguf", prompt="Hello", max_tokens=n,
                                    temperature=0).choices[0].text

    full, first = text_of(24), len(text_of(1))
    stop = full[first + 1 : first + 4]  # completed by an early token of a long round
    cut = full[: full.index(stop)]
    r = c.completions.create(model="target.gguf", prompt="Hello", max_tokens=24,
                             temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    s = list(c.completions.create(model="target.gguf", prompt="Hello", max_tokens=24,
                                  temperature=0, stop=stop, stream=True,
                                  stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == cut
    # usage counts the tokens up to the one that completed the stop string, not the rest
    # of its round (an audit saw 17 and 21 for 13): the fewest whose text holds it
    need = next(n for n in range(1, 25) if text_of(n).startswith(cut + stop))
    assert need < r.model_dump()["specli"]["tokens_per_pass"]  # the round went past it
    assert r.usage.completion_tokens == s[-1].usage.completion_tokens == need


def test_seeded_sampling_replays_and_chat_reuses_prefix(tiny_server):
    c = tiny_server.client()
    kw = dict(model="target.gguf", messages=CHAT, max_tokens=20, temperature=0.9, seed=11)
    a = c.chat.completions.create(**kw).choices[0].message.content
    c.chat.completions.create(model="target.gguf", messages=CHAT, max_tokens=8)  # between
    b = c.chat.completions.create(**kw).choices[0].message.content
    streamed, _ = stream_chat(c, **kw)
    assert a == b == streamed

    first = c.chat.completions.create(model="target.gguf", messages=CHAT, max_tokens=8,
                                      temperature=0)
    turn = [*CHAT, {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And then?"}]
    second = c.chat.completions.create(model="target.gguf", messages=turn, max_tokens=8,
                                       temperature=0)
    assert second.model_dump()["specli"]["prompt_tokens_reused"] >= first.usage.prompt_tokens - 4


def test_bad_requests_get_openai_errors(tiny_server):
    ok = {"model": "target.gguf", "messages": CHAT, "max_tokens": 4}
    long_prompt = "word " * 5000
    cases = [
        (400, {"content": b"{not json"}),
        (400, {"content": b"[1, 2]"}),
        (400, {"json": {**ok, "temperature": "hot"}}),
        (400, {"json": {**ok, "max_tokens": -1}}),
        (400, {"json": {**ok, "n": 2}}),
        (400, {"json": {**ok, "messages": "hi"}}),
        (400, {"json": {**ok, "stop": 5}}),
        (400, {"json": {**ok, "messages": [{"role": "user", "content": long_prompt}]}}),
        (404, {"json": {**ok, "model": "gpt-5"}}),
        (413, {"content": b"{" + b" " * (2 << 20) + b"}"}),
        # found by an audit (each was a 500, the first with a traceback in the log)
        (400, {"content": b'{"messages":' + b"[" * 50000 + b"]" * 50000 + b"}"}),
        (400, {"content": b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}'}),
        (400, {"content": json.dumps({**ok, "stop": ["\ud800"]}).encode()}),
        # ignored before: refused now (they would change the answer or its shape)
        (400, {"json": {**ok, "logprobs": True, "top_logprobs": 2}}),
        (400, {"json": {**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}}),
        (400, {"json": {**ok, "response_format": {"type": "json_object"}}}),
        (400, {"json": {**ok, "presence_penalty": 0.5}}),
        (400, {"json": {**ok, "messages": [{"role": "wizard", "content": "hi"}]}}),
    ]
    for status, kw in cases:
        r = tiny_server.post("/chat/completions", **kw)
        assert r.status_code == status, (kw.get("json"), r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert "Traceback" not in r.text
    r = tiny_server.post("/completions", json={"prompt": long_prompt, "max_tokens": 4})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"  # OpenAI's code
    r = tiny_server.post("/completions",
                         content=json.dumps({"prompt": "\ud800 hi", "max_tokens": 2}).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    neutral = {**ok, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
               "logprobs": False, "tool_choice": "none", "response_format": {"type": "text"}}
    assert tiny_server.post("/chat/completions", json=neutral).status_code == 200
    assert httpx.get(tiny_server.url + "/nowhere").json()["error"]["code"] == "not_found"
    r = tiny_server.post("/chat/completions/", json=ok)  # was a 307 with an empty body
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert httpx.get(tiny_server.url + "/models/").json()["object"] == "list"
    r = tiny_server.post("/chat/completions", json=ok)  # still up
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_an_unexpected_error_is_a_500_and_one_line_not_a_traceback(capsys):
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from specli.serve import Settings, create_app

    def broken() -> bool:
        raise RuntimeError("a bug")

    worker = SimpleNamespace(busy=broken, jobs=None, loaded=SimpleNamespace(method="none"))
    app = create_app(worker, Settings("m", frozenset(), None, 1 << 20, 64))  # type: ignore
    r = TestClient(app, raise_server_exceptions=False).get("/health")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    err = capsys.readouterr().err
    assert "request failed: RuntimeError: a bug" in err and "Traceback" not in err


def test_a_request_cancelled_by_shutdown_still_ends_properly():
    """A second Ctrl-C (or a grace period run out) cancels the requests in flight:
    uvicorn printed a CancelledError traceback and the client got a plain-text 500 or a
    stream cut without [DONE].  Now a 503 in OpenAI's JSON, or an error event and [DONE]."""
    import asyncio

    from specli.serve import _QuietErrors

    async def cut(app) -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await _QuietErrors(app)({"type": "http"}, None, send)  # nothing raised
        return sent

    async def before_any_answer(scope, receive, send) -> None:
        raise asyncio.CancelledError

    async def mid_stream(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        raise asyncio.CancelledError

    sent = asyncio.run(cut(before_any_answer))
    assert sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["code"] == "shutting_down"
    sent = asyncio.run(cut(mid_stream))
    last = sent[-1]
    assert last["type"] == "http.response.body" and not last["more_body"]
    events = last["body"].decode().split("\n\n")
    assert json.loads(events[0].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert events[1] == "data: [DONE]"


def test_cors_and_head_health():
    """Browsers' pages may call the API only from the origins --cors-origin names."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from specli.serve import Settings, create_app

    worker = SimpleNamespace(busy=lambda: False, jobs=SimpleNamespace(qsize=lambda: 0),
                             loaded=SimpleNamespace(method="none"))
    pre = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    for origins, allowed in (((), False), (("http://localhost:3000",), True),
                             (("http://elsewhere",), False)):
        app = create_app(worker, Settings("m", frozenset(), None, 1 << 20, 64, origins))  # type: ignore
        c = TestClient(app)
        r = c.options("/v1/chat/completions", headers=pre)
        got = r.headers.get("access-control-allow-origin")
        assert (got == "http://localhost:3000") == allowed, (origins, r.status_code, got)
        r = c.get("/v1/models", headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 200
        assert ("access-control-allow-origin" in r.headers) == allowed
        assert c.head("/health").status_code == 200


@pytest.mark.parametrize("extra", [
    {"logprobs": True}, {"top_logprobs": 2}, {"tools": [{"type": "function"}]},
    {"functions": [{"name": "f"}]}, {"tool_choice": "required"},
    {"function_call": {"name": "f"}}, {"response_format": {"type": "json_schema"}},
    {"echo": True}, {"best_of": 3}, {"suffix": "end"}, {"logit_bias": {"42": 5}},
    {"presence_penalty": 0.5}, {"frequency_penalty": -1},
])
def test_a_parameter_that_would_change_the_answer_is_refused(extra):
    """Silently ignored before the audit; clients' neutral defaults still pass."""
    from specli.openai_api import ApiError, parse_request

    with pytest.raises(ApiError) as e:
        parse_request({"prompt": "hi", **extra}, "completion", 64)
    (name,) = extra
    assert e.value.status == 400 and e.value.code == "unsupported_parameter"
    assert e.value.param == name and "does not support" in e.value.message


def test_request_rules_found_by_the_audit():
    from specli.openai_api import ApiError, parse_json, parse_request

    neutral = {"logprobs": False, "top_logprobs": None, "tools": [], "tool_choice": "auto",
               "response_format": {"type": "text"}, "echo": False, "best_of": 1,
               "suffix": "", "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0}
    assert parse_request({"prompt": "hi", **neutral}, "completion", 64).prompt == "hi"
    assert parse_request({"prompt": "hi", "temperature": 1e-320}, "completion", 64).params
    assert parse_request({"prompt": "hi", "stream": True,
                          "stream_options": {"include_usage": True}},
                         "completion", 64).include_usage
    assert not parse_request({"prompt": "hi", "stream": True}, "completion", 64).include_usage
    assert not parse_request({"prompt": "hi", "stream": None}, "completion", 64).stream  # a 400

    def refused(body: dict, kind: str = "chat") -> ApiError:
        with pytest.raises(ApiError) as e:
            parse_request(body, kind, 64)
        assert e.value.status == 400
        return e.value

    chat = {"messages": CHAT}
    for opts in ("yes", [True], {"include_usage": "true"}):
        assert refused({**chat, "stream_options": opts}).param == "stream_options"
    for role in ("wizard", "tool", "function"):
        msgs = [*CHAT, {"role": role, "content": "x"}]
        assert refused({"messages": msgs}).param == "messages[1].role"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a \udc00"}]}]
    e = refused({"messages": msgs})
    assert e.param == "messages[0].content" and "lone surrogate" in e.message
    assert refused({"prompt": "\ud83d", "max_tokens": 2}, "completion").param == "prompt"
    assert refused({**chat, "stop": ["ok", "\ud800"]}).code == "invalid_value"
    # a second audit: each was answered (200) where OpenAI's API says 400
    assert refused({**chat, "temperature": 5}).param == "temperature"
    assert parse_request({**chat, "temperature": 2}, "chat", 64).params.temperature == 2
    for role in ("user", "system"):
        assert refused({"messages": [{"role": role}]}).param == "messages[0].content"
    ok = [*CHAT, {"role": "assistant", "content": None}, {"role": "user", "content": "?"}]
    assert parse_request({"messages": ok}, "chat", 64).messages[1]["content"] == ""
    e = refused({**chat, "stream_options": {"include_usage": True}})
    assert e.param == "stream_options" and "only allowed when 'stream' is true" in e.message
    e = refused({"prompt": "hi", "logprobs": 0}, "completion")  # 0: the chosen token's
    assert e.code == "unsupported_parameter" and e.param == "logprobs"
    assert refused({**chat, "modalities": ["text", "audio"]}).param == "modalities"
    assert refused({**chat, "audio": {"voice": "alloy", "format": "wav"}}).param == "audio"
    assert parse_request({**chat, "modalities": ["text"], "logprobs": 0}, "chat", 64)
    for raw in (b'{"prompt":' + b"[" * 50000 + b"]" * 50000 + b"}", b"\xff\xfe{}"):
        with pytest.raises(ApiError) as err:
            parse_json(raw)
        assert err.value.status == 400 and err.value.code == "invalid_json"


def test_request_rules_found_by_the_third_audit():
    """Two were 500s (a huge integer as temperature or top_p: OverflowError; a wrong
    value nested ~945 deep: RecursionError quoting it back); the rest were 400s for what
    OpenAI's API takes."""
    from specli.openai_api import Answer, ApiError, parse_json, parse_request

    def refused(body: dict) -> ApiError:
        with pytest.raises(ApiError) as e:
            parse_request(body, "chat", 64)
        assert e.value.status == 400
        return e.value

    chat = {"messages": CHAT}
    for name in ("temperature", "top_p"):
        body = parse_json(b'{"%s": 1%s}' % (name.encode(), b"0" * 400))
        assert refused({**chat, **body}).param == name
    # near the recursion limit is a band of depths json.loads reads and json.dumps (the
    # error quoting the value) cannot write; where it lies depends on the stack's depth
    # (under pytest here: ~20 depths below the limit), so every depth is tried
    for depth in range(1, sys.getrecursionlimit() + 50):
        try:
            deep = parse_json(b'{"max_tokens": ' + b"[" * depth + b"]" * depth + b"}")
        except ApiError:  # too deep to read: the 400 parse_json gives
            continue
        assert refused({**chat, **deep}).param == "max_tokens"

    def parsed(**kw):
        return parse_request({**chat, **kw}, "chat", 64)

    assert parsed(top_p=0).params.top_k == 1  # only the likeliest token
    assert parsed(top_p=0, top_k=5).params.top_k == 1
    assert parsed(seed=-1).params.seed is None  # llama.cpp clients' "random"
    assert parsed(seed=7).params.seed == 7
    assert parsed(max_tokens=8.0, n=1.0).max_tokens == 8
    assert refused({**chat, "max_tokens": 8.5}).param == "max_tokens"
    assert parsed(stop="").stop == () and parsed(stop=["", "x"]).stop == ("x",)
    assert not parsed(stream=True, stream_options={"include_usage": None}).include_usage
    for prompt in (["Hi", "Yo"], [1, 2, 3], [[1, 2, 3]]):
        with pytest.raises(ApiError) as err:
            parse_request({"prompt": prompt}, "completion", 64)
        assert err.value.param == "prompt" and "not supported" in err.value.message
    assert parse_request({"prompt": ["Hi"]}, "completion", 64).prompt == "Hi"
    # usage asked for: every chunk before the usage chunk says "usage": null (OpenAI's)
    for kind in ("chat", "completion"):
        asked = Answer(kind, "m", usage_asked=True)
        assert asked.chunk("x")["usage"] is None
        assert asked.chunk(None, "stop", extra={})["usage"] is None
        assert "usage" not in Answer(kind, "m").chunk("x")


def test_a_full_queue_says_so_in_english():
    from types import SimpleNamespace

    from specli.openai_api import ApiError, parse_request
    from specli.serve_worker import Job, Worker

    req = parse_request({"prompt": "hi"}, "completion", 8)
    for size, waiting in ((1, "1 request"), (3, "3 requests")):
        worker = Worker(SimpleNamespace(), draft_max=4, queue_size=size)  # type: ignore
        for _ in range(size):
            worker.submit(Job(req, None))  # type: ignore  # never started: they wait
        with pytest.raises(ApiError) as e:
            worker.submit(Job(req, None))  # type: ignore
        assert e.value.status == 503 and e.value.headers["Retry-After"]
        assert e.value.message == (f"the server is busy: its queue ({waiting}) is full; "
                                   "retry later")


def test_api_key(tiny_paths, menv, tmp_path):
    env = {**menv, "SPECLI_API_KEY": "s3cret"}
    s = Server([str(tiny_paths["target"]), "-m", "none", "--no-history", "--ctx", "512",
                "--threads", "1"], env, tmp_path / "log")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = s.post("/chat/completions", json={"messages": CHAT, "max_tokens": 4})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        for path in ("/models", "/models/target.gguf"):  # the retrieve one too
            r = httpx.get(s.url + path, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert s.client(api_key="s3cret").models.retrieve("target.gguf").id == "target.gguf"
        r = s.client(api_key="s3cret").chat.completions.create(
            model="target.gguf", messages=CHAT, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        assert s.stop() == 0


def test_a_model_with_no_chat_template_points_chat_clients_to_completions(menv, tmp_path):
    """Its error told clients to "use --raw", a flag of generate's no request can pass."""
    plain = write_tiny_model(tmp_path / "plain.gguf", seed=0, chat_template=False)
    s = Server([str(plain), "-m", "none", "--no-history", "--ctx", "512", "--threads", "1"],
               menv, tmp_path / "log")
    try:
        r = s.post("/chat/completions", json={"messages": CHAT, "max_tokens": 4})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "messages", r.text
        assert "--raw" not in err["message"] and "/v1/completions" in err["message"]
        r = s.post("/completions", json={"prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        assert s.stop() == 0


def test_bounded_load(tiny_server, report):
    """16 clients x 4 requests against --queue 2: each gets 200 or 503 with Retry-After,
    nothing hangs, and the server's memory does not grow."""
    body = {"model": "target.gguf", "messages": CHAT, "max_tokens": 8, "temperature": 0}
    assert tiny_server.post("/chat/completions", json=body).status_code == 200  # warm-up
    before = tiny_server.rss_kib()

    def client(i: int) -> list[tuple[int, str | None]]:
        out = []
        with httpx.Client(timeout=60) as h:
            for j in range(4):
                stream = (i + j) % 2 == 0
                r = h.post(tiny_server.url + "/chat/completions", json={**body, "stream": stream})
                out.append((r.status_code, r.headers.get("retry-after")))
                assert r.status_code in (200, 503), r.text
                if stream and r.status_code == 200:
                    assert r.text.endswith("data: [DONE]\n\n")
        return out

    with cf.ThreadPoolExecutor(16) as pool:
        results = [x for f in [pool.submit(client, i) for i in range(16)]
                   for x in f.result(timeout=120)]
    assert len(results) == 64
    assert any(code == 200 for code, _ in results)
    assert all(ra and int(ra) > 0 for code, ra in results if code == 503)
    after = tiny_server.rss_kib()
    assert after <= before * 1.10, (before, after)
    n_busy = sum(code == 503 for code, _ in results)
    report("specli serve: 16 clients x 4 requests, --queue 2",
           [f"200: {64 - n_busy}, 503: {n_busy}; RSS {before} -> {after} KiB"])
    assert httpx.get(tiny_server.url.removesuffix("/v1") + "/health").json()["busy"] is False


def _first_token_s(client: openai.OpenAI, max_tokens: int) -> float:
    t0 = time.perf_counter()
    s = client.completions.create(model="slow.gguf", prompt="Hello", max_tokens=max_tokens,
                                  temperature=0, stream=True)
    for ch in s:
        if ch.choices and ch.choices[0].text:
            break
    took = time.perf_counter() - t0
    s.close()
    return took


def test_disconnect_frees_the_model_and_sigterm_stops_cleanly(menv, tmp_path):
    """A slower tiny model (one round ~ms): a client leaving mid-stream must not keep the
    model busy with its remaining tokens, and SIGTERM mid-answer exits 0."""
    slow = write_tiny_model(tmp_path / "slow.gguf", seed=4, n_embd=256, n_layer=8, n_ff=1024)
    s = Server([str(slow), "-m", "none", "--no-history", "--ctx", "2048", "--threads", "1"],
               menv, tmp_path / "log")
    try:
        c = s.client()
        t0 = time.perf_counter()
        full = c.completions.create(model="slow.gguf", prompt="Hello", max_tokens=1500,
                                    temperature=0)
        full_s = time.perf_counter() - t0
        assert full.choices[0].finish_reason == "length"  # no early eos: a long answer
        first = min(_first_token_s(c, 4) for _ in range(2))  # prefill + one round
        s_left = c.completions.create(model="slow.gguf", prompt="Hello", max_tokens=1500,
                                      temperature=0, stream=True)
        for i, _ in enumerate(s_left):
            if i == 3:
                break
        s_left.close()  # the client leaves with ~1500 tokens to go
        took = _first_token_s(c, 4)
        assert took < max(20 * first, 0.5) and took < full_s / 3, (took, first, full_s)
        with pytest.raises(openai.APITimeoutError):  # a non-streamed client gives up
            s.client(timeout=0.3).completions.create(model="slow.gguf", prompt="Hello",
                                                     max_tokens=1500, temperature=0)
        took = _first_token_s(c, 4)  # its job is checked on every 0.5 s
        assert took < 0.5 + max(20 * first, 0.5) and took < full_s / 2, (took, first, full_s)

        with httpx.stream("POST", s.url + "/completions", json={
                "model": "slow.gguf", "prompt": "Hello", "max_tokens": 1500, "stream": True,
                "temperature": 0}, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            s.proc.send_signal(signal.SIGTERM)
            rest = "".join(lines)
        assert s.proc.wait(timeout=30) == 0
        assert "data: [DONE]" in rest and '"interrupted"' in rest
        log = s.log.read_text()
        assert "Traceback" not in log and "specli serve: stopped" in log
    finally:
        s.stop()


def test_missing_serve_extra_is_one_line(tiny_paths, menv, tmp_path):
    fake = tmp_path / "nofastapi" / "fastapi"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no fastapi here')\n")
    env = {**menv, "PYTHONPATH": str(fake.parent)}
    p = subprocess.run([SPECLI, "serve", str(tiny_paths["target"])], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "pip install 'specli[serve]'" in p.stderr


@pytest.mark.real
def test_real_pair_greedy_equals_generate(qwen_pair, tmp_path):
    """The Qwen pair: a served greedy answer is token for token `specli generate`'s."""
    target, draft = qwen_pair
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SPECLI_API_KEY", None)
    args = [target.path, "-d", draft.path, "-m", "draft", "--budget", "fixed:4",
            "--no-history", "--ctx", "2048"]
    prompt = "Write a Python function that checks whether a number is prime."
    ref = generate_json([*args, "-p", prompt, "-n", "48"], env)
    s = Server(args, env, tmp_path / "log")
    try:
        c = s.client(timeout=300)
        msgs = [{"role": "user", "content": prompt}]
        r = c.chat.completions.create(model=Path(target.path).name, messages=msgs,
                                      max_tokens=48, temperature=0)
        assert r.choices[0].message.content == ref["text"]
        assert r.usage.completion_tokens == ref["n_generated"]
        extra = r.model_dump()["specli"]
        assert extra["tokens_per_pass"] > 1.2, extra  # the draft model's tokens are accepted
        turn = [*msgs, {"role": "assistant", "content": r.choices[0].message.content},
                {"role": "user", "content": "Now in one line."}]
        text, chunks = stream_chat(c, model=Path(target.path).name, messages=turn,
                                   max_tokens=16, temperature=0)
        last = chunks[-1].model_dump()
        assert text and last["specli"]["prompt_tokens_reused"] >= r.usage.prompt_tokens - 4
    finally:
        assert s.stop() == 0


def test_every_request_fits_the_threads_first(tiny_paths, monkeypatch, tmp_path):
    """serve lives on between requests: each one first sets the default thread counts
    to the cores other processes left free (Loaded.fit_threads, as chat does per turn;
    tests/test_cores.py shows that on a spinning neighbour), then generates."""
    import asyncio

    from specli import runtime
    from specli.backends.base import LoadOptions
    from specli.openai_api import parse_request
    from specli.serve_worker import Job, Worker

    monkeypatch.setenv("SPECLI_HOME", str(tmp_path))
    loaded = runtime.load(str(tiny_paths["target"]), None, "none", LoadOptions(n_ctx=256),
                          history=False)
    calls: list[str] = []
    monkeypatch.setattr(loaded, "fit_threads", lambda: calls.append("fit"))
    stream = loaded.engine.stream

    def recorded(*args, **kwargs):
        calls.append("generate")
        return stream(*args, **kwargs)

    monkeypatch.setattr(loaded.engine, "stream", recorded)
    worker = Worker(loaded, draft_max=4, queue_size=2)
    loop = asyncio.new_event_loop()
    try:
        for _ in range(2):
            worker._run(Job(parse_request({"prompt": "hi", "max_tokens": 2}, "completion", 8),
                            loop))
    finally:
        loop.close()
        loaded.close()
    assert calls == ["fit", "generate", "fit", "generate"]
