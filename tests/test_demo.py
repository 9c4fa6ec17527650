"""The embedded demos learn: the real CLI on the shipped tiny recipes (pretrained base, warm-up, Nested-ReFT RL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowres_reft.cli import DEFAULT_RECIPE, main

ROOT = Path(__file__).resolve().parents[1]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_make_demo_reasoning_recipe_gains_ten_points_with_nested_rollouts(tmp_path, capsys):
    """`make demo` as shipped (recipes/tiny-reasoning.toml; its 3000-step base is built here), no eval before
    training and none between: the 40 supervised + 100 skip-distillation warm-up steps, then 60 RL steps whose
    rollouts come from the nested model (1 of the 6 layers skipped, a new one per batch) with Retrace.

    Greedy held-out accuracy after RL must beat the after-warm-up eval by 10 points (measured single-threaded,
    seeds 0 / 1 / 2: +20.0 / +24.0 / +20.5; thread counts change the floating-point path, hence the margin).
    """
    assert Path(DEFAULT_RECIPE).name == "tiny-reasoning.toml"
    code = main(["run", str(ROOT / DEFAULT_RECIPE), "--set", f"log.output_dir={tmp_path}",
                 "--set", "log.run_name=demo", "--set", "log.progress=none", "--set", "eval.every=0",
                 "--set", "eval.before_training=false", "--set", "checkpoint.every=0"])
    assert code == 0, capsys.readouterr().err
    records = _records(tmp_path / "demo")
    distill = [r for r in records if r["stage"] == "warmup" and r.get("skip_distill")]
    assert len(distill) == 100 and all(len(r["skip_distill"]) == 1 for r in distill)
    rl = [r for r in records if r["stage"] == "rl"]
    assert len(rl) == 60
    assert all(len(r["skip_set"]) == 1 and r["skip_ratio"] == 0.16 for r in rl)  # nested rollouts, every batch
    assert len({tuple(r["skip_set"]) for r in rl}) > 1  # a new skip set per batch
    assert sum(r["reward_mean"] for r in rl) / len(rl) > 0.1  # the rollouts earn reward: RL has a signal
    evals = {r["label"]: r["eval_accuracy"] for r in records if r["stage"] == "eval"}
    assert 0.25 < evals["after_warmup"] < 0.7, evals  # the warm-up teaches the format: room left for RL
    assert evals["final"] > evals["after_warmup"] + 0.10, evals  # greedy, 200 held-out problems


@pytest.mark.slow
def test_arithmetic_recipe_reward_on_training_rollouts_rises(tmp_path, capsys):
    """recipes/tiny-cpu.toml (the arithmetic task on a 4-layer LayerDrop base, built here: ~40 s), cut to 30 RL
    steps, no eval before training.

    Fixed seed. Rollouts come from the nested model (1 of the 2 middle layers skipped) with Retrace; the mean
    reward of the last 10 steps must beat the first 10 steps' (each step has 128 rollouts), and greedy held-out
    accuracy must rise over the after-warm-up eval.
    """
    code = main(["run", str(ROOT / "recipes" / "tiny-cpu.toml"), "--set", f"log.output_dir={tmp_path}",
                 "--set", "log.run_name=demo", "--set", "log.progress=none", "--set", "train.steps=30",
                 "--set", "eval.before_training=false", "--set", "checkpoint.every=0"])
    assert code == 0, capsys.readouterr().err
    records = _records(tmp_path / "demo")
    rewards = [r["reward_mean"] for r in records if r["stage"] == "rl"]
    assert len(rewards) == 30
    assert all(r["skip_set"] and r["skip_ratio"] == 0.25 for r in records if r["stage"] == "rl")  # nested rollouts
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.03, (first, last, rewards)  # measured here: 0.34 -> 0.43
    evals = {r["label"]: r["eval_accuracy"] for r in records if r["stage"] == "eval"}
    assert 0.2 < evals["after_warmup"] < 0.7  # the warm-up teaches the format: partial accuracy, room for RL
    assert evals["final"] > evals["after_warmup"] + 0.05, evals  # greedy, 200 held-out problems (0.52 -> 0.665 here)
