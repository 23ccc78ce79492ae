"""What SPECLI_TRACE files say about costs inside the pipeline (issue 14).

    python scripts/trace_report.py bench-noise0.3/trace.jsonl.gz [...]

`scripts/gpu_check.sh` keeps one trace per bench.  Per lineup (its members' names, and
"fixed" where its budgets have a fixed length: one bench method each), this prints:
- target passes by size, median milliseconds when the pass before it had the same size
  and when it had another: a runtime that keeps one captured graph per context and
  replays it only while the shape repeats (llama.cpp on CUDA) pays for every change;
- drafting milliseconds per drafted token by the drafter's lag (context tokens it read
  first): a catch-up read in one batch shows up here, and in the steps after it.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import median


def rounds(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def lineup_key(line: dict) -> str:
    budgets = line.get("budgets") or {}
    fixed = all(b.get("draft_scale") is None for b in budgets.values())
    return ", ".join(sorted(budgets)) + (" (fixed)" if fixed else "")


def report(lines: list[dict]) -> list[str]:
    passes: dict[str, dict[tuple[int, bool], list[float]]] = defaultdict(lambda: defaultdict(list))
    drafting: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    last: dict[str, tuple[int, int]] = {}  # lineup -> (round, pass size) of its last line
    for line in lines:
        if not line.get("seconds"):
            continue
        key = lineup_key(line)
        draft_s, verify_s = line["seconds"]
        size = 1 + int(line.get("verified") or 0)
        before = last.get(key)
        if before is not None and line["round"] == before[0] + 1:  # same lineup, next round
            passes[key][(size, size == before[1])].append(verify_s)
        last[key] = (line["round"], size)
        k = int(line.get("verified") or 0)
        if line.get("pick") and k and not line.get("ready"):
            lag = int(line.get("lag") or 0)
            band = "0-1" if lag <= 1 else str(lag) if lag <= 3 else ">3"
            drafting[key][band].append(draft_s / k)
    out = []
    for key in sorted(set(passes) | set(drafting)):
        out.append(f"## {key}")
        out.append("target pass ms by size: same size as the pass before / another size "
                   "(rounds)")
        for size in sorted({s for s, _ in passes[key]}):
            same, other = passes[key].get((size, True), []), passes[key].get((size, False), [])
            cell = " / ".join(f"{1000 * median(x):.2f} ({len(x)})" if x else "n/a"
                              for x in (same, other))
            out.append(f"  {size:>2} tokens: {cell}")
        if drafting[key]:
            cells = ", ".join(f"lag {band}: {1000 * median(x):.2f} ({len(x)})"
                              for band, x in sorted(drafting[key].items()))
            out.append(f"drafting ms per drafted token (rounds): {cells}")
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for name in argv:
        print(f"# {name}")
        print("\n".join(report(rounds(Path(name)))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
