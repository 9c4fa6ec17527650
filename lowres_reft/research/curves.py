"""Accuracy curves against training cost, and the equal-budget comparison built on them (pure functions).

A curve is a list of points {"step", "rl_seconds", "rollout_tokens", "accuracy"}, one per evaluation, in step order:
`rl_seconds` / `rollout_tokens` are the cumulative sums of the RL steps' `step_seconds` / `rollout_tokens` up to
and including that evaluation's step. Evaluation time is not counted (it measures, it does not train), nor is the
supervised warm-up (it is part of the start). The first point is the start (step 0, cost 0) when it was evaluated.

The accuracy of a run at a budget is a step function: that of the last evaluation at or before the budget (the
model one would have in hand had training stopped there). After its last point a curve keeps its last value.
"""

from __future__ import annotations

import statistics

COSTS = ("rl_seconds", "rollout_tokens")
BUDGET_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def curve_from_steps(step_seconds: list[float], rollout_tokens: list[int], evals: list[tuple[int, float]]) -> list[dict]:
    """Curve of one run from its per-step costs (index i = step i + 1) and its (step, accuracy) evaluations.

    Evaluations at the same step keep the last one (at step 0: after the warm-up rather than before it)."""
    by_step = {}
    for step, accuracy in evals:
        if not 0 <= step <= len(step_seconds):
            raise ValueError(f"evaluation at step {step}, but the run has {len(step_seconds)} steps")
        by_step[step] = accuracy
    points = []
    for step in sorted(by_step):
        points.append({"step": step, "rl_seconds": float(sum(step_seconds[:step])),
                       "rollout_tokens": int(sum(rollout_tokens[:step])), "accuracy": by_step[step]})
    return points


def curve_from_metrics(records: list[dict]) -> list[dict]:
    """Curve of one run from its metrics.jsonl records: RL lines (`stage` "rl") and evaluation lines ("eval")."""
    rl = {r["step"]: r for r in records if r.get("stage") == "rl"}  # a resumed step: its last line counts
    steps = sorted(rl)
    if steps != list(range(1, len(steps) + 1)):
        raise ValueError(f"metrics have RL steps {steps[:5]}...; expected 1..N without gaps")
    evals = [(r["step"], r["eval_accuracy"]) for r in records if r.get("stage") == "eval"]
    return curve_from_steps([rl[s]["step_seconds"] for s in steps], [rl[s]["rollout_tokens"] for s in steps], evals)


def accuracy_at(curve: list[dict], budget: float, cost: str = "rl_seconds") -> float | None:
    """Accuracy of the last point with `cost` <= `budget` (None when even the first point costs more)."""
    reached = [p["accuracy"] for p in curve if p[cost] <= budget]
    return reached[-1] if reached else None


def cost_to_reach(curve: list[dict], target: float, cost: str = "rl_seconds") -> float | None:
    """`cost` of the first point with accuracy >= `target` (None: never reached)."""
    return next((p[cost] for p in curve if p["accuracy"] >= target), None)


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def mean_curve(curves: list[list[dict]], cost: str = "rl_seconds") -> dict:
    """Mean and std over seeds of the step functions, at every point's cost of any seed (sorted): {x, mean, std}.

    Where a seed has no point yet at some x (its start was not evaluated) that x is left out."""
    xs = sorted({p[cost] for c in curves for p in c})
    out = {"x": [], "mean": [], "std": []}
    for x in xs:
        values = [accuracy_at(c, x, cost) for c in curves]
        if None in values:
            continue
        stat = mean_std(values)
        out["x"].append(x)
        out["mean"].append(stat["mean"])
        out["std"].append(stat["std"])
    return out


def equal_budget(curves: dict[str, list[list[dict]]], reference: str, fractions=BUDGET_FRACTIONS) -> dict:
    """Per variant: accuracy at fractions of the reference's mean total RL time, and cost to reach its accuracy.

    `curves`: variant name -> one curve per seed. The budgets are T = f x the reference's mean total RL seconds
    (the cost of its last point). The target is the reference's mean final accuracy, which its mean run reaches,
    by definition, at its mean total cost: "to reach" is each variant's cost to reach the target as a ratio to
    that total (mean over seeds; None when any seed never reaches it, with the count that did), in RL seconds
    and in rollout tokens."""
    ref = curves[reference]
    totals = {cost: statistics.fmean(c[-1][cost] for c in ref) for cost in COSTS}
    target = statistics.fmean(c[-1]["accuracy"] for c in ref)
    budgets = [f * totals["rl_seconds"] for f in fractions]
    table = {}
    for name, runs in curves.items():
        at = []
        for budget in budgets:
            values = [a for a in (accuracy_at(c, budget) for c in runs) if a is not None]
            at.append(mean_std(values) if len(values) == len(runs) else None)
        reach = {}
        for cost in COSTS:
            spent = [cost_to_reach(c, target, cost) for c in runs]
            reached = [s for s in spent if s is not None]
            ratio = statistics.fmean(reached) / totals[cost] if len(reached) == len(runs) and totals[cost] > 0 else None
            reach[cost] = {"ratio": ratio, "per_seed": spent, "reached": len(reached), "seeds": len(runs)}
        table[name] = {"accuracy_at": at, "to_reach": reach}
    return {"reference": reference, "fractions": list(fractions), "budgets_seconds": budgets,
            "reference_totals": totals, "target_accuracy": target, "variants": table}


def budget_markdown(result: dict) -> str:
    """The equal-budget table (accuracy in %, mean ± std over seeds)."""
    ref, totals = result["reference"], result["reference_totals"]
    heads = [f"acc % at {f:.0%} T ({b:.1f} s)" for f, b in zip(result["fractions"], result["budgets_seconds"])]
    lines = [f"Equal RL time (T = {ref}'s mean total RL time {totals['rl_seconds']:.1f} s, evaluation excluded); "
             f"cost to reach {ref}'s final mean accuracy {100 * result['target_accuracy']:.1f}% as a ratio to "
             f"{ref}'s total ({totals['rl_seconds']:.1f} s, {totals['rollout_tokens']:.0f} rollout tokens):", "",
             "| variant | " + " | ".join(heads) + " | time to reach | tokens to reach |",
             "|---" * (len(heads) + 3) + "|"]
    for name, row in result["variants"].items():
        cells = [f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s else "n/a" for s in row["accuracy_at"]]
        cells += [_reach_cell(row["to_reach"][cost]) for cost in COSTS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _reach_cell(reach: dict) -> str:
    if reach["ratio"] is None:
        return f"not reached ({reach['reached']}/{reach['seeds']} seeds did)"
    return f"{reach['ratio']:.2f}×"
