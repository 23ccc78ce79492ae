"""Tiny random-weight LLaMA GGUF models with a real SPM tokenizer, for fast unit tests.

``write_tiny_model(path)`` writes a ~0.8 MB F32 GGUF file (architecture ``llama``) that
llama.cpp loads in milliseconds and that generates tokens.  Nothing is downloaded.

* Weights are drawn from ``numpy.random.default_rng(seed)``; the output projection is scaled
  so that next-token distributions are peaked (median top-1 vs top-2 logit gap ~2.9).  Note that
  llama.cpp's CPU flash attention (``flash_attn_type`` "auto" enables it) makes logits depend on
  the batch size by ~1e-3 relative (~0.02 absolute here), which still flips a greedy argmax about
  once per ~1000 steps; contexts created with ``flash_attn_type=LLAMA_FLASH_ATTN_TYPE_DISABLED``
  and ``type_k = type_v = GGML_TYPE_F32`` agree across batch sizes to ~1e-5.
* ``base=`` + ``noise=`` writes a "draft" copy of an existing tiny model: the same tensors plus
  Gaussian noise of relative size ``noise`` (per tensor, relative to the tensor's RMS) and the
  very same metadata/tokenizer, so it mostly agrees with its base.
* The tokenizer is SentencePiece style (``tokenizer.ggml.model = "llama"``): ``<unk>``, ``<s>``,
  ``</s>``, the 256 byte-fallback tokens ``<0x00>``..``<0xFF>``, the ChatML control tokens
  ``<|im_start|>`` / ``<|im_end|>`` and a few hundred word pieces.  ``add_space_prefix`` is off,
  so ``detokenize(tokenize(s)) == s`` for any string (byte fallback covers all of Unicode).
  ``</s>`` (eos) and ``<|im_end|>`` (eot) are both end-of-generation tokens.
  ``tokenizer="a"`` (default) and ``tokenizer="b"`` give different vocabularies (different word
  pieces, different size, different special-token ids).

Only numpy and the ``gguf`` package are needed to write a model; ``silence_llama_log`` needs
llama-cpp-python.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_LOGIT_STD",
    "IM_END",
    "IM_START",
    "restore_llama_log",
    "TOKENIZERS",
    "silence_llama_log",
    "tokenizer_vocab",
    "write_tiny_model",
    "write_tiny_pair",
]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPACE = "\u2581"  # SentencePiece's "▁" word-boundary marker

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Default standard deviation of the output logits.  With ~900 tokens the expected gap between the
# two largest of N(0, s^2) draws is about s / sqrt(2 ln N) ~ s / 3.7, so s = 12 gives typical
# top-1/top-2 gaps of ~2-3 logits (measured median ~2.8 over 64 greedy steps).
DEFAULT_LOGIT_STD = 12.0

# --------------------------------------------------------------------------------------------
# vocabularies
# --------------------------------------------------------------------------------------------

_PUNCT = ".,!?;:'\"-()[]{}/\\@#$%&*+=<>_~`^|"

_WORDS_A = """
the of and to in is you that it he was for on are as with his they at be this have from or
one had by word but not what all were we when your can said there use an each which she do
how their if will up other about out many then them these so some her would make like him
into time has look two more write go see number no way could people my than first water been
call who oil its now find long down day did get come made may part over new sound take only
little work know place year live me back give most very after thing our just name good
sentence man think say great where help through much before line right too mean old any same
tell boy follow came want show also around form three small set put end does another well large
must big even such because turn here why ask went men read need land different home us move
try kind hand picture again change off play spell air away animal house point page letter
mother answer found study still learn should world hello model token draft target speculative
decoding fast test
""".split()

_BIGRAMS_A = """
th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co
me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur
""".split()

_WORDS_B = """
lorem ipsum dolor sit amet consectetur adipiscing elit sed eiusmod tempor incididunt labore
dolore magna aliqua enim minim veniam quis nostrud exercitation ullamco laboris nisi aliquip
commodo consequat duis aute irure reprehenderit voluptate velit esse cillum fugiat nulla
pariatur excepteur sint occaecat cupidatat non proident sunt culpa officia deserunt mollit
anim est laborum alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega
""".split()

_BIGRAMS_B = """
qu um us is it or re ex er en ur at ta ll li la lo ri ip do
""".split()


def _pieces_for_word(piece: str) -> list[str]:
    """All prefixes of ``piece`` of length >= 2, so SPM's bigram merging can reach ``piece``."""
    return [piece[:i] for i in range(2, len(piece) + 1)]


