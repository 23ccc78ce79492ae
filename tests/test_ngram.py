"""N-gram sources and Hierarchy Drafting: drafting rules, the SQLite store's persistence,
concurrency and crash safety, `specli index build`, and greedy identity."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from specli.budget import FixedBudget
from specli.drafters.hierarchy import HierarchyDrafter
from specli.engine import Engine, GenerationConfig
from specli.errors import SpecliError
from specli.fidelity import analyse, first_difference
from specli.ngram import (
    ContextIndex,
    NgramStore,
    chain_draft,
    confidence,
    history_path,
    tokenizer_fingerprint,
)
from specli.runtime import encode_prompt
from specli.sampling import SamplingParams

GREEDY = SamplingParams()
RNG = np.random.default_rng(0)
FP = "0123456789abcdef"
SPECLI = str(Path(sys.executable).parent / "specli")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("SPECLI_HOME", str(h))
    return h


def store(home: Path, *seqs: list[int], **kw) -> NgramStore:
    s = NgramStore.open_history(FP, **kw)
    for seq in seqs:
        s.add(seq)
    return s


def draft(source: ContextIndex | NgramStore, context: list[int], k: int,
          keep_going=None, min_match: int = 1):
    """One source's draft, as hd asks it (the context index first learns the context)."""
    if isinstance(source, ContextIndex):
        source.update(context)
    return chain_draft(source.lookup, context, k, keep_going, source.n_max, min_match)


# -- drafting rules ------------------------------------------------------------------


def test_confidence_rises_with_match_length_and_share():
    assert 0 < confidence(1, 1, 1) < confidence(4, 1, 1) < confidence(4, 5, 5) < 1
    assert confidence(2, 1, 10) < confidence(2, 9, 10)


def test_confidence_is_the_chance_the_token_is_right():
    """A probability the budget can act on before it has learnt anything of this text
    (fitted on Spec-Bench answers: scripts/hd_confidence.py).  A token seen once
    after the last token was right 1 time in 4 there, once after the last four 7 in 10;
    the old number put both near 0.4 (0.375 and 0.45)."""
    assert confidence(1, 1, 1) == pytest.approx(0.25)
    assert confidence(4, 1, 1) == pytest.approx(0.727, abs=0.001)
    assert confidence(4, 20, 20) > 0.95  # many unanimous sightings: near certain
    assert confidence(1, 2, 10) < 0.2  # a minority continuation of one token


def test_context_longest_match_first_and_chaining():
    ctx = [1, 2, 3, 4, 5, 9, 9, 2, 3, 4, 6, 7, 8, 9, 2, 3, 4]
    d = draft(ContextIndex(), ctx, 3)
    # "9 2 3 4" (4 tokens) was followed by 6; "2 3 4" alone would tie 5 against 6
    assert d.tokens == [6, 7, 8] and d.probs is None and len(d.confidence) == 3
    assert all(0 < c < 1 for c in d.confidence)


def test_context_most_frequent_continuation_wins_and_ties_go_to_the_newest():
    ci = ContextIndex(n_max=1)
    assert draft(ci, [5, 1, 5, 1, 5, 2, 5], 1).tokens == [1]  # 1 twice, 2 once
    ci.reset()
    assert draft(ci, [5, 1, 5, 2, 5], 1).tokens == [2]  # tie: the latest
    assert ci.next_counts([5]) == [(1, 1.0), (2, 1.0)]


def test_context_follows_a_growing_and_a_changed_context_and_knows_nothing_new():
    ci = ContextIndex(n_max=2)
    ctx = [1, 2, 3]
    assert draft(ci, ctx, 2).tokens == []  # nothing repeats
    ctx += [1, 2]
    assert draft(ci, ctx, 2).tokens == [3, 1]
    assert draft(ci, [7, 8, 7], 1).tokens == [8]  # a different text: re-indexed
    assert draft(ci, [7, 8, 7], 0).tokens == [] and draft(ci, [], 3).tokens == []


