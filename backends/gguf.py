"""GGUF models through llama-cpp-python's low-level API.

Why the low-level API and not `llama_cpp.Llama`: `Llama` keeps an
(n_batch x n_vocab) score buffer and, for per-position logits, needs
`logits_all=True`, which computes the LM head for every prompt token.  Here a
batch marks exactly the positions under verification, and KV rollback checks
`llama_memory_seq_rm`'s result instead of ignoring it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from .. import tree
from ..chat_template import render_chat
from ..errors import NoChatTemplate, SpecliError
from ..threads import cores_note, default_cores, target_threads
from .amx import plan_weights
from .base import LoadOptions, StepClock

GGUF_MAGIC = b"GGUF"
_FLASH = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
_KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}

# llama.cpp reports why a load failed only through its log: keep the tail of it.
_LOG_TAIL: deque[str] = deque(maxlen=40)
_LOG_LOCK = threading.Lock()
_VERBOSE = bool(os.environ.get("SPECLI_VERBOSE"))


_LOG_ERROR, _LOG_CONT = 4, 5  # ggml_log_level: an error, and a line continuing the last
_log_state = {"last": 0, "loading": 0}


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    msg = text.decode("utf-8", errors="replace")
    with _LOG_LOCK:
        _LOG_TAIL.append(msg)
        if level != _LOG_CONT:
            _log_state["last"] = level
        is_error = _log_state["last"] == _LOG_ERROR
        loading = _log_state["loading"] > 0
    # errors outside a load go to stderr: a fatal one (a CUDA error, say) aborts the
    # process right after, and its reason exists nowhere else; a failed load is
    # reported in one line from the tail instead
    if _VERBOSE or (is_error and not loading):
        os.write(2, text)


@contextlib.contextmanager
def _loading() -> Iterator[None]:
    """A load: its log kept quiet, and Ctrl-C (or SIGTERM) held until it returns.  A
    signal during a load runs its Python handler inside llama.cpp's log callback, where
    ctypes prints the KeyboardInterrupt and drops it: the load, and the whole answer,
    went on and the run ended 0.  Held, it stops the run once the load is back."""
    with _LOG_LOCK:
        _log_state["loading"] += 1
    held: list[int] = []
    saved = _hold_signals(held)
    try:
        yield
    finally:
        with _LOG_LOCK:
            _log_state["loading"] -= 1
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if held:  # the restored handler acts on it now (`kill` exits 143, Ctrl-C 130)
            signal.raise_signal(held[0])
            raise KeyboardInterrupt  # a handler that returned: the run still stops


def _hold_signals(held: list[int]) -> dict[int, Any]:
    """Note SIGINT and SIGTERM in `held` instead of acting on them; returns the handlers
    to put back.  Only the main thread may set handlers; ignored signals stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler not in (signal.SIG_IGN, None):
            saved[sig] = handler
            signal.signal(sig, lambda signum, frame: held.append(signum))
    return saved


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


