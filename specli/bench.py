"""`specli bench`: every method against plain decoding, on the same prompts, in one process.

On a noisy CPU only ratios measured side by side mean anything, so the models load once,
each prompt runs every method back to back (`none` first: the reference) and every method
is timed alike: prefill ends at the first emitted chunk, decode runs from there to the end
of generation and counts only the tokens after that chunk.  The peers are llama-cpp-python's
own `Llama`, driven through its public API only.  The arithmetic (`summarize`) is apart from
the running so tests can check it on recorded rows.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import methods
from .budget import CostModel, parse_budget
from .engine import Engine, GenerationConfig, Result
from .errors import SpecliError
from .fidelity import analyse, first_difference
from .prompts import Prompt
from .report import calibrated_pass_ms
from .runtime import Loaded, encode_prompt
from .sampling import SamplingParams
from .threads import cores_note, cpu_name

PLOT_HINT = "install the plot extra (pip install 'specli[plot]') to get speedup.png"
WARMUP_TEXT = "Say hello."
_IDENTITY_KEYS = ("identical", "matches", "divergence_index", "gap", "noise", "explained")
_NO_IDENTITY = dict.fromkeys(_IDENTITY_KEYS)


def parse_methods(text: str) -> list[str]:
    """Comma list to methods in order (specli.methods.parse, peers allowed); `none` always
    runs first, since every ratio needs it."""
    names = [methods.parse(m, peers=True).text for m in text.split(",") if m.strip()]
    if not names:
        raise SpecliError("no method given; e.g. --methods none,draft")
    return list(dict.fromkeys(["none", *names]))


def uses_tree(names: Sequence[str]) -> bool:
    """Whether a method may verify candidate trees (the target then holds sequences)."""
    return any((m := methods.parse(n, peers=True).method) is not None and m.trees
               for n in names)


def parse_list(text: str | None) -> list[str] | None:
    """Comma list, or None (meaning all) when empty."""
    items = [c.strip() for c in (text or "").split(",") if c.strip()]
    return items or None


@dataclass
class Plan:
    prompts: list[Prompt]
    methods: list[str]
    n_tokens: int
    params: SamplingParams
    draft_max: int
    threads: int
    budget: str  # for the plain `draft` method; `draft@fixed:K` names its own
    out: Path
    repeats: int = 1  # runs of every method per prompt; the summary keeps the fastest
    meta: dict = field(default_factory=dict)  # command, models, machine: for the summary header


@dataclass
class Clock:
    """One run's timestamps, the same for every method, so decode excludes prefill and the
    first emitted chunk for all alike."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    n_first: int = 0  # tokens generated when the first chunk arrived
    end: float = 0.0

    def chunk(self, n_so_far: int) -> None:
        if self.first is None:
            self.first, self.n_first = time.perf_counter(), n_so_far

    def fields(self, n: int) -> dict:
        first = self.end if self.first is None else self.first
        decode_s, after = self.end - first, n - min(self.n_first, n)
        return {
            "prefill_s": first - self.start,
            "decode_s": decode_s,
            "decode_tok_s": after / decode_s if after > 0 and decode_s > 0 else None,
            "wall_s": self.end - self.start,
        }


Runner = Callable[[list[int], int], dict]


def specli_runner(engine: Engine, method: str, params: SamplingParams, draft_max: int,
                  calibrated: CostModel | None = None) -> Runner:
    """`calibrated`: standalone costs to set beside the run's when its budget has none
    (a fixed length)."""

    def run(prompt: list[int], n: int) -> dict:
        res = Result(method=method)
        clock = Clock()
        for _ in engine.stream(prompt, GenerationConfig(n, params, draft_max), res):
            clock.chunk(len(res.tokens))
        clock.end = time.perf_counter()
        s = res.stats
        return {
            "n_prompt": s.n_prompt, "n_generated": s.n_generated, "stop_reason": res.stop_reason,
            **clock.fields(s.n_generated), "target_forwards": s.target_forwards,
            "drafted": s.drafted, "accepted": s.accepted, "mean_accepted": s.mean_accepted,
            **costs_fields(res, calibrated), "tokens": res.tokens, "stats": s.as_dict(),
        }

    return run


