"""Token-sequence helpers shared by the engine, drafters and front ends."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable, Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest shared prefix: how much of a KV cache can be kept.
    Called every round on contexts of thousands of tokens, so it compares slices
    (C speed) and bisects, instead of stepping token by token in Python."""
    a = a if isinstance(a, list) else list(a)  # lists (the usual case) are not copied
    b = b if isinstance(b, list) else list(b)
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo] holds; the answer is <= hi
    if (a if len(a) == hi else a[:hi]) == (b if len(b) == hi else b[:hi]):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo + (a[lo] == b[lo])


class TextStream:
    """Turns token pieces into text without ever emitting half a UTF-8 character:
    a token may end mid-character, and the decoder holds those bytes back."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tokens: Iterable[int]) -> str:
        return self._decoder.decode(b"".join(self._token_bytes(t) for t in tokens))

    def flush(self) -> str:
        """The end of the text: bytes of a character the last token left unfinished (a
        length limit can cut one) are dropped, not shown as U+FFFD."""
        self._decoder.reset()
        return ""


def tokens_spelling(token_bytes: Callable[[int], bytes], tokens: Sequence[int],
                    n_chars: int) -> int:
    """The fewest leading tokens whose text (as TextStream decodes it) has at least
    `n_chars` characters: how many tokens it took to write a text's first n_chars."""
    stream, have = TextStream(token_bytes), 0
    for i, tok in enumerate(tokens):
        have += len(stream.push([tok]))
        if have >= n_chars:
            return i + 1
    return len(tokens)


def detokenize(token_bytes: Callable[[int], bytes], tokens: Iterable[int]) -> str:
    stream = TextStream(token_bytes)
    return stream.push(tokens) + stream.flush()
