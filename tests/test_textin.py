"""Text coming in (specli.textin): one decoding for -f files, stdin and chat lines."""

from __future__ import annotations

import io

import pytest

from specli.errors import SpecliError
from specli.textin import check_text, decode_utf8, read_all, read_line


def test_one_leading_byte_order_mark_is_dropped():
    """Windows editors start files with U+FEFF: no text, so no prompt tokens, and a file
    holding only the mark is an empty prompt, not a prompt of one odd character."""
    bom = b"\xef\xbb\xbf"
    assert decode_utf8(bom + b"Hello", "f") == "Hello"
    assert decode_utf8(bom, "f") == ""
    assert decode_utf8(bom + bom + b"x", "f") == "\ufeffx"  # one mark only
    assert decode_utf8(b"a" + bom, "f") == "a\ufeff"  # inside the text: left alone
    raw = io.TextIOWrapper(io.BytesIO(bom + b"Hi\nthere\n"), encoding="latin-1")
    assert read_line(raw) == "Hi\n" and read_line(raw) == "there\n"
    assert read_all(io.TextIOWrapper(io.BytesIO(bom + b"  \n"), encoding="latin-1")) == "  \n"


def test_text_that_is_not_utf8_names_its_source():
    with pytest.raises(SpecliError, match=r"prompt file x is not UTF-8 text \(byte 0xe9"):
        decode_utf8("é".encode("latin-1"), "prompt file x")
    with pytest.raises(SpecliError, match="the line is not UTF-8 text"):
        check_text("caf\udce9", "the line")
    with pytest.raises(SpecliError, match="unpaired surrogate"):  # from JSON's \ud800
        check_text("a\ud800", "the line")
