"""N-gram sources for Hierarchy Drafting: the context, the user's history, a static corpus.

Each source maps an n-gram (n = 1..4 tokens) to counts of the token that followed it.
A draft is built by greedy chaining, as llama.cpp's ngram-cache does: look up the last
n tokens (longest n first), append the most frequent continuation, repeat.  Drafts are
deterministic (probs None), so verification treats them as one-hot: lossless.

The context index lives in memory and grows with the text.  History and corpora are
SQLite files (one per tokenizer, since token ids mean nothing across vocabularies):
WAL mode and short IMMEDIATE transactions let two specli processes write the same
history, and a kill -9 mid-write leaves the last committed state.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from rich.console import Console

from .backends.base import Backend
from .drafters.base import Draft, KeepGoing
from .errors import SpecliError
from .registry import check_plain_name, specli_home

N_MAX = 4  # longest n-gram indexed
TOTAL = -1  # pseudo-token: the row holding a key's total count (exact shares after pruning)
SCHEMA_VERSION = "1"
DEFAULT_MAX_ROWS = 2_000_000
BUSY_TIMEOUT_MS = 5000

# key -> (token, its count, the key's total count), or None when the key was never seen
Lookup = Callable[[Sequence[int]], tuple[int, float, float] | None]


# How strongly a key's counts are shrunk toward "wrong", by match length: SMOOTHING / n**1.5
# sightings' worth.  Fitted (maximum likelihood, two parameters) to the 4432 look-ups hd
# chains (up to 8 tokens, to the first wrong one) along 39 greedy Spec-Bench answers of
# Qwen2.5-Coder-1.5B (3 per category), each judged against the token the model wrote.
# Deciles of the fitted value, predicted/right: 0.1-0.2 (210 look-ups) 0.16/0.12, 0.2-0.3
# (728) 0.24/0.20, 0.3-0.4 (189) 0.35/0.23, 0.4-0.5 (540) 0.47/0.46, 0.6-0.7 (447)
# 0.64/0.64, 0.7-0.8 (1968) 0.73/0.74, 0.8-0.9 (285) 0.85/0.87; log-likelihood -2497.  The
# earlier count / (total + 1) scaled by n, read as a probability: -2903, and 3260 of the
# 4432 fell in one of the budget's bins, 0.3-0.5: tokens seen once after the last token
# (right 0.27 of the time), the last two (0.52), three (0.63) and four (0.73).  What one
# text taught that bin (a summary copying its source) misjudged the next (a 23-token
# answer: every draft rejected).  scripts/hd_confidence.py repeats the fit.
SMOOTHING = 3.0


def confidence(n: int, count: float, total: float) -> float:
    """The chance that the winner of a key of length `n`, seen `count` times of the
    key's `total`, is the target's next token: a calibrated probability, so the budget
    can judge a draft by it before it has learnt anything about this text.  A token
    seen once after the last token: 0.25; once after the last four: 0.73."""
    return count / (total + SMOOTHING / n**1.5)


def chain_draft(
    lookup: Lookup,
    context: Sequence[int],
    k: int,
    keep_going: KeepGoing | None,
    n_max: int = N_MAX,
    min_match: int = 1,
) -> Draft:
    """Greedy chaining: the likeliest continuation of the longest known suffix, up to k
    tokens.  `min_match` is the shortest suffix match the first token may come from;
    later tokens continue from any match, their confidence says how good it is."""
    draft = Draft()
    if k <= 0 or not context:
        return draft
    tail = list(context[-n_max:])
    while len(draft.tokens) < k:
        lo = min_match if not draft.tokens else 1
        hit = None
        for n in range(min(n_max, len(tail)), lo - 1, -1):
            found = lookup(tail[-n:])
            if found is not None:
                hit = (n, *found)
                break
        if hit is None:
            break
        n, tok, count, total = hit
        draft.tokens.append(tok)
        draft.confidence.append(confidence(n, count, total))
        tail.append(tok)
        if len(tail) > n_max:
            del tail[0]
        if keep_going is not None and not keep_going(draft.confidence):
            break
    return draft  # probs None: a deterministic draft, verified as one-hot


class ContextIndex:
    """N-gram counts over the current context (prompt + output so far), updated
    incrementally: O(n_max) per new token, O(1) per look-up (the winner of each key is
    kept up to date; ties go to the most recent continuation, as in prompt lookup)."""

    def __init__(self, n_max: int = N_MAX) -> None:
        self.n_max = n_max
        self._seen: list[int] = []
        # key -> [total, best token, best count, {token: count}]
        self._table: dict[tuple[int, ...], list] = {}

    def reset(self) -> None:
        self._seen, self._table = [], {}

    def update(self, context: Sequence[int]) -> None:
        """Index every n-gram of `context` that has a token after it; start over when
        `context` does not extend what was indexed."""
        ctx = context if isinstance(context, list) else list(context)
        m = len(self._seen)
        if len(ctx) < m or ctx[:m] != self._seen:
            self.reset()
            m = 0
        table = self._table
        for end in range(max(m, 1), len(ctx)):
            tok = ctx[end]
            for n in range(1, min(self.n_max, end) + 1):
                key = tuple(ctx[end - n : end])
                e = table.get(key)
                if e is None:
                    table[key] = [1, tok, 1, {tok: 1}]
                    continue
                c = e[3].get(tok, 0) + 1
                e[3][tok] = c
                e[0] += 1
                if c >= e[2]:  # newest wins a tie
                    e[1], e[2] = tok, c
        self._seen += ctx[m:]  # a copy: the caller's list grows on

    def lookup(self, key: Sequence[int]) -> tuple[int, float, float] | None:
        e = self._table.get(tuple(key))
        return None if e is None else (e[1], float(e[2]), float(e[0]))

    def next_counts(self, key_tokens: Sequence[int]) -> list[tuple[int, float]]:
        e = self._table.get(tuple(key_tokens))
        if e is None:
            return []
        return sorted(((t, float(c)) for t, c in e[3].items()), key=lambda x: -x[1])


# -- persistent stores ------------------------------------------------------------------


def tokenizer_fingerprint(backend: Backend) -> str:
    """Which tokenizer a store's ids belong to: sha256 over the vocabulary (16 hex)."""
    h = hashlib.sha256()
    for text in backend.vocab_texts():
        h.update(len(text).to_bytes(4, "little"))
        h.update(text)
    return h.hexdigest()[:16]


