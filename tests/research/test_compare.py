"""`lowres-reft compare` on the tiny model: runs the grid, reuses finished runs, writes table/JSON/plot."""

import json
from pathlib import Path

import pytest
from conftest import TINY_RUN_SETS, as_set_args

from lowres_reft.cli import main
from lowres_reft.research.compare import aggregate, variants

ROOT = Path(__file__).resolve().parents[2]
SMALL = TINY_RUN_SETS + ["train.steps=2", "eval.before_training=false"]


def test_variant_grid_runs_r0_once():
    grid = variants([0.0, 0.25], ["tis", "retrace"], adaptive=True)
    assert [v["name"] for v in grid] == ["r=0 none", "r=0.25 tis", "r=0.25 retrace", "adaptive retrace"]


def test_aggregate_mean_std():
    stats = aggregate([{"a": 1.0, "b": None}, {"a": 3.0, "b": None}])
    assert stats == {"a": {"mean": 2.0, "std": 2 ** 0.5}}


def test_compare_cli_tiny(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", str(ROOT / "recipes" / "tiny-cpu.toml"), "--skip-ratios", "0,0.25", "--corrections", "retrace",
            "--seeds", "0,1", "--out", str(out), *as_set_args(SMALL + [f"log.output_dir={tmp_path}"])]
    assert main(args) == 0
    data = json.loads((out / "compare.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["r=0 none", "r=0.25 retrace"]
    for v in data["variants"]:
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        assert 0.0 <= v["stats"]["final_accuracy"]["mean"] <= 1.0
        assert v["stats"]["rollout_tokens_per_s"]["mean"] > 0
    assert data["variants"][0]["stats"]["mean_skip_ratio"]["mean"] == 0.0
    assert data["variants"][1]["stats"]["mean_skip_ratio"]["mean"] == 0.25
    assert (out / "compare.png").stat().st_size > 1000 and "r=0.25 retrace" in (out / "compare.md").read_text()
    capsys.readouterr()
    # A second call reuses the finished runs (nothing is retrained).
    assert main(args) == 0
    assert "==" not in capsys.readouterr().out


def test_compare_bad_list_is_clear(tmp_path, capsys):
    code = main(["compare", str(ROOT / "recipes" / "tiny-cpu.toml"), "--skip-ratios", "a,b"])
    assert code == 2 and "--skip-ratios" in capsys.readouterr().err


def test_compare_jobs_runs_subprocesses_with_logs(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", str(ROOT / "recipes" / "tiny-cpu.toml"), "--skip-ratios", "0.25", "--corrections", "retrace",
            "--seeds", "0,1", "--jobs", "2", "--out", str(out), *as_set_args(SMALL + [f"log.output_dir={tmp_path}"])]
    assert main(args) == 0
    data = json.loads((out / "compare.json").read_text())
    assert [r["seed"] for r in data["variants"][0]["runs"]] == [0, 1]
    assert data["variants"][0]["stats"]["mean_skip_ratio"]["mean"] == 0.25
    for seed in (0, 1):
        assert "eval final" in (out / f"r0.25-retrace-seed{seed}.log").read_text()
        assert (out / f"r0.25-retrace-seed{seed}" / "metrics.jsonl").is_file()
    assert "== r=0.25 retrace seed 1" in capsys.readouterr().out


def test_compare_jobs_below_one_is_clear(tmp_path, capsys):
    code = main(["compare", str(ROOT / "recipes" / "tiny-cpu.toml"), "--jobs", "0", "--out", str(tmp_path / "c")])
    assert code == 2 and "--jobs" in capsys.readouterr().err and not (tmp_path / "c").exists()


def _curve_costs(run_dir: Path) -> dict[int, tuple[float, int]]:
    """step -> (cumulative step_seconds, cumulative rollout_tokens) from a run's metrics.jsonl."""
    from lowres_reft.run.metrics import read_metrics

    rl = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rl"]
    return {r["step"]: (sum(x["step_seconds"] for x in rl[: r["step"]]), sum(x["rollout_tokens"] for x in rl[: r["step"]]))
            for r in rl} | {0: (0.0, 0)}


def test_compare_eval_every_writes_curves_and_equal_time_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", str(ROOT / "recipes" / "tiny-cpu.toml"), "--skip-ratios", "0,0.5", "--corrections", "tis",
            "--seeds", "0", "--eval-every", "1", "--out", str(out),
            *as_set_args(SMALL + ["train.steps=3", f"log.output_dir={tmp_path}"])]
    assert main(args) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["eval_every"] == 1 and data["trl"] is False
    for v, name in zip(data["variants"], ("r0-none-seed0", "r0.5-tis-seed0")):
        (run,) = v["runs"]
        curve, costs = run["curve"], _curve_costs(out / name)
        assert [p["step"] for p in curve] == [0, 1, 2, 3]  # the start (evaluated: no warm-up), every step, final
        assert curve[0]["accuracy"] == run["start_accuracy"] and curve[-1]["accuracy"] == run["final_accuracy"]
        for p in curve:
            assert (p["rl_seconds"], p["rollout_tokens"]) == pytest.approx(costs[p["step"]])
    equal = data["equal_time"]
    assert equal["reference"] == "r=0 none" and set(equal["variants"]) == {"r=0 none", "r=0.5 tis"}
    total = data["variants"][0]["runs"][0]["curve"][-1]["rl_seconds"]
    assert equal["budgets_seconds"] == pytest.approx([total / 4, total / 2, 3 * total / 4, total])
    assert equal["variants"]["r=0 none"]["accuracy_at"][-1]["mean"] == data["variants"][0]["runs"][0]["final_accuracy"]
    assert "Equal RL time" in (out / "compare.md").read_text() and "time to reach" in capsys.readouterr().out
    assert (out / "compare-time.png").stat().st_size > 1000


def test_compare_eval_every_negative_is_clear(tmp_path, capsys):
    code = main(["compare", str(ROOT / "recipes" / "tiny-cpu.toml"), "--eval-every", "-1", "--out", str(tmp_path / "c")])
    assert code == 2 and "--eval-every" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_compare_trl_without_trl_is_one_line(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    code = main(["compare", str(ROOT / "recipes" / "tiny-cpu.toml"), "--trl", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "lowres-reft[bench]"' in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_compare_trl_curve_starts_where_ours_does(tmp_path, capsys):
    pytest.importorskip("trl")
    out = tmp_path / "cmp"
    # A start with accuracy > 0 from a random-init tiny model: questions whose answer is mostly "7", a warm-up that
    # teaches "7", and greedy evals of one token (so "7" is read as the answer before it repeats).
    for split, n in (("train", 32), ("test", 8)):
        rows = [{"question": f"Say {i % 5}.", "answer": "3" if i % 4 == 3 else "7", "solution": "7."} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ['data.name="jsonl"', f'data.path="{tmp_path}"', 'data.solution_field="solution"', "data.max_eval_samples=8",
            "eval.max_new_tokens=1", "warmup.steps=12", "warmup.batch_size=8", "warmup.lr=0.03"]
    args = ["compare", str(ROOT / "recipes" / "tiny-cpu.toml"), "--skip-ratios", "0", "--seeds", "0", "--trl",
            "--eval-every", "1", "--out", str(out), *as_set_args(SMALL + data + [f"log.output_dir={tmp_path}"])]
    assert main(args) == 0
    data = json.loads((out / "compare.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["r=0 none", "trl"]
    ours, trl = (v["runs"][0]["curve"] for v in data["variants"])
    assert [p["step"] for p in ours] == [p["step"] for p in trl] == [0, 1, 2]
    assert trl[0]["accuracy"] == ours[0]["accuracy"] > 0  # one shared start (base + warm-up, merged), same eval
    assert trl[0]["rl_seconds"] == 0 and 0 < trl[1]["rl_seconds"] < trl[2]["rl_seconds"] and trl[2]["rollout_tokens"] > 0
    result = json.loads((out / "trl-seed0" / "result.json").read_text())
    assert trl[2]["rl_seconds"] == pytest.approx(sum(result["step_seconds"]))
    assert [step for step, _ in result["checkpoints"]] == [1]  # the last step's adapter is the final one
    # Ours started from the shared start too: its model, no second warm-up.
    recipe = (out / "shared-r0-none-seed0" / "checkpoint-last" / "recipe.toml").read_text()
    warmup = recipe.split("[warmup]")[1].split("[")[0]
    assert str((out / "start-seed0").resolve()) in recipe and "\nsteps = 0" in warmup
    assert "skip_distill_steps = 0" in warmup  # a skip distillation, if the recipe has one, is in the start too
    assert "| trl |" in (out / "compare.md").read_text() and (out / "compare-time.png").is_file()
    capsys.readouterr()
    assert main(args) == 0  # a second call reuses the start and both runs
    assert "==" not in capsys.readouterr().out


def test_compare_shared_start_without_trl(tmp_path):
    """--shared-start: every variant of a seed starts from one merged start (warm-up paid once), no TRL run."""
    out = tmp_path / "cmp"
    for split, n in (("train", 32), ("test", 8)):
        rows = [{"question": f"Say {i % 5}.", "answer": "7", "solution": "7."} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ['data.name="jsonl"', f'data.path="{tmp_path}"', 'data.solution_field="solution"', "data.max_eval_samples=8",
            "eval.max_new_tokens=1", "warmup.steps=4", "warmup.batch_size=8"]
    args = ["compare", str(ROOT / "recipes" / "tiny-cpu.toml"), "--skip-ratios", "0,0.25", "--corrections", "retrace",
            "--seeds", "0", "--shared-start", "--eval-every", "1", "--out", str(out),
            *as_set_args(SMALL + data + [f"log.output_dir={tmp_path}"])]
    assert main(args) == 0
    variants = json.loads((out / "compare.json").read_text())["variants"]
    assert [v["name"] for v in variants] == ["r=0 none", "r=0.25 retrace"]
    starts = {v["runs"][0]["curve"][0]["accuracy"] for v in variants}
    assert len(starts) == 1  # the same start for both
    assert (out / "start-seed0" / "config.json").is_file() and not (out / "trl-seed0").exists()
    for name in ("shared-r0-none-seed0", "shared-r0.25-retrace-seed0"):
        warmup = (out / name / "checkpoint-last" / "recipe.toml").read_text().split("[warmup]")[1].split("[")[0]
        assert "\nsteps = 0" in warmup
