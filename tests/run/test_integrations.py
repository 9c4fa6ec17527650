"""Integrations, on one real tiny CLI run: TensorBoard through accelerate's trackers, quiet logs, in-step progress."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN_SETS, as_set_args

from lowres_reft.run import tracking
from lowres_reft.run.metrics import read_metrics
from lowres_reft.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny-cpu.toml")


def _cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "lowres_reft", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 2-step tiny run with TensorBoard, plain progress and rollout/update micro-batches; (run dir, output)."""
    out = tmp_path_factory.mktemp("runs")
    sets = TINY_RUN_SETS + [f"log.output_dir={out}", "log.run_name=tb", "train.steps=2", "log.progress=plain",
                            'log.trackers=["tensorboard"]', "rollout.micro_batch=4", "train.micro_batch_size=4"]
    proc = _cli("run", TINY, *as_set_args(sets))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "tb", proc.stdout + proc.stderr


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_grouped_scalars_per_step(tracked_run):
    run, _ = tracked_run
    scalars = _scalars(run / "tensorboard")
    records = read_metrics(run / "metrics.jsonl")
    rl = [r for r in records if r["stage"] == "rl"]
    evals = [r for r in records if r["stage"] == "eval"]
    for key, tag in (("reward_mean", "rollout/reward_mean"), ("loss", "loss/loss"), ("ess", "offpolicy/ess"),
                     ("rollout_tokens", "rollout/tokens"), ("lr", "train/lr")):
        assert [s for s, _ in scalars[tag]] == [1, 2], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in rl], rel=1e-6), tag
    assert [s for s, _ in scalars["eval/accuracy"]] == [e["step"] for e in evals] == [0, 2]
    assert [v for _, v in scalars["eval/accuracy"]] == pytest.approx([e["eval_accuracy"] for e in evals])
    assert not any(tag.startswith("rl/") for tag in scalars)  # every RL metric has its group in the table
    # The recipe is the run config (hparams.yml beside the events).
    (hparams,) = (run / "tensorboard").glob("*/hparams.yml")
    assert "train.steps: 2" in hparams.read_text()


def test_cpu_run_does_not_print_the_bitsandbytes_kernels_warning(tracked_run):
    """No line about bitsandbytes' optional Hub kernel, whatever bitsandbytes / kernels / the hub client would say
    (tests/test_quiet.py checks the guard and the filters themselves)."""
    _, output = tracked_run
    assert "kernel" not in output.lower(), output


def test_grouped_metrics_table_and_fallback():
    values, step = tracking.grouped_metrics({"step": 3, "stage": "rl", "reward_mean": 0.5, "ess": 0.9, "update_skipped": True,
                                             "skip_set": [1], "new_thing": 2, "loss": float("nan")})
    assert step == 3
    assert values["rollout/reward_mean"] == 0.5 and values["offpolicy/ess"] == 0.9 and values["train/update_skipped"] == 1.0
    assert values["rl/new_thing"] == 2.0  # not in the table yet: kept under its stage, never dropped
    assert values["loss/loss"] != values["loss/loss"]  # NaN stays NaN
    assert not any("skip_set" in k for k in values)
    values, step = tracking.grouped_metrics({"step": 0, "stage": "warmup", "warmup_step": 7, "loss": 1.5})
    assert (values, step) == ({"warmup/loss": 1.5}, 7)
    values, step = tracking.grouped_metrics({"step": 0, "stage": "eval", "label": "final", "eval_accuracy": 0.25, "eval_n": 8})
    assert (values, step) == ({"eval/accuracy": 0.25, "eval/n": 8.0}, 0)


def test_tracker_names_are_accelerates():
    from accelerate.utils import LoggerType

    assert set(tracking.PIP_PACKAGES) == {str(t.value) for t in LoggerType} - {"all"}


