"""Model runtimes behind one interface (base.Backend): GGUF through llama.cpp, ONNX
through onnxruntime.  `open_model` picks one by what the path holds."""

from __future__ import annotations

import os

from .base import Backend, LoadOptions


def open_model(path: str | os.PathLike[str], opts: LoadOptions) -> Backend:
    """An ONNX export (a folder with an .onnx file, or the file) or a GGUF file."""
    from .onnx import is_onnx_model

    if is_onnx_model(path):
        from .onnx import ONNXModel

        return ONNXModel(path, opts)
    from .gguf import GGUFModel

    return GGUFModel(path, opts)