def test_keep_going_stops_a_draft():
    ctx = [1, 2, 3, 4, 5, 1, 2]
    d = draft(ContextIndex(), ctx, 4, keep_going=lambda conf: len(conf) < 2)
    assert d.tokens == [3, 4] and len(d.confidence) == 2


def test_store_drafts_by_longest_match_most_frequent_and_chains(home):
    s = store(home, [1, 2, 3, 7], [9, 2, 3, 8], [5, 2, 3, 8], [4, 5, 6])
    assert s.next_counts([2, 3]) == [(8, 2.0), (7, 1.0)]
    assert draft(s, [0, 2, 3], 1).tokens == [8]  # "2 3": 8 twice, 7 once
    assert draft(s, [1, 2, 3], 1).tokens == [7]  # "1 2 3" (longer) says 7
    assert draft(s, [0, 4], 5).tokens == [5, 6]  # chained until nothing follows
    assert draft(s, [0, 99], 5).tokens == []  # unknown
    d = draft(s, [0, 4], 5, keep_going=lambda conf: False)
    assert d.tokens == [5] and d.probs is None
    assert draft(s, [0, 2, 3], 1, min_match=3).tokens == []  # only a 2-token match
    s.close()


def test_hd_asks_context_then_history_then_static(home, tmp_path):
    history = store(home, [1, 2, 3, 4, 5])
    fp_static = tmp_path / "static.sqlite"
    static = NgramStore(fp_static, FP)
    static.add([7, 8, 9, 10])
    hd = HierarchyDrafter(history, static)

    assert hd.propose([6, 6, 6, 2, 3], 2, GREEDY, RNG).tokens == [4, 5]  # history only
    assert hd.last_source == "history"
    assert hd.propose([2, 3, 9, 2, 3], 1, GREEDY, RNG).tokens == [9]  # context first
    assert hd.propose([0, 8, 9], 1, GREEDY, RNG).tokens == [10]  # static
    # a one-token coincidence in the context loses to a 2-token match further down...
    assert hd.propose([3, 1, 0, 2, 3], 1, GREEDY, RNG).tokens == [4]
    # ...unless the paper's plain order is asked for
    plain = HierarchyDrafter(history, static, passes=(1,))
    assert plain.propose([3, 1, 0, 2, 3], 1, GREEDY, RNG).tokens == [1]
    assert hd.sources == {"context": 0, "history": 0, "static": 0}  # none judged yet
    hd.accepted([], 1, 1)
    assert hd.tokens["history"] == [1, 1] and "history 1 draft, 1/1" in hd.describe()
    hd.finish([6, 6, 2, 3, 11])
    assert history.next_counts([6, 2, 3]) == [(11, 1.0)]
    hd.close()


def test_hd_asks_a_store_each_key_once_per_draft(home):
    """The second pass (a one-token match) must not ask the store again for the keys the
    first pass asked: each is a SQLite query in a round that usually finds nothing, and
    on a GPU a round lasts a few milliseconds."""
    history = store(home, [1, 2, 3, 4, 5])
    asked: list[tuple[int, ...]] = []
    real = history.lookup
    history.lookup = lambda key: asked.append(tuple(key)) or real(key)  # type: ignore[method-assign]
    hd = HierarchyDrafter(history)
    assert hd.propose([9, 8, 7, 6], 3, GREEDY, RNG).tokens == []  # nothing anywhere
    assert sorted(asked) == sorted({(9, 8, 7, 6), (8, 7, 6), (7, 6), (6,)})
    asked.clear()
    assert hd.propose([9, 8, 7, 6, 2, 3], 2, GREEDY, RNG).tokens == [4, 5]  # still drafts
    assert len(asked) == len(set(asked))
    hd.close()


# -- the store on disk ---------------------------------------------------------------