def history_path(fingerprint: str) -> Path:
    return specli_home() / "history" / f"{fingerprint}.sqlite"


def corpus_path(name: str) -> Path:
    return specli_home() / "corpora" / f"{check_plain_name(name, 'corpus')}.sqlite"


def existing_corpus(name: str) -> Path:
    """The file of the corpus index `name`, or a one-line error saying how to build it."""
    path = corpus_path(name)
    if not path.is_file():
        raise SpecliError(
            f"no corpus index named {name!r} (looked for {path}); "
            f"build one with: specli index build FILE... -o {name}"
        )
    return path


def pack_key(tokens: Sequence[int]) -> bytes:
    """An n-gram as little-endian int32 bytes (n is implied by the length)."""
    return struct.pack(f"<{len(tokens)}i", *tokens)


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ngrams (key BLOB NOT NULL, token INTEGER NOT NULL, "
    "count REAL NOT NULL, last_seen INTEGER NOT NULL, PRIMARY KEY (key, token)) WITHOUT ROWID",
)
_AGE_INDEX = "CREATE INDEX IF NOT EXISTS ngrams_age ON ngrams (last_seen)"
_UPSERT = (
    "INSERT INTO ngrams (key, token, count, last_seen) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key, token) DO UPDATE SET count = count + excluded.count, "
    "last_seen = excluded.last_seen"
)
# The total row has the largest count, so the first two rows hold it and the winner.
_BEST = (
    "SELECT token, count FROM ngrams WHERE key = ? "
    "ORDER BY count DESC, last_seen DESC, token LIMIT 2"
)
_NEXT = (
    "SELECT token, count FROM ngrams WHERE key = ? AND token >= 0 "
    "ORDER BY count DESC, last_seen DESC, token"
)


