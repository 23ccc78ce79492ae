"""Is a divergence from plain greedy decoding float noise or a real loss?

llama.cpp's CPU kernels are not batch-invariant: a token's logits differ slightly
when it is evaluated inside a verify batch instead of alone.  So speculative
greedy output equals plain greedy output only up to near-ties.  The rule used by
the tests and the bench: at the first differing position, the plain run's top-2
logit gap must be smaller than the batch-versus-single-token logit difference
measured on the same model and tokens.  An algorithmic bug diverges early and at
large gaps, and fails this rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .backends.base import Backend


@dataclass(frozen=True)
class Divergence:
    index: int  # first generated position where the two runs differ
    gap: float  # plain run's top-1 minus top-2 logit there
    noise: float  # largest |batch - single| logit difference measured around it
    reproduced: bool  # the single-token replay gave the plain run's token

    @property
    def explained(self) -> bool:
        return self.reproduced and self.gap < self.noise


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token, or None when one is a prefix of the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def analyse(
    target: Backend, prompt: Sequence[int], plain: Sequence[int], index: int, window: int = 8
) -> Divergence:
    """Replay the plain run up to `index` one token at a time (as plain decoding
    does), then re-evaluate verify batches of 2..window+1 tokens at every alignment
    that contains `index` (a verify batch also holds the draft tokens after it) and
    take the largest logit difference from the single-token rows."""
    last = min(len(plain) - 1, index + window)  # plain tokens we can put after `index`
    seq = list(prompt) + list(plain[: last + 1])
    base = len(prompt) - 1  # seq[base + j] is the input whose logits predict plain[j]
    target.truncate(0)
    target.eval(seq[:base])
    first = max(0, index - window)
    single: dict[int, np.ndarray] = {}
    for j in range(last + 1):
        row = target.eval([seq[base + j]], [0])[0]
        if j >= first:
            single[j] = row
    top2 = np.sort(single[index])[-2:]
    gap = float(top2[1] - top2[0])
    reproduced = int(np.argmax(single[index])) == plain[index]

    noise = 0.0
    for size in range(2, window + 2):
        for start in range(max(first, index - size + 1), index + 1):
            end = min(start + size, last + 1)
            if end - start < 2:
                continue
            target.truncate(base + start)
            rows = target.eval(seq[base + start : base + end], range(end - start))
            for r, j in enumerate(range(start, end)):
                noise = max(noise, float(np.max(np.abs(rows[r] - single[j]))))
    target.truncate(0)
    return Divergence(index=index, gap=gap, noise=noise, reproduced=reproduced)
