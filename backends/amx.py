"""CPU weights around an AMX unit that faults.

Where the CPU reports Intel AMX, llama.cpp moves a CPU model's quantised weights into its
AMX buffer and multiplies every batch of two or more tokens with tile instructions.  On
some machines the first of them faults: a 2-core Xeon VM (AMX_INT8 = 1, 2026-11-28) died
with SIGSEGV at `ldtilecfg` in `ggml_backend_amx_mul_mat` on every prompt and every
verification pass, in specli and in plain llama-cpp-python alike (llama.cpp issue 20824
reports the same).  A process cannot survive it, so a child process loads the model and
evaluates four tokens once per machine and llama.cpp build; the answer is cached.  Where
the child dies, weights go where they go on a CPU without AMX: repacked for llama.cpp's
AVX2/AVX-512 kernels (CPU_REPACK) where ggml repacks their type, plain otherwise.

`SPECLI_AMX=off` skips the check and avoids AMX; `SPECLI_AMX=on` skips it and uses AMX.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import platform
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from ..registry import specli_home
from ..threads import cpu_name
from .gguf_tensors import Tensor, TensorTable, read_tensor_table

# ggml types with AMX kernels (ggml-cpu/amx/common.h, qtype_has_amx_kernels):
# Q4_0 Q4_1 Q8_0 Q4_K Q5_K Q6_K IQ4_XS
AMX_TYPES = frozenset({2, 3, 8, 12, 13, 14, 23})
# ggml's x86 repacking (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type), for
# weights with a row count divisible by 8: Q4_0 Q4_K IQ4_NL MXFP4 with AVX2, Q2_K with
# AVX-512.  Every AMX CPU has both.
REPACK_TYPES = frozenset({2, 12, 20, 39, 10})
# the weights llama.cpp multiplies activations by (MUL_MAT): only those may be repacked
_MATMUL = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up",
           "ffn_down", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
_FAULTS = {-signal.SIGSEGV, -signal.SIGILL, -signal.SIGBUS}
PROBE_TIMEOUT_S = 600.0


class _Override(ctypes.Structure):  # struct llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass
class WeightPlan:
    """Model parameters that keep a model's CPU weights off a faulting AMX unit."""

    note: str
    patterns: list[bytes]
    _array: ctypes.Array = field(repr=False)

    def apply(self, mparams: llama_cpp.llama_model_params) -> None:
        mparams.use_extra_bufts = False  # no AMX buffer; repacking only where named below
        mparams.tensor_buft_overrides = ctypes.addressof(self._array)


def on_cpu(name: str, n_layer: int | None, n_gpu_layers: int) -> bool:
    """Whether llama.cpp keeps this weight on the CPU: it offloads the last n_gpu_layers
    of the n_layer blocks plus the output layer (llama-model.cpp, i_gpu_start)."""
    if n_gpu_layers <= 0:
        return True
    if n_layer is None:
        return False
    start = max(n_layer + 1 - n_gpu_layers, 0)
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) < start
    return name == "output.weight" and n_layer < start


def repack_patterns(table: TensorTable, n_gpu_layers: int) -> list[str]:
    """Regexes naming the CPU weights that llama.cpp would repack on this CPU without
    AMX: one per kind of weight, listing its blocks (Q4_K_M mixes types across blocks)."""
    blocks: dict[str, list[int]] = {}
    output = False
    for t in table.tensors:
        if (len(t.dims) != 2 or t.type not in REPACK_TYPES or t.dims[1] % 8
                or not on_cpu(t.name, table.n_layer, n_gpu_layers)):
            continue
        m = _BLOCK.match(t.name)
        if m and m.group(2) in _MATMUL:
            blocks.setdefault(m.group(2), []).append(int(m.group(1)))
        elif t.name == "output.weight":
            output = True
    patterns = [rf"^blk\.({'|'.join(map(str, sorted(ids)))})\.{kind}\.weight$"
                for kind, ids in sorted(blocks.items())]
    return patterns + ([r"^output\.weight$"] if output else [])


def uses_amx(t: Tensor) -> bool:
    """Whether llama.cpp would put this weight in its AMX buffer (2-D, a type with AMX
    kernels, rows in whole tiles)."""
    return len(t.dims) == 2 and t.type in AMX_TYPES and t.dims[1] % 32 == 0


def _ggml(name: str) -> ctypes.CDLL | None:
    lib = Path(llama_cpp.__file__).parent / "lib"
    for file in (f"lib{name}.so", f"lib{name}.dylib", f"{name}.dll"):
        if (lib / file).exists():
            try:
                return ctypes.CDLL(str(lib / file))
            except OSError:
                return None
    return None


