"""A draft model whose tokenizer differs from the target's (Timor et al., ICML 2025).

The two models share text, not token ids, so the drafter works on its own tokenization
of the accepted text.  Its token context follows the text lazily: it keeps the longest
prefix of its tokens whose bytes still prefix the new text (less one token, which may
tokenize differently once more text follows), re-tokenizes only the rest, and its KV
cache rolls back to match (the inner ModelDrafter keeps the cache on a common prefix).

- Greedy (SLEM, string-level exact match): the drafter continues greedily in its own
  vocabulary; the draft text is re-tokenized with the target's tokenizer, the last
  target token dropped (the text may end inside what the target would make one longer
  token), an incomplete UTF-8 character at the end held back and invalid bytes skipped.
  The target verifies those tokens by exact match, so nothing it would not have
  produced is ever accepted.
- Sampled (TLI, token-level intersection): the drafter samples from its distribution
  restricted to tokens whose strings exist in both vocabularies, mapped to target ids,
  and that restricted distribution is what speculative sampling is told: the output
  follows the target's exact distribution.
"""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..backends.base import Backend
from ..sampling import SamplingParams, probs_from_logits, sample
from ..tokens import common_prefix
from . import follower
from .base import BaseDrafter, Draft, KeepGoing
from .model import ModelDrafter


def same_tokenizer(target: Backend, draft: Backend) -> bool:
    """Token ids mean the same strings in both models (compare every token's text; a
    few padding ids at the end of one vocabulary are harmless: llama.cpp allows 128)."""
    t, d = target.vocab_texts(), draft.vocab_texts()
    n = min(len(t), len(d))
    return t[:n] == d[:n] and abs(len(t) - len(d)) <= 128