def costs_fields(res: Result, fallback: CostModel | None = None) -> dict:
    """A run's own costs and the calibrated standalone ones, in milliseconds: a draft-model
    step and a target pass (the calibrated pass has the run's mean size)."""
    s, cal = res.stats, res.calibrated or fallback
    return {
        "ms_per_pass": s.ms_per_pass or None,
        "pass_size": s.pass_size or None,
        "ms_per_draft_step": s.ms_per_draft_step or None,
        "draft_steps": s.draft_steps,
        "draft_batches": s.draft_batches if s.draft_steps else None,
        # all of drafting, per drafted token: model steps and specli's own work around them
        "ms_per_drafted_token": s.ms_per_drafted_token or None,
        "ms_per_round_other": s.ms_per_round_other or None,
        "calibrated_ms_per_pass": calibrated_pass_ms(s, cal) if cal is not None else None,
        # a step right after a target pass, as a drafting round pays it; and back to back
        "calibrated_ms_per_draft_step": 1000 * cal.draft if cal is not None and cal.draft
        else None,
        "calibrated_ms_per_draft_step_back_to_back": 1000 * cal.draft_alone
        if cal is not None and cal.draft_alone else None,
        # duo's pair was also timed side by side: a step while a target pass runs beside it
        "calibrated_ms_per_draft_step_beside": 1000 * cal.overlap_draft
        if cal is not None and cal.overlap_draft else None,
    }


class Peer:
    """llama-cpp-python's `Llama` (plain, or with its prompt-lookup drafter at its defaults),
    loaded once and reset between prompts.

    Its stream yields text, not token ids, so ids and timing come from a `stopping_criteria`
    hook: it is called as each token is sampled, with the evaluated prefix (every earlier
    token, verified), and once more after the loop with a prefix that may hold unverified
    drafts, which is dropped.  The first call ends prefill: the first text chunk can come
    later, since the stream holds back bytes it takes for part of a UTF-8 character.
    The last token of a run cut by max_tokens is sampled but never evaluated; under greedy
    decoding it is recovered after timing with `Llama.generate` on that prefix (plain:
    the cached logits, exact; lookup: at most one replayed token).  Sampled runs keep counts only.
    """

    def __init__(self, method: str, path: str, n_ctx: int, threads: int) -> None:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding

        class CountingLookup(LlamaDraftModel):
            """The peer's drafter, counting rounds and drafted tokens (it reports neither)."""

            def __init__(self) -> None:
                self.inner, self.rounds, self.drafted = LlamaPromptLookupDecoding(), 0, 0

            def __call__(self, input_ids, /, **kwargs):
                out = self.inner(input_ids, **kwargs)
                self.rounds, self.drafted = self.rounds + 1, self.drafted + len(out)
                return out

        self.method, self._criteria = method, llama_cpp.StoppingCriteriaList
        self.drafter = CountingLookup() if method == "peer-pld" else None
        from .backends.amx import llama_defaults, plan_weights

        plan = plan_weights(path, 0)  # around a faulting AMX unit
        try:
            # logits_all with a drafter: llama-cpp-python 0.3.36 sizes its score buffer by
            # n_batch unless told, and then fails on prompts longer than n_batch
            with llama_defaults(plan):
                self.llm = llama_cpp.Llama(
                    path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                    verbose=False, draft_model=self.drafter, logits_all=self.drafter is not None,
                )
        except (ValueError, RuntimeError) as e:
            raise SpecliError(f"llama-cpp-python could not load {Path(path).name}: {e}") from None

    def __call__(self, prompt: list[int], n: int, temperature: float) -> dict:
        llm, d = self.llm, self.drafter
        llm.reset()
        if d is not None:
            d.rounds = d.drafted = 0
        seen: list = []
        clock, finish = Clock(), None

        def record(ids, _logits) -> bool:
            seen.append(ids)
            clock.chunk(len(seen))
            return False

        # top_k/top_p/min_p off: the plain temperature distribution specli samples from
        stream = llm.create_completion(
            prompt, max_tokens=n, temperature=temperature, top_k=0, top_p=1.0, min_p=0.0,
            repeat_penalty=1.0, stream=True, stopping_criteria=self._criteria([record]),
        )
        for chunk in stream:
            finish = chunk["choices"][0]["finish_reason"]
        clock.end = time.perf_counter()
        sampled = seen[:-1]
        n_gen = len(sampled) - (finish == "stop")  # "stop": the last sample was end-of-turn
        tokens: list[int] | None = [int(t) for t in sampled[-1][len(prompt):]] if sampled else []
        if len(tokens) < n_gen:
            tokens = tokens + [self._next_greedy(prompt + tokens)] if temperature == 0 else None
        forwards = 1 + d.rounds if d is not None else len(sampled)
        return {
            "n_prompt": len(prompt), "n_generated": n_gen,
            "stop_reason": {"stop": "eos"}.get(finish or "", finish), **clock.fields(n_gen),
            "target_forwards": forwards, "drafted": d.drafted if d is not None else 0,
            "accepted": len(sampled) - forwards, "mean_accepted": len(sampled) / forwards,
            "tokens": tokens,
        }

    def _next_greedy(self, context: list[int]) -> int:
        gen = self.llm.generate(context, temp=0.0, top_k=0, top_p=1.0, min_p=0.0)
        try:
            return int(next(gen))
        finally:
            gen.close()


