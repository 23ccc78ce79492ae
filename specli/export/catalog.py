"""Exported ONNX models the user made with `specli export`, by name.

An export is a folder (model.onnx, tokenizer files, specli.json); the catalog
($SPECLI_HOME/exports.json) maps a short name to it so `specli generate NAME`,
`--draft NAME` and `specli models` work as they do for registry models.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from ..errors import SpecliError
from ..registry import specli_home

META = "specli.json"  # written into every export folder

# Quantisations and whether a token's logits are the same whether it is evaluated alone
# or inside a batch (onnxruntime's CPU kernels; tests/test_gguf_onnx.py and
# tests/test_real_onnx.py check it).  Without that, verifying a draft in one pass is not
# the computation plain decoding does.  Both int4 and int8 are weight-only MatMulNBits.
QUANTS = {"none": True, "int4": True, "int8": True}


@dataclass(frozen=True)
class Export:
    name: str
    path: str
    source: str  # what it was exported from (GGUF path, HF folder, registry name)
    quant: str
    exporter: str  # "specli-gguf" (no torch) or "optimum"
    batch_invariant: bool
    created: str = ""

    @property
    def present(self) -> bool:
        return any(Path(self.path).glob("*.onnx"))


def catalog_path() -> Path:
    return specli_home() / "exports.json"


def exports_dir() -> Path:
    return specli_home() / "exports"


def load() -> dict[str, Export]:
    p = catalog_path()
    if not p.exists():
        return {}
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpecliError(f"cannot read the export catalog {p}: {e}") from None
    why = _invalid(raw)
    if why is not None:
        raise SpecliError(f"{p} is not a valid exports list ({why}); delete it and run "
                          "`specli export` again (--reuse re-registers an export still there)")
    return {name: _export(entry) for name, entry in raw.items()}


_FIELD_TYPES = {"str": str, "bool": bool}  # Export's field types (others: not checked)


def _invalid(raw: object) -> str | None:
    """What is wrong with a parsed exports.json, or None: a hand edit or another
    program's file must be a one-line error, not a crash in whoever reads it."""
    if not isinstance(raw, dict):
        return f"expected an object of name: export, not {type(raw).__name__}"
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            return f"{name!r} is {type(entry).__name__}, not an object"
        for f in fields(Export):
            value = entry.get(f.name)
            if f.name not in entry and f.default is MISSING:
                return f"{name!r} has no {f.name!r}"
            if f.name in entry and not isinstance(value, _FIELD_TYPES.get(str(f.type), object)):
                return f"{name!r}: {f.name!r} is not a {f.type}"
    return None


def _export(entry: dict) -> Export:
    """An Export from a checked entry, fields a later specli may add left out."""
    return Export(**{f.name: entry[f.name] for f in fields(Export) if f.name in entry})


def register(entry: Export) -> None:
    """Add (or replace) an export, atomically: a crash never leaves half a catalog."""
    entries = load()
    entries[entry.name] = entry
    p = catalog_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({k: asdict(v) for k, v in sorted(entries.items())}, indent=1),
                   encoding="utf-8")
    os.replace(tmp, p)
    Path(entry.path, META).write_text(json.dumps(asdict(entry), indent=1), encoding="utf-8")


def find(name: str) -> Export | None:
    entries = load()
    return entries.get(name) or {k.lower(): v for k, v in entries.items()}.get(name.lower())


def read_meta(folder: str | os.PathLike[str]) -> Export | None:
    """The specli.json of an export folder, if it has one."""
    p = Path(folder, META)
    try:
        return Export(**json.loads(p.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