def decode_text(data: bytes) -> tuple[str, int]:
    """Text of `data` and how many bytes it used: an incomplete character at the end is
    left for later (more tokens may complete it) and invalid bytes are skipped (a
    proposal only has to be text; verification decides what is emitted)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    text = dec.decode(data, final=False)
    return text, len(data) - len(dec.getstate()[0])


class CrossDrafter(BaseDrafter):
    name = "draft"

    def __init__(self, target: Backend, model: Backend, extra: int = 2) -> None:
        self.target, self.model = target, model
        self.inner = ModelDrafter(model)  # owns the drafter's KV cache
        self.extra = extra  # drafter tokens beyond k: its tokens are often shorter
        self._t_tokens: list[int] = []  # target tokens whose text is in _t_ends
        self._t_ends: list[int] = []  # cumulative byte ends of those tokens
        self._text = b""
        self._d_tokens: list[int] = []  # the drafter's tokens: tokenized text, then drafts
        self._d_ends: list[int] = []  # cumulative bytes of the text each token stands for
        self._n_text = 0  # how many of _d_tokens came from tokenizing the context
        self._shared: tuple[np.ndarray, np.ndarray] | None = None  # drafter ids, target ids

    # -- the accepted text, in the drafter's tokens ------------------------------------
    def _context_text(self, context: Sequence[int]) -> tuple[bytes, int]:
        """Bytes of the target context (control tokens written out, so a drafter that
        knows the same chat markers sees them), computed incrementally; and how many
        leading bytes are unchanged since the previous call."""
        keep = common_prefix(self._t_tokens, context)
        del self._t_tokens[keep:], self._t_ends[keep:]
        same = self._t_ends[-1] if self._t_ends else 0
        text = bytearray(self._text[:same])
        for tok in context[keep:]:
            text += self.target.token_bytes(tok, special=True)
            self._t_tokens.append(tok)
            self._t_ends.append(len(text))
        self._text = bytes(text)
        return self._text, same

    def drafter_context(self, context: Sequence[int]) -> list[int]:
        """The drafter's tokens for the context's text: its earlier tokens as far as they
        still spell a prefix of the text (tokenized text, then its own drafted tokens
        where they were accepted), less one, then the rest of the text tokenized."""
        text, same = self._context_text(context)
        ends = self._d_ends
        j = bisect.bisect_right(ends, same, 0, self._n_text)  # tokenized text still there
        if j == self._n_text:  # then its own drafted tokens, as far as they were accepted
            while j < len(ends) and text.startswith(self._piece(self._d_tokens[j]),
                                                    ends[j - 1] if j else 0):
                j += 1
        if j and ends[j - 1] < len(text):
            j -= 1  # the last kept token may merge with what follows
        while j and not _starts_char(text, ends[j - 1]):
            j -= 1
        start = ends[j - 1] if j else 0
        del self._d_tokens[j:], self._d_ends[j:]
        rest, used = decode_text(text[start:])
        if rest:
            bos = self.model.bos
            add_bos = (not j and self.model.add_bos and bos is not None
                       and not text.startswith(self._piece(bos)))  # the text may carry one
            toks = self.model.tokenize(rest, add_bos=add_bos, special=True)
            self._d_tokens += toks
            self._d_ends += [start + e for e in _covered(used, [self._piece(t) for t in toks])]
        self._n_text = len(self._d_tokens)
        return list(self._d_tokens)

    def _drafted(self, tokens: Sequence[int]) -> None:
        """The drafter's own new tokens: kept while the target accepts their text."""
        for tok in tokens:
            self._d_tokens.append(tok)
            self._d_ends.append((self._d_ends[-1] if self._d_ends else 0) + len(self._piece(tok)))

    def _piece(self, tok: int) -> bytes:
        return self.model.token_bytes(tok, special=True)

    # -- drafting ----------------------------------------------------------------------
    def propose(
        self,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        rng: np.random.Generator,
        keep_going: KeepGoing | None = None,
    ) -> Draft:
        if k <= 0 or not context:
            return Draft()
        d_ctx = self.drafter_context(context)
        if not d_ctx or len(d_ctx) + k + self.extra >= self.model.n_ctx:
            return Draft()
        if params.greedy:
            return self._slem(d_ctx, k, rng, keep_going)
        return self._tli(d_ctx, k, params, rng, keep_going)

    def _slem(self, d_ctx: list[int], k: int, rng: np.random.Generator,
              keep_going: KeepGoing | None) -> Draft:
        # the budget's stop rule is about target tokens: applied after re-tokenizing
        d = self.inner.propose(d_ctx, k + self.extra, SamplingParams(), rng)
        self._drafted(d.tokens)
        dec = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        ends, text = [], ""
        for tok in d.tokens:
            if self.model.is_eog(tok):
                break
            text += dec.decode(self.model.token_bytes(tok))
            ends.append(len(text.encode()))
        ended = len(ends) < len(d.tokens)  # the drafter finished: its text is complete
        if not text:
            return Draft()
        tokens = self.target.tokenize(text, add_bos=False, special=False)
        if not ended and len(tokens) > 1:
            tokens = tokens[:-1]  # may be the start of a longer target token
        draft = Draft(source=self.name)
        pos = 0
        for tok in tokens[:k]:
            pos += len(self.target.token_bytes(tok))
            i = min(bisect.bisect_left(ends, pos), len(ends) - 1)  # the drafter token it ends in
            draft.tokens.append(tok)
            draft.confidence.append(d.confidence[i])
            if keep_going is not None and not keep_going(draft.confidence):
                break
        return draft

    def shared(self) -> tuple[np.ndarray, np.ndarray]:
        """Drafter ids whose strings are also target tokens, and those target ids
        (tokens that are strings of bytes; control tokens and empty pieces excluded)."""
        if self._shared is None:
            index = {}
            for i in range(self.target.n_vocab):
                piece = self.target.token_bytes(i)
                if piece and not self.target.is_eog(i):
                    index.setdefault(piece, i)
            d_ids, t_ids = [], []
            for i in range(self.model.n_vocab):
                piece = self.model.token_bytes(i)
                if piece in index and not self.model.is_eog(i):
                    d_ids.append(i)
                    t_ids.append(index[piece])
            self._shared = (np.array(d_ids, dtype=np.int64), np.array(t_ids, dtype=np.int64))
        return self._shared

    def _tli(self, d_ctx: list[int], k: int, params: SamplingParams, rng: np.random.Generator,
             keep_going: KeepGoing | None) -> Draft:
        d_ids, t_ids = self.shared()
        if not len(d_ids):
            return Draft()
        m = self.model
        logits = follower.sync(m, d_ctx)
        draft, rows, drafted = Draft(source=self.name), [], []
        for i in range(k):
            restricted = np.full_like(logits, -np.inf)
            restricted[d_ids] = logits[d_ids]
            q_d = probs_from_logits(restricted, params)
            x = sample(q_d, rng)
            drafted.append(x)
            row = np.zeros(self.target.n_vocab)
            np.add.at(row, t_ids, q_d[d_ids])  # the same law, in target ids
            tok = int(t_ids[np.searchsorted(d_ids, x)])
            draft.tokens.append(tok)
            draft.confidence.append(float(q_d[x]))
            rows.append(row)
            if i == k - 1 or (keep_going is not None and not keep_going(draft.confidence)):
                break
            logits = m.eval([x], [0])[0]
        self._drafted(drafted)
        draft.probs = rows
        return draft

    # -- the rest of the drafter interface ------------------------------------------------
    def lag(self, context: Sequence[int]) -> int:
        return max(len(context) - len(self._t_tokens), 0) + 1

    def reset(self) -> None:
        self.inner.reset()
        self._t_tokens, self._t_ends, self._text = [], [], b""
        self._d_tokens, self._d_ends, self._n_text = [], [], 0

    def describe(self) -> str:
        return (f"cross-tokenizer drafting ({Path(self.model.path).name} has another "
                "tokenizer): SLEM re-tokenization when greedy, TLI shared-vocabulary "
                "sampling otherwise")


def _starts_char(text: bytes, i: int) -> bool:
    """Whether byte i of `text` begins a UTF-8 character (or is the end)."""
    return i >= len(text) or (text[i] & 0xC0) != 0x80


def _covered(n_text: int, pieces: list[bytes]) -> list[int]:
    """Cumulative ends, within n_text bytes of text, of the text each token stands for.
    Tokenizers may add a leading space (SentencePiece's prefix) or normalise, and
    skipped invalid bytes are in no piece: what pieces add beyond the text is charged to
    the first tokens, and the last token always ends at n_text."""
    extra = max(sum(map(len, pieces)) - n_text, 0)
    out, pos = [], 0
    for p in pieces:
        take = max(len(p) - extra, 0)
        extra -= len(p) - take
        pos = min(pos + take, n_text)
        out.append(pos)
    if out:
        out[-1] = n_text
    return out
