"""hd's confidence (specli.ngram.confidence) against a model's own answers: fit, replay.

hd drafts by chaining n-gram look-ups in the context (prompt + answer so far).  This
replays those look-ups over greedy answers a bench recorded (`none` rows of its
results.jsonl) and judges each chained token against the token the model wrote.

Fit: P(right) = count / (total + a / n**e) by maximum likelihood over a grid of a and e;
the observed rate beside the predicted one per decile, for the fit and for the
confidence specli ships, so a change of formula is judged on data.

Replay: hd's budget (specli.budget) drafting along each answer, every text after the one
before as in a bench, with pass costs of a 2-core AMX CPU, a 2-core AVX2 CPU and a GPU
(FIELD-NOTES' and calibrated curves, drafting free): each round the budget trims the
chain found at that point, the tokens accepted are those the model wrote.  Speedup per
category against plain steps, with the budget learning as shipped and with the
confidences taken as they are.  Timing noise, pass-shape effects and the plan before
the draft are left out: it compares policies, it does not predict a bench.

    python scripts/hd_confidence.py benchmarks/results/2026-11-26-cpu2-hd/results.jsonl

The prompts are re-encoded with the target's chat template (default: the default pair's
target; --model to change) and must encode to the recorded lengths.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence

from specli.backends.base import LoadOptions
from specli.backends.gguf import GGUFModel
from specli.budget import Acceptance, AdaptiveBudget, CostModel
from specli.ngram import ContextIndex, chain_draft, confidence
from specli.prompts import load_prompts
from specli.pull import resolve_model
from specli.registry import load_registry
from specli.runtime import encode_prompt

CHAIN = 8  # tokens chained per draft at most (--draft-max's default)
CURVES = {  # seconds of one pass over 1, 2, ... 9 tokens
    "2-core AMX": [0.001 * x for x in (62.6, 95.3, 102.1, 102.1, 132.5, 151.9, 171.2, 180.9,
                                       195.5)],
    "2-core AVX2": [0.026 * x for x in (1, 1.66, 1.9, 2.22, 2.5, 2.76, 3.7, 4.67, 5.0)],
    "GPU": [0.005 * (1 + 0.08 * i) for i in range(9)],
}

Look = tuple[int, float, float, bool]  # n, count, total, right
Text = tuple[str, list[list[Look]]]  # category, the chain found at each answer position


def answers(path: str, prompts: str | None,
            model: str | None) -> list[tuple[str, list[int], list[int]]]:
    """(category, prompt tokens, answer tokens) of each prompt's first `none` row."""
    reg = load_registry()
    target = GGUFModel(resolve_model(model or reg.default_pair.target, registry=reg),
                       LoadOptions(n_ctx=512, n_threads=1))
    texts = {p.id: p.text for p in load_prompts(prompts)}
    out, seen = [], set()
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        if row["method"] != "none" or not row.get("tokens") or row["prompt_id"] in seen:
            continue
        seen.add(row["prompt_id"])
        prompt = encode_prompt(target, texts[row["prompt_id"]])
        if len(prompt) != row["n_prompt"]:
            raise SystemExit(f"prompt {row['prompt_id']} encodes to {len(prompt)} tokens, "
                             f"the bench saw {row['n_prompt']}: another model or template?")
        out.append((row["category"], prompt, row["tokens"]))
    target.close()
    return out


def chain_at(index: ContextIndex, ctx: list[int], rest: list[int]) -> list[Look]:
    """The chain hd finds after `ctx` (`ngram.chain_draft` over the context index, as hd
    drafts), each token judged against `rest`, the answer from here; it ends at its first
    wrong token (later ones are never verified)."""
    hits: list[tuple[int, float, float]] = []

    def look(key: Sequence[int]) -> tuple[int, float, float] | None:
        hit = index.lookup(key)
        if hit is not None:  # chain_draft takes the first hit, longest key first
            hits.append((len(key), hit[1], hit[2]))
        return hit

    draft = chain_draft(look, ctx, min(CHAIN, len(rest)), None)
    chain: list[Look] = []
    for (n, count, total), tok, want in zip(hits, draft.tokens, rest, strict=False):
        chain.append((n, count, total, tok == want))
        if tok != want:
            break
    return chain