def identity(loaded: Loaded, prompt: list[int], ref: dict, row: dict, window: int = 8) -> dict:
    """Greedy only: equal to `none`'s tokens, or else is the first divergence a near-tie
    (fidelity's rule)?  A run cut by max_tokens says nothing past its end."""
    a, b = ref["tokens"], row["tokens"]
    if b is None:
        return dict(_NO_IDENTITY)
    i = first_difference(a, b)
    short = min((a, ref), (b, row), key=lambda x: len(x[0]))[1]
    if i is None and (len(a) == len(b) or short["stop_reason"] == "length"):
        return {**_NO_IDENTITY, "identical": True, "matches": True}
    i = min(len(a), len(b)) if i is None else i
    out = {**_NO_IDENTITY, "identical": False, "matches": False, "divergence_index": i}
    if i < len(a):  # else `none` ended here: its end-of-turn token is not kept to replay
        d = analyse(loaded.target, prompt, a, i, window)
        out.update(gap=d.gap, noise=d.noise, explained=d.explained, matches=d.explained)
    return out


def run_order(methods: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, method) pairs for one prompt: `none` first (every row is compared with
    it), then odd repeats in reverse, so no method always runs in the same slot."""
    order = []
    for rep in range(repeats):
        ms = methods if rep % 2 == 0 else methods[::-1]
        order += [(rep, m) for m in ms]
    return order


def fastest(rows: list[dict]) -> list[dict]:
    """One row per (prompt, method): the run with the shortest decode.  Interference on a
    shared machine only ever adds time, so the fastest of repeated runs is the least
    disturbed estimate of what the method costs."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["prompt"], r["method"])
        if key not in best or _decode_key(r) < _decode_key(best[key]):
            best[key] = r
    return list(best.values())


def _decode_key(row: dict) -> float:
    return 1.0 / row["decode_tok_s"] if row.get("decode_tok_s") else math.inf


def geomean(xs: Iterable[float]) -> float | None:
    vals = list(xs)
    return math.exp(fmean(math.log(x) for x in vals)) if vals else None


def _cell(rows: list[dict], ref: dict[int, dict], runs: list[dict]) -> dict:
    """`rows`: one per prompt (the fastest run); `runs`: every run, for identity."""
    pairs = [(r, ref[r["prompt"]]) for r in rows if r["prompt"] in ref]
    judged = [r["matches"] for r in runs if r.get("matches") is not None]
    accepted = [r["mean_accepted"] for r in rows if r.get("mean_accepted") is not None]
    return {
        "prompts": len(rows),
        "runs": len(runs),
        "speedup": geomean(
            r["decode_tok_s"] / b["decode_tok_s"] for r, b in pairs
            if r["decode_tok_s"] and b["decode_tok_s"]
        ),
        "e2e_speedup": geomean(b["wall_s"] / r["wall_s"] for r, b in pairs if r["wall_s"] > 0),
        "mean_accepted": fmean(accepted) if accepted else None,
        "identity_rate": sum(judged) / len(judged) if judged else None,
        "decode_tok_s": geomean(r["decode_tok_s"] for r in rows if r["decode_tok_s"]),
        **{key: _mean(rows, key) for key in COST_KEYS},
    }


