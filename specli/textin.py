"""Text coming in: prompts from -p, -f FILE, stdin, and chat lines, read one way.

Bytes are decoded as UTF-8 here, strictly, whichever way they arrive: Python's own stdin
decoding depends on the locale (under C/POSIX it smuggles bad bytes through as lone
surrogates that fail much later, deep in the tokenizer), so stdin is read as bytes.
"""

from __future__ import annotations

from typing import BinaryIO, TextIO

from .errors import SpecliError

BOM = "\ufeff"


def decode_utf8(data: bytes, source: str) -> str:
    """`data` as text, or a one-line error naming `source` and the first bad byte.
    One leading byte-order mark (Windows editors write it) is dropped: it is no text,
    and left in it would become prompt tokens, or a prompt of its own."""
    try:
        return data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as e:
        raise SpecliError(
            f"{source} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it first, e.g. with iconv -t UTF-8"
        ) from None


def check_text(text: str, source: str) -> str:
    """A str that may carry undecodable bytes as surrogates (-p from a non-UTF-8 shell,
    a line typed at a terminal): the same error as for the bytes themselves."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            data = text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError as e:  # a surrogate no byte stands for (JSON "\ud800")
            raise SpecliError(f"{source} holds an unpaired surrogate (U+{ord(text[e.start]):04X}"
                              f" at character {e.start}): not text") from None
        return decode_utf8(data, source)
    return text


def _binary(stream: TextIO) -> BinaryIO | None:
    return getattr(stream, "buffer", None)


def read_all(stream: TextIO, source: str = "the prompt on stdin") -> str:
    """Everything on a text stream (stdin), decoded from its bytes."""
    raw = _binary(stream)
    if raw is None:  # already text (a test's StringIO)
        return check_text(stream.read(), source)
    return decode_utf8(raw.read(), source)


def read_line(stream: TextIO, source: str = "a line on stdin") -> str:
    """One line of a text stream, '' at its end, decoded from its bytes."""
    raw = _binary(stream)
    if raw is None:
        return check_text(stream.readline(), source)
    return decode_utf8(raw.readline(), source)