def chains(pairs: list[tuple[str, list[int], list[int]]]) -> list[Text]:
    """The chain hd would find at every position of every answer."""
    texts: list[Text] = []
    for category, prompt, answer in pairs:
        ctx, index, found = list(prompt), ContextIndex(), []
        for t in range(len(answer)):
            index.update(ctx)
            found.append(chain_at(index, ctx, answer[t:]))
            ctx.append(answer[t])
        texts.append((category, found))
    return texts


def replay(texts: list[Text], verify: list[float], learn: bool) -> dict[str, list[float]]:
    """Speedup of each text against plain steps, hd's budget trimming every chain."""
    budget = AdaptiveBudget(CostModel(verify, 0.0), Acceptance(calibrated=True))
    out: dict[str, list[float]] = defaultdict(list)
    for category, found in texts:
        budget.begin()
        pos, spent = 0, 0.0
        while pos < len(found):
            chain = found[pos]
            said = [confidence(n, c, t) for n, c, t, _ in chain]
            if not learn:
                budget.acc.shift = 0.0
            k = budget.trim(said)
            right = next((i for i, look in enumerate(chain[:k]) if not look[3]), k)
            spent += verify[k]
            if k:
                budget.acc.update(said[:k], right)
            pos += right + 1
        out[category].append(len(found) * verify[0] / spent)
    return out


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))


def log_likelihood(f: Callable[[int, float, float], float], looks: list[Look]) -> float:
    return sum(math.log(min(max(f(n, c, t) if ok else 1 - f(n, c, t), 1e-9), 1.0))
               for n, c, t, ok in looks)


def deciles(f: Callable[[int, float, float], float], looks: list[Look]) -> str:
    bins: dict[int, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for n, c, t, ok in looks:
        p = f(n, c, t)
        b = bins[min(int(p * 10), 9)]
        b[0] += ok
        b[1] += 1
        b[2] += p
    return "\n".join(f"  {d / 10:.1f}-{(d + 1) / 10:.1f}: {int(b[1]):5d} look-ups, predicted "
                     f"{b[2] / b[1]:.2f}, right {b[0] / b[1]:.2f}"
                     for d, b in sorted(bins.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a bench's results.jsonl with greedy `none` rows")
    ap.add_argument("--prompts", help="the bench's --prompts file (default: Spec-Bench)")
    ap.add_argument("--model", help="the bench's target (default: the default pair's)")
    args = ap.parse_args()
    texts = chains(answers(args.results, args.prompts, args.model))
    looks = [look for _, found in texts for chain in found for look in chain]
    print(f"{len(looks)} look-ups, {sum(x[3] for x in looks) / len(looks):.2f} right")
    grid = [(a, e) for a in (1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6) for e in (0.5, 1, 1.25, 1.5, 1.75, 2)]
    ll, a, e = max((log_likelihood(lambda n, c, t, a=a, e=e: c / (t + a / n**e), looks), a, e)
                   for a, e in grid)
    print(f"fit: count / (total + {a} / n**{e}), log-likelihood {ll:.1f}")
    print(deciles(lambda n, c, t: c / (t + a / n**e), looks))
    print(f"shipped (specli.ngram.confidence): log-likelihood "
          f"{log_likelihood(confidence, looks):.1f}")
    print(deciles(confidence, looks))
    print("replay, speedup against plain steps (geometric means): overall, lowest category")
    for name, verify in CURVES.items():
        for learn in (True, False):
            per = replay(texts, verify, learn)
            low = min(per, key=lambda c: geomean(per[c]))
            print(f"  {name:12s} {'learning' if learn else 'as said':9s} "
                  f"{geomean([x for xs in per.values() for x in xs]):.3f}x, "
                  f"{low} {geomean(per[low]):.3f}x")

if __name__ == "__main__":
    main()