COST_KEYS = ("ms_per_pass", "pass_size", "calibrated_ms_per_pass", "ms_per_draft_step",
             "calibrated_ms_per_draft_step", "calibrated_ms_per_draft_step_back_to_back",
             "calibrated_ms_per_draft_step_beside",
             "draft_batches", "ms_per_drafted_token", "ms_per_round_other")


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key)]
    return fmean(vals) if vals else None


def summarize(rows: list[dict]) -> dict:
    """Per method, per category and overall (over prompts, not categories): geometric-mean
    decode and end-to-end speedups against `none` on the same prompt, mean accepted tokens
    per target forward, and the fraction of greedy rows that match `none`.  Repeated runs
    count once: the fastest (identity is judged on every run)."""
    best = fastest(rows)
    ref = {r["prompt"]: r for r in best if r["method"] == "none"}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cats = list(dict.fromkeys(r["category"] for r in rows))
    table = {}
    for m in methods:
        mine = [r for r in best if r["method"] == m]
        runs = [r for r in rows if r["method"] == m]
        table[m] = {
            c: _cell([r for r in mine if r["category"] == c], ref,
                     [r for r in runs if r["category"] == c])
            for c in cats
        }
        table[m]["overall"] = _cell(mine, ref, runs)
    return {"methods": methods, "categories": cats, "table": table}


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + unit


def render_markdown(summary: dict, meta: dict) -> str:
    cols = [*summary["categories"], "overall"]
    lines = ["# specli bench", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        "",
        "Decode speedup vs `none` (geometric mean over prompts of the fastest run of each; "
        "tokens after the first emitted chunk, prefill excluded) / mean accepted tokens per "
        "target forward:",
        "",
    ]
    lines += _md_table(["method", *cols], (
        [m, *(f"{_fmt(row[c]['speedup'], '.2f', 'x')} / {_fmt(row[c]['mean_accepted'], '.2f')}"
              for c in cols)] for m, row in summary["table"].items()))
    lines.append("")
    lines += _md_table(
        ["method", "identity rate (near-tie rule)", "end-to-end speedup", "decode tok/s",
         "prompts", "runs"],
        (_overall_cells(m, row["overall"]) for m, row in summary["table"].items()))
    lines += [
        "",
        "Costs inside the pipeline beside the calibrated standalone costs (ms, mean over "
        "prompts; a target pass of the run's mean size; a draft-model step calibrated right "
        "after a target pass, as a drafting round pays it, and back to back; evals of the "
        "draft model over "
        "several tokens, its prompt and catch-ups, per prompt; all of drafting per drafted "
        "token, the model's steps and specli's work around them (beside a pass, only the "
        "wait); the rest of a round, outside "
        "drafting and target passes: budgets, bookkeeping, the bench's own reading):",
        "",
    ]
    lines += _md_table(
        ["method", "target pass", "calibrated", "tokens per pass", "draft-model step",
         "calibrated after a pass", "step ratio", "calibrated back to back",
         "calibrated beside a pass", "draft batches", "drafting per drafted token",
         "rest of a round"],
        (_cost_cells(m, row["overall"]) for m, row in summary["table"].items()))
    return "\n".join(lines) + "\n"


