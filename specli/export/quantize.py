"""Weight-only quantisation of an optimum export, the same scheme specli's own exporter uses.

onnxruntime's MatMulNBits stores 4- or 8-bit weights in blocks of 32 with a scale and
zero point each, and leaves activations in float: a token's logits come out
bit-identical whether it is evaluated alone or inside a verification batch, so
drafting changes nothing.  (Dynamic int8, which quantises activations per call, is
not batch-invariant, measured up to 1.0 logit apart: specli never produces it.)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SpecliError
from .gguf_onnx import _ACCURACY_LEVEL, _BLOCK, _SYMMETRIC, _make_quantizer

BITS = {"int4": 4, "int8": 8}


def quantize_model(model: Path, quant: str) -> Path:
    """Quantise `model` (an .onnx file, weights beside it) in place; returns model.onnx,
    its weights in model.onnx.data (the layout specli's own exporter writes)."""
    if quant == "none":
        return model
    if quant not in BITS:
        raise SpecliError(f"unknown quantisation {quant!r}; choose none, int4 or int8")
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _make_quantizer(BITS[quant])  # keeps the quantiser's import from flooding the log
    q = MatMulNBitsQuantizer(onnx.load(str(model)), bits=BITS[quant], block_size=_BLOCK,
                             is_symmetric=_SYMMETRIC, accuracy_level=_ACCURACY_LEVEL)
    q.process()
    # the graph and its weights are in memory now: the fp32 files (optimum names the
    # weights model.onnx_data) can go before the quantised ones are written
    for f in model.parent.iterdir():
        if f.name.startswith(model.name):
            f.unlink()
    final = model.parent / "model.onnx"
    data = final.with_name(final.name + ".data")
    onnx.save_model(q.model.model, str(final), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    os.chmod(data, final.stat().st_mode & 0o777)  # onnx writes it 0600; match the graph
    return final