def _normal_pieces(chars: str, bigrams: Iterable[str], words: Iterable[str]) -> list[str]:
    out: list[str] = [SPACE, *chars]
    out += list(bigrams)
    for w in words:
        out += _pieces_for_word(SPACE + w)
    seen: set[str] = set()
    uniq = []
    for p in out:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


TOKENIZERS = ("a", "b")


def tokenizer_vocab(tokenizer: str = "a") -> dict:
    """Token list, scores, types and special ids for tokenizer ``"a"`` or ``"b"``."""
    from gguf import TokenType

    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tiny tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    digits = "0123456789"
    if tokenizer == "a":
        chars = letters + letters.upper() + digits + _PUNCT
        normal = _normal_pieces(chars, _BIGRAMS_A, _WORDS_A)
    else:
        chars = letters + digits + ".,!?-'"
        normal = _normal_pieces(chars, _BIGRAMS_B, _WORDS_B)

    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    scores: list[float] = [0.0, 0.0, 0.0]
    chat = [IM_START, IM_END]
    if tokenizer == "a":  # chat tokens right after </s>; "b" puts them at the end of the vocab
        tokens += chat
        types += [TokenType.CONTROL] * 2
        scores += [0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(TokenType.BYTE)
        scores.append(0.0)
    for i, piece in enumerate(normal):
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        # SPM merges the bigram whose merged piece has the highest score first; longer pieces
        # (whole words) get higher scores so that words are found greedily.
        scores.append(-1000.0 + 10.0 * len(piece) - 0.001 * i)
    if tokenizer == "b":
        tokens += chat
        types += [TokenType.CONTROL] * 2
        scores += [0.0, 0.0]
    assert len(set(tokens)) == len(tokens), "duplicate token strings"
    return {
        "tokens": tokens,
        "scores": scores,
        "types": [int(t) for t in types],
        "unk": 0,
        "bos": 1,
        "eos": 2,
        "im_start": tokens.index(IM_START),
        "im_end": tokens.index(IM_END),
    }


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------


def _tensor_name(kind: str, bid: int | None = None) -> str:
    import gguf

    t = getattr(gguf.MODEL_TENSOR, kind)
    assert t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA], kind
    name = gguf.TENSOR_NAMES[t]  # e.g. "blk.{bid}.attn_q"; llama.cpp wants the ".weight"
    return (name.format(bid=bid) if bid is not None else name) + ".weight"


def _random_tensors(
    rng: np.random.Generator,
    n_vocab: int,
    n_embd: int,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    logit_std: float,
) -> dict[str, np.ndarray]:
    """numpy shapes are (rows=out, cols=in); the gguf writer reverses them into ggml's ne."""
    head_dim = n_embd // n_head

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    w: dict[str, np.ndarray] = {}
    w[_tensor_name("TOKEN_EMBD")] = normal((n_vocab, n_embd), 1.0)
    for i in range(n_layer):
        w[_tensor_name("ATTN_NORM", i)] = ones(n_embd)
        w[_tensor_name("ATTN_Q", i)] = normal((n_head * head_dim, n_embd), n_embd**-0.5)
        w[_tensor_name("ATTN_K", i)] = normal((n_head_kv * head_dim, n_embd), n_embd**-0.5)
        w[_tensor_name("ATTN_V", i)] = normal((n_head_kv * head_dim, n_embd), n_embd**-0.5)
        w[_tensor_name("ATTN_OUT", i)] = normal((n_embd, n_head * head_dim), n_embd**-0.5)
        w[_tensor_name("FFN_NORM", i)] = ones(n_embd)
        w[_tensor_name("FFN_GATE", i)] = normal((n_ff, n_embd), n_embd**-0.5)
        w[_tensor_name("FFN_UP", i)] = normal((n_ff, n_embd), n_embd**-0.5)
        w[_tensor_name("FFN_DOWN", i)] = normal((n_embd, n_ff), n_ff**-0.5)
    w[_tensor_name("OUTPUT_NORM")] = ones(n_embd)
    # rms_norm makes the final hidden state ~unit RMS, so logits ~ N(0, logit_std^2).
    w[_tensor_name("OUTPUT")] = normal((n_vocab, n_embd), logit_std * n_embd**-0.5)
    return w