def _md_table(head: list[str], rows: Iterable[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _overall_cells(method: str, o: dict) -> list[str]:
    ident = "n/a" if o["identity_rate"] is None else f"{100 * o['identity_rate']:.0f}%"
    return [method, ident, _fmt(o["e2e_speedup"], ".2f", "x"), _fmt(o["decode_tok_s"], ".1f"),
            str(o["prompts"]), str(o["runs"])]


def _cost_cells(method: str, o: dict) -> list[str]:
    step, cal = o.get("ms_per_draft_step"), o.get("calibrated_ms_per_draft_step")
    return [method, _fmt(o.get("ms_per_pass"), ".2f"), _fmt(o.get("calibrated_ms_per_pass"), ".2f"),
            _fmt(o.get("pass_size"), ".2f"), _fmt(step, ".2f"), _fmt(cal, ".2f"),
            f"{step / cal:.2f}x" if step and cal else "n/a",
            _fmt(o.get("calibrated_ms_per_draft_step_back_to_back"), ".2f"),
            _fmt(o.get("calibrated_ms_per_draft_step_beside"), ".2f"),
            _fmt(o.get("draft_batches"), ".1f"), _fmt(o.get("ms_per_drafted_token"), ".2f"),
            _fmt(o.get("ms_per_round_other"), ".3f")]


def plot_speedup(summary: dict, path: Path) -> bool:
    """Grouped bars, category x method; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = [*summary["categories"], "overall"]
    methods = [m for m in summary["methods"] if m != "none"] or summary["methods"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cols) * max(1, len(methods) / 2)), 4))
    top = 1.0
    for i, m in enumerate(methods):
        vals = [summary["table"][m][c]["speedup"] or 0.0 for c in cols]
        ax.bar([x + i * width for x in range(len(cols))], vals, width, label=m)
        top = max(top, *vals)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, top * 1.15)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(cols))])
    ax.set_xticklabels(cols, rotation=30, ha="right")
    ax.set_ylabel("decode speedup vs none (x)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_name()} ({platform.machine()})"


OUTPUTS = ("results.jsonl", "summary.json", "summary.md", "speedup.png")


def keep_previous(out: Path) -> Path | None:
    """An earlier bench's files in `out` moved to out/previous-<its time> (a rerun
    into the same folder, a Makefile target run twice a day, used to overwrite them)."""
    first = out / OUTPUTS[0]
    if not first.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(first.stat().st_mtime))
    dest = out / f"previous-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = out / f"previous-{stamp}-{n}"
    dest.mkdir()
    for name in OUTPUTS:
        if (out / name).exists():
            (out / name).rename(dest / name)
    return dest


def write_summary(rows: list[dict], plan: Plan, console: Console) -> dict:
    summary = {"meta": plan.meta, **summarize(rows)}
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
    (plan.out / "summary.md").write_text(render_markdown(summary, plan.meta), "utf-8")
    if not plot_speedup(summary, plan.out / "speedup.png"):
        console.print(PLOT_HINT, markup=False)
    return summary


def run(loaded: Loaded, plan: Plan, console: Console) -> tuple[dict, bool]:
    """Run the plan, writing each row as it finishes; Ctrl-C stops and still summarizes.
    Returns the summary and whether it was interrupted."""
    encoded = [encode_prompt(loaded.target, p.text) for p in plan.prompts]
    n_ctx = loaded.target.n_ctx
    too_long = next((i for i, t in enumerate(encoded) if len(t) + plan.n_tokens >= n_ctx), None)
    if too_long is not None:
        raise SpecliError(
            f"prompt {plan.prompts[too_long].id} is {len(encoded[too_long])} tokens; with "
            f"-n {plan.n_tokens} it needs more than --ctx {n_ctx}: raise --ctx or lower -n"
        )
    t_setup = time.perf_counter()
    runners: dict[str, Runner] = {}
    for m in plan.methods:
        if m.startswith("peer-"):
            if loaded.target.name != "llama.cpp":
                raise SpecliError(f"{m} runs llama-cpp-python's own Llama: it needs a GGUF "
                                  f"target, not {loaded.target.name}")
            peer = Peer(m, loaded.target.path, n_ctx, plan.threads)
            runners[m] = lambda p, n, peer=peer: peer(p, n, plan.params.temperature)
        else:
            spec = methods.parse(m, peers=True)
            budget = spec.budget or plan.budget
            engine = (loaded.draft_engine(spec.model, budget) if spec.model
                      else loaded.make_engine(spec.base, budget))
            k = parse_budget(budget)  # METHOD@fixed:K drafts K a round, beyond -k too
            runners[m] = specli_runner(engine, m, plan.params, max(plan.draft_max, k or 0),
                                       _standalone(loaded, spec, budget))
    warm = encode_prompt(loaded.target, WARMUP_TEXT)
    for r in runners.values():  # first-call costs (page faults, buffers) are not counted
        r(warm, min(4, plan.n_tokens))
    # where a bench's time goes: calibrations and warm-up apart from the timed runs
    plan.meta["setup_s"] = round(time.perf_counter() - t_setup, 1)
    if loaded.duo_placement:  # placed by measurement while the engines were made
        plan.meta["duo_drafter"] = loaded.duo_placement
    t_runs = time.perf_counter()

    plan.out.mkdir(parents=True, exist_ok=True)
    if (kept := keep_previous(plan.out)) is not None:
        console.print(f"note: {plan.out} held an earlier bench's results: moved to {kept}",
                      markup=False)
    rows: list[dict] = []
    interrupted = False
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with (plan.out / "results.jsonl").open("w", encoding="utf-8") as out, \
            Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("bench", total=len(plan.prompts) * len(plan.methods) * plan.repeats)
        try:
            for i, (p, tokens) in enumerate(zip(plan.prompts, encoded, strict=True)):
                ref: dict | None = None
                for rep, m in run_order(plan.methods, plan.repeats):
                    bar.update(task, description=f"{p.category} {i + 1}/{len(encoded)} {m}")
                    row = runners[m](tokens, plan.n_tokens)
                    ref = ref or row
                    greedy = plan.params.greedy
                    row.update(identity(loaded, tokens, ref, row, plan.draft_max)
                               if greedy else _NO_IDENTITY)
                    row = {"prompt": i, "prompt_id": p.id, "category": p.category,
                           "method": m, "repeat": rep, **row}
                    rows.append(row)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    bar.advance(task)
        except KeyboardInterrupt:
            interrupted = True
    plan.meta["runs_s"] = round(time.perf_counter() - t_runs, 1)
    if interrupted:
        total = len(plan.prompts) * len(plan.methods) * plan.repeats
        plan.meta["interrupted"] = f"yes, {len(rows)} of {total} runs finished"
    return write_summary(rows, plan, console), interrupted


def _standalone(loaded: Loaded, spec: methods.Spec, budget: str) -> CostModel | None:
    """A fixed-length method's draft model calibrated alone, so that its rows too set the
    in-pipeline costs beside the standalone ones (a budget of its own carries them)."""
    m = spec.method
    if (parse_budget(budget) is None or spec.model or m is None or not m.draft_model
            or loaded.draft is None or loaded.cross):
        return None
    return loaded.duo_cost_model() if m.name == "duo" else loaded.cost_model()


def describe(plan: Plan, loaded: Loaded, command: Sequence[str], ctx: int) -> dict:
    """The summary header: enough to reproduce and to judge the numbers."""
    from importlib.metadata import version

    note = cores_note() if loaded.opts.n_threads is None else None
    return {
        "command": shlex.join(command),
        "target": Path(loaded.target.path).name,
        "draft": Path(loaded.draft.path).name if loaded.draft is not None else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "threads": getattr(loaded.target, "n_threads", plan.threads),
        # default thread counts below the core count: why
        **({"threads_note": note} if note else {}),
        "gpu_layers": loaded.opts.n_gpu_layers,
        "duo_drafter": (f"{loaded.duo_opts.n_threads or plan.threads} threads, "
                        f"{loaded.duo_opts.n_gpu_layers} GPU layers")
        if loaded.duo_opts is not None and any(m.startswith("duo") for m in plan.methods)
        else None,
        "n_tokens": plan.n_tokens,
        "temperature": plan.params.temperature,
        "draft_max": plan.draft_max,
        "budget": plan.budget,
        "ctx": ctx,
        "prompts": len(plan.prompts),
        "repeats": plan.repeats,
        "versions": f"specli {version('specli')}, llama-cpp-python {version('llama_cpp_python')}",
    }