def _last_error() -> str:
    """The most telling line llama.cpp logged, for a one-line error message."""
    with _LOG_LOCK:
        lines = [ln.strip() for ln in _LOG_TAIL if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower() or "failed" in ln.lower():
            return ln
    return lines[-1] if lines else "no details from llama.cpp"


def check_gguf_file(path: str | os.PathLike[str]) -> Path:
    """Fail early, in one line, on a missing, unreadable or non-GGUF file."""
    p = Path(path)
    if not p.exists():
        raise SpecliError(f"model file not found: {p}")
    if p.is_dir():
        raise SpecliError(f"model path is a directory, not a GGUF file: {p}")
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SpecliError(f"cannot read model file {p}: {e.strerror or e}") from None
    if magic != GGUF_MAGIC:
        raise SpecliError(f"not a GGUF file (bad magic {magic!r}): {p}")
    return p


def default_threads() -> int:
    """Every core this process may use, less those other processes keep busy (see
    specli.threads)."""
    return default_cores()


def placement(n_gpu_layers: int, threads: int) -> str:
    """Where llama.cpp runs a model, in words (a build without GPU support ignores -ngl)."""
    some = f"{threads} thread{'s' * (threads != 1)}"
    if n_gpu_layers > 0 and llama_cpp.llama_supports_gpu_offload():
        return f"llama.cpp GPU ({n_gpu_layers} layers offloaded), {some} on the CPU"
    return f"llama.cpp CPU, {some}"


class GGUFModel:
    """One llama.cpp model and context holding a single KV sequence (seq 0)."""

    name = "llama.cpp"

    def __init__(self, path: str | os.PathLike[str], opts: LoadOptions | None = None) -> None:
        opts = opts or LoadOptions()
        _init_backend()
        p = check_gguf_file(path)
        self.path = str(p)
        self._model = None
        self._ctx = None
        self._batch = None

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        self._weights = plan_weights(self.path, opts.n_gpu_layers if gpu else 0)
        if self._weights:
            self._weights.apply(mparams)
        with _loading():
            self._model = llama_cpp.llama_model_load_from_file(self.path.encode(), mparams)
        if not self._model:
            raise SpecliError(f"llama.cpp could not load {p.name}: {_last_error()}")

        n_train = llama_cpp.llama_model_n_ctx_train(self._model)
        self.n_ctx = min(opts.n_ctx, n_train) if n_train > 0 else opts.n_ctx
        self.n_batch = max(1, min(opts.n_batch, self.n_ctx))
        # the GPU runs every layer and the output head: a couple of CPU threads feed it
        whole = (opts.n_gpu_layers > llama_cpp.llama_model_n_layer(self._model)
                 and bool(llama_cpp.llama_supports_gpu_offload()))
        threads = opts.n_threads or target_threads(default_threads(), whole)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        self._branches = max(1, opts.branches)
        cparams.n_seq_max = self._branches
        # one cell buffer for all sequences: branches share the prefix's cells
        cparams.kv_unified = self._branches > 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        cparams.flash_attn_type = _FLASH[opts.flash_attn]
        cparams.type_k = cparams.type_v = _KV_TYPES[opts.kv_type]
        if opts.n_gpu_layers == 0:  # keep everything on the CPU, KV included
            cparams.offload_kqv = False
            cparams.op_offload = False
        with _loading():
            self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise SpecliError(f"llama.cpp could not create a context for {p.name}: {_last_error()}")
        self.n_threads = threads
        self._whole = whole
        self._gpu_layers = opts.n_gpu_layers
        self._threads_given = opts.n_threads is not None
        self.placement = placement(opts.n_gpu_layers, threads)
        note = None if self._threads_given else cores_note()
        if self._weights:
            note = f"{note}; {self._weights.note}" if note else self._weights.note
        if note:
            self.placement += f" ({note})"
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.bos = bos if bos >= 0 else None
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, self._branches)
        # an evaluated tree awaiting keep_path: first node position, tokens, sequences
        self._tree: tuple[int, list[int], list[list[int]], int] | None = None
        self.tokens: list[int] = []
        self.step_clock = StepClock()
        self.catch_up_stepwise = 0
        self._piece_cache: dict[tuple[int, bool], bytes] = {}

    # -- tokenizer -----------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_bos, special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_bos, special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        key = (token, special)
        piece = self._piece_cache.get(key)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
            piece = buf.raw[:n]
            self._piece_cache[key] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def vocab_texts(self) -> list[bytes]:
        get = llama_cpp.llama_vocab_get_text
        return [get(self._vocab, i) or b"" for i in range(self.n_vocab)]

    @property
    def add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return (llama_cpp.llama_vocab_get_text(self._vocab, token) or b"").decode(
            "utf-8", errors="replace"
        )

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        template = self.chat_template()
        if not template:
            raise NoChatTemplate(Path(self.path).name)
        return render_chat(
            template, messages, source=Path(self.path).name,
            eos_token=self._token_text(llama_cpp.llama_vocab_eos(self._vocab)),
            bos_token=self._token_text(llama_cpp.llama_vocab_bos(self._vocab)))

    # -- KV cache ------------------------------------------------------------------
    def eval(self, tokens: Sequence[int], logits_for: Sequence[int] = ()) -> np.ndarray:
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise SpecliError(
                f"context full: {len(self.tokens)} + {len(tokens)} tokens > --ctx {self.n_ctx}"
            )
        t0 = time.perf_counter()
        want = set(logits_for)
        rows: list[np.ndarray] = []
        b = self._batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            pos0 = len(self.tokens)
            out_idx = []
            for j, tok in enumerate(chunk):
                b.token[j] = tok
                b.pos[j] = pos0 + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                flag = (start + j) in want
                b.logits[j] = flag
                if flag:
                    out_idx.append(j)
            b.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self._ctx, b)
            if rc != 0:
                # a failed decode may leave a partial batch in the cache: drop it
                llama_cpp.llama_memory_seq_rm(self._mem, 0, pos0, -1)
                raise SpecliError(f"llama_decode failed (code {rc}): {_last_error()}")
            self.tokens.extend(chunk)
            if out_idx:
                rows.append(self._outputs(len(out_idx)).copy())
        self.step_clock.add(len(tokens), time.perf_counter() - t0)
        if not rows:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def _outputs(self, n: int) -> np.ndarray:
        """The last decode's n logits rows, in batch order: a view of llama.cpp's buffer
        (valid until the next decode), copied once by the caller.  A row at a time then
        stacked was two copies: a verify pass over a 150k vocabulary reads megabytes."""
        addr = ctypes.cast(llama_cpp.llama_get_logits(self._ctx), ctypes.c_void_p).value
        buf = (ctypes.c_float * (n * self.n_vocab)).from_address(addr)
        return np.frombuffer(buf, dtype=np.float32).reshape(n, self.n_vocab)

    def truncate(self, n: int) -> None:
        if n > len(self.tokens):
            return
        # remove even when n == len(tokens): an eval interrupted between llama_decode
        # and our bookkeeping may have left cells past the end
        if not llama_cpp.llama_memory_seq_rm(self._mem, 0, n, -1):
            raise SpecliError(
                f"KV cache rollback to {n} tokens failed for {Path(self.path).name} "
                "(recurrent or hybrid models cannot roll back partially)"
            )
        del self.tokens[n:]

    # -- candidate trees -------------------------------------------------------------
    # Each root-to-leaf branch is a KV sequence (leaf j -> seq j); a node belongs to the
    # sequences of every leaf below it, so shared prefixes are stored and computed once,
    # and llama.cpp's per-sequence causal mask is exactly tree attention.
    @property
    def max_branches(self) -> int:
        return self._branches

    def eval_tree(self, root: int, tokens: Sequence[int], parents: Sequence[int]) -> np.ndarray:
        n = len(tokens)
        depth, seqs = tree.depths(parents), tree.sequences(parents)
        n_seqs = 1 + max((s for ss in seqs for s in ss), default=0)
        if n_seqs > self._branches:
            raise SpecliError(f"a draft tree of {n_seqs} branches > {self._branches} sequences")
        if 1 + n > self.n_batch:
            raise SpecliError(f"a draft tree of {n} tokens does not fit one batch ({self.n_batch})")
        if len(self.tokens) + 1 + max(depth, default=0) + 1 > self.n_ctx:
            raise SpecliError(f"context full: {len(self.tokens)} tokens, --ctx {self.n_ctx}")
        pos0 = len(self.tokens)
        for s in range(1, n_seqs):  # every branch sees the prefix
            llama_cpp.llama_memory_seq_cp(self._mem, 0, s, -1, -1)
        b = self._batch
        rows = [(root, pos0, list(range(n_seqs)))]
        rows += [(tokens[i], pos0 + 1 + depth[i], seqs[i]) for i in range(n)]
        for j, (tok, pos, ss) in enumerate(rows):
            b.token[j], b.pos[j], b.logits[j] = tok, pos, True
            b.n_seq_id[j] = len(ss)
            for m, s in enumerate(ss):
                b.seq_id[j][m] = s
        b.n_tokens = len(rows)
        rc = llama_cpp.llama_decode(self._ctx, b)
        self._tree = (pos0 + 1, list(tokens), seqs, n_seqs)
        self.tokens.append(root)
        if rc != 0:
            self.keep_path([])
            self.truncate(pos0)
            raise SpecliError(f"llama_decode failed (code {rc}): {_last_error()}")
        return self._outputs(len(rows)).copy()

    def keep_path(self, path: Sequence[int]) -> None:
        if self._tree is None:
            raise SpecliError("keep_path without eval_tree")
        first, tokens, seqs, n_seqs = self._tree
        self._tree = None
        mem = self._mem
        end = first + len(path)
        src = seqs[path[-1]][0] if path else 0  # a branch through the last kept node
        if not llama_cpp.llama_memory_seq_rm(mem, 0, first if src else end, -1):
            raise SpecliError(f"KV cache rollback failed for {Path(self.path).name}")
        if src:
            llama_cpp.llama_memory_seq_cp(mem, src, 0, first, end)
        for s in range(1, n_seqs):
            llama_cpp.llama_memory_seq_rm(mem, s, -1, -1)
        self.tokens += [tokens[i] for i in path]

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)
        self.tokens.clear()

    def fit_free_cores(self, cores: int, why: str = "") -> None:
        """Between generations: the default thread count for `cores` free cores (a count
        the user gave stays); `why` says what left them free, for --stats."""
        if self._threads_given:
            return
        n = target_threads(cores, self._whole)
        if n != self.n_threads:
            llama_cpp.llama_set_n_threads(self._ctx, n, n)
            self.n_threads = n
        notes = "; ".join(x for x in (why, self._weights and self._weights.note) if x)
        self.placement = placement(self._gpu_layers, n) + (f" ({notes})" if notes else "")

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # models are big: free them even if close() was forgotten
        try:
            self.close()
        except Exception:
            pass
