"""A draft model's KV cache following the accepted text, for every drafter with a model.

The cache follows lazily: before a draft it keeps the longest prefix it shares with the
context, rolls the rest back and feeds only the new tokens.  So rejected guesses cost one
rollback, never a re-prefill, and a drafter that sat out plain steps catches up in one
batch (what `behind` tells the budget).

Except a short catch-up where the model's `catch_up_stepwise` says so: there each token
is read as a step of its own.  On a CPU a batch never costs more than its tokens as
steps, but llama.cpp's CUDA backend replays a captured graph only while a context's
evals keep one shape, and a batch between drafting steps costs the next steps their
graph too (ggml-org/llama.cpp issue 28652); calibration measures which way is faster
for the model where it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..backends.base import Backend
from ..tokens import common_prefix


def behind(held: Sequence[int], context: Sequence[int]) -> int:
    """Tokens a cache holding `held` must read to give logits after `context` (at least
    one: logits come from a fed token)."""
    return len(context) - min(common_prefix(held, context), len(context) - 1)


def sync(model: Backend, context: Sequence[int]) -> np.ndarray:
    """Make the model's cache hold `context` and return the next-token logits."""
    keep = len(context) - behind(model.tokens, context)
    model.truncate(keep)
    fresh = context[keep:]
    if len(fresh) > model.catch_up_stepwise:
        return model.eval(fresh, [len(fresh) - 1])[0]
    for tok in fresh[:-1]:  # with logits, as a step asks: the same graph
        model.eval([tok], [0])
    return model.eval(fresh[-1:], [0])[0]
