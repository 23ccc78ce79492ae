"""Measure what verification and drafting cost on this machine, once, and cache it.

The cost of one target pass over k tokens is not linear in k and differs by an order
of magnitude between a CPU and a GPU, so the budget needs it measured for the exact
model file, runtime, device settings and thread count.  The result is cached in
$SPECLI_HOME/calibration/ and reused until any of those change, or until a few plain
steps timed at load disagree with it (it was measured on a busy machine, say).

For duo (drafting beside verification) the pair is also measured side by side: how much
slower a target pass runs while the drafter drafts next to it, and what a drafted token
costs meanwhile.  On one CPU the two share cores and memory bandwidth; with the target
on a GPU they should barely meet.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, fields, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from .backends.base import Backend, LoadOptions
from .budget import CostModel
from .cpu_load import MIN_WINDOW_S, CpuTimes, busy_elsewhere, read_cpu_times
from .registry import specli_home
from .sampling import SamplingParams, draft_token
from .threads import TAKEN_FROM, release_openmp_threads

K_MAX = 16  # verify costs measured for 1..K_MAX tokens; the budget extrapolates beyond
REPEATS = 5
CONTEXT = (
    "The quick brown fox jumps over the lazy dog. Speculative decoding drafts several "
    "tokens and verifies them in one pass of the target model, keeping its output exact."
)


def _file_id(path: str) -> dict:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}


def cache_key(target: Backend, draft: Backend | None, opts: LoadOptions,
              draft_opts: LoadOptions | None = None, overlap: bool = False) -> str:
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
    if overlap or draft_opts is not None:  # keys of the earlier calibrations stay as they were
        ident["draft_threads"] = getattr(draft, "n_threads", None)
        ident["draft_opts"] = asdict(draft_opts) if draft_opts is not None else None
        ident["overlap"] = overlap
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


def measure(target: Backend, draft: Backend | None, k_max: int = K_MAX,
            overlap: bool = False) -> CostModel:
    """Median time of a target pass over n = 1..k_max tokens (logits for all of them,
    as verification asks) and of one drafted token, back to back and in a round right
    after a target pass (`measure_draft_round`), at a short context; with a draft,
    also which way it reads a short catch-up faster (`measure_catch_up`); with
    `overlap`, also both side by side (`measure_overlap`); and what a change of pass
    shape costs the plain steps after it (`measure_shape_change`)."""
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
    shape_change = measure_shape_change(target, filler, base, min(4, k_max - 1))
    target.truncate(0)
    draft_alone = catch_up = 0.0
    if draft is not None:
        room = max(1, draft.n_ctx - 4 * REPEATS - 4)
        dctx = draft.tokenize(CONTEXT, add_bos=draft.add_bos)[:room]
        draft.truncate(0)
        draft.eval(dctx)
        samples = []
        dfill = dctx * (2 + 4 * REPEATS)  # the draft's own tokens: its vocabulary may differ
        for tok in dfill[: 2 + 4 * REPEATS]:
            samples.append(_timed(lambda tok=tok: draft.eval([tok], [0])))
        draft_alone = statistics.median(samples[2:])
        draft.truncate(0)
        # catching up: reading context tokens in one batch
        batch = (dctx * 8)[: min(64, draft.n_ctx - 1)]
        catch_up = statistics.median(
            _timed(lambda: (draft.truncate(0), draft.eval(batch))) for _ in range(REPEATS)
        ) / len(batch)
        draft.truncate(0)
    cost = CostModel(verify=verify, draft=draft_alone, draft_alone=draft_alone,
                     catch_up=catch_up, shape_change=shape_change)
    if draft is not None:
        # a round's drafting never costs less than back-to-back steps: a dip is noise
        cost.draft = max(draft_alone, measure_draft_round(target, draft))
        cost.round_batched, cost.round_stepwise = measure_catch_up(draft)
    if overlap and draft is not None:
        cost.overlap_verify, cost.overlap_draft = measure_overlap(target, draft)
    return cost


# tokens drafted per round in `measure_draft_round`.  Short, as the drafts whose cost
# decides whether to draft at all: the cold first step weighs more the shorter the draft
# (27M timing drafter on the AMX VM, against back to back: 2.1-2.2x a token in rounds of
# 1, 1.7-1.9x of 2, 1.6-1.7x of 4, and 2.3-2.6x inside the bench, where rounds drafted
# about 2); the budget learns the rest online.
ROUND_DRAFTS = 2
GREEDY = SamplingParams()


def measure_draft_round(target: Backend, draft: Backend, k: int = ROUND_DRAFTS) -> float:
    """Median seconds per drafted token over rounds that each begin with a target pass
    over k + 1 tokens (logits for all, as verification asks) and then draft k tokens
    one at a time (k: ROUND_DRAFTS unless asked), as a drafting round does after the previous
    round's verification: the pass's rows and each step's logits read in between (an
    argmax, the greedy drafter's confidence), only the steps timed.  Why not back-to-back
    steps alone: on a CPU a drafter that fits the caches loses them to what runs between
    its steps (the 27M timing drafter's step cost 2.3-2.6x after a target pass,
    SmolLM2-135M's 1.12x, a 0.5B's 1.01x; scripts/cold_draft_step.py), so the budget
    planned its first rounds at half their cost until it had learnt better.  With the
    target on a GPU the two should agree."""
    k = max(1, min(k, target.n_ctx // 2 - 1, draft.n_ctx // 2))
    tctx = target.tokenize(CONTEXT, add_bos=target.add_bos)[: max(1, target.n_ctx - k - 2)]
    dctx = draft.tokenize(CONTEXT, add_bos=draft.add_bos)[: max(1, draft.n_ctx - k - 1)]
    tfill, dfill = (tctx * (k + 2))[: k + 1], (dctx * (k + 1))[:k]
    target.truncate(0)
    target.eval(tctx)
    draft.truncate(0)
    draft.eval(dctx)
    per_token = []
    for _ in range(REPEATS + 1):  # the first round settles both models' shapes
        rows = target.eval(tfill, range(k + 1))
        target.truncate(len(tctx))
        np.argmax(rows, axis=1)  # verification reads the pass's rows
        seconds = 0.0
        for tok in dfill:
            t0 = time.perf_counter()
            logits = draft.eval([tok], [0])
            seconds += time.perf_counter() - t0
            draft_token(logits[0], GREEDY, None)  # its token and confidence, as drafting does
        per_token.append(seconds / k)
        draft.truncate(len(dctx))
    target.truncate(0)
    draft.truncate(0)
    return statistics.median(per_token[1:])


def measure_shape_change(target: Backend, filler: list[int], base: int, n: int) -> float:
    """Extra seconds two plain steps take right after a pass over n tokens, beside two
    after plain steps (a block of rounds each way).  For --stats and the GPU check: about
    0 on a CPU; llama.cpp on CUDA runs the first step without its captured graph and
    captures it again in the second, and verification passes change shape often."""
    if n < 2:
        return 0.0

    def two_steps(after: int) -> float:
        target.eval(filler[:after], range(after))
        t0 = time.perf_counter()
        target.eval(filler[after:after + 1], [0])
        target.eval(filler[after + 1:after + 2], [0])
        seconds = time.perf_counter() - t0
        target.truncate(base)
        return seconds

    steady = [two_steps(1) for _ in range(REPEATS + 1)][1:]  # the first settles the shape
    changed = [two_steps(n) for _ in range(REPEATS + 1)][1:]
    return max(0.0, statistics.median(changed) - statistics.median(steady))


def measure_catch_up(draft: Backend) -> tuple[float, float]:
    """Median seconds of a drafting round that first reads two tokens (as after a fully
    accepted draft: its last token and the target's) then drafts three: with the two
    read in one batch, and read as two steps.  Each way in a block of rounds of its
    own, so that a runtime keeping a graph per shape (llama.cpp's CUDA backend) shows
    its steady state both ways: changing shape between batch and steps, or never."""
    room = max(8, draft.n_ctx - 16)
    base = draft.tokenize(CONTEXT, add_bos=draft.add_bos)[: max(1, room - 8)]
    fresh = (base * 5)[:5]
    draft.truncate(0)
    draft.eval(base)

    def one_round(stepwise: bool) -> float:
        t0 = time.perf_counter()
        if stepwise:
            draft.eval(fresh[:1], [0])
            draft.eval(fresh[1:2], [0])
        else:
            draft.eval(fresh[:2], [1])
        for tok in fresh[2:]:
            draft.eval([tok], [0])
        seconds = time.perf_counter() - t0
        draft.truncate(len(base))
        return seconds

    rounds = {}
    for stepwise in (False, True):
        times = [one_round(stepwise) for _ in range(REPEATS + 2)]
        rounds[stepwise] = statistics.median(times[2:])  # two to settle into the shape
    draft.truncate(0)
    return rounds[False], rounds[True]


OVERLAP_SIZES = (1, 2, 4, 8)  # verify passes timed beside the drafter (and without)


class _Pause:
    """Pauses a worker loop between its steps, with a handshake.  Why not a plain Lock
    around each step: a thread that releases a Lock and takes it again at once usually
    wins it back, so the other side starved (calibration took minutes beside a fast
    drafter on a GPU machine)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._want = self._paused = self._stopped = False

    def checkpoint(self) -> bool:
        """Worker, between steps: wait while paused; False once stopped."""
        with self._cond:
            while self._want and not self._stopped:
                self._paused = True
                self._cond.notify_all()
                self._cond.wait()
            self._paused = False
            return not self._stopped

    def hold(self, timeout: float = 10.0) -> None:
        """Ask the worker to pause; return once it has finished its current step."""
        with self._cond:
            self._want = True
            self._cond.wait_for(lambda: self._paused or self._stopped, timeout)

    def release(self) -> None:
        with self._cond:
            self._want = False
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


def measure_overlap(target: Backend, draft: Backend) -> tuple[float, float]:
    """Target passes over 1, 2, 4 and 8 tokens timed in pairs: once with the drafter
    paused, once while another thread drafts without pause (one token at a time, as
    duo's drafter does).  Pairs, so that whatever else loads the machine weighs on both.
    Returns (median slowdown of a pass, at least 1; median seconds per token drafted
    beside it)."""
    ctx = target.tokenize(CONTEXT, add_bos=target.add_bos)[: max(1, target.n_ctx - 17)]
    dctx = draft.tokenize(CONTEXT, add_bos=draft.add_bos)[: max(1, draft.n_ctx - 40)]
    target.truncate(0)
    target.eval(ctx)
    draft.truncate(0)
    draft.eval(dctx)
    pause = _Pause()
    steps: list[float] = []

    def drafting() -> None:  # this thread alone touches the draft model meanwhile
        i = 0
        while pause.checkpoint():
            if i % 16 == 0:
                draft.truncate(len(dctx))
            tok = dctx[i % len(dctx)]
            steps.append(_timed(lambda tok=tok: draft.eval([tok], [0])))
            i += 1

    worker = threading.Thread(target=drafting, name="specli-calibrate-drafter", daemon=True)
    worker.start()
    try:
        ratios = []
        filler = (ctx * 8)[: max(OVERLAP_SIZES)]
        for n in OVERLAP_SIZES:
            def once(n: int = n) -> None:
                target.eval(filler[:n], range(n))
                target.truncate(len(ctx))
            once()
            alone, beside = [], []
            for _ in range(REPEATS):
                pause.hold()
                alone.append(_timed(once))
                pause.release()
                time.sleep(0.005)  # the drafter is under way again
                beside.append(_timed(once))
            ratios.append(statistics.median(beside) / statistics.median(alone))
    finally:
        pause.stop()
        worker.join()
    target.truncate(0)
    draft.truncate(0)
    drafted = statistics.median(steps[2:]) if len(steps) > 2 else 0.0
    return max(1.0, statistics.median(ratios)), drafted


# A cached calibration is checked against a few plain steps timed now: one measured while
# the machine was busy (or on other power settings) would otherwise steer every later run.
RECHECK_STEPS = 3
STALE_RATIO = 1.5  # re-measure when a plain step now takes over 1.5x more, or less
MIN_CHECKED_STEP_S = 0.002  # shorter steps are too noisy to judge by 3 samples


def plain_step(target: Backend) -> float:
    """Median time of one plain decoding step now, at a short context."""
    ctx = target.tokenize(CONTEXT, add_bos=target.add_bos)
    ctx = ctx[: max(1, min(len(ctx), target.n_ctx - RECHECK_STEPS - 2))]
    target.truncate(0)
    target.eval(ctx)
    times = [_timed(lambda t=t: target.eval([t], [0])) for t in (ctx * 4)[: RECHECK_STEPS + 1]]
    target.truncate(0)
    return statistics.median(times[1:])  # the first is a warm-up


def is_stale(cached_step: float, step_now: float, ratio: float = STALE_RATIO) -> bool:
    """Whether a plain step timed now disagrees with the cached one by more than `ratio`."""
    if cached_step < MIN_CHECKED_STEP_S or step_now <= 0:
        return False
    return not (1 / ratio <= step_now / cached_step <= ratio)


def cost_from_json(data: dict) -> CostModel:
    """A cached cost model, field by field (TypeError or ValueError when it is not one;
    fields an older file lacks take their defaults)."""
    names = {f.name for f in fields(CostModel)}
    cost = CostModel(**{k: v for k, v in data.items() if k in names})
    return replace(cost, verify=[float(v) for v in cost.verify],
                   **{n: float(getattr(cost, n)) for n in names - {"verify"}})


def calibration_path(key: str) -> Path:
    return specli_home() / "calibration" / f"{key}.json"


def load_or_measure(
    target: Backend, draft: Backend | None, opts: LoadOptions, *, force: bool = False,
    draft_opts: LoadOptions | None = None, overlap: bool = False,
    note: Callable[[str], None] | None = None,
) -> tuple[CostModel, bool]:
    """The cached cost model, or a fresh measurement (saved atomically, unless other
    processes kept a core busy meanwhile), applied to the draft model
    (`catch_up_stepwise`).  `draft_opts`: where the draft runs when it differs from
    `opts`; `overlap`: also measure the pair side by side (duo); `note`: told when a
    measurement is not saved.  Returns (model, measured_now)."""
    try:
        return _load_or_measure(target, draft, opts, force, draft_opts, overlap, note)
    finally:  # the models ran on this thread: hand its OpenMP workers back meanwhile
        release_openmp_threads()


def _load_or_measure(
    target: Backend, draft: Backend | None, opts: LoadOptions, force: bool,
    draft_opts: LoadOptions | None, overlap: bool, note: Callable[[str], None] | None,
) -> tuple[CostModel, bool]:
    path = calibration_path(cache_key(target, draft, opts, draft_opts, overlap))
    if not force and path.exists():
        try:
            data = json.loads(path.read_text("utf-8"))
            cost = cost_from_json(data)
            cached = cost.verify[0]
            # measured before catch-ups were timed, or drafting in rounds
            older = draft is not None and not ("round_batched" in data and "draft_alone" in data)
            if not older and (cached < MIN_CHECKED_STEP_S
                              or not is_stale(cached, plain_step(target))):
                return _applied(cost, draft), False
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass  # unreadable cache: measure again
    before = read_cpu_times()
    cost = measure(target, draft, overlap=overlap)
    busy = disturbed(before, read_cpu_times())
    if busy is not None:  # costs timed beside a busy neighbour: good for this run only
        if note is not None:
            note(f"note: other processes kept {busy:.1f} cores busy while calibrating, so "
                 "these costs are used but not saved (measured again next time)")
        return _applied(cost, draft), True
    record = {
        **asdict(cost),
        "target": target.path,
        "draft_model": draft.path if draft is not None else None,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _save(path, record, note)
    return _applied(cost, draft), True


def _save(path: Path, record: dict, note: Callable[[str], None] | None) -> None:
    """Write a calibration atomically.  The cache only saves measuring next time, so a
    place it cannot be written ($SPECLI_HOME under a file, read-only) is a warning."""
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=1), "utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            tmp.unlink()
        if note is not None:
            note(f"warning: cannot save the calibration to {path}: {e.strerror or e}; "
                 "it is used but measured again next time")


def disturbed(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """Cores' worth other processes used during a calibration, when enough to count a
    core as taken (specli.threads.TAKEN_FROM): a calibration saved then would hold
    slow costs until a plain step disagreed by 1.5x.  None: undisturbed, or unknown."""
    if before is None or after is None or after.at - before.at < MIN_WINDOW_S:
        return None
    busy = busy_elsewhere(before, after)
    return busy if busy >= TAKEN_FROM else None


def _applied(cost: CostModel, draft: Backend | None) -> CostModel:
    """The draft model reads short catch-ups the way measured faster where it runs."""
    if draft is not None:
        draft.catch_up_stepwise = cost.catch_up_stepwise
    return cost