def test_store_persists_and_checks_the_tokenizer(home):
    s = store(home, [1, 2, 3, 4], [1, 2, 3, 5])
    path = s.path
    s.close()
    assert path == history_path(FP) == home / "history" / f"{FP}.sqlite"
    s = NgramStore.open_history(FP)
    assert s.next_counts([1, 2, 3]) == [(5, 1.0), (4, 1.0)]  # equal counts: newest first
    assert dict(s.next_counts([2])) == {3: 2.0}
    s.close()
    with pytest.raises(SpecliError, match=f"{FP}.*fedcba9876543210"):
        NgramStore(path, "fedcba9876543210")
    with pytest.raises(SpecliError, match="no corpus index named 'nope'"):
        NgramStore.open_corpus("nope", FP)
    with pytest.raises(SpecliError, match="invalid corpus name"):
        NgramStore.open_corpus("../x", FP)


def test_an_unusable_history_is_a_warning_not_an_error(tmp_path, monkeypatch):
    """History only speeds hd up: a corrupt file, or a home under a file, warns once."""
    bad = tmp_path / "home"
    (bad / "history").mkdir(parents=True)
    monkeypatch.setenv("SPECLI_HOME", str(bad))
    history_path(FP).write_bytes(b"this is not an sqlite file at all" * 100)
    notes: list[str] = []
    assert NgramStore.open_history_or_none(FP, notes.append) is None
    assert len(notes) == 1 and "\n" not in notes[0]
    assert str(history_path(FP)) in notes[0] and "--no-history" in notes[0]
    assert "delete" in notes[0]
    (tmp_path / "file.gguf").write_bytes(b"x")
    monkeypatch.setenv("SPECLI_HOME", str(tmp_path / "file.gguf" / "sub"))
    assert NgramStore.open_history_or_none(FP, notes.append) is None
    assert len(notes) == 2 and str(history_path(FP)) in notes[1]
    assert "delete" not in notes[1]  # no file of its own to delete: the folder is the trouble
    assert NgramStore.open_history_or_none(FP) is None  # no one to tell: silent


def test_size_bound_evicts_the_least_recently_seen(home):
    s = store(home, max_rows=60)
    s.add([100, 101, 102, 103, 104, 105])  # 28 rows (continuations + totals), seen at time 1
    s.add([200, 201, 202, 203, 204, 205])  # 28 more, time 2
    s.add([100, 101])  # 2 of the first rows seen again, time 3
    s.add([300, 301, 302, 303])  # 12 new rows: 68 > 60, so down to 54
    age = dict(s.conn.execute("SELECT last_seen, count(*) FROM ngrams GROUP BY last_seen"))
    assert sum(age.values()) == 54
    assert age == {1: 26 - 14, 2: 28, 3: 2, 4: 12}  # 14 rows evicted, all from time 1
    assert s.next_counts([100]) == [(101, 2.0)]  # refreshed, so kept
    assert s.next_counts([201, 202]) == [(203, 1.0)] and s.next_counts([302]) == [(303, 1.0)]
    s.close()


_WRITER = """
import sys, time
from pathlib import Path
from specli.ngram import NgramStore
tag, sync = int(sys.argv[1]), Path(sys.argv[2])
s = NgramStore.open_history({fp!r})
(sync / str(tag)).touch()  # ready; wait for the go so both begin together
while not (sync / "go").exists():
    time.sleep(0.005)
t0 = time.time()
for i in range({n}):
    s.add([tag, 1, 2, 3, tag])
print(t0, time.time())
s.close()
"""


def test_two_processes_write_one_history_at_once(home, tmp_path):
    code = _WRITER.format(fp=FP, n=300)
    env = {**os.environ, "SPECLI_HOME": str(home)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tag), str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for tag in (50, 60)
    ]
    deadline = time.time() + 60
    while not ((tmp_path / "50").exists() and (tmp_path / "60").exists()):
        dead = [p.communicate()[1] for p in procs if p.poll() is not None]
        assert not dead, dead
        assert time.time() < deadline
        time.sleep(0.01)
    (tmp_path / "go").touch()
    spans = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        spans.append([float(x) for x in out.split()])
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1  # the two really wrote at the same time
    s = NgramStore.open_history(FP)
    assert sorted(s.next_counts([1, 2, 3])) == [(50, 300.0), (60, 300.0)]
    assert dict(s.next_counts([2])) == {3: 600.0}
    assert s.next_counts([50, 1]) == [(2, 300.0)] and s.next_counts([60]) == [(1, 300.0)]
    s.close()


