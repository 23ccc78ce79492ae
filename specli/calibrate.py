"""Measure what verification and drafting cost on this machine, once, and cache it.

The cost of one target pass over k tokens is not linear in k and differs by an order
of magnitude between a CPU and a GPU, so the budget needs it measured for the exact
model file, runtime, device settings and thread count.  The result is cached in
$SPECLI_HOME/calibration/ and reused until any of those change.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .backends.base import Backend, LoadOptions
from .budget import CostModel
from .registry import specli_home

K_MAX = 16  # verify costs measured for 1..K_MAX tokens; the budget extrapolates beyond
REPEATS = 5
CONTEXT = (
    "The quick brown fox jumps over the lazy dog. Speculative decoding drafts several "
    "tokens and verifies them in one pass of the target model, keeping its output exact."
)


def _file_id(path: str) -> dict:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}


def cache_key(target: Backend, draft: Backend | None, opts: LoadOptions) -> str:
    ident = {
        "target": _file_id(target.path),
        "draft": _file_id(draft.path) if draft is not None else None,
        "backend": target.name,
        "draft_backend": draft.name if draft is not None else None,
        "runtime": [_runtime_version(m) for m in (target, draft) if m is not None],
        "threads": getattr(target, "n_threads", None),
        "opts": asdict(opts),
        "k_max": K_MAX,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _runtime_version(model: Backend) -> str:
    package = {"llama.cpp": "llama_cpp_python", "onnxruntime": "onnxruntime"}.get(model.name)
    try:
        return f"{model.name} {version(package)}" if package else model.name
    except PackageNotFoundError:
        return f"{model.name} unknown"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(target: Backend, draft: Backend | None, k_max: int = K_MAX) -> CostModel:
    """Median time of a target pass over n = 1..k_max tokens (logits for all of them,
    as verification asks) and of one drafted token, at a short context."""
    k_max = max(1, min(k_max, target.n_ctx // 2))  # a tiny --ctx still calibrates
    ctx = target.tokenize(CONTEXT, add_bos=target.add_bos)[: max(1, target.n_ctx - k_max - 1)]
    filler = (ctx * (k_max // max(len(ctx), 1) + 2))[: k_max + 1]
    target.truncate(0)
    target.eval(ctx)
    base = len(ctx)

    def verify_once(n: int) -> None:
        target.eval(filler[:n], range(n))
        target.truncate(base)

    verify_once(min(4, k_max))  # warm-up: first-call allocations are not the steady state
    verify = [
        statistics.median(_timed(lambda n=n: verify_once(n)) for _ in range(REPEATS))
        for n in range(1, k_max + 1)
    ]
    # a pass over more tokens never costs less: a spike (another process, a page fault)
    # is clipped to the cheapest measurement of any longer pass
    for i in range(k_max - 2, -1, -1):
        verify[i] = min(verify[i], verify[i + 1])
    target.truncate(0)
    draft_cost = catch_up = 0.0
    if draft is not None:
        room = max(1, draft.n_ctx - 4 * REPEATS - 4)
        dctx = draft.tokenize(CONTEXT, add_bos=draft.add_bos)[:room]
        draft.truncate(0)
        draft.eval(dctx)
        samples = []
        dfill = dctx * (2 + 4 * REPEATS)  # the draft's own tokens: its vocabulary may differ
        for tok in dfill[: 2 + 4 * REPEATS]:
            samples.append(_timed(lambda tok=tok: draft.eval([tok], [0])))
        draft_cost = statistics.median(samples[2:])
        draft.truncate(0)
        # catching up: reading context tokens in one batch
        batch = (dctx * 8)[: min(64, draft.n_ctx - 1)]
        catch_up = statistics.median(
            _timed(lambda: (draft.truncate(0), draft.eval(batch))) for _ in range(REPEATS)
        ) / len(batch)
        draft.truncate(0)
    return CostModel(verify=verify, draft=draft_cost, catch_up=catch_up)


def calibration_path(key: str) -> Path:
    return specli_home() / "calibration" / f"{key}.json"


def load_or_measure(
    target: Backend, draft: Backend | None, opts: LoadOptions, *, force: bool = False
) -> tuple[CostModel, bool]:
    """The cached cost model, or a fresh measurement (saved atomically).
    Returns (model, measured_now)."""
    path = calibration_path(cache_key(target, draft, opts))
    if not force and path.exists():
        try:
            data = json.loads(path.read_text("utf-8"))
            cost = CostModel(list(data["verify"]), float(data["draft"]), float(data["catch_up"]))
            return cost, False
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable cache: measure again
    cost = measure(target, draft)
    record = {
        "verify": cost.verify,
        "draft": cost.draft,
        "catch_up": cost.catch_up,
        "target": target.path,
        "draft_model": draft.path if draft is not None else None,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1), "utf-8")
    os.replace(tmp, path)
    return cost, True

