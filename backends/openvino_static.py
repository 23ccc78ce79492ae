"""Static-shape decoding through OpenVINO: what an Intel NPU can run, proven on the CPU plugin.

Why: OpenVINO's NPU plugin compiles static shapes only, and a decoder's KV cache grows
every token.  So, as OpenVINO's own NPU LLM pipeline does, every shape is fixed here:

- the KV cache is a buffer of C slots (C = --ctx), owned by specli as numpy arrays; slot
  j >= n (the tokens cached so far) is masked out by ``attention_mask``;
- a verify/generate call always takes W = K+1 tokens (K = the window: the most tokens a
  round may draft); a plain step or a shorter draft is padded, and the padded rows'
  logits are ignored;
- a prompt is prefilled in chunks of P tokens (padded and masked the same way).

The graph is specli's own ONNX export (``specli export``), read by OpenVINO and changed
at load in one way: each ``present.N.key|value`` output returns only the W (or P) new
rows instead of past + new, so a call moves no more than it must.  After a call the new
rows are copied into slots [n, n+m) of the buffer; rollback is lowering n (the stale
slots stay masked: their softmax weight is exactly 0), which keeps verification exact.

The exporter's mask is index-based (cache slot j is visible to the query in slot
past + s iff j <= past + s and attention_mask[j] == 1), so padding between the valid past
and the new tokens is harmless: no static variant of the graph is needed.  OpenVINO's
runtime is used directly rather than onnxruntime's OpenVINO execution provider: the
compiled shapes, the buffer and rollback then stay in specli's hands, and the EP cannot
sit beside the plain onnxruntime wheel.  `specli export --static` records the window and
prefill chunk in ``static.json``; C is --ctx, chosen at load (compiled blobs for the NPU
are cached in $SPECLI_HOME/openvino-cache, so a shape compiles once per machine).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SpecliError
from ..threads import default_cores
from .base import LoadOptions, check_device
from .onnx import ONNXModel, _one_line

STATIC_FILE = "static.json"  # written by `specli export --static` into the export folder
DEFAULT_WINDOW = 8  # K: matches --draft-max's default, so the budget may draft up to it
DEFAULT_PREFILL = 64  # P: prompt tokens per prefill call
INSTALL_HINT = "pip install 'specli[npu]'"
# --device value -> OpenVINO device; auto: the NPU when there is one (static exports only)
_OV_DEVICE = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}


@dataclass(frozen=True)
class StaticSpec:
    """The fixed shapes of a static export: the window K (a verify call takes K+1 tokens)
    and the prefill chunk P.  The KV capacity is --ctx, chosen at load."""

    window: int = DEFAULT_WINDOW
    prefill: int = DEFAULT_PREFILL

    def check(self) -> StaticSpec:
        if not 1 <= self.window <= 64:
            raise SpecliError(f"--window {self.window}: choose 1..64 drafted tokens per pass")
        if self.prefill < self.window + 1:
            raise SpecliError(f"--prefill {self.prefill} is shorter than a verify call "
                              f"(--window {self.window} + 1): raise --prefill")
        return self


def read_static(folder: str | os.PathLike[str]) -> StaticSpec | None:
    """The static.json of an export folder, or None for a dynamic export."""
    p = Path(folder, STATIC_FILE)
    if not p.exists():
        return None
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
        return StaticSpec(int(raw["window"]), int(raw["prefill"])).check()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecliError(f"cannot read {p}: {e}") from None


def write_static(folder: str | os.PathLike[str], spec: StaticSpec) -> None:
    Path(folder, STATIC_FILE).write_text(json.dumps(asdict(spec.check()), indent=1) + "\n",
                                         encoding="utf-8")


def wants_static(path: str | os.PathLike[str], opts: LoadOptions) -> bool:
    """An ONNX export runs static when asked for the NPU or when it was exported --static."""
    if opts.device == "npu":
        return True
    p = Path(path)
    return read_static(p if p.is_dir() else p.parent) is not None


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise SpecliError(f"static-shape decoding (--device npu, --static exports) needs "
                          f"OpenVINO: {INSTALL_HINT}") from None
    return openvino


def openvino_devices() -> list[str]:
    """Devices OpenVINO's runtime sees (CPU, GPU, NPU...); empty when it is not installed."""
    try:
        return list(import_openvino().Core().available_devices)
    except Exception:
        return []


def pick_device(device: str, available: Sequence[str]) -> str:
    """--device to an OpenVINO device; an explicit one never falls back."""
    names = {d.split(".")[0].upper() for d in available}
    if device == "auto":
        return "NPU" if "NPU" in names else "CPU"
    want = _OV_DEVICE[check_device(device)]
    if want not in names:
        fix = (" (install Intel's NPU driver; on an AI PC, update it), or run the same "
               "static graphs on the CPU with --device cpu" if want == "NPU" else "")
        raise SpecliError(f"--device {device}: OpenVINO sees no {want} here (devices: "
                          f"{', '.join(available) or 'none'}){fix}")
    return want