def write_tiny_model(
    path: Path,
    *,
    seed: int = 0,
    tokenizer: str = "a",
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 2048,
    base: Path | None = None,
    noise: float = 0.0,
    chat_template: bool = True,
    logit_std: float = DEFAULT_LOGIT_STD,
) -> Path:
    """Write a tiny random LLaMA GGUF model to ``path`` and return ``path``.

    Without ``base``: weights from ``default_rng(seed)``, vocabulary ``tokenizer`` ("a"/"b"),
    hyper-parameters from the keyword arguments, ChatML ``tokenizer.chat_template`` if
    ``chat_template``.  ``logit_std`` sets how peaked the next-token distributions are (the
    default keeps greedy top-1/top-2 gaps well above float noise; lower it, e.g. to 2, for
    tests that need diverse sampling).

    With ``base``: every metadata key (hyper-parameters, tokenizer, chat template) and every
    tensor is copied from the GGUF file ``base``; each float tensor gets Gaussian noise
    ``noise * rms(tensor) * N(0, 1)`` drawn from ``default_rng(seed)``.  The shape/tokenizer
    keyword arguments are then ignored (the result is always compatible with ``base``).
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if base is not None:
        if Path(base).resolve() == path.resolve():
            raise ValueError("base and path must be different files")
        _write_noisy_copy(Path(base), path, seed=seed, noise=noise)
        return path
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be divisible by n_head and n_head by n_head_kv")

    voc = tokenizer_vocab(tokenizer)
    n_vocab = len(voc["tokens"])
    rng = np.random.default_rng(seed)
    tensors = _random_tensors(rng, n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff, logit_std)

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-llama-{tokenizer}-s{seed}")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_vocab_size(n_vocab)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)

    w.add_tokenizer_model("llama")
    w.add_token_list(voc["tokens"])
    w.add_token_scores(voc["scores"])
    w.add_token_types(voc["types"])
    w.add_unk_token_id(voc["unk"])
    w.add_bos_token_id(voc["bos"])
    w.add_eos_token_id(voc["eos"])
    w.add_eot_token_id(voc["im_end"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    if chat_template:
        w.add_chat_template(CHAT_TEMPLATE)

    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    _finish(w)
    return path


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_noisy_copy(base: Path, path: Path, *, seed: int, noise: float) -> None:
    import gguf

    reader = gguf.GGUFReader(str(base))
    arch_field = reader.fields["general.architecture"]
    w = gguf.GGUFWriter(str(path), arch_field.contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.name"):
            continue
        main = field.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), main, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), main)
    base_name = reader.fields["general.name"].contents() if "general.name" in reader.fields else ""
    w.add_name(f"{base_name or base.stem}-draft-n{noise:g}-s{seed}")
    rng = np.random.default_rng(seed)
    float_types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    for t in reader.tensors:
        data = np.array(t.data)  # copy out of the memmap
        if t.tensor_type not in float_types:
            raise ValueError(f"tensor {t.name} has type {t.tensor_type.name}; only F32/F16")
        x = data.astype(np.float32)
        if noise:
            rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) or 1.0
            x = x + (noise * rms) * rng.standard_normal(x.shape).astype(np.float32)
        w.add_tensor(t.name, x.astype(data.dtype))
    _finish(w)


def write_tiny_pair(
    directory: Path, *, seed: int = 0, noise: float = 0.05, tokenizer: str = "a"
) -> tuple[Path, Path]:
    """Write ``target.gguf`` and a noisy ``draft.gguf`` copy of it into ``directory``."""
    directory = Path(directory)
    target = write_tiny_model(directory / "target.gguf", seed=seed, tokenizer=tokenizer)
    draft = write_tiny_model(directory / "draft.gguf", seed=seed + 1, base=target, noise=noise)
    return target, draft


# --------------------------------------------------------------------------------------------
# llama.cpp log control
# --------------------------------------------------------------------------------------------

_LOG_CALLBACK_REF: list = []  # keep the ctypes callback alive for the process lifetime


def silence_llama_log(sink: Callable[[int, str], None] | None = None) -> None:
    """Route llama.cpp/ggml log output to ``sink(level, text)`` (or drop it if ``sink`` is None).

    The reason a model failed to load is only in this log, so pass a sink that collects the
    text when a test needs it.  The callback is process-global.
    """
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _cb(level, text, user_data):  # noqa: ARG001
        if sink is not None:
            try:
                sink(int(level), text.decode("utf-8", "replace") if text else "")
            except Exception:  # never let a Python error cross into C
                pass

    _LOG_CALLBACK_REF.append(_cb)
    llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))


def restore_llama_log() -> None:
    """Re-install llama-cpp-python's own log callback (undo ``silence_llama_log``)."""
    import llama_cpp
    from llama_cpp import _logger

    llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
