"""`lowres-reft compare` on the tiny model: runs the grid, reuses finished runs, writes table/JSON/plot."""

import json
from pathlib import Path

from conftest import TINY_RUN_SETS, as_set_args

from lowres_reft.cli import main
from lowres_reft.compare import aggregate, variants

ROOT = Path(__file__).resolve().parents[1]
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
