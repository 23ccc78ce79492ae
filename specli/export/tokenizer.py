"""Tokenizer files for an ONNX export made from a GGUF: tokenizer.json (the `tokenizers`
library), tokenizer_config.json (chat template, BOS/EOS) and generation_config.json
(every id llama.cpp stops on).

Built from the GGUF's own `tokenizer.ggml.*` metadata, never from a Hugging Face
download, and aimed at *llama.cpp's* tokenization, not the original model's: a drafter
and a target on two runtimes only agree if both turn text into the same ids.  So the
pre-tokenizer regexes are the ones llama.cpp uses (no NFC normalizer, for instance),
every control / unknown token becomes a special added token (transformers' GGUF
converter drops most of them), user-defined tokens become non-special added tokens
(llama.cpp splits them out of the text even when special tokens are not parsed, and
prints them even when special tokens are hidden), and SentencePiece vocabularies,
which a GGUF stores as scores without merges, get the BPE merges that reproduce
llama.cpp's score-driven bigram merging.

Supported: `llama` (SentencePiece-style, with byte fallback) and `gpt2` (byte-level BPE)
with the pre-tokenizers in `_PRE`; anything else raises SpecliError.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specli.errors import SpecliError

SPACE = "\u2581"  # SentencePiece's escaped space

# gguf token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ---------------------------------------------------------------------------------------
# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe), applied in
# order, each splitting the pieces of the previous one and keeping the text between
# matches as pieces of its own ("isolated").
# ---------------------------------------------------------------------------------------
# GPT-2's regex as llama.cpp spells it: without GPT-2's final `|\s+`, which changes
# nothing here, since the text between matches is kept as pieces of its own anyway.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")


@dataclass(frozen=True)
class _Pre:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a whole vocabulary entry is kept as is
    add_bos: bool = False  # llama.cpp's default when the GGUF has no add_bos_token


_PRE: dict[str, _Pre] = {}
for _names, _pre in (
    (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), _Pre((_QWEN2,))),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     _Pre((r"\p{N}", _GPT2))),
    (("gpt-2", "phi-2", "mpt", "olmo"), _Pre((_GPT2,))),
    (("llama3", "llama-v3", "llama-bpe", "falcon3"), _Pre((_LLAMA3,), True, True)),
    (("default",), _Pre(_DEFAULT)),
):
    for _n in _names:
        _PRE[_n] = _pre

# ---------------------------------------------------------------------------------------
# llama.cpp's rules for special tokens by their text (llama_vocab::impl::load)
# ---------------------------------------------------------------------------------------
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
    "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>",
    "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
    "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})
# fill-in-the-middle roles whose tokens end generation when the GGUF does not name them
_FIM_EOG_TEXTS = {
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# other texts llama.cpp forces to CONTROL when the GGUF does not name their role
_ROLE_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>",
                "<PRE>", "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>",
                "<SUF>", "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>",
                "<MID>", "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    **_FIM_EOG_TEXTS,
}
_ALWAYS_USER_DEFINED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})
_ROLE_KEYS = {
    "bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id",
    "eom": "eom_token_id", "unk": "unknown_token_id", "pad": "padding_token_id",
    "fim_pre": "fim_pre_token_id", "fim_suf": "fim_suf_token_id",
    "fim_mid": "fim_mid_token_id", "fim_pad": "fim_pad_token_id",
    "fim_rep": "fim_rep_token_id", "fim_sep": "fim_sep_token_id",
}


# ---------------------------------------------------------------------------------------
# reading the GGUF header
# ---------------------------------------------------------------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Every key/value of a GGUF header, tensors skipped.  Own reader because gguf's
    GGUFReader indexes every array element first (8 s for a 262k vocabulary)."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise SpecliError(f"cannot read {path}: {e}") from None
    try:
        if buf[:4] != b"GGUF":
            raise SpecliError(f"{path} is not a GGUF file")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise SpecliError(f"{path}: GGUF version {version} is not supported")
        pos = 24
        meta: dict[str, Any] = {}

        def string(p: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, p)
            raw = buf[p + 8 : p + 8 + n]
            try:
                return raw.decode("utf-8"), p + 8 + n
            except UnicodeDecodeError:
                raise SpecliError(f"{path}: metadata string {raw[:40]!r} is not UTF-8") from None

        def value(t: int, p: int) -> tuple[Any, int]:
            if t == _STRING:
                return string(p)
            if t == _ARRAY:
                sub, n = struct.unpack_from("<IQ", buf, p)
                p += 12
                if sub == _STRING:
                    out = []
                    for _ in range(n):
                        s, p = string(p)
                        out.append(s)
                    return out, p
                if sub in _SCALARS:
                    dt = np.dtype(_SCALARS[sub])
                    arr = np.frombuffer(buf, dtype=dt, count=n, offset=p).copy()
                    return arr, p + n * dt.itemsize
                out = []
                for _ in range(n):
                    v, p = value(sub, p)
                    out.append(v)
                return out, p
            if t in _SCALARS:
                fmt = _SCALARS[t]
                return struct.unpack_from(fmt, buf, p)[0], p + struct.calcsize(fmt)
            raise SpecliError(f"{path}: unknown GGUF value type {t}")

        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            meta[key], pos = value(vtype, pos + 4)
        return meta
    except struct.error:
        raise SpecliError(f"{path}: truncated GGUF header") from None
    finally:
        buf.close()


# ---------------------------------------------------------------------------------------
# the vocabulary as llama.cpp sees it
# ---------------------------------------------------------------------------------------
@dataclass
class GGUFVocab:
    """A GGUF's tokenizer after llama.cpp's load-time rules (token kinds fixed up by text,
    default ids and flags filled in)."""

    model: str  # "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]  # gguf token types after llama.cpp's fix-ups
    scores: np.ndarray | None
    merges: list[str]
    roles: dict[str, int]  # bos, eos, eot, ... -> id (present roles only)
    eog: list[int]  # every id llama.cpp ends generation on
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    context_length: int | None
    index: dict[str, int]  # token text -> id

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], source: str) -> GGUFVocab:
        model = meta.get("tokenizer.ggml.model")
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if model not in ("llama", "gpt2") or (model == "gpt2" and pre not in _PRE):
            kind = model if model != "gpt2" else f"gpt2 with pre-tokenizer '{pre}'"
            raise SpecliError(
                f"{source}: tokenizer '{kind}' is not supported for export (supported: "
                f"llama/SentencePiece, gpt2 with {', '.join(sorted(_PRE))})")
        tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise SpecliError(f"{source} has no tokenizer.ggml.tokens")
        n = len(tokens)
        raw_types = meta.get("tokenizer.ggml.token_type")
        types = [int(t) for t in raw_types[:n]] if raw_types is not None else [NORMAL] * n
        scores = meta.get("tokenizer.ggml.scores")
        scores = np.asarray(scores, dtype=np.float64)[:n] if scores is not None else None
        merges = list(meta.get("tokenizer.ggml.merges") or [])
        if model == "gpt2" and not merges:
            raise SpecliError(f"{source} has no tokenizer.ggml.merges")
        index = {t: i for i, t in enumerate(tokens)}
        if len(index) != n:
            raise SpecliError(f"{source}: duplicate tokens in the vocabulary")

        # default ids and flags, then the GGUF's own keys (llama.cpp's order)
        spm = model == "llama"
        roles: dict[str, int] = {"bos": 1, "eos": 2, "unk": 0} if spm else {"bos": 11, "eos": 11}
        roles = {k: v for k, v in roles.items() if v < n}
        for role, key in _ROLE_KEYS.items():
            v = meta.get(f"tokenizer.ggml.{key}")
            if isinstance(v, int | np.integer) and 0 <= int(v) < n:
                roles[role] = int(v)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", spm or _PRE[pre].add_bos))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", spm))

        eog = _fix_special_kinds(tokens, types, roles, index)
        arch = meta.get("general.architecture")
        ctx = meta.get(f"{arch}.context_length")
        return cls(
            model=model, pre=pre, tokens=tokens, types=types, scores=scores, merges=merges,
            roles=roles, eog=eog, add_bos=add_bos, add_eos=add_eos,
            add_space_prefix=add_space_prefix,
            chat_template=meta.get("tokenizer.chat_template"),
            context_length=int(ctx) if ctx is not None else None, index=index)

    def text(self, role: str) -> str | None:
        i = self.roles.get(role)
        return self.tokens[i] if i is not None else None


def _fix_special_kinds(
    tokens: list[str], types: list[int], roles: dict[str, int], index: dict[str, int]
) -> list[int]:
    """llama.cpp's load-time rules, in its order: roles the GGUF does not name are
    found by text (and their tokens made CONTROL), then the end-of-generation set is
    built from the fill-in-the-middle pad/repo/separator roles, the texts it knows
    (<|im_end|>, <|endoftext|>, </s>, <end_of_turn>...; made CONTROL too), and EOS,
    EOT, EOM; then its two exceptions (gpt-oss' <|end|>, and </s> next to Gemma 4's
    <|tool_response>) leave the set.  `types` is updated in place; returns the set.
    A role found by text under several spellings keeps them all (llama.cpp keeps the
    first its hash map yields; real vocabularies carry one)."""
    found: dict[str, list[int]] = {}
    for role, texts in _ROLE_TEXTS.items():
        if role not in roles:
            found[role] = [index[t] for t in texts if t in index]
            for i in found[role]:
                types[i] = CONTROL
    eog: set[int] = set()
    for role in _FIM_EOG_TEXTS:
        eog.update([roles[role]] if role in roles else found.get(role, []))
    for t in _EOG_TEXTS & index.keys():
        eog.add(index[t])
        types[index[t]] = CONTROL
    for t in _ALWAYS_USER_DEFINED & index.keys():
        types[index[t]] = USER_DEFINED
    eog.update(roles[r] for r in ("eos", "eot", "eom") if r in roles)
    texts = {tokens[i]: i for i in eog}
    if "<|end|>" in texts and ({"<|return|>", "<|call|>"} <= texts.keys()
                               or {"<|calls|>", "<|flush|>"} <= texts.keys()):
        eog.discard(texts["<|end|>"])
        types[texts["<|end|>"]] = USER_DEFINED
    if "<|tool_response>" in texts and "</s>" in texts:
        eog.discard(texts["</s>"])
        types[texts["</s>"]] = NORMAL
    return sorted(eog)


# ---------------------------------------------------------------------------------------
# tokenizer.json
# ---------------------------------------------------------------------------------------
def spm_merges(tokens: list[str], scores: np.ndarray) -> list[tuple[str, str]]:
    """BPE merges that replay llama.cpp's SentencePiece tokenizer: it repeatedly joins
    the adjacent pair whose concatenation is the highest-scoring vocabulary entry, so
    every split of every entry into two entries is a merge, ranked by that entry's
    score.  Equal scores are ordered by id: llama.cpp would take the leftmost pair in
    the text, which a ranked merge list cannot express (the vocabularies tested here
    give their normal tokens distinct scores)."""
    index = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, t in enumerate(tokens):
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in index and right in index:
                ranked.append((-float(scores[i]), i, k, left, right))
    ranked.sort()
    return [(left, right) for _s, _i, _k, left, right in ranked]


def _bpe_merges(v: GGUFVocab) -> list[tuple[str, str]]:
    """The GGUF's merges ("a b", split at the first space after the first character,
    as llama.cpp does), keeping those whose parts and result are vocabulary entries
    (the `tokenizers` library accepts no others)."""
    out = []
    for m in v.merges:
        cut = m.find(" ", 1)
        if cut < 0:
            continue
        left, right = m[:cut], m[cut + 1 :]
        if left in v.index and right in v.index and left + right in v.index:
            out.append((left, right))
    return out


def build_tokenizer(v: GGUFVocab) -> Any:
    """A `tokenizers.Tokenizer` that tokenizes like llama.cpp does with this vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre
    from tokenizers.processors import TemplateProcessing

    vocab = dict(v.index)
    if v.model == "llama":
        if v.scores is None:
            raise SpecliError("SentencePiece vocabulary without tokenizer.ggml.scores")
        unk = v.text("unk")
        tok = Tokenizer(models.BPE(vocab, spm_merges(v.tokens, v.scores), unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
        norm = [normalizers.Prepend(SPACE)] if v.add_space_prefix else []
        tok.normalizer = normalizers.Sequence([*norm, normalizers.Replace(" ", SPACE)])
        dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if v.add_space_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
    else:
        spec = _PRE[v.pre]
        tok = Tokenizer(models.BPE(vocab, _bpe_merges(v), ignore_merges=spec.ignore_merges))
        tok.pre_tokenizer = pre.Sequence(
            [pre.Split(Regex(r), "isolated") for r in spec.regexes]
            + [pre.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()

    # llama.cpp splits these out of the text before the model sees it, longest first
    # (control and unknown tokens only when special tokens are parsed)
    kinds = list(zip(v.tokens, v.types, strict=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in kinds if k in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in kinds if k == USER_DEFINED])
    if tok.get_vocab_size(with_added_tokens=True) != len(v.tokens):
        raise SpecliError("added tokens did not keep their GGUF ids")

    bos, eos = v.text("bos"), v.text("eos")
    parts = ([f"{bos}"] if v.add_bos and bos else []) + ["$A"]
    parts += [f"{eos}"] if v.add_eos and eos else []
    if len(parts) > 1:
        specials = {t: v.index[t] for t in parts if t != "$A"}
        tok.post_processor = TemplateProcessing(
            single=" ".join(parts), pair=" ".join(parts + [p.replace("$A", "$B") for p in parts]),
            special_tokens=list(specials.items()))
    return tok


# ---------------------------------------------------------------------------------------
# the three files
# ---------------------------------------------------------------------------------------
def tokenizer_config(v: GGUFVocab) -> dict[str, Any]:
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, role in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unk"),
                       ("pad_token", "pad")):
        text = v.text(role)
        if text is not None:
            cfg[name] = text
    cfg["add_bos_token"] = v.add_bos
    cfg["add_eos_token"] = v.add_eos
    cfg["clean_up_tokenization_spaces"] = False
    if v.context_length:
        cfg["model_max_length"] = v.context_length
    if v.chat_template:
        cfg["chat_template"] = v.chat_template
    return cfg


def generation_config(v: GGUFVocab) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if "bos" in v.roles:
        cfg["bos_token_id"] = v.roles["bos"]
    cfg["eos_token_id"] = v.eog
    return cfg


def load_vocab(gguf_path: Path) -> GGUFVocab:
    gguf_path = Path(gguf_path)
    return GGUFVocab.from_metadata(read_gguf_metadata(gguf_path), gguf_path.name)


def write_tokenizer_files(gguf_path: Path, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json for the
    GGUF's vocabulary into out_dir (created if missing)."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise SpecliError("exporting a tokenizer needs the tokenizers library: "
                          "pip install 'specli[onnx]'") from None
    v = load_vocab(Path(gguf_path))
    tok = build_tokenizer(v)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    for name, data in (("tokenizer_config.json", tokenizer_config(v)),
                       ("generation_config.json", generation_config(v))):
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")
