"""Every decoding method in one table, and one parser for what users write.

`generate --method`, `bench --methods`, the runtime and the help texts all read this
table, so a method is added in one place: a `Method` with the engine factory that builds
it (see `register`; the runtime registers specli's own).  What users write:

    METHOD            e.g. draft, hd, duo
    METHOD@BUDGET     the method under a budget of its own: draft@fixed:4, hd@auto
    draft/MODEL       the draft method with another draft model (bench only)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .budget import parse_budget
from .errors import SpecliError

if TYPE_CHECKING:
    from .engine import Engine
    from .runtime import Loaded

Factory = Callable[["Loaded", str], "Engine"]
"""Builds a method's engine on loaded models, for a budget spec ("auto", "fixed:K")."""


@dataclass(frozen=True)
class Method:
    name: str
    help: str  # one clause for --help
    factory: Factory
    draft_model: bool = False  # uses the draft model (--draft) when there is one
    needs_draft: bool = False  # and cannot run without one
    same_tokenizer: bool = False  # its draft model must share the target's tokenizer
    trees: bool = False  # may verify candidate trees (the target holds --branches sequences)
    ngrams: bool = False  # drafts from hd's n-gram stores (--corpus, your history)
    fixed_budget: bool = True  # METHOD@fixed:K makes sense (it drafts)


METHODS: dict[str, Method] = {}
PEERS = {"peer-none": "llama-cpp-python's Llama", "peer-pld": "its prompt-lookup decoding"}


def register(method: Method) -> Method:
    """Add (or replace) a method: it is then known to generate, chat, bench and --help."""
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The method called `name`, or a one-line error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise SpecliError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


@dataclass(frozen=True)
class Spec:
    """One method as written: `base`, `base@budget` or `draft/model[@budget]`."""

    text: str
    base: str
    model: str | None = None
    budget: str | None = None

    @property
    def method(self) -> Method | None:
        return METHODS.get(self.base)  # None for the peers


def parse(text: str, *, peers: bool = False) -> Spec:
    """`text` as a Spec, or a one-line error saying what is known."""
    text = text.strip()
    head, at, budget = text.partition("@")
    base, slash, model = head.partition("/")
    known = [*METHODS, *(PEERS if peers else ())]
    forms = "METHOD@fixed:K, draft/MODEL" if peers else "METHOD@fixed:K"
    bad = SpecliError(f"unknown method {text!r}; choose from {', '.join(known)}, {forms}")
    if base in PEERS and peers and not (at or slash):
        return Spec(text, base)
    method = METHODS.get(base)
    if method is None or (slash and (not peers or base != "draft" or not model)):
        raise bad
    if at:
        try:
            parse_budget(budget)
        except ValueError as e:
            raise SpecliError(f"unknown method {text!r}: {e}") from None
        if not method.fixed_budget:
            raise bad
    return Spec(text, base, model or None, budget or None)


def help_text() -> str:
    """The --method help: every method and what it does."""
    return "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()) + "."


def bench_help() -> str:
    """The bench's --methods help."""
    fixed = ", ".join(m.name for m in METHODS.values() if m.fixed_budget)
    names = "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())
    peers = "; ".join(f"{name}: {what}" for name, what in PEERS.items())
    return (f"Comma list (none always runs first: the reference) of: {names}; {peers}. "
            f"METHOD@fixed:K runs {fixed} with a fixed draft length K; draft/MODEL drafts "
            "with another draft model.")
