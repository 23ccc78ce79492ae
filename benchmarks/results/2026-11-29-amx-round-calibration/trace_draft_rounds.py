"""Draft-model rounds in SPECLI_TRACE files: ms per drafted token, the budget's learnt
draft_scale, and settled plain steps, for the `draft` method and auto's draft members.

    python trace_draft_rounds.py TRACE.jsonl[.gz] ...
"""

import gzip
import json
import statistics
import sys


def report(path: str) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    print(path)
    for method in ("draft", "draft,draft+hd,hd"):  # the budgets a method's trace lines hold
        rs = [r for r in rows if ",".join(sorted(r["budgets"])) == method and r["seconds"]]
        for name in ("draft", "draft+hd"):
            mine = [r for r in rs if r["pick"] == name and r["verified"]]
            if not mine:
                continue
            ms = [1000 * r["seconds"][0] / r["verified"] for r in mine]
            scale = [r["budgets"][name]["draft_scale"] for r in mine]
            print(f"  [{method}] {name}: {len(mine)} rounds, "
                  f"{sum(r['verified'] for r in mine)} drafted, "
                  f"{sum(r['accepted'] for r in mine)} accepted, ms/drafted token median "
                  f"{statistics.median(ms):.2f}, draft_scale when drafting median "
                  f"{statistics.median(scale):.2f}")
        plain = [1000 * r["seconds"][1] for r in rs
                 if r["pick"] is None and r.get("plain_before", 9) >= 2]
        print(f"  [{method}] settled plain step median {statistics.median(plain):.2f} "
              f"({len(plain)})")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        report(p)
