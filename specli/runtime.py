"""From command-line words to a ready engine: resolve names, load models, pick the method.

Shared by `generate`, `chat` and `bench` so the three load and encode alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence, Set
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console

from . import methods
from .backends import open_model
from .backends.base import Backend, LoadOptions
from .budget import (
    Acceptance,
    AdaptiveBudget,
    Budget,
    CostModel,
    FixedBudget,
    OverlapBudget,
    choose_placement,
    parse_budget,
)
from .calibrate import load_or_measure
from .cpu_load import Watch
from .drafters.cross import CrossDrafter, same_tokenizer
from .drafters.duo import DuoDrafter
from .drafters.hierarchy import HierarchyDrafter
from .drafters.lookup import LookupDrafter
from .drafters.model import ModelDrafter
from .engine import Engine, Result
from .errors import SpecliError
from .export import catalog
from .lineup import Lineup, Member
from .methods import Method
from .ngram import NgramStore, tokenizer_fingerprint
from .pull import resolve_model
from .registry import Pair, Registry, load_registry
from .threads import (
    cores_note,
    default_cores,
    drafter_needs_own_thread,
    drafter_threads,
    pools_outnumber_cores,
    usable_cores,
)


@dataclass
class Loaded:
    target: Backend
    draft: Backend | None
    method: str  # the method the user gets (never "auto" with nothing to choose from)
    target_name: str
    draft_name: str | None
    opts: LoadOptions
    budget_spec: str = "auto"
    corpus: str | None = None  # static n-gram index for hd (`specli index build`)
    history: bool = True  # hd learns from (and drafts from) this user's past generations
    # where duo's drafter runs (CPU-pinned by default) and with how many threads
    duo_opts: LoadOptions | None = None
    duo_told: bool = False  # -ngld given: duo's drafter goes there, nothing measured
    engine: Engine = field(init=False)
    cross: bool = field(default=False, init=False)  # the draft's tokenizer differs
    _cost: CostModel | None = field(default=None, init=False, repr=False)
    _duo_cost: CostModel | None = field(default=None, init=False, repr=False)
    _duo_model: Backend | None = field(default=None, init=False, repr=False)
    _duos: list[DuoDrafter] = field(default_factory=list, init=False, repr=False)
    # how duo's drafter was placed, when measured (for --stats): "CPU ... (measured: ...)"
    duo_placement: str = field(default="", init=False)
    _engines: list[Engine] = field(default_factory=list, init=False, repr=False)
    _models: list[Backend] = field(default_factory=list, init=False, repr=False)  # draft/NAME
    _watch: Watch = field(default_factory=Watch, init=False, repr=False)  # others' CPU use
    _fitted_at: float = field(default_factory=time.monotonic, init=False, repr=False)
    # one-line notes to the user (stderr), e.g. a history store that cannot be used
    note: Callable[[str], None] | None = field(default=None, init=False, repr=False)

    def cost_model(self, console: Console | None = None, force: bool = False) -> CostModel:
        """Calibrated costs for this target/draft pair, measured once per machine setup."""
        if self._cost is None or force:
            with _status(console, "calibrating (first use of this model pair here)"):
                self._cost, _ = load_or_measure(self.target, self.draft, self.opts, force=force,
                                                note=_printer(console))
        return self._cost

    def duo_cost_model(self, console: Console | None = None) -> CostModel:
        """Calibrated costs for duo: the pair measured apart and side by side."""
        model = self.duo_model(console)  # placing it by measurement calibrates it too
        if self._duo_cost is None:
            with _status(console, "calibrating the drafter beside the target (first use here)"):
                self._duo_cost, _ = load_or_measure(self.target, model, self.opts,
                                                    draft_opts=self.duo_opts, overlap=True,
                                                    note=_printer(console))
        return self._duo_cost

    def duo_model(self, console: Console | None = None) -> Backend:
        """duo's draft model: the loaded draft when duo is the method, else a second copy
        (another method's drafter may be using the first); placed by duo_opts, or by
        measurement first when the target is on a GPU and -ngld was not given."""
        if self.draft is None:
            raise SpecliError("--method duo needs a draft model (--draft)")
        if self.cross:
            raise SpecliError("--method duo needs a draft model with the target's tokenizer")
        if not self.duo_told and not self.duo_placement and on_accelerator(self.opts):
            self.place_duo_drafter(console)
        if self.method == "duo":
            return self.draft
        if self._duo_model is None:
            self._duo_model = open_model(self.draft.path, self.duo_opts or _duo_opts(self.opts))
        return self._duo_model

    def place_duo_drafter(self, console: Console | None = None) -> None:
        """With the target on a GPU and no --draft-gpu-layers: calibrate duo's draft model
        on the GPU and on the CPU beside the target, and keep the place whose measured
        costs promise the faster generation (`choose_placement`)."""
        assert self.duo_opts is not None
        places = {"CPU": self.duo_opts,
                  "GPU": replace(self.duo_opts, n_gpu_layers=ALL_LAYERS,
                                 n_threads=getattr(self.target, "n_threads", None))}
        current = self.draft if self.method == "duo" else self._duo_model  # on the CPU
        assert self.draft is not None
        models: dict[str, Backend] = {}
        costs: dict[str, CostModel] = {}
        try:
            for place, o in places.items():
                reuse = place == "CPU" and current is not None
                models[place] = current if reuse else open_model(self.draft.path, o)
                with _status(console, f"measuring the draft model on the {place}"):
                    costs[place], _ = load_or_measure(self.target, models[place], self.opts,
                                                      draft_opts=o, overlap=True,
                                                      note=_printer(console))
        except SpecliError:
            for m in models.values():
                if m is not current:
                    m.close()
            raise
        best, speedups = choose_placement(costs)
        chosen = models[best]
        for m in models.values():
            if m is not chosen:
                m.close()
        if self.method == "duo":
            self.draft = chosen
        else:
            self._duo_model = chosen
        self.duo_opts, self._duo_cost = places[best], costs[best]
        measured = ", ".join(
            f"{place} {1000 * costs[place].draft:.2f} ms a token, "
            f"{speedups[place]:.2f}x expected" for place in places)
        self.duo_placement = f"{chosen.placement} (placed by measurement: {measured})"

    def make_budget(self, spec: str, free_drafts: bool = False,
                    calibrated: bool = False) -> Budget:
        """`free_drafts`: the drafter costs ~nothing (n-gram lookup), only verification.
        `calibrated`: its confidences are acceptance probabilities (hd's)."""
        k = _parse_budget(spec)
        if k is not None:
            return FixedBudget(k)
        cost = self.cost_model()
        return AdaptiveBudget(CostModel(cost.verify, 0.0) if free_drafts else cost,
                              Acceptance(calibrated=calibrated))

    def make_engine(self, method: str, budget: str = "auto") -> Engine:
        """An engine for `method` (a name in specli.methods) on the loaded models."""
        m = methods.get(method)
        if m.needs_draft and self.draft is None:
            raise SpecliError(f"--method {m.name} needs a draft model (--draft)")
        if m.same_tokenizer and self.cross:
            raise SpecliError(f"--method {m.name} needs a draft model with the target's "
                              "tokenizer; use draft")
        engine = m.factory(self, budget)
        self._engines.append(engine)  # closed with the models (its drafters' threads, stores)
        return engine

    @contextmanager
    def one_off_engine(self) -> Iterator[Engine]:
        """An engine of the loaded method with new budgets and no history, closed after
        the block: what a seeded sampled request needs to replay exactly (as
        `specli generate --seed` does in a process of its own)."""
        saved, self.history = self.history, False
        duos = len(self._duos)
        try:
            engine = self.make_engine(self.method, self.budget_spec)
        finally:
            self.history = saved
        try:
            yield engine
        finally:
            self._engines.remove(engine)
            engine.close()
            self._duos[duos:] = [d for d in self._duos[duos:] if not d.stopped]

    def draft_engine(self, name: str, budget: str = "auto") -> Engine:
        """An engine drafting with another draft model (path or registry name), for the
        bench's draft/NAME methods: loaded, compared and calibrated like --draft."""
        path = resolve_model(name, registry=load_registry())
        model = open_model(path, replace(self.opts, branches=1))
        self._models.append(model)
        cross = not same_tokenizer(self.target, model)
        drafter = (CrossDrafter(self.target, model) if cross
                   else ModelDrafter(model, own_thread=self._own_thread(model)))
        k = _parse_budget(budget)
        if k is not None:
            b: Budget = FixedBudget(k)
        else:
            b = AdaptiveBudget(load_or_measure(self.target, model, self.opts)[0])
        engine = Engine(self.target, drafter, b)
        self._engines.append(engine)
        return engine

    def fit_threads(self) -> None:
        """Before a generation in a long-lived process (chat, serve): default thread
        counts follow the cores other processes left free since the last look, as they
        did at the start (specli.threads.default_cores)."""
        self._fit()

    def keep_fit(self) -> None:
        """During a generation, at most once every REFIT_EVERY_S: the same for the models
        only this thread runs (a long answer outlasts the load it started with; a duo
        drafter's thread may be inside its model, so that one keeps its threads)."""
        if time.monotonic() - self._fitted_at < REFIT_EVERY_S:
            return
        self._fit(skip={id(d.model) for d in self._duos})

    def _fit(self, skip: Set[int] = frozenset()) -> None:
        """Fit every llama.cpp model's default threads but those whose id is in `skip`."""
        self._fitted_at = time.monotonic()
        busy = self._watch.look()
        if busy is None:
            return
        free = usable_cores(busy)
        why = cores_note(busy, "lately")
        models = [self.target, self.draft, self._duo_model, *self._models]
        for m in {id(m): m for m in models if m is not None and id(m) not in skip}.values():
            fit = getattr(m, "fit_free_cores", None)  # llama.cpp only: ONNX fixes its threads
            if fit is not None:
                fit(free, why)

    def placements(self) -> dict[str, str]:
        """Where each model runs (runtime, device, threads), for --stats and --json."""
        where = {"target": self.target.placement}
        if self.draft is not None:
            where["draft"] = self.draft.placement
        if self.duo_placement:
            where["duo drafter"] = self.duo_placement
        return where

    def finish(self, prompt: Sequence[int], res: Result, start: int = 0) -> None:
        """Let a drafter with a memory learn from a finished (or stopped) generation."""
        self.engine.finish([*prompt, *res.tokens], start)

    def _auto_engine(self, budget: str) -> Engine:
        """hd always (free drafts: only verification costs); with a draft model also
        draft and draft+hd, the cascade sharing hd's stores.  Each round the member
        whose budget expects the most tokens per second drafts, or none does."""
        if _parse_budget(budget) is not None:
            raise SpecliError("--method auto sizes its drafts itself: use --budget auto, "
                              "or a method (draft, lookup, hd, draft+hd) with fixed:K")
        hd = self._hd_drafter()
        members = [Member("hd", hd, self.make_budget("auto", free_drafts=True,
                                                     calibrated=True))]
        if self.draft is not None:
            members.append(Member("draft", self._model_drafter(), self.make_budget("auto")))
        if self.draft is not None and not self.cross:
            cascade = ModelDrafter(self.draft, hd, own_thread=self._own_thread(self.draft))
            members.append(Member("draft+hd", cascade, self.make_budget("auto")))
        if self.draft is not None and not self.cross and on_accelerator(self.opts):
            members.append(Member("duo", *self._duo("auto")))
        return Engine(self.target, lineup=Lineup(members, learner=hd, name="auto"))

    def _duo(self, budget: str) -> tuple[DuoDrafter, Budget]:
        """A drafter one round ahead in its own thread, with a budget that plans for it."""
        model = self.duo_model()
        k = _parse_budget(budget)
        duo_budget = FixedBudget(k) if k is not None else OverlapBudget(self.duo_cost_model())
        drafter = DuoDrafter(model, branches=self.target.max_branches,
                             own_thread=self._own_thread(model),
                             end_idle_thread=self._pools_crowd(model))
        self._duos.append(drafter)
        return drafter, duo_budget

    def _model_drafter(self) -> ModelDrafter | CrossDrafter:
        """Same tokenizer: drafts are target tokens.  Another: the cross-tokenizer path."""
        assert self.draft is not None
        if self.cross:
            return CrossDrafter(self.target, self.draft)
        return ModelDrafter(self.draft, own_thread=self._own_thread(self.draft))

    def _cpu_threads(self, draft: Backend) -> tuple[int | None, int | None] | None:
        """The CPU thread counts of the target and `draft` where both run on llama.cpp
        (OpenMP teams, see specli.threads); None for other runtimes."""
        if self.target.name != "llama.cpp" or draft.name != "llama.cpp":
            return None
        return getattr(self.target, "n_threads", None), getattr(draft, "n_threads", None)

    def _own_thread(self, draft: Backend) -> bool:
        """llama.cpp pairs whose CPU thread counts differ: the drafter gets its own thread."""
        threads = self._cpu_threads(draft)
        return threads is not None and drafter_needs_own_thread(*threads)

    def _pools_crowd(self, draft: Backend) -> bool:
        """Whether a drafting thread's OpenMP pool beside the target's would outnumber
        the cores (other runtimes: assumed so, which only ends an idle thread sooner)."""
        threads = self._cpu_threads(draft)
        return threads is None or pools_outnumber_cores(*threads)

    def _hd_drafter(self, branches: int | None = None) -> HierarchyDrafter:
        fp = tokenizer_fingerprint(self.target)
        history = NgramStore.open_history_or_none(fp, self.note) if self.history else None
        self.history = history is not None  # unusable: warned once, not tried again
        static = NgramStore.open_corpus(self.corpus, fp) if self.corpus else None
        b = self.target.max_branches if branches is None else branches
        return HierarchyDrafter(history, static, branches=b)

    def close(self) -> None:
        for engine in self._engines:  # first: duo's thread stops before its model closes
            engine.close()
        for model in self._models:
            model.close()
        # a duo thread that did not stop may still be inside its model: leave that one
        busy = {id(d.model) for d in self._duos if not d.stopped}
        for m in (self.target, self.draft, self._duo_model):
            if m is not None and id(m) not in busy:
                m.close()


# how often a generation looks again at the load other processes put on the cores
REFIT_EVERY_S = 1.0
ALL_LAYERS = 999  # llama.cpp offloads every layer (and the output) of any model this size


def _duo_opts(draft_opts: LoadOptions, gpu_layers: int | None = None) -> LoadOptions:
    """duo's drafter: on the CPU unless told (llama.cpp then also keeps its KV cache and
    every op there), one sequence, the draft's threads."""
    return replace(draft_opts, branches=1, n_gpu_layers=gpu_layers or 0)


def _ctx_capped(loaded: Loaded) -> str | None:
    """"MODEL was trained for N tokens" when the backend capped --ctx there, else None."""
    if loaded.target.n_ctx < loaded.opts.n_ctx:
        return f"{Path(loaded.target.path).name} was trained for {loaded.target.n_ctx} tokens"
    return None


def more_context(loaded: Loaded) -> str:
    """What would let a generation cut by a full context go on: a larger --ctx, unless
    the backend already capped it at what the model was trained for."""
    capped = _ctx_capped(loaded)
    if capped:
        return f"{capped}, so a larger --ctx cannot help; a shorter prompt can"
    return "a larger --ctx lets it go on"


def ctx_advice(loaded: Loaded, shorten: str = "shorten the prompt") -> str:
    """The way out of text the context cannot hold: a larger --ctx or `shorten`, or only
    `shorten` where --ctx is capped at the model's trained length already."""
    capped = _ctx_capped(loaded)
    return f"{capped}: {shorten}" if capped else f"raise --ctx or {shorten}"


def on_accelerator(opts: LoadOptions) -> bool:
    """Whether the target runs (partly) on a GPU: layers asked for and a build that can."""
    import llama_cpp

    return opts.n_gpu_layers > 0 and bool(llama_cpp.llama_supports_gpu_offload())


def _parse_budget(spec: str) -> int | None:
    try:
        return parse_budget(spec)
    except ValueError as e:
        raise SpecliError(str(e)) from None


def choose_models(model: str | None, draft: str | None, method: str) -> tuple[str, str | None]:
    """No MODEL: the registry's default pair; a pair's name (`specli models`): that pair.
    A registry target with no --draft: its registered same-tokenizer draft, for the
    methods that use one."""
    m = methods.get(method)
    reg = load_registry()
    wants_draft = m.draft_model
    pair = reg.default_pair if model is None else _pair_named(model, reg)
    if pair is not None:
        model = pair.target
        if draft is None and wants_draft:
            draft = pair.draft
    elif draft is None and wants_draft and (entry := reg.find(model)) is not None:
        draft = next(
            (p.draft for p in reg.pairs.values() if p.target == entry.name and p.same_tokenizer),
            None,
        )
    if not wants_draft:
        draft = None
    elif m.needs_draft and draft is None:
        raise SpecliError(f"the {method} method needs a draft model: pass --draft "
                          "PATH_OR_NAME")
    return model, draft


def _pair_named(name: str, reg: Registry) -> Pair | None:
    """The registry pair `name` stands for, unless it names a file, a model or an
    export (those came first and keep their meaning)."""
    pair = reg.find_pair(name)
    if pair is None or reg.find(name) is not None or Path(name).expanduser().exists():
        return None
    return None if catalog.find(name) is not None else pair


def load(
    model: str | None,
    draft: str | None,
    method: str,
    opts: LoadOptions,
    console: Console | None = None,
    budget: str = "auto",
    corpus: str | None = None,
    history: bool = True,
    tree: bool | None = None,
    draft_threads: int | None = None,
    draft_gpu_layers: int | None = None,
) -> Loaded:
    """`tree`: load the target to verify candidate trees (opts.branches sequences);
    None: when the method may draft trees.  `draft_threads` / `draft_gpu_layers`: where
    the draft model runs (None: the target's threads; duo's drafter on the CPU, the
    other methods' draft with the target's GPU layers)."""
    model, draft = choose_models(model, draft, method)
    if not (methods.get(method).trees if tree is None else tree):
        opts = replace(opts, branches=1)
    reg = load_registry()
    target_path = resolve_model(model, registry=reg, console=console)
    draft_path = resolve_model(draft, registry=reg, console=console) if draft else None
    with _status(console, f"loading {Path(target_path).name}"):
        target = open_model(target_path, opts)
    if console is not None and target.name == "llama.cpp" and opts.n_gpu_layers > 0 \
            and not on_accelerator(opts):
        console.print("note: this llama-cpp-python build has no GPU support, so -ngl is "
                      "ignored and everything runs on the CPU (`specli devices` says more)",
                      markup=False)
    draft_opts = replace(opts, branches=1, n_threads=draft_threads or opts.n_threads)
    if draft_gpu_layers is not None:
        draft_opts = replace(draft_opts, n_gpu_layers=draft_gpu_layers)
    duo = _duo_opts(draft_opts, draft_gpu_layers)
    if duo.n_threads is None and duo.n_gpu_layers == 0:
        # duo's drafter on the CPU beside a target that leaves cores free (on a GPU)
        t = getattr(target, "n_threads", None)
        duo = replace(duo, n_threads=drafter_threads(default_cores(), t) if t else None)
    dm: Backend | None = None
    if draft_path is not None:
        with _status(console, f"loading {Path(draft_path).name}"):
            dm = open_model(draft_path, duo if method == "duo" else draft_opts)
    used = method
    if method == "auto" and _parse_budget(budget) is not None:  # a fixed length: one drafter
        used = "draft" if dm is not None else "hd"
    loaded = Loaded(target, dm, used, model, draft, opts, budget, corpus, history, duo,
                    duo_told=draft_gpu_layers is not None)
    loaded.cross = dm is not None and not same_tokenizer(target, dm)
    loaded.note = _printer(console)
    # Calibrated here, with a spinner, on first use: for a budget to plan with, and for
    # a draft model on a GPU even at a fixed length (how it best reads a short catch-up
    # is measured there: calibrate.measure_catch_up).
    measure = _parse_budget(budget) is None or (
        dm is not None and on_accelerator(duo if used == "duo" else draft_opts))
    if used == "duo" and measure:
        loaded.duo_cost_model(console)
    elif used != "none" and measure:
        loaded.cost_model(console)
    loaded.engine = loaded.make_engine(used, budget)
    return loaded


def encode_prompt(
    target: Backend, text: str, *, system: str | None = None, raw: bool = False
) -> list[int]:
    """The user's text as target tokens: through the model's chat template unless raw."""
    if not text.strip():
        raise SpecliError("empty prompt: give text with -p, -f FILE or on stdin")
    if raw:
        prefix = f"{system}\n\n" if system else ""
        return target.tokenize(prefix + text, add_bos=target.add_bos, special=False)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    return encode_messages(target, messages)


def encode_messages(target: Backend, messages: list[dict[str, str]]) -> list[int]:
    tokens = target.tokenize(target.chat_prompt(messages), add_bos=target.add_bos, special=True)
    # templates that write the BOS text themselves would otherwise get it twice
    if len(tokens) > 1 and tokens[0] == tokens[1] == target.bos:
        tokens = tokens[1:]
    return tokens


def _printer(console: Console | None):
    """A one-line note to the console (stderr), or nowhere."""
    return None if console is None else lambda text: console.print(text, markup=False)


def _status(console: Console | None, text: str):
    if console is None or not console.is_terminal:
        return nullcontext()
    return console.status(text, spinner="dots")


# -- specli's methods: each one's engine on loaded models (see specli.methods) -----------
def _none(loaded: Loaded, budget: str) -> Engine:
    return Engine(loaded.target)


def _draft(loaded: Loaded, budget: str) -> Engine:
    return Engine(loaded.target, loaded._model_drafter(), loaded.make_budget(budget))


def _lookup(loaded: Loaded, budget: str) -> Engine:
    return Engine(loaded.target, LookupDrafter(), loaded.make_budget(budget, free_drafts=True))


def _hd(loaded: Loaded, budget: str) -> Engine:
    return Engine(loaded.target, loaded._hd_drafter(),
                  loaded.make_budget(budget, free_drafts=True, calibrated=True))


def _cascade(loaded: Loaded, budget: str) -> Engine:
    assert loaded.draft is not None
    helper = loaded._hd_drafter(branches=1)
    drafter = ModelDrafter(loaded.draft, helper, own_thread=loaded._own_thread(loaded.draft))
    return Engine(loaded.target, drafter, loaded.make_budget(budget))


def _duo_engine(loaded: Loaded, budget: str) -> Engine:
    drafter, duo_budget = loaded._duo(budget)
    return Engine(loaded.target, drafter, duo_budget)


for _method in (
    Method("auto", "each round, whichever of hd, draft and draft+hd (the last two with a "
           "draft model; also duo with the target on a GPU) is expected to pay most, or a "
           "plain step", lambda loaded, budget: loaded._auto_engine(budget),
           draft_model=True, trees=True, fixed_budget=False, ngrams=True),
    Method("none", "plain decoding (the reference)", _none, fixed_budget=False),
    Method("draft", "speculative decoding with the draft model (--draft)", _draft,
           draft_model=True, needs_draft=True),
    Method("lookup", "draft by copying from the prompt and output so far (no draft model)",
           _lookup),
    Method("hd", "hierarchy drafting from the context, your past generations and a "
           "--corpus index", _hd, trees=True, ngrams=True),
    Method("draft+hd", "the draft model, with hd guessing its tokens (a cascade)", _cascade,
           draft_model=True, needs_draft=True, same_tokenizer=True, ngrams=True),
    Method("duo", "the draft model drafts the next round in its own thread while the target "
           "verifies this one (DuoDecoding; pays when the target sits on a GPU: -ngl), or in "
           "turn where the measured costs say overlapping cannot pay", _duo_engine,
           draft_model=True, needs_draft=True, same_tokenizer=True, trees=True),
):
    methods.register(_method)
