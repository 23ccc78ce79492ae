"""The tokenizer files exported from a GGUF must turn text into llama.cpp's own ids.

Every comparison tokenizes the same strings with llama.cpp (`GGUFModel.tokenize`) and
with `tokenizers.Tokenizer.from_file(tokenizer.json)`, with special tokens parsed and
not parsed (the ONNX backend toggles `encode_special_tokens` for the latter), requires
identical ids, and requires `decode` to give the text back.  End-of-generation ids in
generation_config.json must be exactly the ids llama.cpp's `is_eog` accepts.

Fast tests use generated GGUFs (tiny SentencePiece vocabularies, byte-level BPE
vocabularies trained here for each pre-tokenizer); the `real` test uses the cached
Qwen, SmolLM2 and Gemma 3 GGUFs and fails if they are missing.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from tinymodel import (
    CHAT_TEMPLATE,
    silence_llama_log,
    tokenizer_vocab,
    write_tiny_model,
)
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from specli.backends.base import LoadOptions
from specli.backends.gguf import GGUFModel
from specli.errors import SpecliError
from specli.export.tokenizer import GGUFVocab, read_gguf_metadata, write_tokenizer_files

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TEXTS = [
    "Hello, world!", " leading space", "  two leading spaces", "trailing   ", "",
    "\n\nnewlines\n\n\n x", "def f(x):\n    return x * 2  # comment\n\tTab\r\n",
    "for i in range(10):\n        print(i)\n\n\n", "12345 + 67.89 = 1e10, 007, 1234567",
    "naïve café – “quotes” — ünïcödé", "日本語のテキスト, 中文字符, 한국어",
    "emoji 🤖🎉👍🏽 👨‍👩‍👧",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b<|endoftext|>c",
    "I'm can't WE'LL they've 'S", "DON'THE IT'SELF WE'LLBE THEY'REAL don'the",
    "    \n    \n", "x" * 40 + " " * 33 + "y", " ", "a xylophone", "xylophone",
    '<tool_call>{"a": 1}</tool_call>', "<|fim_prefix|>def<|fim_suffix|>x<|fim_middle|>",
    "\u00a0nbsp\u3000ideographic\u2028line sep", "Ω ≈ ∑ ∫ √2 ½ ² Ⅻ", "<s>html</s> <b>x</b>\n\n\n\n",
    "<start_of_turn>user\nx<end_of_turn>", "the speculative decoding model hello test",
    "<0x41> literal byte-token text", "a\u0301e\u0308 combining", "\x00\x01\x1f\x7f controls",
]
_POOL = (list("abcXYZ019 _-.,;:'\"!?()[]{}<>|/\\@#$%^&*+=~`\t\n\r ")
         + list("éüñßøΩπ中文日本한국🤖🎉👍🏽\u200d\u00a0\u3000\u2028\u0301ſİ²½")
         + SPECIALS + ["</s>", "<s>", "<end_of_turn>", "<tool_call>", "  ", "\n\n", "    ",
                       "'s", "'LL", "'Re", "12345", "the", " model"])


def fuzz(n: int, seed: int) -> list[str]:
    """Random strings built from the characters and pieces tokenizers disagree on."""
    rng = random.Random(seed)
    return ["".join(rng.choice(_POOL) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def mismatches(model: GGUFModel, tok: Tokenizer, texts: list[str],
               round_trip: bool = True) -> list[str]:
    """Every way the exported tokenizer differs from llama.cpp on `texts`: ids, and
    decoded text (llama.cpp's pieces joined; the input itself when `round_trip`, i.e.
    unless the vocabulary adds a space before the text and after each special token)."""
    bad = []
    try:
        for special in (True, False):
            tok.encode_special_tokens = not special
            for s in texts:
                want = model.tokenize(s, add_bos=False, special=special)
                got = tok.encode(s, add_special_tokens=False).ids
                if got != want:
                    bad.append(f"special={special} {s!r}: llama.cpp {want[:16]} export {got[:16]}")
                    continue
                if not special:
                    continue
                text = tok.decode(got, skip_special_tokens=False)
                pieces = b"".join(model.token_bytes(t, special=True) for t in want).decode()
                if not round_trip:  # llama.cpp's detokenizer drops the first phantom space
                    pieces = pieces.removeprefix(" ")
                if text != pieces or (round_trip and text != s):
                    bad.append(f"decode {s!r}: export {text!r}, llama.cpp {pieces!r}")
    finally:
        tok.encode_special_tokens = False
    return bad


def check_export(gguf_path: Path, out: Path, texts: list[str],
                 model: GGUFModel | None = None, round_trip: bool = True) -> tuple[Tokenizer, int]:
    """Export, then compare ids, BOS handling and end-of-generation ids with llama.cpp.
    Returns the tokenizer and the number of strings compared."""
    write_tokenizer_files(gguf_path, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    own = model is None
    if own:
        silence_llama_log()
        model = GGUFModel(gguf_path, LoadOptions(n_ctx=64, n_threads=1))
    try:
        assert tok.get_vocab_size(with_added_tokens=True) == model.n_vocab
        bad = mismatches(model, tok, texts, round_trip)
        assert not bad, f"{len(bad)} of {2 * len(texts)} differ:\n" + "\n".join(bad[:10])

        cfg = json.loads((out / "tokenizer_config.json").read_text())
        gen = json.loads((out / "generation_config.json").read_text())
        assert gen["eos_token_id"] == [i for i in range(model.n_vocab) if model.is_eog(i)]
        assert gen.get("bos_token_id") == model.bos
        assert cfg["add_bos_token"] == model.add_bos
        if model.bos is not None:
            assert tok.token_to_id(cfg["bos_token"]) == model.bos
        # the post-processor adds BOS exactly when llama.cpp does
        assert tok.encode("hi there").ids == model.tokenize("hi there", add_bos=True)
        meta = read_gguf_metadata(gguf_path)
        assert cfg.get("chat_template") == meta.get("tokenizer.chat_template")
        arch = meta["general.architecture"]
        assert cfg["model_max_length"] == meta[f"{arch}.context_length"]
    finally:
        if own:
            model.close()
    return tok, len(texts)


# ---------------------------------------------------------------------------------------
# generated GGUFs with a chosen vocabulary
# ---------------------------------------------------------------------------------------
def write_vocab_model(path: Path, tokenizer_kv: dict, seed: int = 0) -> Path:
    """A tiny random-weight llama GGUF whose tokenizer keys are `tokenizer_kv`: model,
    tokens, types, optional pre, scores, merges, ids {key: id}, flags {key: bool}."""
    base = write_tiny_model(path.with_suffix(".base.gguf"), seed=seed)
    reader = gguf.GGUFReader(str(base))
    w = gguf.GGUFWriter(str(path), reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")) or key == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    kv = tokenizer_kv
    w.add_tokenizer_model(kv["model"])
    if "pre" in kv:
        w.add_tokenizer_pre(kv["pre"])
    w.add_token_list(kv["tokens"])
    w.add_token_types(kv["types"])
    if "scores" in kv:
        w.add_token_scores(kv["scores"])
    if "merges" in kv:
        w.add_token_merges(kv["merges"])
    for key, v in kv.get("ids", {}).items():
        w.add_uint32(f"tokenizer.ggml.{key}", v)
    for key, v in kv.get("flags", {}).items():
        w.add_bool(f"tokenizer.ggml.{key}", v)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)
    n = len(kv["tokens"])
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name in ("token_embd.weight", "output.weight"):  # rows follow the vocabulary
            data = rng.standard_normal((n, data.shape[1])).astype(np.float32)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    base.unlink()
    return path


def spm_kv(tokenizer: str = "a", extra: tuple[str, ...] = (), **flags: bool) -> dict:
    """A tiny SentencePiece vocabulary plus `extra` tokens typed NORMAL (llama.cpp may
    re-type them by their text)."""
    v = tokenizer_vocab(tokenizer)
    add = [t for t in extra if t not in v["tokens"]]
    return {"model": "llama", "tokens": v["tokens"] + add,
            "types": v["types"] + [gguf.TokenType.NORMAL] * len(add),
            "scores": v["scores"] + [-5000.0] * len(add),
            "ids": {"bos_token_id": v["bos"], "eos_token_id": v["eos"]},
            "flags": {"add_space_prefix": False, **flags}}


@pytest.fixture(scope="module")
def trained_bpe() -> dict:
    """A byte-level BPE vocabulary (1000 entries) trained here on Spec-Bench prompts, plus
    ChatML control tokens and a user-defined <tool_call>."""
    root = Path(__file__).parent.parent / "specli/data/spec_bench/question.jsonl"
    corpus = [t for line in root.read_text().splitlines() for t in json.loads(line)["turns"]]
    t = Tokenizer(models.BPE())
    # learned on whitespace-led chunks, so that merges cross what the pre-tokenizers
    # split ("(the", "'S", "123", ".\n"): a wrong split then shows as other ids
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s*\S+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # merges across upper-case contractions, which only some pre-tokenizers split off
    contractions = ["DON'THE IT'SELF WE'LLBE THEY'REAL I'VERY SHE'DO I'MORE"] * 50
    t.train_from_iterator(corpus[:300] + contractions, trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(t.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    # a word no merge leads to: one token only where llama.cpp ignores merges (llama3)
    tokens.append("\u0120xylophone")
    n = len(tokens)
    return {"model": "gpt2", "tokens": tokens + SPECIALS + ["<tool_call>"],
            "types": [gguf.TokenType.NORMAL] * n + [gguf.TokenType.CONTROL] * 3
            + [gguf.TokenType.USER_DEFINED],
            "merges": merges, "ids": {"bos_token_id": n + 2, "eos_token_id": n + 1},
            "corpus": corpus[300:400]}


# ---------------------------------------------------------------------------------------
# fast tests
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", ["a", "b"])
def test_tiny_spm_vocabularies_match_llama_cpp(tmp_path, vocab):
    path = write_tiny_model(tmp_path / "m.gguf", tokenizer=vocab)
    check_export(path, tmp_path / "out", TEXTS + fuzz(300, seed=1))
    cfg = json.loads((tmp_path / "out/tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == ("<s>", "</s>", True)
    assert cfg["chat_template"] == CHAT_TEMPLATE
    gen = json.loads((tmp_path / "out/generation_config.json").read_text())
    v = tokenizer_vocab(vocab)
    assert gen == {"bos_token_id": 1, "eos_token_id": sorted([v["eos"], v["im_end"]])}


def test_spm_space_prefix_after_every_special_token(tmp_path):
    # llama.cpp prepends a space to the text and to every piece after a special token
    path = write_vocab_model(tmp_path / "m.gguf", spm_kv("a", add_space_prefix=True))
    tok, _ = check_export(path, tmp_path / "out", TEXTS + fuzz(200, seed=2), round_trip=False)
    assert tok.decode(tok.encode(" the model").ids, skip_special_tokens=True) == " the model"


@pytest.mark.parametrize("pre", ["qwen2", "smollm", "gpt-2", "llama-bpe", "default"])
def test_byte_level_bpe_pre_tokenizers_match_llama_cpp(tmp_path, trained_bpe, pre):
    kv = {k: v for k, v in trained_bpe.items() if k != "corpus"} | {"pre": pre}
    path = write_vocab_model(tmp_path / "m.gguf", kv)
    check_export(path, tmp_path / "out", TEXTS + trained_bpe["corpus"] + fuzz(500, seed=3))


# every text llama.cpp knows an end-of-generation or fill-in-the-middle role by (one
# spelling per FIM role: with several, llama.cpp keeps whichever its hash map yields)
EOG_NAMED = ("<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
             "[e~[", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "[EOS]",
             "[EOT]", "<EOT>", "_<EOT>", "<end_of_utterance>", "<|end_of_text|>", "<|eom_id|>",
             "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|fim_pad|>", "<|repo_name|>",
             "<|file_sep|>", "<|fim_prefix|>", "<|channel|>", "<|message|>")


def test_end_of_generation_rules_follow_llama_cpp(tmp_path):
    # named tokens typed NORMAL become control tokens, and stop generation; </s> (the
    # EOS) and <|end|> leave the set because <|tool_response>, <|return|>, <|call|> are there
    path = write_vocab_model(tmp_path / "m.gguf", spm_kv("a", extra=EOG_NAMED))
    # (not decoded: the SentencePiece decoder turns the "▁" inside a special token
    # into a space, where llama.cpp writes special tokens out verbatim)
    spelled = [t for t in EOG_NAMED if "\u2581" not in t]
    texts = ["".join(spelled), " x ".join(spelled), "a</s>b<|end|>c<|channel|>d"]
    check_export(path, tmp_path / "out", texts + TEXTS)
    eog = json.loads((tmp_path / "out/generation_config.json").read_text())["eos_token_id"]
    tokens = spm_kv("a", extra=EOG_NAMED)["tokens"]
    named = {tokens[i] for i in eog}
    assert "</s>" not in named and "<|end|>" not in named and "<|im_end|>" in named
    assert "<|repo_name|>" in named and "<|fim_prefix|>" not in named


def test_unsupported_tokenizers_are_one_line_errors(tmp_path):
    toks = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b"]}
    for model, pre in (("bert", None), ("t5", None), ("gpt2", "chameleon")):
        meta = toks | {"tokenizer.ggml.model": model, "tokenizer.ggml.pre": pre}
        with pytest.raises(SpecliError, match="not supported") as e:
            GGUFVocab.from_metadata(meta, "x.gguf")
        assert "\n" not in str(e.value)
    bogus = tmp_path / "not.gguf"
    bogus.write_bytes(b"nope" * 10)
    with pytest.raises(SpecliError, match="not a GGUF"):
        write_tokenizer_files(bogus, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# the real vocabularies
# ---------------------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.parametrize("which", ["target", "draft", "smollm2-135m-instruct", "gemma-3-270m"])
def test_real_vocabularies_match_llama_cpp(request, tmp_path, report, which):
    if which in ("target", "draft"):
        target, draft = request.getfixturevalue("qwen_pair")
        model = target if which == "target" else draft
    else:
        model = request.getfixturevalue("cross_drafters")[which]
    root = Path(__file__).parent.parent / "specli/data/spec_bench/question.jsonl"
    prompts = [t for line in root.read_text().splitlines() for t in json.loads(line)["turns"]]
    t0 = time.perf_counter()
    _, n = check_export(Path(model.path), tmp_path / "out", TEXTS + prompts + fuzz(1000, 4),
                        model)
    gen = json.loads((tmp_path / "out/generation_config.json").read_text())
    report("exported tokenizers vs llama.cpp (ids equal on every string, special on/off)",
           [f"{Path(model.path).name}: {2 * n} encodings, EOG {gen['eos_token_id']}, "
            f"{time.perf_counter() - t0:.1f} s"])
    if which in ("target", "draft"):  # ends on <|im_end|>, and on what else llama.cpp does
        assert {151643, 151645}.issubset(gen["eos_token_id"])
