"""The embedded demo learns: the real CLI on the demo recipe as shipped (pretrained base, warm-up, Nested-ReFT RL).

The arithmetic recipe (recipes/tiny-cpu.toml) runs in the CLI, compare and bench tests on few steps; its learning
run left this suite to keep it under 10 minutes on 2 cores (measured in README, "The demo learns").
"""

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