def count_ngrams(
    seqs: Sequence[Sequence[int]], n: int, start: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (n-gram, next token) pairs over `seqs` (never across two of them), counting
    only continuations at index >= `start`: keys (m, n) int32 sorted, next (m,), counts (m,)."""
    parts = []
    for seq in seqs:
        arr = np.asarray(seq, dtype=np.int32)
        if len(arr) < n + 1:
            continue
        rows = sliding_window_view(arr, n + 1)  # row i: arr[i : i+n+1], continuation i+n
        parts.append(rows[max(0, start - n) :])
    if not parts:
        empty = np.empty((0, n), np.int32)
        return empty, np.empty(0, np.int32), np.empty(0, np.int64)
    uniq, counts = np.unique(np.concatenate(parts), axis=0, return_counts=True)
    return np.ascontiguousarray(uniq[:, :n]), uniq[:, n].copy(), counts


def _group_starts(keys: np.ndarray) -> np.ndarray:
    """Start index of each run of equal rows in sorted `keys`."""
    if len(keys) == 0:
        return np.empty(0, np.int64)
    change = np.any(keys[1:] != keys[:-1], axis=1)
    return np.concatenate(([0], np.flatnonzero(change) + 1))


def _rows_for(
    keys: np.ndarray,
    nxt: np.ndarray,
    counts: np.ndarray,
    clock: int,
    min_count: int = 1,
    keep_top: int | None = None,
) -> list[tuple[bytes, int, float, int]]:
    """Table rows for one n: a total row per key (before pruning, so shares stay exact)
    and the continuations that survive pruning (count >= min_count, the top `keep_top`)."""
    if len(keys) == 0:
        return []
    starts = _group_starts(keys)
    totals = np.add.reduceat(counts, starts)
    group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(keys))))
    keep = counts >= min_count
    if keep_top is not None:
        order = np.lexsort((-counts, group))  # by key, most frequent first
        rank = np.empty(len(keys), np.int64)
        rank[order] = np.arange(len(keys)) - starts[group[order]]
        keep &= rank < keep_top
    n = keys.shape[1]
    first = np.ascontiguousarray(keys[starts].astype("<i4"))
    blobs = first.view(np.dtype((np.void, 4 * n))).ravel().tolist()  # bytes per key
    kept = np.flatnonzero(keep)
    groups = np.unique(group[kept]).tolist()
    key_totals = totals[groups].astype(float).tolist()
    out = [(blobs[g], TOTAL, t, clock) for g, t in zip(groups, key_totals, strict=True)]
    out += [
        (blobs[g], t, c, clock)
        for g, t, c in zip(
            group[kept].tolist(), nxt[kept].tolist(), counts[kept].astype(float).tolist(),
            strict=True,
        )
    ]
    return out


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode, waiting out another process doing the same.

    On a new file the switch needs an exclusive lock and SQLite answers "database is
    locked" at once instead of calling the busy handler, so two specli processes
    started together would have one fail; this retries for up to BUSY_TIMEOUT_MS."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class NgramStore:
    """An SQLite table n-gram -> next-token counts: the user's history (read-write) or a
    static corpus (read-only).  One file per tokenizer, checked by fingerprint on open.

    A look-up is one indexed SELECT per n tried; nothing is cached across processes.
    The sqlite3 connection may be used from another thread, one at a time."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        fingerprint: str,
        *,
        readonly: bool = False,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.max_rows = max_rows
        self.n_max = N_MAX
        self._conn: sqlite3.Connection | None = None
        if readonly and not self.path.is_file():
            raise SpecliError(f"no n-gram store at {self.path}")
        try:
            self._conn = self._open(fingerprint)
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        except (sqlite3.Error, OSError) as e:
            self.close()
            why = getattr(e, "strerror", None) or e  # OSError: without the path again
            raise SpecliError(f"cannot open n-gram store {self.path}: {why}") from None
        if meta.get("schema") != SCHEMA_VERSION:
            self.close()
            raise SpecliError(
                f"n-gram store {self.path} has schema {meta.get('schema')!r}, "
                f"expected {SCHEMA_VERSION}; rebuild it"
            )
        if meta.get("fingerprint") != fingerprint:
            self.close()
            raise SpecliError(self._other_tokenizer(meta, fingerprint))
        self.fingerprint = fingerprint
        self.n_max = int(meta.get("n_max", N_MAX))

    def _other_tokenizer(self, meta: dict[str, str], fingerprint: str) -> str:
        """The one-line error for a store of another tokenizer: a corpus built for another
        model says which and how to rebuild it (token ids mean nothing across models)."""
        if self.readonly:  # a corpus (`specli index build`); a history is read-write
            built = meta.get("model") or f"tokenizer {meta.get('fingerprint')}"
            return (f"corpus index {self.path.stem!r} was built for another tokenizer "
                    f"({built}) than this model's; rebuild it for this model: specli index "
                    f"build FILE... --model MODEL -o {self.path.stem}")
        return (f"n-gram store {self.path} belongs to tokenizer {meta.get('fingerprint')}, "
                f"not to this model's tokenizer {fingerprint}")

    @classmethod
    def open_history(cls, fingerprint: str, max_rows: int = DEFAULT_MAX_ROWS) -> NgramStore:
        """This user's generation history for one tokenizer (created on first use)."""
        return cls(history_path(fingerprint), fingerprint, max_rows=max_rows)

    @classmethod
    def open_history_or_none(
        cls, fingerprint: str, note: Callable[[str], None] | None = None
    ) -> NgramStore | None:
        """The user's history, or None after a one-line warning to `note` when it cannot
        be opened (not a directory, not a database, another tokenizer's): history only
        speeds hd up, so a broken store must not stop a generation."""
        try:
            return cls.open_history(fingerprint)
        except SpecliError as e:
            if note is not None:  # deleting helps a broken store, not a folder that fails
                fix = ("delete that file to start a new history; "
                       if history_path(fingerprint).is_file() else "")
                note(f"warning: {e}; going on without your history ({fix}--no-history "
                     "silences this)")
            return None

    @classmethod
    def open_corpus(cls, name: str, fingerprint: str) -> NgramStore:
        """A corpus built by `specli index build`, read-only."""
        return cls(existing_corpus(name), fingerprint, readonly=True)

    def _open(self, fingerprint: str) -> sqlite3.Connection:
        if self.readonly:
            conn = sqlite3.connect(
                self.path.absolute().as_uri() + "?mode=ro", uri=True,
                isolation_level=None, check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            return conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _switch_to_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: safe against process crashes
            conn.execute("BEGIN IMMEDIATE")  # two processes may create the file at once
            for sql in (*_SCHEMA, _AGE_INDEX):
                conn.execute(sql)
            conn.executemany(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                [("schema", SCHEMA_VERSION), ("fingerprint", fingerprint),
                 ("n_max", str(N_MAX)), ("clock", "0"), ("rows", "0")],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.close()  # an open transaction is rolled back
            raise
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpecliError(f"n-gram store {self.path} is closed")
        return self._conn

    # -- reading ---------------------------------------------------------------------
    def lookup(self, key: Sequence[int]) -> tuple[int, float, float] | None:
        """(most frequent next token, its count, the key's total), or None."""
        rows = self.conn.execute(_BEST, (pack_key(key),)).fetchall()
        best = next(((t, c) for t, c in rows if t != TOTAL), None)
        if best is None:
            return None
        total = next((c for t, c in rows if t == TOTAL), None)
        if total is None or total < best[1]:  # total row evicted or absent
            total = sum(c for t, c in rows if t != TOTAL)
        return best[0], float(best[1]), float(total)

    def next_counts(self, key_tokens: Sequence[int]) -> list[tuple[int, float]]:
        """Every known continuation of `key_tokens`, most frequent first."""
        return [(t, float(c)) for t, c in self.conn.execute(_NEXT, (pack_key(key_tokens),))]

    def count_rows(self) -> tuple[int, int]:
        """(distinct n-grams, continuation rows): exact, a scan (for reports, not drafting)."""
        return _count_rows(self.conn)

    # -- writing ---------------------------------------------------------------------
    def add(self, tokens: Sequence[int], start: int = 0) -> None:
        """Count every n-gram of a finished generation (prompt + output), in ONE
        transaction.  `start`: count only continuations at index >= start (a chat turn
        appended to a conversation already added)."""
        if self.readonly:
            raise SpecliError(f"n-gram store {self.path} is read-only")
        grouped = [count_ngrams([tokens], n, start) for n in range(1, self.n_max + 1)]
        if not any(len(g[0]) for g in grouped):
            return
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")  # waits (busy_timeout) for another writer
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            clock = int(meta["clock"]) + 1
            rows: list[tuple[bytes, int, float, int]] = []
            for keys, nxt, counts in grouped:
                rows += _rows_for(keys, nxt, counts, clock)
            conn.executemany(_UPSERT, rows)
            # an upper bound on the row count: exact counts (a scan) only near the limit
            bound = int(meta["rows"]) + len(rows)
            if bound > self.max_rows:
                bound = self._evict()
            conn.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                [(str(clock), "clock"), (str(bound), "rows")],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _evict(self) -> int:
        """Over the bound: delete the least recently seen rows down to 90%."""
        (rows,) = self.conn.execute("SELECT count(*) FROM ngrams").fetchone()
        if rows <= self.max_rows:
            return rows
        excess = rows - int(self.max_rows * 0.9)
        self.conn.execute(
            "DELETE FROM ngrams WHERE (key, token) IN "
            "(SELECT key, token FROM ngrams ORDER BY last_seen LIMIT ?)",
            (excess,),
        )
        return rows - excess

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> NgramStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _count_rows(conn: sqlite3.Connection) -> tuple[int, int]:
    keys, rows = conn.execute("SELECT sum(token = -1), sum(token >= 0) FROM ngrams").fetchone()
    return int(keys or 0), int(rows or 0)


def store_counts(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(distinct n-grams, continuation rows) of a store file, read-only, any tokenizer."""
    conn = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return _count_rows(conn)
    except sqlite3.Error as e:
        raise SpecliError(f"cannot read n-gram store {path}: {e}") from None
    finally:
        conn.close()


# -- corpus building --------------------------------------------------------------------


def _read_text(path: Path) -> str:
    if not path.exists():
        raise SpecliError(f"file not found: {path}")
    if not path.is_file():
        raise SpecliError(f"not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecliError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise SpecliError(f"cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise SpecliError(f"{path} is empty: nothing to index")
    return text


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Pieces of about `size` characters, cut after a newline (progress steps)."""
    out, i = [], 0
    while i < len(text):
        j = text.find("\n", i + size)
        j = len(text) if j < 0 else j + 1
        out.append(text[i:j])
        i = j
    return out


def build_corpus(
    backend: Backend,
    files: Sequence[Path],
    name: str,
    console: Console | None = None,
    *,
    min_count: int = 2,
    keep_top: int = 8,
) -> Path:
    """Tokenize text files with the model's tokenizer (no BOS, control tokens as text),
    count their n-grams and write corpora/NAME.sqlite atomically (a temp file, then
    os.replace).  Pruned to stay compact: n >= 2 continuations seen fewer than
    `min_count` times and all but the `keep_top` likeliest continuations of a key are
    dropped (each key keeps its true total, so shares stay honest)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    out = corpus_path(name)
    files = [Path(f) for f in files]
    if not files:
        raise SpecliError("no input files to index")
    texts = [_read_text(f) for f in files]  # fail on any bad file before the slow part
    fingerprint = tokenizer_fingerprint(backend)
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    seqs: list[list[int]] = []
    with Progress(
        TextColumn("indexing {task.description}"), BarColumn(), DownloadColumn(),
        TimeRemainingColumn(), console=console, disable=console is None, transient=True,
    ) as bar:
        task = bar.add_task(files[0].name, total=total_bytes)
        for f, text in zip(files, texts, strict=True):
            bar.update(task, description=f.name)
            toks: list[int] = []
            for piece in _chunks(text):
                toks += backend.tokenize(piece, add_bos=False, special=False)
                bar.advance(task, len(piece.encode("utf-8")))
            seqs.append(toks)

    rows: list[tuple[bytes, int, float, int]] = []
    for n in range(1, N_MAX + 1):
        keys, nxt, counts = count_ngrams(seqs, n)
        rows += _rows_for(keys, nxt, counts, 0, min_count if n >= 2 else 1, keep_top)
    if not rows:
        raise SpecliError("the input files are too short to index (fewer than 2 tokens)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = OFF")  # a temp file: no journal needed
            conn.execute("BEGIN")
            for sql in _SCHEMA:
                conn.execute(sql)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("schema", SCHEMA_VERSION), ("fingerprint", fingerprint),
                 ("n_max", str(N_MAX)), ("clock", "0"), ("rows", str(len(rows))),
                 ("files", str(len(files))), ("tokens", str(sum(map(len, seqs)))),
                 ("model", Path(getattr(backend, "path", "") or "").name)],
            )
            conn.executemany(
                "INSERT INTO ngrams (key, token, count, last_seen) VALUES (?, ?, ?, ?)", rows
            )
            conn.execute("COMMIT")
            conn.execute("PRAGMA journal_mode = DELETE")  # read-only opens need no -wal
        finally:
            conn.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
