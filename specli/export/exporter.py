"""`specli export`: a GGUF file, a registry name or a Hugging Face folder to an ONNX decoder.

Two exporters, one output layout (model.onnx + weights, tokenizer.json,
tokenizer_config.json, generation_config.json, config.json, specli.json):
- specli-gguf (GGUF sources, the default): reads the GGUF with the `gguf` package and
  writes the decoder graph itself; needs onnx, no torch (`pip install 'specli[export]'`).
- optimum (Hugging Face folders; GGUF too with --exporter optimum): transformers loads
  the model, optimum exports it (`pip install 'specli[export-hf]'`, torch CPU).
The folder is written under a temporary name and renamed at the end, so an
interrupted export leaves nothing that looks finished.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..backends.openvino_static import StaticSpec, read_static, write_static
from ..errors import SpecliError
from ..registry import check_plain_name
from . import catalog

Progress = Callable[[str, int, int], None]  # (step, done, total)
EXPORTERS = ("auto", "specli", "optimum")
HF_EXTRA_HINT = ("pip install 'specli[export-hf]' "
                 "--extra-index-url https://download.pytorch.org/whl/cpu")


def classify(source: str) -> tuple[str, Path, str]:
    """(kind, path, label): kind "gguf" or "hf" (a folder with config.json)."""
    p = Path(source).expanduser()
    if p.is_dir():
        if (p / "config.json").exists():
            return "hf", p.absolute(), p.name
        raise SpecliError(f"{source} is a folder without config.json: not a Hugging Face model")
    if p.exists():
        from ..backends.gguf import check_gguf_file

        return "gguf", check_gguf_file(p).absolute(), p.stem
    from ..pull import resolve_model
    from ..registry import load_registry

    path = resolve_model(source, registry=load_registry())  # pulls if missing
    return "gguf", path, source


def default_name(label: str, quant: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-").lower() or "model"
    return f"{base}-onnx-{quant}"


def export_model(
    source: str,
    out: Path | None = None,
    *,
    quant: str = "int8",
    name: str | None = None,
    exporter: str = "auto",
    force: bool = False,
    reuse: bool = False,
    progress: Progress | None = None,
    static: StaticSpec | None = None,
) -> catalog.Export:
    """`reuse`: an existing export of the same source, quantisation and exporter is
    kept as it is (scripts and `make test` call export every time).  `static`: also
    write static.json (window, prefill chunk), so the export runs with fixed shapes
    through OpenVINO (an Intel NPU, or its CPU plugin); see backends/openvino_static.py."""
    if quant not in catalog.QUANTS:
        raise SpecliError(f"unknown --quant {quant!r}; choose from {', '.join(catalog.QUANTS)}")
    if exporter not in EXPORTERS:
        raise SpecliError(f"unknown --exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    if static is not None:
        static.check()
    if name is not None:  # it names a folder under $SPECLI_HOME/exports
        check_plain_name(name, "export")
    kind, path, label = classify(source)
    if kind == "hf" and exporter == "specli":
        raise SpecliError("specli's own exporter reads GGUF files; a Hugging Face folder "
                          "exports through optimum (--exporter optimum)")
    use = exporter if exporter != "auto" else ("specli" if kind == "gguf" else "optimum")
    name = name or default_name(label, quant) + ("-static" if static else "")
    dest = (out or catalog.exports_dir() / name).expanduser().absolute()
    known = catalog.find(name)
    if known is not None and Path(known.path) != dest and known.present and not force:
        raise SpecliError(f"the name {name!r} already stands for the export in {known.path}; "
                          "pass --name NEW, or --force to give it to this one")
    if dest.exists() and any(dest.iterdir()):
        made = catalog.read_meta(dest)
        exporter_name = "specli-gguf" if use == "specli" else "optimum"
        if reuse and made is not None and (made.source, made.quant, made.exporter) == (
                str(path), quant, exporter_name) and made.present and (
                read_static(dest) == static):
            catalog.register(catalog.Export(**{**made.__dict__, "name": name}))
            return catalog.find(name) or made
        if not force:
            raise SpecliError(f"{dest} exists and is not empty; pass --force to replace it")
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    note = progress or (lambda step, done, total: None)
    try:
        if use == "specli":
            from .gguf_onnx import export_gguf
            from .tokenizer import write_tokenizer_files

            export_gguf(path, tmp, quant=quant, progress=note)
            note("tokenizer", 0, 1)
            write_tokenizer_files(path, tmp)
            note("tokenizer", 1, 1)
        else:
            from . import hf_optimum

            hf_optimum.export(kind, path, tmp, quant, note)
        if static is not None:
            write_static(tmp, static)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    entry = catalog.Export(
        name=name, path=str(dest), source=str(path), quant=quant,
        exporter="specli-gguf" if use == "specli" else "optimum",
        batch_invariant=catalog.QUANTS[quant], created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    catalog.register(entry)
    return entry