def test_flat_config():
    assert tracking.flat_config({"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}) == {
        "lora.r": 4, "lora.target_modules": "q_proj,v_proj"}


def test_unknown_tracker_is_a_one_line_error():
    with pytest.raises(UsageError, match='unknown tracker \'tensorbord\' \\(did you mean "tensorboard"'):
        tracking.check_trackers(("tensorbord",))


def test_missing_tracker_package_fails_before_anything_is_written(tmp_path):
    import accelerate.utils

    missing = [n for n in tracking.PIP_PACKAGES if not getattr(accelerate.utils, f"is_{n}_available")()]
    assert missing, "every tracker package is installed: nothing to test the error with"
    name = missing[0]
    proc = _cli("run", TINY, *as_set_args(TINY_RUN_SETS + [f"log.output_dir={tmp_path / 'runs'}",
                                                            f'log.trackers=["tensorboard", "{name}"]']))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: [log] trackers:")
    assert f"pip install {tracking.PIP_PACKAGES[name]}" in lines[0]
    assert not (tmp_path / "runs").exists()


def _front_matter(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_export_writes_model_cards_and_merged_loads(tracked_run, tmp_path):
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from lowres_reft import __version__
    from lowres_reft.run.evaluation import wilson_interval

    run, _ = tracked_run
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    proc = _cli("export", str(run / "checkpoint-last"), "--adapter", str(adapter), "--merged", str(merged))
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = json.loads((run / "eval.json").read_text())["history"][-1]
    low, high = wilson_interval(round(final["accuracy"] * final["n"]), final["n"])
    recipe_toml = (run / "checkpoint-last" / "recipe.toml").read_text().strip()
    for out, library in ((adapter, "peft"), (merged, "transformers")):
        card = (out / "README.md").read_text()
        meta = _front_matter(card)
        assert meta["library_name"] == library and "nested-reft" in meta["tags"] and "qlora" in meta["tags"]
        assert "base_model" not in meta  # builtin:tiny is no Hub id
        assert "| RL steps trained | 2 |" in card
        assert f"{final['accuracy']:.3f} on {final['n']} problems (95% Wilson interval {low:.3f}-{high:.3f}), step 2 (final)" in card
        assert f"lowres-reft {__version__}" in card and "`builtin:tiny`" in card
        assert f"```toml\n{recipe_toml}\n```" in card
    assert "vllm serve" in (merged / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert isinstance(model, torch.nn.Module) and model.config.model_type == "qwen2"


def test_model_card_of_a_hub_model_names_it_and_its_interval():
    from lowres_reft.config import Recipe, recipe_from_dict
    from lowres_reft.config.toml import recipe_to_toml
    from lowres_reft.run.modelcard import eval_line, render_model_card

    recipe = recipe_from_dict({"model": {"name": "Qwen/Qwen2.5-1.5B-Instruct"}, "log": {"run_name": "gsm"}})
    history = [{"step": 0, "label": "before_training", "accuracy": 0.1, "n": 100},
               {"step": 60, "label": "final", "accuracy": 0.5, "n": 100}]
    card = render_model_card(recipe, recipe_to_toml(recipe), {"step": 60, "eval_history": history}, "adapter")
    meta = _front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-1.5B-Instruct" and meta["library_name"] == "peft"
    # 50/100: Wilson 95% = 0.5 +- 1.96/(1+1.96^2/100) * sqrt(0.25/100 + 1.96^2/40000) = 0.404..0.596 (by hand)
    assert "0.500 on 100 problems (95% Wilson interval 0.404-0.596), step 60 (final)" in card
    assert 'PeftModel.from_pretrained(base, "path/to/this/dir")' in card
    assert eval_line(None) == "not evaluated"
    assert "| RL steps trained | unknown |" in render_model_card(Recipe(), "", {}, "merged", "bfloat16")


def test_plain_progress_shows_rollout_and_update_micro_batches(tracked_run):
    """The tracked run has 2x4 rollouts, rollout.micro_batch=4 and train.micro_batch_size=4: 2 micro-batches each."""
    _, output = tracked_run
    lines = output.splitlines()
    rollout = [line for line in lines if line.startswith("  step 1/2 rollout")]
    assert [line.split(" (")[0] for line in rollout] == ["  step 1/2 rollout 1/2", "  step 1/2 rollout 2/2"]
    tokens = [int(line.split("(")[1].split()[0]) for line in rollout]
    assert 0 < tokens[0] <= tokens[1] <= 8 * 8  # 8 sequences of at most 8 new tokens
    assert [line for line in lines if line.startswith("  step 2/2 update")] == ["  step 2/2 update 1/2", "  step 2/2 update 2/2"]
    # in-step lines come before their step's line
    assert lines.index("  step 1/2 update 2/2") < next(i for i, line in enumerate(lines) if line.startswith("step 1/2 "))


def test_progress_modes(capsys):
    from lowres_reft.run.metrics import Progress

    quiet = Progress(3, 0, "none")
    quiet.within("rollout")(1, 2, 10)
    single = Progress(3, 0, "plain")
    single.within("update")(1, 1)  # one micro-batch: nothing to add to the step line
    assert capsys.readouterr().out == ""
    bar = Progress(3, 0, "bar")
    report = bar.within("rollout")
    report(1, 2, 5)
    assert bar.inner is not None and bar.inner.n == 1
    report(2, 2, 9)
    assert bar.inner is None  # the in-step bar goes away when the phase ends
    bar.close()
