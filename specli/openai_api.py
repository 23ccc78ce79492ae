"""OpenAI's wire format for `specli serve`, free of the web framework: request parsing
with OpenAI's error JSON, response and stream-chunk shapes, and stop strings.

Kept apart from specli/serve.py so every rule a client can trip over is a pure
function that can be read (and tested) without a server.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .engine import Result
from .sampling import SamplingParams


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class GenRequest:
    """One completion request, validated: what the generation thread needs."""

    kind: str  # "chat" or "completion"
    prompt: str | None
    messages: list[dict[str, str]] | None
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    model: str | None
    include_usage: bool = False  # streamed: a last chunk with usage (stream_options)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad bytes, bad JSON, nesting too deep
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ApiError(400, f"the request body is not valid JSON: {why}",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _bad(param: str, what: str, got: Any) -> ApiError:
    try:
        shown = json.dumps(got)[:80]
    except (RecursionError, ValueError):  # parsed, yet nested too deeply to write back
        shown = f"a deeply nested {type(got).__name__}"
    return ApiError(400, f"'{param}' must be {what} (got {shown})", param=param,
                    code="invalid_value")


def _text(v: str, param: str) -> str:
    """A string the tokenizer can take: valid JSON may still hold a lone surrogate
    escape ("\\ud83d", half an emoji cut by a client), which has no UTF-8."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' must be valid Unicode text (it holds a lone "
                       "surrogate, e.g. half of an emoji)", param=param,
                       code="invalid_value") from None
    return v


def _number(body: dict[str, Any], name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, "a number", v)
    try:
        f = float(v)
    except OverflowError:  # an integer of hundreds of digits: valid JSON, no float
        raise _bad(name, "a number", v) from None
    if not math.isfinite(f):
        raise _bad(name, "a number", v)
    return f


def _integer(body: dict[str, Any], name: str) -> int | None:
    """An integer; a whole float (8.0, as JavaScript clients write 8) is one too."""
    v = body.get(name)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise _bad(name, "an integer", v)
    return v


def _sampling(body: dict[str, Any]) -> SamplingParams:
    """temperature (default 1.0, as OpenAI's), top_p, top_k (an extension) and seed.
    top_p 0 keeps only the likeliest token (top_k 1); a negative seed (clients of
    llama.cpp's server send -1) means none: a fresh one each request."""
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:  # OpenAI's range: past 2 an answer is noise
        raise _bad("temperature", "a number from 0 to 2", temperature)
    top_p = _number(body, "top_p", 1.0)
    if not 0 <= top_p <= 1:
        raise _bad("top_p", "a number from 0 to 1", top_p)
    top_k = _integer(body, "top_k") or 0
    if top_k < 0:
        raise _bad("top_k", "an integer >= 0", top_k)
    if top_p == 0:
        top_p, top_k = 1.0, 1
    seed = _integer(body, "seed")
    if seed is not None and seed < 0:
        seed = None
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def _max_tokens(body: dict[str, Any], cap: int) -> int:
    """max_tokens (or max_completion_tokens): at least 1; above `cap` it is lowered to
    it (clients often send their own large default); absent: the cap."""
    name = "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens"
    v = _integer(body, name)
    if v is None:
        return cap
    if v < 1:
        raise _bad(name, "an integer >= 1", v)
    return min(v, cap)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if (not isinstance(items, list) or len(items) > 4
            or not all(isinstance(s, str) for s in items)):
        raise _bad("stop", "a string or a list of up to 4 of them", v)
    return tuple(_text(s, "stop") for s in items if s)  # "" stops nothing


def _content(v: Any, i: int) -> str:
    """A message's content: a string, a list of text parts, or (an assistant's) null."""
    if v is None:
        return ""
    if isinstance(v, str):
        return _text(v, f"messages[{i}].content")
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                   and isinstance(p.get("text"), str) for p in v):
        return _text("".join(p["text"] for p in v), f"messages[{i}].content")
    raise _bad(f"messages[{i}].content", "a string or a list of text parts", v)


ROLES = ("system", "developer", "user", "assistant")  # tool messages: tools are refused


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    v = body.get("messages")
    if not isinstance(v, list) or not v:
        raise _bad("messages", "a non-empty list of messages", v)
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "an object with a string 'role'", m)
        if m["role"] not in ROLES:
            raise _bad(f"messages[{i}].role", "one of " + ", ".join(ROLES), m["role"])
        # only an assistant's content may be null (it called a tool instead)
        if m.get("content") is None and m["role"] != "assistant":
            raise _bad(f"messages[{i}].content", "a string or a list of text parts", None)
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _prompt(body: dict[str, Any]) -> str:
    v = body.get("prompt")
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    if isinstance(v, list) and v:  # a batch, or token ids (OpenAI takes both)
        raise _bad("prompt", "one non-empty string (several prompts, and prompts as "
                   "token ids, are not supported)", v)
    if not isinstance(v, str) or not v.strip():
        raise _bad("prompt", "a non-empty string", v)
    return _text(v, "prompt")


# Parameters that would change the answer or its shape and that specli does not do:
# refused when set to anything but their neutral value (clients often send defaults).
UNSUPPORTED: dict[str, Any] = {
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none", "auto"),
    "function_call": lambda v: v not in (None, "none", "auto"),
    "response_format": lambda v: v is not None and not (isinstance(v, dict)
                                                       and v.get("type") == "text"),
    "echo": lambda v: bool(v),
    "best_of": lambda v: v not in (None, 1),
    "suffix": lambda v: bool(v),
    "logit_bias": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0),
    "frequency_penalty": lambda v: v not in (None, 0),
}


