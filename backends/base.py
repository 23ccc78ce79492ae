"""The one interface every model runtime implements.

The engine only ever talks to a model through this protocol, so a GGUF target can
be verified against an ONNX drafter (or any later runtime) without the loop
knowing which is which.  A backend owns one sequence of tokens in its KV cache
(`tokens`) and keeps it exact: `eval` appends, `truncate` rolls back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import SpecliError

DEVICES = ("auto", "cpu", "gpu", "npu")  # --device: where an ONNX model runs


def check_device(device: str) -> str:
    """`device` if --device knows it, else a one-line error listing what it knows."""
    if device not in DEVICES:
        raise SpecliError(f"unknown --device {device!r}; choose from {', '.join(DEVICES)}")
    return device


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: context size, CPU threads, GPU layers."""

    n_ctx: int = 4096
    n_threads: int | None = None  # None: every core this process may use
    n_gpu_layers: int = 0
    n_batch: int = 512
    # Batch-invariance vs speed: llama.cpp's flash-attention path changes float
    # summation order with batch size, so verify batches drift from one-token
    # decoding.  "auto" lets llama.cpp choose; "off" keeps greedy output closest to
    # plain decoding.  kv_type "f32" reduces that drift further at 2x KV memory.
    flash_attn: str = "auto"  # "auto" | "on" | "off"
    kv_type: str = "f16"  # "f16" | "f32"
    # Candidate branches one forward pass may verify (multi-candidate drafting): the KV
    # cache then holds that many sequences sharing the prefix.  1: a single chain.
    branches: int = 1
    # ONNX models: which device onnxruntime runs on (auto, cpu, gpu, npu); see backends/onnx.py
    device: str = "auto"


@dataclass
class StepClock:
    """Time a model spends in one-token forward passes: a drafter's steps.  Set beside
    the calibrated cost of the same step, it shows whether drafting inside a generation
    runs at the model's standalone speed (thread pools, other threads and the GIL can
    make it several times slower without changing a single token)."""

    steps: int = 0
    seconds: float = 0.0
    # evals over several tokens (a prompt, a catch-up): each a new shape for a runtime
    # that replays a captured graph only while the shape repeats (llama.cpp on CUDA)
    batches: int = 0

    def add(self, n_tokens: int, seconds: float) -> None:
        if n_tokens == 1:
            self.steps += 1
            self.seconds += seconds
        elif n_tokens > 1:
            self.batches += 1


class Backend(Protocol):
    """A loaded causal LM with its tokenizer and a single rollback-able KV sequence."""

    name: str  # runtime, e.g. "llama.cpp"
    path: str
    n_vocab: int
    n_ctx: int
    n_batch: int  # most tokens one forward pass takes (eval splits longer input)
    tokens: list[int]  # what the KV cache holds, in order
    bos: int | None  # the BOS token id, if the vocabulary has one
    placement: str  # where it runs, for --stats and --json ("llama.cpp CPU, 2 threads")
    step_clock: StepClock  # one-token evals, timed (see StepClock)
    # A drafter this many tokens behind (or fewer) catches up one token at a time, each
    # eval shaped like a drafting step: set by calibration where that measured faster
    # than one batch (specli.calibrate.measure_catch_up); 0: always in one batch.
    catch_up_stepwise: int

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        """Text to token ids; `special` parses control tokens such as <|im_end|>."""
        ...

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The raw bytes a token stands for (may be part of a UTF-8 character); control
        tokens are empty unless `special`, which writes them out (e.g. <|im_end|>)."""
        ...

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, end of turn)."""
        ...

    def vocab_texts(self) -> list[bytes]:
        """Every token's string, by id: two models share a tokenizer iff these match."""
        ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat template applied, ending with the assistant's turn."""
        ...

    @property
    def add_bos(self) -> bool:
        """Whether a raw prompt must start with the BOS token."""
        ...

    def eval(self, tokens: Sequence[int], logits_for: Sequence[int] = ()) -> np.ndarray:
        """Append `tokens` to the KV cache; return logits rows only for the given
        indices into `tokens` (shape (len(logits_for), n_vocab), float32)."""
        ...

    def truncate(self, n: int) -> None:
        """Drop everything after the first `n` cached tokens; raise if the cache cannot."""
        ...

    @property
    def max_branches(self) -> int:
        """Most root-to-leaf branches `eval_tree` takes in one pass (1: chains only)."""
        ...

    def eval_tree(self, root: int, tokens: Sequence[int], parents: Sequence[int]) -> np.ndarray:
        """Append `root` and evaluate a tree of candidate tokens after it in one pass
        (`parents[i]`: node i's parent, -1 for root; parents precede children).  Returns
        logits for the root and every node, (1 + len(tokens), n_vocab).  Must be followed
        by `keep_path` before any other call."""
        ...

    def keep_path(self, path: Sequence[int]) -> None:
        """Keep the nodes of `path` (a root-to-node chain of node indices) after the root
        and drop the rest of the tree: the cache is then as if that chain alone had been
        decoded."""
        ...

    def close(self) -> None: ...
