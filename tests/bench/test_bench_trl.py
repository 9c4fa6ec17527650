"""`lowres-reft bench trl`: the side-by-side with TRL's GRPOTrainer. Structure and matching only, no timing thresholds."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_SETS, as_set_args

from lowres_reft.bench import trl_side
from lowres_reft.cli import main

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny-cpu.toml")
ROW_KEYS = {"variant", "seed", "steps", "step_s", "step_s_with_first", "rollout_tokens", "rollout_seconds",
            "rollout_tok_s", "max_rss_bytes", "wall_seconds", "torch_threads", "adapter", "step_seconds", "accuracy"}


def _recipe(tiny_cache, *extra):
    from lowres_reft.config import load_recipe

    return load_recipe(RECIPE, [*TINY_RUN_SETS, f"log.output_dir={tiny_cache}", *extra])


@pytest.fixture(scope="module")
def trl_setup(tiny_cache, tmp_path_factory):
    """A shared start and a TRL trainer built on it (not trained)."""
    pytest.importorskip("trl")
    from lowres_reft.bench import trl_runs

    recipe = _recipe(tiny_cache)
    work = tmp_path_factory.mktemp("trl")
    base = trl_runs.prepare_base(recipe, 0, work / "start", log=lambda *a: None)
    trainer, policy = trl_runs.build_trl_trainer(recipe, base, 0, 3, work / "trl")
    return recipe, base, trainer, policy


def test_trl_sees_our_prompts_in_our_order(trl_setup):
    from lowres_reft.data.datasets import load_problems
    from lowres_reft.data.prompts import encode_prompts
    from lowres_reft.rl.batch import prompt_indices

    recipe, _, trainer, policy = trl_setup
    problems = load_problems(recipe.data, "train")
    ours = encode_prompts(policy.tokenizer, problems, recipe)
    G = recipe.rollout.group_size
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 3
    for step, batch in enumerate(batches, start=1):
        expected = [i for i in prompt_indices(step, 0, recipe, len(problems)) for _ in range(G)]
        assert [row["index"] for row in batch] == expected  # each prompt G times, side by side, our order
        for row in batch:  # TRL tokenizes the text it is given: the same tokens as our trainer's prompts
            assert policy.tokenizer(text=row["prompt"])["input_ids"] == ours[row["index"]]
            assert row["answer"] == problems[row["index"]].answer


def test_trl_trainer_settings_match_ours(trl_setup):
    from lowres_reft.utils.schedules import lr_factor

    recipe, _, trainer, policy = trl_setup
    lora = [p for p in policy.model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # TRL's bf16 cast undone
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for p in lora}
    tr = recipe.train
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(tr.lr * lr_factor(0, 3, tr.warmup_steps, tr.lr_schedule))
    args = trainer.args
    assert (args.loss_type, args.beta, args.num_iterations, args.shuffle_dataset) == ("dapo", 0.0, 1, False)
    assert args.per_device_train_batch_size == recipe.rollout.prompts_per_step * recipe.rollout.group_size
    assert args.num_generations == recipe.rollout.group_size and args.steps_per_generation == 1
    assert trainer.generation_config.temperature == recipe.rollout.temperature
    assert trainer.generation_config.max_new_tokens == recipe.rollout.max_new_tokens


def test_trl_reward_is_our_score(tiny_cache):
    pytest.importorskip("trl")
    from lowres_reft.bench.trl_runs import trl_reward
    from lowres_reft.data.rewards import score

    recipe = _recipe(tiny_cache)
    completions, answers = ["3+4=7.", "3+4=8.", "no idea"], ["7", "7", "7"]
    cfg = recipe.reward
    expected = score(completions, answers, cfg.functions, cfg.format_weight, cfg.require_final_answer).rewards
    assert trl_reward(recipe)(completions=completions, answer=answers, prompts=["q"] * 3) == expected
    assert expected[0] > expected[1]


def test_run_row_and_summary_by_hand():
    raw = {"step_seconds": [9.0, 1.0, 3.0], "rollout_tokens": [10, 20, 30], "rollout_seconds": [1.0, 2.0, 3.0],
           "max_rss_bytes": 100, "wall_seconds": 20.0, "torch_threads": 1, "adapter": "a"}
    row = trl_side.run_row("trl", 0, raw)
    assert row["step_s"] == 2.0 and row["step_s_with_first"] == pytest.approx(13 / 3)  # first step excluded
    assert row["rollout_tok_s"] == 10.0
    rows = [dict(row, accuracy=0.5), dict(row, seed=1, step_s=4.0, accuracy=0.7),
            dict(row, variant="ours-r0", step_s=1.0, rollout_tok_s=20.0, accuracy=0.6),
            dict(row, variant="ours-r0", seed=1, step_s=2.0, rollout_tok_s=20.0, accuracy=0.6)]
    summary = trl_side.summarize(rows, ["trl", "ours-r0"])
    assert summary["trl"]["step_s"] == 3.0 and summary["trl"]["step_s_std"] == pytest.approx(math.sqrt(2))
    assert summary["ours-r0"]["step_time_vs_trl"] == pytest.approx(1.5 / 3.0)
    assert summary["ours-r0"]["rollout_tok_s_vs_trl"] == 2.0
    assert summary["trl"]["accuracy"] == pytest.approx(0.6) and summary["ours-r0"]["accuracy_std"] == 0.0


@pytest.mark.parametrize("args, message", [
    (["--variants", "trl,nope"], "unknown nope"),
    (["--seeds", "0,x"], "--seeds"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--set", "train.grad_accum=2"], "grad_accum must be 1"),
])
def test_bad_arguments_are_one_line(args, message, tmp_path, capsys):
    assert main(["bench", "trl", "--recipe", RECIPE, "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_missing_trl_names_the_extra(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    assert main(["bench", "trl", "--recipe", RECIPE, "--out", str(tmp_path / "o")]) == 2
    assert 'pip install "lowres-reft[bench]"' in capsys.readouterr().err


@pytest.mark.slow
def test_bench_trl_end_to_end(tiny_cache, tmp_path, capsys):
    pytest.importorskip("trl")
    out = tmp_path / "report.json"
    sets = as_set_args([*TINY_RUN_SETS, f"log.output_dir={tiny_cache}", "warmup.steps=2"])
    assert main(["bench", "trl", "--recipe", RECIPE, *sets, "--steps", "2", "--seeds", "0",
                 "--out", str(tmp_path / "work"), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for variant in trl_side.VARIANTS:
        assert f"| {variant} |" in table
    report = json.loads(out.read_text())
    assert report["config"]["trl"] and report["config"]["steps"] == 2 and report["device"]["type"] == "cpu"
    assert len(report["results"]) == 3 and [r["variant"] for r in report["results"]] == list(trl_side.VARIANTS)
    for row in report["results"]:
        assert ROW_KEYS <= set(row)
        assert row["steps"] == 2 and row["torch_threads"] == 1 and len(row["step_seconds"]) == 2
        for key in ("step_s", "rollout_tok_s", "max_rss_bytes", "rollout_tokens", "rollout_seconds"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["variant"], key)
        assert 0.0 <= row["accuracy"] <= 1.0
        assert (Path(row["adapter"]) / "adapter_config.json").is_file()
    for variant, entry in report["summary"].items():
        assert math.isfinite(entry["step_time_vs_trl"]) and entry["step_time_vs_trl"] > 0
        assert math.isfinite(entry["rollout_tok_s_vs_trl"]) and entry["rollout_tok_s_vs_trl"] > 0
