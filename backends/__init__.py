"""Model runtimes behind one interface (base.Backend): GGUF through llama.cpp, ONNX
through onnxruntime, or with static shapes through OpenVINO (`--device npu`, exports made
with `specli export --static`).  `open_model` picks one by what the path holds."""

from __future__ import annotations

import os

from .base import Backend, LoadOptions


def open_model(path: str | os.PathLike[str], opts: LoadOptions) -> Backend:
    """An ONNX export (a folder with an .onnx file, or the file) or a GGUF file."""
    from .onnx import is_onnx_model

    if is_onnx_model(path):
        from .openvino_static import wants_static

        if wants_static(path, opts):
            from .openvino_static import StaticModel

            return StaticModel(path, opts)
        from .onnx import ONNXModel

        return ONNXModel(path, opts)
    from .gguf import GGUFModel

    return GGUFModel(path, opts)
