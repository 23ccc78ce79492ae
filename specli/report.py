"""How a finished generation is shown: --stats lines and the --json object.

Shared by `generate` and `chat` (and free of the CLI, so chat does not import it).
"""

from __future__ import annotations

from .budget import CostModel
from .engine import Result, Stats


def stats_lines(res: Result, where: dict[str, str] | None = None) -> list[str]:
    """`where`: each model's runtime and device (Loaded.placements)."""
    s = res.stats
    lines = [
        f"method {res.method}, stop: {res.stop_reason}",
        *(f"{role} on {place}" for role, place in (where or {}).items()),
        f"prompt {s.n_prompt} tokens, prefill {s.prefill_s:.2f} s ({s.prefill_tok_s:.1f} tok/s)",
        f"generated {s.n_generated} tokens in {s.decode_s:.2f} s ({s.decode_tok_s:.1f} tok/s)",
        f"target forward passes {s.target_forwards} ({s.mean_accepted:.2f} tokens each)",
    ]
    if res.budget:
        by = ", ".join(f"{k} {v}" for k, v in sorted(s.rounds_by.items(), key=lambda x: -x[1]))
        lines.append(f"rounds drafted by: {by or 'none yet'} (none: a plain step)")
    if res.budget:
        lines.append(
            f"budget {res.budget}: drafted in {s.draft_rounds} of {s.target_forwards} rounds, "
            f"{s.drafted} tokens, accepted {s.accepted} ({100 * s.acceptance_rate:.1f}%); "
            f"time drafting {s.draft_s:.2f} s, verifying {s.verify_s:.2f} s"
        )
    lines += cost_lines(res)
    if res.cost_note:
        lines.append(res.cost_note)
    if res.drafter_note:
        lines.append(res.drafter_note)
    lines.append(f"wall {s.wall_s:.2f} s")
    return lines


def calibrated_pass_ms(stats: Stats, cal: CostModel) -> float:
    """The calibrated cost of one target pass of this run's mean size, in milliseconds."""
    return 1000 * cal.verify_cost(max(1, round(stats.pass_size)))


def cost_lines(res: Result) -> list[str]:
    """What a target pass and a draft-model step cost in this run, beside the calibrated
    standalone costs: drafting slower inside a generation than alone is a defect."""
    s, cal = res.stats, res.calibrated
    if not s.target_forwards:
        return []
    pass_line = (f"target passes: {s.ms_per_pass:.2f} ms each over {s.pass_size:.2f} tokens "
                 "on average")
    if cal is not None:
        pass_line += (f" (calibrated alone, {max(1, round(s.pass_size))} tokens: "
                      f"{calibrated_pass_ms(s, cal):.2f} ms)")
    pass_line += f"; the rest of a round (budgets, bookkeeping) {s.ms_per_round_other:.3f} ms"
    lines = [pass_line]
    if s.draft_steps:
        step = f"draft model steps: {s.draft_steps} at {s.ms_per_draft_step:.2f} ms each"
        if cal is not None and cal.draft > 0:
            step += (f" (calibrated after a target pass: {1000 * cal.draft:.2f} ms, "
                     f"{s.ms_per_draft_step / (1000 * cal.draft):.2f}x"
                     + (f"; back to back {1000 * cal.draft_alone:.2f} ms)" if cal.draft_alone
                        else ")"))
        way = "" if cal is None else (" (short ones token by token)" if cal.catch_up_stepwise
                                      else " (in one batch)")
        step += f"; {s.draft_batches} evals over several tokens (prompt, catch-ups{way})"
        lines.append(step)
    if s.drafted:
        lines.append(f"drafting: {s.ms_per_drafted_token:.2f} ms per drafted token, all of "
                     "it (model steps, choosing tokens, confidences, sampled rows; beside a "
                     "pass, only the wait)")
    return lines


def result_json(
    res: Result, text: str, model: str, draft: str | None, where: dict[str, str] | None = None
) -> dict:
    s = res.stats
    return {
        "text": text,
        "tokens": res.tokens,
        "n_prompt": s.n_prompt,
        "n_generated": s.n_generated,
        "stop_reason": res.stop_reason,
        "method": res.method,
        "budget": res.budget or None,
        "drafter": res.drafter_note or None,
        "model": model,
        "draft": draft,
        "devices": dict(where or {}),
        "stats": {
            "drafted": s.drafted,
            "accepted": s.accepted,
            "acceptance_rate": s.acceptance_rate,
            "mean_accepted": s.mean_accepted,
            "target_forwards": s.target_forwards,
            "draft_rounds": s.draft_rounds,
            "rounds_by": dict(s.rounds_by),
            "prefill_s": s.prefill_s,
            "prefill_tok_s": s.prefill_tok_s,
            "decode_s": s.decode_s,
            "decode_tok_s": s.decode_tok_s,
            "draft_s": s.draft_s,
            "verify_s": s.verify_s,
            "wall_s": s.wall_s,
            "ms_per_pass": s.ms_per_pass,
            "pass_size": s.pass_size,
            "draft_steps": s.draft_steps,
            "ms_per_draft_step": s.ms_per_draft_step,
            "ms_per_drafted_token": s.ms_per_drafted_token,
            "draft_batches": s.draft_batches,
            "ms_per_round_other": s.ms_per_round_other,
        },
        "calibrated": calibrated_json(res),
    }


def calibrated_json(res: Result) -> dict | None:
    """The standalone costs the budget planned with, in milliseconds."""
    cal = res.calibrated
    if cal is None:
        return None
    return {"ms_per_pass": [round(1000 * v, 4) for v in cal.verify],
            "ms_per_draft_step": round(1000 * cal.draft, 4),
            "ms_per_draft_step_back_to_back": round(1000 * cal.draft_alone, 4),
            "catch_up_stepwise": cal.catch_up_stepwise}
