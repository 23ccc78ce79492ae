"""ONNX decoders through onnxruntime: Intel CPUs, iGPUs and NPUs (OpenVINO), CUDA, DirectML.

Runs a decoder exported with past key values (optimum's `text-generation-with-past`,
or `specli export` from a GGUF file): inputs `input_ids`, `attention_mask`,
`position_ids`, `past_key_values.N.key/value`; outputs `logits`, `present.N.key/value`.
The KV cache lives here as numpy arrays, so rollback is exact slicing.  Exports made
by specli also take `logits_positions`, so only the positions under verification pay
for the LM head (a prompt's prefill pays for none).

The tokenizer comes from the export's `tokenizer.json` (the `tokenizers` library),
the chat template from `tokenizer_config.json`, end-of-generation ids from
`generation_config.json`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..chat_template import render_chat
from ..errors import NoChatTemplate, SpecliError
from ..threads import cores_note, default_cores
from .base import LoadOptions, StepClock, check_device

# execution providers that put a whole model on a GPU, best first
GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")
OPENVINO = "OpenVINOExecutionProvider"
CPU = "CPUExecutionProvider"
INSTALL_HINT = "pip install 'specli[onnx]'"
# prompt chunk when the model computes logits at every position (optimum exports):
# bounds the (chunk x vocab) logits array a prefill call returns
_CHUNK_ALL_LOGITS = 64
_CHUNK = 512


def is_onnx_model(path: str | os.PathLike[str]) -> bool:
    """A folder holding an ONNX decoder, or an .onnx file."""
    p = Path(path)
    return p.suffix == ".onnx" or (p.is_dir() and any(p.glob("*.onnx")))


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise SpecliError(f"ONNX models need onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


@dataclass(frozen=True)
class ProviderChoice:
    """Execution providers to try in order, and what the user asked for."""

    providers: list[tuple[str, dict[str, str]]]
    device: str  # what was asked: auto, cpu, gpu, npu
    fallback: bool  # may fall back to the CPU provider if the first one fails to load


def choose_providers(
    device: str, available: Sequence[str], openvino_devices: Sequence[str] = ()
) -> ProviderChoice:
    """Map --device to onnxruntime execution providers.

    gpu: CUDA, ROCm or DirectML, else OpenVINO's GPU.  npu: OpenVINO's NPU.  cpu:
    OpenVINO's CPU plugin when onnxruntime-openvino is installed, else the default CPU
    provider.  auto: a GPU if one is there (never the NPU, which needs static shapes),
    else the CPU provider, which is the fastest CPU path measured here."""
    check_device(device)
    ov = OPENVINO in available
    ov_has = {d.split(".")[0].upper() for d in openvino_devices}
    cpu = (CPU, {})
    if device == "cpu":
        # ACCURACY: without it OpenVINO's CPU plugin quantises activations on the fly, and
        # a token's logits change with its call's size (0.26 apart, Qwen2.5-0.5B int8)
        first = [(OPENVINO, {"device_type": "CPU", "precision": "ACCURACY"})] if ov else []
        return ProviderChoice([*first, cpu], device, fallback=False)
    if device == "npu":
        if not ov:
            raise SpecliError(
                "--device npu needs the OpenVINO execution provider: "
                "pip install onnxruntime-openvino (it replaces onnxruntime)")
        if openvino_devices and "NPU" not in ov_has:
            raise SpecliError("--device npu: OpenVINO sees no NPU here "
                              f"(devices: {', '.join(openvino_devices)})")
        return ProviderChoice([(OPENVINO, {"device_type": "NPU"}), cpu], device, fallback=False)
    gpus = [(p, {}) for p in GPU_PROVIDERS if p in available]
    if ov and (not openvino_devices or "GPU" in ov_has):
        gpus.append((OPENVINO, {"device_type": "GPU"}))
    if device == "gpu":
        if not gpus:
            raise SpecliError(
                "no GPU execution provider in this onnxruntime "
                f"(it has: {', '.join(available)}); install onnxruntime-gpu, "
                "onnxruntime-directml or onnxruntime-openvino")
        return ProviderChoice([*gpus[:1], cpu], device, fallback=False)
    return ProviderChoice([*gpus[:1], cpu], device, fallback=True)


def openvino_devices(ort: Any) -> list[str]:
    """Devices OpenVINO reports (CPU, GPU, NPU...), when onnxruntime-openvino is installed."""
    get = getattr(ort.capi._pybind_state, "get_available_openvino_device_ids", None)
    try:
        return list(get()) if get else []
    except Exception:
        return []


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpecliError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise SpecliError(f"cannot read {path}: expected a JSON object, got "
                          f"{type(data).__name__}")
    return data


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for
    each byte in byte-level BPE token strings."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _uses_byte_level(decoder: dict[str, Any] | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_uses_byte_level(d) for d in decoder.get("decoders", []) or [])


class ONNXModel:
    """An ONNX decoder with one rollback-able KV sequence, on the chosen device."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], opts: LoadOptions | None = None) -> None:
        opts = opts or LoadOptions()
        ort = import_onnxruntime()
        model_file, folder = self._locate(Path(path))
        self.path = str(folder)
        self._tok, self._tok_cfg, gen_cfg, cfg = self._load_tokenizer(folder)

        choice = choose_providers(opts.device, ort.get_available_providers(), openvino_devices(ort))
        if choice.device == "npu":  # open_model sends --device npu to StaticModel
            raise SpecliError(
                "--device npu: OpenVINO's NPU plugin compiles static shapes only, and this "
                "decoder's KV cache grows with every token (dynamic shapes); open it with "
                "specli's static-shape backend (specli.backends.openvino_static)")
        so = ort.SessionOptions()
        threads = opts.n_threads or default_cores()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.n_threads = threads
        self.note = ""  # what happened when choosing the provider, for --stats
        try:
            with warnings.catch_warnings():  # a skipped provider is reported below instead
                warnings.simplefilter("ignore", UserWarning)
                self._sess = ort.InferenceSession(str(model_file), so, providers=choice.providers)
        except Exception as e:
            if not choice.fallback or len(choice.providers) < 2:
                raise SpecliError(f"onnxruntime could not load {model_file.name} on "
                                  f"{choice.providers[0][0]}: {_one_line(e)}") from None
            self.note = f"{choice.providers[0][0]} failed ({_one_line(e, 80)}); using the CPU"
            try:
                self._sess = ort.InferenceSession(str(model_file), so, providers=[CPU])
            except Exception as e2:
                raise SpecliError(f"onnxruntime could not load {model_file}: "
                                  f"{_one_line(e2)}") from None
        active = self._sess.get_providers()
        self.provider = active[0]
        wanted = choice.providers[0][0]
        if self.provider != wanted:  # onnxruntime skips a provider it cannot use, quietly
            if not choice.fallback:
                raise SpecliError(f"--device {choice.device}: onnxruntime could not use "
                                  f"{wanted} and would run on {self.provider}")
            self.note = self.note or f"{wanted} unavailable; using {self.provider}"
        opts_for = dict(choice.providers).get(self.provider, {})
        self.device = opts_for.get("device_type", "GPU" if self.provider in GPU_PROVIDERS
                                   else "CPU")
        self.placement = f"onnxruntime {self.provider} ({self.device}), {threads} threads"
        if self.note:
            self.placement += f"; {self.note}"
        note = None if opts.n_threads is not None else cores_note()
        if note:
            self.placement += f"; {note}"

        inputs = {i.name: i for i in self._sess.get_inputs()}
        for need in ("input_ids", "attention_mask"):
            if need not in inputs:
                raise SpecliError(f"{model_file.name} is not a decoder with past key values "
                                  f"(no {need!r} input); export with `specli export`")
        self._layers = sum(1 for n in inputs if n.startswith("past_key_values.")
                           and n.endswith(".key"))
        if self._layers == 0:
            raise SpecliError(f"{model_file.name} takes no past key values: export it with "
                              "past (optimum task text-generation-with-past, or specli export)")
        k0 = inputs["past_key_values.0.key"]
        self._kv_heads, self._head_dim = _static(k0.shape[1]), _static(k0.shape[3])
        if self._kv_heads is None or self._head_dim is None:
            self._kv_heads = cfg.get("num_key_value_heads")
            self._head_dim = cfg.get("head_dim") or (
                cfg["hidden_size"] // cfg["num_attention_heads"] if "hidden_size" in cfg else None)
        if not self._kv_heads or not self._head_dim:
            raise SpecliError(f"cannot tell the KV cache shape of {model_file.name}")
        self._kv_dtype = np.float16 if "float16" in k0.type else np.float32
        self._has_positions = "position_ids" in inputs
        self._has_logit_rows = "logits_positions" in inputs
        # specli's exporter keeps every MatMul at 2+ rows; other graphs (optimum's) send a
        # lone token's attention through onnxruntime's one-row (GEMV) path, which sums in
        # another order (0.19 logits apart on Qwen2.5-0.5B): there a one-token call
        # re-feeds the previous token, so no token's logits depend on its call's size.
        self._min_two_rows = not self._has_logit_rows
        out = {o.name: o for o in self._sess.get_outputs()}
        self._outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(self._layers)
                                      for kv in ("key", "value")]
        missing = [o for o in self._outputs if o not in out]
        if missing:
            raise SpecliError(f"{model_file.name} lacks outputs {', '.join(missing[:3])}")
        n_logits = _static(out["logits"].shape[-1])
        self.n_vocab = int(n_logits or cfg.get("vocab_size") or self._tok.get_vocab_size(True))
        n_train = cfg.get("max_position_embeddings") or opts.n_ctx
        self.n_ctx = min(opts.n_ctx, int(n_train))
        self.n_batch = _CHUNK if self._has_logit_rows else _CHUNK_ALL_LOGITS

        self._init_vocabulary(gen_cfg)
        self._past: list[np.ndarray] = []
        self.truncate(0)

    def _init_vocabulary(self, gen_cfg: dict[str, Any]) -> None:
        """BOS, end-of-generation ids and token pieces from the export's tokenizer files
        (shared with the static-shape OpenVINO backend, which runs the same exports)."""
        self.bos = self._special_id(self._tok_cfg.get("bos_token"))
        if self.bos is None and isinstance(gen_cfg.get("bos_token_id"), int):
            self.bos = gen_cfg["bos_token_id"]
        eos = gen_cfg.get("eos_token_id", [])
        self._eog = set(eos if isinstance(eos, list) else [eos])
        cfg_eos = self._special_id(self._tok_cfg.get("eos_token"))
        if cfg_eos is not None and not self._eog:
            self._eog.add(cfg_eos)
        self._byte_level = _uses_byte_level(json.loads(self._tok.to_str()).get("decoder"))
        self._byte_of = _bytes_to_unicode() if self._byte_level else {}
        self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._piece_cache: dict[tuple[int, bool], bytes] = {}
        self.tokens: list[int] = []
        self.step_clock = StepClock()
        self.catch_up_stepwise = 0

    # -- loading ---------------------------------------------------------------------
    @staticmethod
    def _locate(p: Path) -> tuple[Path, Path]:
        if not p.exists():
            raise SpecliError(f"model not found: {p}")
        if p.is_file():
            return p, p.parent
        for name in ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx"):
            if (p / name).exists():
                return p / name, p
        found = sorted(p.glob("*.onnx"))
        if not found:
            raise SpecliError(f"no .onnx model in {p}")
        return found[0], p

    @staticmethod
    def _load_tokenizer(folder: Path) -> tuple[Any, dict, dict, dict]:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise SpecliError(f"ONNX models need the tokenizers library: {INSTALL_HINT}") from None
        tj = folder / "tokenizer.json"
        if not tj.exists():
            raise SpecliError(f"{folder} has no tokenizer.json (export it with `specli export`)")
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as e:
            raise SpecliError(f"cannot read {tj}: {_one_line(e)}") from None
        tok.encode_special_tokens = False
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        jinja = folder / "chat_template.jinja"  # where recent transformers save it
        if not tok_cfg.get("chat_template") and jinja.exists():
            tok_cfg["chat_template"] = jinja.read_text(encoding="utf-8")
        return (tok, tok_cfg, _read_json(folder / "generation_config.json"),
                _read_json(folder / "config.json"))

    def _special_id(self, token: Any) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if not token:
            return None
        return self._tok.token_to_id(token)

    # -- tokenizer ---------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        # control tokens written in the text are parsed only when `special`
        self._tok.encode_special_tokens = not special
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False
        return [self.bos, *ids] if add_bos and self.bos is not None else list(ids)

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        key = (token, special)
        piece = self._piece_cache.get(key)
        if piece is None:
            piece = self._piece(token, special)
            self._piece_cache[key] = piece
        return piece

    def _piece(self, token: int, special: bool) -> bytes:
        text = self._tok.id_to_token(token)
        if text is None:
            return b""
        if token in self._special:
            return text.encode("utf-8") if special else b""
        if self._byte_level:
            try:
                return bytes(self._byte_of[c] for c in text)
            except KeyError:  # an added (non-byte-level) token: its text is literal
                return text.encode("utf-8")
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])  # SentencePiece byte fallback
        return text.replace("\u2581", " ").encode("utf-8")

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def vocab_texts(self) -> list[bytes]:
        texts = []
        for i in range(self.n_vocab):
            t = self._tok.id_to_token(i)
            texts.append(t.encode("utf-8") if t is not None else b"")
        return texts

    @property
    def add_bos(self) -> bool:
        return bool(self._tok_cfg.get("add_bos_token", False)) and self.bos is not None

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        template = self._tok_cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"),
                            None)
        if not template:
            raise NoChatTemplate(Path(self.path).name)
        cfg = self._tok_cfg

        def text_of(t: Any) -> str:
            return (t.get("content", "") if isinstance(t, dict) else t) or ""

        return render_chat(template, messages, source=Path(self.path).name,
                           bos_token=text_of(cfg.get("bos_token")),
                           eos_token=text_of(cfg.get("eos_token")))

    # -- KV cache ------------------------------------------------------------------------
    def eval(self, tokens: Sequence[int], logits_for: Sequence[int] = ()) -> np.ndarray:
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise SpecliError(
                f"context full: {len(self.tokens)} + {len(tokens)} tokens > --ctx {self.n_ctx}")
        t0 = time.perf_counter()
        want = sorted(set(logits_for))
        rows: list[np.ndarray] = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[start : start + self.n_batch])
            local = [i - start for i in want if start <= i < start + len(chunk)]
            rows.append(self._run(chunk, local))
        self.step_clock.add(len(tokens), time.perf_counter() - t0)
        if not rows:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return np.concatenate(rows).astype(np.float32, copy=False)

    def _run(self, chunk: list[int], local: list[int]) -> np.ndarray:
        if len(chunk) == 1 and self._min_two_rows and self.tokens:
            prev = self.tokens[-1]
            self.truncate(len(self.tokens) - 1)
            return self._run([prev, *chunk], [1] if local else [])
        past, n = len(self.tokens), len(chunk)
        feed: dict[str, np.ndarray] = {
            "input_ids": np.asarray([chunk], dtype=np.int64),
            "attention_mask": np.ones((1, past + n), dtype=np.int64),
        }
        if self._has_positions:
            feed["position_ids"] = np.arange(past, past + n, dtype=np.int64)[None, :]
        if self._has_logit_rows:  # one row when none is wanted: the LM head stays cheap
            feed["logits_positions"] = np.asarray(local or [n - 1], dtype=np.int64)
        for i in range(self._layers):
            feed[f"past_key_values.{i}.key"] = self._past[2 * i]
            feed[f"past_key_values.{i}.value"] = self._past[2 * i + 1]
        try:
            out = self._sess.run(self._outputs, feed)
        except Exception as e:
            raise SpecliError(f"onnxruntime failed on {self.provider}: {_one_line(e)}") from None
        self._past = out[1:]
        self.tokens.extend(chunk)
        logits = out[0][0]
        if not self._has_logit_rows:
            return logits[local]
        return logits if local else logits[:0]

    def truncate(self, n: int) -> None:
        if n > len(self.tokens):
            return
        if n == 0 or not self._past:
            empty = np.zeros((1, self._kv_heads, 0, self._head_dim), dtype=self._kv_dtype)
            self._past = [empty] * (2 * self._layers)
        elif n < len(self.tokens):
            self._past = [np.ascontiguousarray(a[:, :, :n]) for a in self._past]
        del self.tokens[n:]

    # -- candidate trees: chains only (the exported graph has a causal mask only) ----------
    @property
    def max_branches(self) -> int:
        return 1

    def eval_tree(self, root: int, tokens: Sequence[int], parents: Sequence[int]) -> np.ndarray:
        raise SpecliError("ONNX models verify chains only (no candidate trees); use --branches 1")

    def keep_path(self, path: Sequence[int]) -> None:
        raise SpecliError("keep_path without eval_tree")

    def reset(self) -> None:
        self.truncate(0)

    def close(self) -> None:
        self._sess = None
        self._past = []


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