@functools.cache
def cpu_extra_buffers() -> dict[str, int]:
    """llama.cpp's extra CPU weight buffer types by name (AMX, CPU_REPACK, ...), or {}
    where the libraries do not say: fixed for the process, so asked once."""
    base, reg_lib = _ggml("ggml-base"), _ggml("ggml")
    if base is None or reg_lib is None:
        return {}
    try:
        by_type, dev_reg = reg_lib.ggml_backend_dev_by_type, base.ggml_backend_dev_backend_reg
        proc, buft_name = base.ggml_backend_reg_get_proc_address, base.ggml_backend_buft_name
    except AttributeError:
        return {}
    by_type.restype, by_type.argtypes = ctypes.c_void_p, [ctypes.c_int]
    dev_reg.restype, dev_reg.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    proc.restype, proc.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
    buft_name.restype, buft_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    cpu = by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    fn = proc(dev_reg(cpu), b"ggml_backend_dev_get_extra_bufts") if cpu else None
    if not fn:
        return {}
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(cpu)
    found: dict[str, int] = {}
    i = 0
    while bufts and bufts[i]:
        found[buft_name(bufts[i]).decode()] = bufts[i]
        i += 1
    return found


_CHILD = r"""
import ctypes, sys
import llama_cpp
quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()
mp = llama_cpp.llama_model_default_params()
mp.n_gpu_layers = 0
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), mp)
if not model:
    sys.exit(3)
cp = llama_cpp.llama_context_default_params()
cp.n_ctx = cp.n_batch = cp.n_ubatch = 16
cp.n_threads = cp.n_threads_batch = 2
cp.offload_kqv = cp.op_offload = False
ctx = llama_cpp.llama_init_from_model(model, cp)
if not ctx:
    sys.exit(3)
tokens = (llama_cpp.llama_token * 4)(1, 2, 3, 4)
sys.exit(0 if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, 4)) == 0 else 3)
"""


def probe(model_path: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool | None:
    """Loads the model on the CPU in a child process and evaluates a 4-token batch (AMX
    tiles).  True: it ran; False: the child died of a fault; None: it failed otherwise
    (out of memory, a timeout), which says nothing about AMX."""
    try:
        rc = subprocess.run([sys.executable, "-c", _CHILD, model_path], timeout=timeout_s,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL).returncode
    except (subprocess.TimeoutExpired, OSError):
        return None
    return True if rc == 0 else False if rc in _FAULTS else None


def machine_key() -> str:
    """What the answer depends on: the llama.cpp build, the kernel and the CPU."""
    system = llama_cpp.llama_print_system_info().decode(errors="replace")
    return (f"llama-cpp-python {llama_cpp.__version__} | {platform.release()} | {cpu_name()}"
            f" | {system}")


def _forced() -> bool | None:
    """SPECLI_AMX: on (use AMX), off (avoid it), or unset (check)."""
    value = os.environ.get("SPECLI_AMX", "").strip().lower()
    return True if value in ("on", "1", "yes") else False if value in ("off", "0", "no") else None


def amx_works(model_path: str, cache: Path) -> bool:
    """Whether AMX ran a batch in a child process on this machine, asked once and kept in
    `cache` (a JSON map from machine_key() to the answer); SPECLI_AMX overrides it."""
    if _forced() is not None:
        return bool(_forced())
    key = machine_key()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), bool):
        return known[key]
    works = probe(model_path)
    if works is None:
        return False  # unknown: the safe way this time, asked again next time
    known[key] = works
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)
    except OSError:
        pass
    return works


def plan_weights(
    model_path: str, n_gpu_layers: int, cache: Path | None = None
) -> WeightPlan | None:
    """None where llama.cpp may place this model's CPU weights itself: no AMX buffer in
    this build or on this CPU, no weight AMX would take, or AMX works here.  Otherwise
    the parameters that keep them off AMX.  `cache`: $SPECLI_HOME/amx.json unless given."""
    bufts = cpu_extra_buffers()
    if "AMX" not in bufts:
        return None
    try:
        table = read_tensor_table(model_path)
    except (OSError, ValueError):
        return None  # llama.cpp will say what is wrong with the file
    if not any(uses_amx(t) and on_cpu(t.name, table.n_layer, n_gpu_layers)
               for t in table.tensors):
        return None
    if amx_works(model_path, cache or specli_home() / "amx.json"):
        return None
    why = "SPECLI_AMX=off" if _forced() is False else "AMX faulted in a check"
    return plan_for(table, n_gpu_layers, bufts.get("CPU_REPACK"), f"{why}: AVX-512 kernels")


def plan_for(table: TensorTable, n_gpu_layers: int, repack: int | None, note: str) -> WeightPlan:
    """No extra buffer types, except CPU_REPACK (the buffer type `repack`, where this
    build has it) for the weights llama.cpp would repack without AMX."""
    patterns = [p.encode() for p in repack_patterns(table, n_gpu_layers)] if repack else []
    array = (_Override * (len(patterns) + 1))()
    for i, p in enumerate(patterns):
        array[i].pattern, array[i].buft = p, repack
    return WeightPlan(note, patterns, array)


@contextlib.contextmanager
def llama_defaults(plan: WeightPlan | None) -> Iterator[None]:
    """`llama_cpp.Llama` built inside takes the plan: it starts from
    llama_model_default_params() and sets no buffer fields of its own."""
    if plan is None:
        yield
        return
    low = llama_cpp.llama_cpp
    original = low.llama_model_default_params

    def with_plan() -> llama_cpp.llama_model_params:
        params = original()
        plan.apply(params)
        return params

    low.llama_model_default_params = with_plan
    try:
        yield
    finally:
        low.llama_model_default_params = original