def _compile_config(device: str, threads: int) -> dict[str, Any]:
    if device == "CPU":
        # fp32 compute and no on-the-fly activation quantisation: with it (group size 32, the
        # plugin's default for int8 weights) a token's logits moved by up to 0.38 with the
        # other tokens of its window (1.5B int8, measured), so a verify pass would not give
        # the token its plain-step logits and speculation would not be lossless.  Without
        # it the window rows equal one-token calls within 3e-5 (float summation order).
        return {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
                "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1, **json.loads(os.environ.get("SPECLI_OV_CPU", "{}"))}
    from ..registry import specli_home

    cache = specli_home() / "openvino-cache"  # an NPU compile takes minutes: once per shape
    cache.mkdir(parents=True, exist_ok=True)
    return {"CACHE_DIR": str(cache), "PERFORMANCE_HINT": "LATENCY"}


def _new_rows_only(model: Any) -> None:
    """Make each present.N output the new tokens' K/V alone (the Concat's second input),
    not past + new: a static call then returns W rows, not C + W."""
    done = 0
    for result in model.get_results():
        names = result.output(0).get_names()
        if not any(n.startswith("present.") for n in names):
            continue
        node = result.input_value(0).get_node()
        while node.get_type_name() == "Identity":
            node = node.input_value(0).get_node()
        if node.get_type_name() != "Concat" or node.get_input_size() != 2:
            raise SpecliError("static decoding needs an export made by `specli export` "
                              f"(present output {sorted(names)[0]} is not past + new)")
        result.input(0).replace_source_output(node.input_value(1))
        done += 1
    if not done:
        raise SpecliError("the model has no present.N outputs: not a decoder with a KV cache")
    model.validate_nodes_and_infer_types()


@dataclass
class _Call:
    """One compiled shape (seq tokens, `rows` logits rows) and its reusable inputs."""

    request: Any
    seq: int
    rows: int
    feed: dict[str, np.ndarray]
    present: list[Any]  # the compiled model's present outputs, in buffer order
    logits: Any


class StaticModel(ONNXModel):
    """A specli ONNX export run with fixed shapes by OpenVINO (CPU, GPU or NPU plugin);
    one rollback-able KV sequence of at most C = --ctx tokens."""

    name = "openvino"

    def __init__(self, path: str | os.PathLike[str], opts: LoadOptions | None = None, *,
                 spec: StaticSpec | None = None) -> None:
        opts = opts or LoadOptions()
        ov = import_openvino()
        model_file, folder = self._locate(Path(path))
        self.path = str(folder)
        self._tok, self._tok_cfg, gen_cfg, cfg = self._load_tokenizer(folder)
        self.spec = (spec or read_static(folder) or StaticSpec()).check()
        core = ov.Core()
        self.device = pick_device(opts.device, core.available_devices)
        threads = opts.n_threads or default_cores()
        self.n_threads = threads if self.device == "CPU" else None
        n_train = int(cfg.get("max_position_embeddings") or opts.n_ctx)
        self.n_ctx = self.capacity = min(opts.n_ctx, n_train)
        self._max_pos = n_train
        self.window = self.spec.window
        self.n_batch = self.spec.prefill
        try:
            model = core.read_model(str(model_file))
        except Exception as e:
            raise SpecliError(f"OpenVINO could not read {model_file.name}: {_one_line(e)}") \
                from None
        names = {i.get_any_name() for i in model.inputs}
        for need in ("input_ids", "attention_mask", "position_ids", "logits_positions"):
            if need not in names:
                raise SpecliError(f"{model_file.name} has no {need!r} input: static decoding "
                                  "runs exports made by `specli export`")
        self._layers = sum(1 for n in names if n.startswith("past_key_values.")
                           and n.endswith(".key"))
        k0 = next(i for i in model.inputs if i.get_any_name() == "past_key_values.0.key")
        shape = k0.get_partial_shape()
        self._kv_heads, self._head_dim = shape[1].get_length(), shape[3].get_length()
        self.n_vocab = model.outputs[0].get_partial_shape()[-1].get_length()
        _new_rows_only(model)
        self._kv_names = [f"past_key_values.{i}.{kv}" for i in range(self._layers)
                          for kv in ("key", "value")]
        self._kv = [np.zeros((1, self._kv_heads, self.capacity, self._head_dim), np.float32)
                    for _ in self._kv_names]
        config = _compile_config(self.device, threads)
        t0 = time.perf_counter()
        self._verify = self._compile(core, model, self.window + 1, self.window + 1, config)
        self._prefill = self._compile(core, model, self.spec.prefill, 1, config)
        self.compile_s = time.perf_counter() - t0
        self.provider = f"OpenVINO {self.device}"
        self.placement = (f"OpenVINO {self.device} plugin, static shapes (ctx {self.capacity}, "
                          f"window {self.window}+1, prefill {self.spec.prefill})"
                          + (f", {threads} threads" if self.device == "CPU" else ""))
        self.note = ""
        self.calls = 0  # fixed-shape calls run (a verify pass of up to K+1 tokens is one)
        self._init_vocabulary(gen_cfg)

    def _compile(self, core: Any, model: Any, seq: int, rows: int,
                 config: dict[str, Any]) -> _Call:
        c = self.capacity
        m = model.clone()
        shapes: dict[str, list[int]] = {"input_ids": [1, seq], "attention_mask": [1, c + seq],
                                        "position_ids": [1, seq], "logits_positions": [rows]}
        for n in self._kv_names:
            shapes[n] = [1, self._kv_heads, c, self._head_dim]
        try:
            m.reshape(shapes)
            compiled = core.compile_model(m, self.device, config)
        except Exception as e:
            raise SpecliError(f"OpenVINO could not compile the static model ({seq} tokens, "
                              f"ctx {c}) for {self.device}: {_one_line(e)}") from None
        feed: dict[str, np.ndarray] = {
            "input_ids": np.zeros((1, seq), np.int64),
            "attention_mask": np.zeros((1, c + seq), np.int64),
            "position_ids": np.zeros((1, seq), np.int64),
            "logits_positions": np.arange(rows, dtype=np.int64),
        }
        feed.update(zip(self._kv_names, self._kv, strict=True))  # shared, never copied
        by_name = {}
        for out in compiled.outputs:
            for n in out.get_names():
                by_name[n] = out
        present = [by_name[n.replace("past_key_values", "present")] for n in self._kv_names]
        return _Call(compiled.create_infer_request(), seq, rows, feed, present,
                     compiled.outputs[0])

    # -- KV cache ------------------------------------------------------------------------
    def eval(self, tokens: Sequence[int], logits_for: Sequence[int] = ()) -> np.ndarray:
        n = len(self.tokens)
        if n + len(tokens) > self.capacity:
            raise SpecliError(
                f"static context full: {n} + {len(tokens)} tokens > capacity {self.capacity} "
                "(the static KV buffer is --ctx tokens): raise --ctx")
        t0 = time.perf_counter()
        want = sorted(set(logits_for))
        rows: list[np.ndarray] = []
        start, verify_len = 0, self.window + 1
        while start < len(tokens):
            left = len(tokens) - start
            wanted = [i - start for i in want if i >= start]
            # a prefill chunk returns no logits: chunks holding wanted rows use the window
            if left > verify_len and (not wanted or wanted[0] >= self._prefill.seq):
                call = self._prefill
                size = min(left, call.seq)
            else:
                call, size = self._verify, min(left, verify_len)
            chunk = list(tokens[start : start + size])
            local = [i for i in wanted if i < size]
            out = self._run(call, chunk)
            if local:
                rows.append(np.array(out[local], dtype=np.float32))
            start += size
        self.step_clock.add(len(tokens), time.perf_counter() - t0)
        if not rows:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return np.concatenate(rows)

    def _run(self, call: _Call, chunk: list[int]) -> np.ndarray:
        """One fixed-shape call on `chunk` (padded to call.seq); returns its logits rows
        (call.rows of them) and stores the chunk's K/V in buffer slots [n, n + m)."""
        n, m, c = len(self.tokens), len(chunk), self.capacity
        f = call.feed
        f["input_ids"][0, :m] = chunk
        f["input_ids"][0, m:] = 0
        mask = f["attention_mask"][0]
        mask[:] = 0
        mask[:n] = 1
        mask[c : c + m] = 1
        f["position_ids"][0] = np.minimum(np.arange(n, n + call.seq), self._max_pos - 1)
        try:
            res = call.request.infer(f, share_inputs=True, share_outputs=True)
        except Exception as e:
            raise SpecliError(f"OpenVINO failed on {self.device}: {_one_line(e)}") from None
        self.calls += 1
        for buf, out in zip(self._kv, call.present, strict=True):
            buf[:, :, n : n + m] = res[out][:, :, :m]
        self.tokens.extend(chunk)
        return res[call.logits][0]

    def truncate(self, n: int) -> None:
        # slots >= n stay as they are: masked, their softmax weight is exactly 0
        del self.tokens[max(n, 0):]

    def close(self) -> None:
        self._verify = self._prefill = None  # type: ignore[assignment]
        self._kv = []
