"""Accuracy curves against RL time / rollout tokens and the equal-budget table, against hand-computed values."""

import math

import pytest

from lowres_reft.research.curves import (
    accuracy_at,
    budget_markdown,
    cost_to_reach,
    curve_from_metrics,
    curve_from_steps,
    equal_budget,
    mean_curve,
)

RECORDS = [
    {"step": 0, "stage": "eval", "label": "before_training", "eval_accuracy": 0.1, "eval_n": 10},
    {"step": 1, "stage": "warmup", "loss": 1.0, "step_seconds": 99.0},  # the warm-up is part of the start
    {"step": 0, "stage": "eval", "label": "after_warmup", "eval_accuracy": 0.3, "eval_n": 10},
    {"step": 1, "stage": "rl", "step_seconds": 2.0, "rollout_tokens": 100},
    {"step": 2, "stage": "rl", "step_seconds": 3.0, "rollout_tokens": 50},
    {"step": 2, "stage": "eval", "label": "step_2", "eval_accuracy": 0.5, "eval_n": 10},
    {"step": 3, "stage": "rl", "step_seconds": 1.5, "rollout_tokens": 70},
    {"step": 3, "stage": "eval", "label": "final", "eval_accuracy": 0.4, "eval_n": 10},
]


def point(step, seconds, tokens, accuracy):
    return {"step": step, "rl_seconds": seconds, "rollout_tokens": tokens, "accuracy": accuracy}


def test_curve_from_metrics_lines_by_hand():
    # Start = after the warm-up (the later eval at step 0), at cost 0; eval time and warm-up lines not counted.
    assert curve_from_metrics(RECORDS) == [point(0, 0.0, 0, 0.3), point(2, 5.0, 150, 0.5), point(3, 6.5, 220, 0.4)]


def test_curve_from_metrics_refuses_missing_steps():
    with pytest.raises(ValueError, match="without gaps"):
        curve_from_metrics([r for r in RECORDS if not (r["stage"] == "rl" and r["step"] == 2)])


def test_curve_from_steps_checks_eval_steps():
    assert curve_from_steps([1.0, 2.0], [5, 6], [(2, 0.5), (0, 0.1)]) == [point(0, 0.0, 0, 0.1), point(2, 3.0, 11, 0.5)]
    with pytest.raises(ValueError, match="step 3"):
        curve_from_steps([1.0, 2.0], [5, 6], [(3, 0.5)])


def test_accuracy_at_is_a_step_function():
    curve = curve_from_metrics(RECORDS)
    assert accuracy_at(curve, 0.0) == 0.3 and accuracy_at(curve, 4.99) == 0.3
    assert accuracy_at(curve, 5.0) == 0.5 and accuracy_at(curve, 6.49) == 0.5
    assert accuracy_at(curve, 100.0) == 0.4  # after the last point: the last value
    assert accuracy_at(curve, 149, "rollout_tokens") == 0.3 and accuracy_at(curve, 150, "rollout_tokens") == 0.5
    assert accuracy_at(curve[1:], 1.0) is None  # no start point: nothing before the first eval


def test_cost_to_reach():
    curve = curve_from_metrics(RECORDS)
    assert cost_to_reach(curve, 0.45) == 5.0 and cost_to_reach(curve, 0.45, "rollout_tokens") == 150
    assert cost_to_reach(curve, 0.3) == 0.0 and cost_to_reach(curve, 0.6) is None


A = [[point(0, 0.0, 0, 0.2), point(5, 10.0, 100, 0.6)], [point(0, 0.0, 0, 0.2), point(5, 30.0, 300, 0.4)]]
B = [[point(0, 0.0, 0, 0.2), point(2, 4.0, 50, 0.5), point(4, 8.0, 100, 0.7)],
     [point(0, 0.0, 0, 0.2), point(3, 6.0, 80, 0.55)]]


def test_mean_curve_by_hand():
    m = mean_curve(B)
    assert m["x"] == [0.0, 4.0, 6.0, 8.0]
    assert m["mean"] == pytest.approx([0.2, 0.35, 0.525, 0.625])
    assert m["std"] == pytest.approx([0.0, math.sqrt(0.045), math.sqrt(0.00125), math.sqrt(0.01125)])
    assert mean_curve([B[0], B[1][1:]])["x"] == [6.0, 8.0]  # x where a seed has no point yet are left out


def test_equal_budget_by_hand():
    result = equal_budget({"r0": A, "nested": B}, "r0")
    # T = mean total RL time of r0 = (10 + 30) / 2 = 20 s; target = mean final accuracy of r0 = 0.5.
    assert result["budgets_seconds"] == [5.0, 10.0, 15.0, 20.0]
    assert result["reference_totals"] == {"rl_seconds": 20.0, "rollout_tokens": 200.0}
    assert result["target_accuracy"] == pytest.approx(0.5)
    r0, nested = result["variants"]["r0"], result["variants"]["nested"]
    assert [s["mean"] for s in r0["accuracy_at"]] == pytest.approx([0.2, 0.4, 0.4, 0.4])
    assert r0["accuracy_at"][1]["std"] == pytest.approx(math.sqrt(0.08))
    assert [s["mean"] for s in nested["accuracy_at"]] == pytest.approx([0.35, 0.625, 0.625, 0.625])
    # r0's seed 2 ends at 0.4 < 0.5: not reached; nested reaches 0.5 at 4 s and 6 s (50 and 80 tokens).
    assert r0["to_reach"]["rl_seconds"] == {"ratio": None, "per_seed": [10.0, None], "reached": 1, "seeds": 2}
    assert nested["to_reach"]["rl_seconds"]["ratio"] == pytest.approx(5.0 / 20.0)
    assert nested["to_reach"]["rollout_tokens"]["ratio"] == pytest.approx(65.0 / 200.0)
    table = budget_markdown(result)
    assert "| nested | 35.0 ± 21.2 | 62.5 ± 10.6 | 62.5 ± 10.6 | 62.5 ± 10.6 | 0.25× | 0.33× |" in table
    assert "not reached (1/2 seeds did)" in table and "50.0%" in table


def test_equal_budget_without_start_points_says_n_a():
    result = equal_budget({"r0": [c[1:] for c in A]}, "r0")
    assert result["variants"]["r0"]["accuracy_at"][0] is None  # 5 s: before either seed's first eval
    assert "| r0 | n/a |" in budget_markdown(result)
