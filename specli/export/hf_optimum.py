"""Export through transformers + optimum (task text-generation-with-past).

For Hugging Face model folders, and for GGUF files when asked (`--exporter optimum`):
transformers dequantises a GGUF to fp32 on load.  Needs torch: the `export-hf` extra,
with the CPU wheel index so pip never pulls a multi-GB CUDA build.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import SpecliError
from .quantize import quantize_model

HINT = ("exporting with optimum needs torch, transformers and optimum: "
        "pip install 'specli[export-hf]' --extra-index-url https://download.pytorch.org/whl/cpu")
TASK = "text-generation-with-past"


def _require() -> None:
    try:
        import optimum.exporters.onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise SpecliError(HINT) from None


def export(kind: str, path: Path, out: Path, quant: str,
           note: Callable[[str, int, int], None]) -> None:
    _require()
    from optimum.exporters.onnx import main_export, onnx_export_from_model

    note("export (optimum)", 0, 2)
    if kind == "hf":
        main_export(str(path), output=str(out), task=TASK, device="cpu", do_validation=False)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
        onnx_export_from_model(model, output=str(out), task=TASK, do_validation=False)
        del model
        # transformers' GGUF tokenizer drops most control tokens: write ours
        from .tokenizer import write_tokenizer_files

        write_tokenizer_files(path, out)
    note("export (optimum)", 1, 2)
    model_file = out / "model.onnx"
    if not model_file.exists():
        raise SpecliError(f"optimum wrote no model.onnx in {out}")
    quantize_model(model_file, quant)
    note("export (optimum)", 2, 2)