_OPENER = """
import sys, time
from pathlib import Path
from specli.ngram import NgramStore
start, homes = float(sys.argv[1]), sys.argv[2:]
for i, home in enumerate(homes):  # trial i: every opener starts at start + i/10 s
    while time.time() < start + i / 10:
        pass
    NgramStore(Path(home) / "h.sqlite", {fp!r}).close()
"""


def test_processes_opening_a_new_history_together_all_succeed(tmp_path):
    """Regression: switching a new file to WAL does not wait for a lock (SQLite skips
    the busy handler), so one of two specli processes started together failed with
    "database is locked" (about 2 trials in 5 on a 2-core machine before the fix)."""
    homes = [str(tmp_path / str(i)) for i in range(30)]
    for h in homes:
        Path(h).mkdir()
    start = time.time() + 3  # after both interpreters have imported specli
    procs = [
        subprocess.Popen([sys.executable, "-c", _OPENER.format(fp=FP), str(start), *homes],
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    for h in homes:
        s = NgramStore(Path(h) / "h.sqlite", FP)
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        s.close()


_CRASHER = """
import numpy as np
from specli.ngram import NgramStore

class Tell:  # says when the big upsert starts: the kill then lands inside a transaction
    def __init__(self, conn):
        self._conn = conn
    def __getattr__(self, name):
        return getattr(self._conn, name)
    def executemany(self, sql, rows):
        if sql.startswith("INSERT INTO ngrams"):
            print("writing", flush=True)
        return self._conn.executemany(sql, rows)

s = NgramStore.open_history({fp!r})
s.add([11, 12, 13, 14])
s._conn = Tell(s._conn)
big = np.random.default_rng(0).integers(1000, 60000, size=15000).tolist() + [7, 7, 7, 7]
while True:
    s.add(big)  # one long transaction each (about 0.5 s on a 2-core machine)
    print("committed", flush=True)
"""


def test_kill_9_mid_write_keeps_every_committed_entry(home):
    env = {**os.environ, "SPECLI_HOME": str(home)}
    p = subprocess.Popen([sys.executable, "-c", _CRASHER.format(fp=FP)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said, at = [], []
        for _ in range(3):
            said.append(p.stdout.readline().strip())
            at.append(time.perf_counter())
        assert said == ["writing", "committed", "writing"], p.stderr.read()
        time.sleep((at[1] - at[0]) / 4)  # inside the second big transaction, on any machine
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    s = NgramStore.open_history(FP)
    assert s.conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert s.next_counts([11, 12, 13]) == [(14, 1.0)]  # committed before the loop
    [(tok, count)] = s.next_counts([7, 7, 7])
    assert (tok, count) == (7, 1.0)  # the first big add, and nothing of the second
    assert dict(s.next_counts([7]))[7] == 3 * count
    s.add([11, 12, 13, 15])  # and it is writable again
    assert dict(s.next_counts([11, 12, 13])) == {14: 1.0, 15: 1.0}
    s.close()


# -- index build and drafting from a corpus, on a tiny real model ---------------------


LINE = "water sound take only little work know place year live me back give most very\n"


def _run(args, env):
    return subprocess.run([SPECLI, *args], capture_output=True, text=True, env=env, timeout=120)


def test_index_build_then_hd_drafts_from_the_corpus(tiny_paths, tiny_models, home, tmp_path):
    t = tiny_models["target"]
    text = "the people said hello to the world.\n" + LINE * 3 + "then they went home.\n"
    corpus = tmp_path / "notes.txt"
    corpus.write_text(text, encoding="utf-8")
    env = {**os.environ, "SPECLI_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    p = _run(["index", "build", str(corpus), "--model", str(tiny_paths["target"]),
              "-o", "notes"], env)
    assert p.returncode == 0, p.stderr
    out = Path(p.stdout.strip())
    assert out == home / "corpora" / "notes.sqlite" and out.is_file()
    assert "continuations of" in p.stderr and "n-grams" in p.stderr
    assert not list(out.parent.glob(".*tmp*"))  # no temp file left behind

    fp = tokenizer_fingerprint(t)
    static = NgramStore.open_corpus("notes", fp)
    toks = t.tokenize(text, add_bos=False, special=False)
    line = t.tokenize(LINE, add_bos=False, special=False)
    i = next(j for j in range(len(toks)) if toks[j : j + len(line)] == line)
    ctx = toks[i + 2 : i + 5]  # three distinct tokens from inside the repeated line
    hd = HierarchyDrafter(None, static)
    d = hd.propose(ctx, 6, GREEDY, RNG)
    assert d.tokens == toks[i + 5 : i + 11]
    assert hd.last_source == "static"
    static.close()
    # another model: which one it was built for, and how to rebuild it, in one line
    with pytest.raises(SpecliError) as e:
        NgramStore.open_corpus("notes", tokenizer_fingerprint(tiny_models["other"]))
    msg = str(e.value)
    assert f"({tiny_paths['target'].name})" in msg and "\n" not in msg
    assert "specli index build FILE... --model MODEL -o notes" in msg


def test_index_build_bad_input_is_one_line(tiny_paths, home, tmp_path):
    env = {**os.environ, "SPECLI_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    model = str(tiny_paths["target"])
    for args, needle in (
        ([str(tmp_path / "missing.txt")], "file not found"),
        ([str(empty)], "is empty"),
    ):
        p = _run(["index", "build", *args, "--model", model, "-o", "x"], env)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 1 and len(lines) == 1 and needle in lines[0], p.stderr
    assert not (home / "corpora" / "x.sqlite").exists()


# -- losslessness on the tiny model ---------------------------------------------------


def _check_identity(t, prompt, plain, spec):
    i = first_difference(plain.tokens, spec.tokens)
    if i is not None:
        assert analyse(t, prompt, plain.tokens, i).explained
    else:
        assert plain.tokens == spec.tokens


def test_hd_greedy_identity_and_history_drafts(tiny_models, home):
    t = tiny_models["target"]
    cfg = GenerationConfig(max_tokens=48, draft_max=6)
    history = NgramStore.open_history(tokenizer_fingerprint(t))

    text = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"
    prompt = encode_prompt(t, text)
    plain = Engine(t).generate(prompt, cfg, "none")
    hd = HierarchyDrafter(history)
    spec = Engine(t, hd, FixedBudget(6)).generate(prompt, cfg, "hd")
    _check_identity(t, prompt, plain, spec)
    assert spec.stats.drafted > 0 and hd.sources["context"] > 0

    # a new prompt, answered once: the next run drafts its answer from the history
    prompt2 = encode_prompt(t, "write about water and sound")
    plain2 = Engine(t).generate(prompt2, cfg, "none")
    hd.finish(prompt2 + plain2.tokens)
    hd2 = HierarchyDrafter(history)
    spec2 = Engine(t, hd2, FixedBudget(6)).generate(prompt2, cfg, "hd")
    _check_identity(t, prompt2, plain2, spec2)
    assert hd2.sources["history"] > 0 and spec2.stats.accepted > 0
    history.close()


def test_store_file_is_plain_sqlite(home):
    """Other tools can read it: the layout is the documented one."""
    store(home, [1, 2, 3]).close()
    conn = sqlite3.connect(history_path(FP))
    cols = [r[1] for r in conn.execute("PRAGMA table_info(ngrams)")]
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    conn.close()
    assert cols == ["key", "token", "count", "last_seen"]
    assert meta["fingerprint"] == FP and meta["n_max"] == "4"