# ...and in a completion request, where logprobs is a count (0 still asks for the
# chosen token's); and the ones only ever set to ask for something other than text
COMPLETION_UNSUPPORTED: dict[str, Any] = {
    **UNSUPPORTED, "logprobs": lambda v: v is not None and v is not False}
OUTPUT_UNSUPPORTED: dict[str, Any] = {
    "modalities": lambda v: v is not None and v != ["text"],
    "audio": lambda v: v is not None,
}


def _refuse_unsupported(body: dict[str, Any], kind: str) -> None:
    rules = {**(COMPLETION_UNSUPPORTED if kind == "completion" else UNSUPPORTED),
             **OUTPUT_UNSUPPORTED}
    for name, used in rules.items():
        if name in body and used(body[name]):
            raise ApiError(400, f"specli serve does not support '{name}' (only its default)",
                           param=name, code="unsupported_parameter")


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    """stream_options.include_usage: a streamed answer then ends with a chunk of usage."""
    v = body.get("stream_options")
    if v is None:
        return False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true",
                       param="stream_options", code="invalid_value")
    include = v.get("include_usage") if isinstance(v, dict) else None
    if not isinstance(v, dict) or not isinstance(include, (bool, type(None))):
        raise _bad("stream_options", 'an object like {"include_usage": true}', v)
    return bool(include)  # null: the default, as for stream


def parse_request(body: dict[str, Any], kind: str, max_tokens_cap: int) -> GenRequest:
    """A chat or completion request, checked field by field (400 naming the field)."""
    n = _integer(body, "n")
    if n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_value")
    _refuse_unsupported(body, kind)
    stream = body.get("stream")
    stream = False if stream is None else stream  # null: the default, as OpenAI's schema has it
    if not isinstance(stream, bool):
        raise _bad("stream", "true or false", stream)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "a string", model)
    return GenRequest(
        kind=kind,
        prompt=_prompt(body) if kind == "completion" else None,
        messages=_messages(body) if kind == "chat" else None,
        max_tokens=_max_tokens(body, max_tokens_cap), params=_sampling(body),
        stop=_stop(body), stream=stream, model=model, include_usage=_include_usage(body, stream))


class StopScanner:
    """Finds stop strings in streamed text: holds back a tail that could still become
    one, so nothing past a stop string is ever sent."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""
        self.hit = False
        self.sent = 0  # characters returned so far
        self.end = 0  # once hit: where the first stop string to complete ends, in characters

    def push(self, text: str) -> str:
        """The text safe to send now (everything before a stop string, once found)."""
        self.pending += text
        if not self.stops or self.hit:
            return self._release(0 if self.hit else len(self.pending))
        found = [(i, i + len(s)) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if found:
            self.hit = True
            self.end = self.sent + min(end for _, end in found)
            return self._release(min(start for start, _ in found))
        hold = max((n for s in self.stops for n in range(1, len(s))
                    if self.pending.endswith(s[:n])), default=0)
        return self._release(len(self.pending) - hold, keep=True)

    def flush(self) -> str:
        return self._release(0 if self.hit else len(self.pending))

    def _release(self, cut: int, keep: bool = False) -> str:
        """pending[:cut] is sent; the rest is kept (keep) or dropped."""
        out = self.pending[:cut]
        self.pending = self.pending[cut:] if keep else ""
        self.sent += len(out)
        return out


def finish_reason(stop_reason: str) -> str:
    """OpenAI's finish_reason: "length" when a limit cut the answer, else "stop"."""
    return "length" if stop_reason in ("length", "context") else "stop"


def usage(n_prompt: int, res: Result) -> dict[str, int]:
    n = len(res.tokens)
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


def specli_stats(res: Result) -> dict[str, Any]:
    """What speculative decoding did for this answer (an extension field)."""
    s = res.stats
    return {"method": res.method, "stop_reason": res.stop_reason,
            "acceptance_rate": round(s.acceptance_rate, 4),
            "tokens_per_pass": round(s.mean_accepted, 4),
            "target_forwards": s.target_forwards, "rounds_by": dict(s.rounds_by),
            "prompt_tokens_reused": s.n_prompt - s.n_prefilled - 1 if s.n_prompt else 0,
            "decode_tok_s": round(s.decode_tok_s, 2)}


@dataclass
class Answer:
    """The response's identity, shared by every chunk of one streamed answer."""

    kind: str
    model: str
    usage_asked: bool = False  # stream_options.include_usage: every chunk has "usage"
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        self.id = self.id or prefix + uuid.uuid4().hex[:24]
        self.created = self.created or int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def full(self, text: str, finish: str, use: dict[str, int],
             extra: dict[str, Any]) -> dict[str, Any]:
        """The whole (non-streamed) answer."""
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                              "content": text}}
            head = self._head("chat.completion")
        else:
            choice, head = {"index": 0, "text": text}, self._head("text_completion")
        choice |= {"finish_reason": finish, "logprobs": None}
        return head | {"choices": [choice], "usage": use, "specli": extra}

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        """The chunk after the last one when the client asked for usage (OpenAI's
        stream_options.include_usage): no choices, the usage."""
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._head(kind) | {"choices": [], "usage": use}

    def chunk(self, text: str | None, finish: str | None = None, *, role: bool = False,
              use: dict[str, int] | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """One streamed chunk; the last one carries finish_reason and stats."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
            head = self._head("chat.completion.chunk")
        else:
            choice, head = {"index": 0, "text": text or ""}, self._head("text_completion")
        choice |= {"finish_reason": finish, "logprobs": None}
        out = head | {"choices": [choice]}
        if use is not None or self.usage_asked:  # null until the usage chunk (OpenAI's)
            out["usage"] = use
        if extra is not None:
            out["specli"] = extra
        return out


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event."""
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


SSE_DONE = "data: [DONE]\n\n"
