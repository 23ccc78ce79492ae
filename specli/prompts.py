"""Benchmark prompts: Spec-Bench (shipped, Apache-2.0) or any JSONL with the same fields."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import SpecliError
from .textin import check_text, decode_utf8

SPEC_BENCH_CATEGORIES = (
    "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
    "translation", "summarization", "qa", "math_reasoning", "rag",
)


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str  # the first user turn


def load_prompts(path: str | Path | None = None) -> list[Prompt]:
    """Read `question_id`, `category`, `turns` rows (Spec-Bench's format)."""
    if path is None:
        raw = (resources.files("specli") / "data/spec_bench/question.jsonl").read_text("utf-8")
        where = "Spec-Bench"
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise SpecliError(f"cannot read prompts {path}: {e.strerror or e}") from None
        raw, where = decode_utf8(data, f"prompts file {path}"), str(path)
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            text = turns[0] if isinstance(turns, list) else turns  # a string: the turn
            if not isinstance(text, str):
                raise TypeError(text)
            qid, cat = str(row.get("question_id", n)), str(row.get("category", "all"))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise SpecliError(f"{where}:{n}: expected JSON with 'turns' (and 'category')") from None
        out.append(Prompt(qid, cat, check_text(text, f"{where}:{n}")))
    if not out:
        raise SpecliError(f"no prompts in {where}")
    return out


def pick(prompts: list[Prompt], categories: list[str] | None, per_category: int) -> list[Prompt]:
    """The first `per_category` prompts of each category, categories in order."""
    cats = categories or list(dict.fromkeys(p.category for p in prompts))
    known = {p.category for p in prompts}
    unknown = [c for c in cats if c not in known]
    if unknown:
        raise SpecliError(f"unknown categories {unknown}; known: {sorted(known)}")
    return [p for c in cats for p in [q for q in prompts if q.category == c][:per_category]]
