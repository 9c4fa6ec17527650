"""Training-loop pieces: schedules, data order, non-finite updates, and the optional paths (KL, PPO, accumulation)."""

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_SETS
from safetensors.torch import load_file

from lowres_reft import trainer
from lowres_reft.config import load_recipe
from lowres_reft.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SMALL = TINY_RUN_SETS + ["log.progress=none"]


def _recipe(tmp_path, *extra):
    return load_recipe(ROOT / "recipes" / "tiny-cpu.toml", SMALL + [f"log.output_dir={tmp_path}", *extra])


def test_lr_factor_warmup_and_schedules():
    assert trainer.lr_factor(0, 10, 2, "constant") == 0.5
    assert trainer.lr_factor(1, 10, 2, "constant") == 1.0
    assert trainer.lr_factor(5, 10, 0, "constant") == 1.0
    assert trainer.lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert trainer.lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert trainer.lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert trainer.lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)


def test_prompt_indices_cover_each_epoch_once(tmp_path):
    recipe = _recipe(tmp_path, "rollout.prompts_per_step=3", "train.grad_accum=2")
    n = 12
    seen = [i for step in (1, 2) for a in (0, 1) for i in trainer.prompt_indices(step, a, recipe, n)]
    assert sorted(seen) == list(range(n))  # 2 steps x 2 batches x 3 prompts = one epoch, no repeats
    assert trainer.prompt_indices(3, 0, recipe, n) == trainer.prompt_indices(3, 0, recipe, n)


def test_nonfinite_loss_skips_update_and_keeps_adapters(tmp_path, monkeypatch):
    real = trainer.L.policy_objective

    def poisoned(*args, **kwargs):
        objective, clip = real(*args, **kwargs)
        return objective * float("nan"), clip

    monkeypatch.setattr(trainer.L, "policy_objective", poisoned)
    run = trainer.train(_recipe(tmp_path, "train.steps=2", "log.run_name=nan", "eval.before_training=false"), log=lambda *a: None)
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["update_skipped"] for r in records] == [True, True]
    assert records[-1]["skipped_updates"] == 2
    adapter = load_file(run / "checkpoint-last" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in adapter.values())
    # LoRA B starts at zero; no update was applied, so it is still exactly zero.
    assert all(float(v.abs().max()) == 0.0 for k, v in adapter.items() if "lora_B" in k)


def test_optional_paths_run_kl_ppo_accum_checkpointing_16bit(tmp_path):
    recipe = _recipe(
        tmp_path, "train.steps=2", "log.run_name=paths", "loss.kl_beta=0.05", "loss.updates_per_batch=2",
        "train.grad_accum=2", "train.gradient_checkpointing=true", "train.micro_batch_size=3", "loss.correction=tis",
        "loss.aggregation=seq_mean", "rollout.top_p=0.9", "model.load_in_4bit=false", "eval.before_training=false",
        "train.lr=0.01", "warmup.steps=2", "warmup.batch_size=4",
    )
    run = trainer.train(recipe, log=lambda *a: None)
    everything = read_metrics(run / "metrics.jsonl")
    assert [r["warmup_step"] for r in everything if r["stage"] == "warmup"] == [1, 2]
    assert [r["label"] for r in everything if r["stage"] == "eval"] == ["after_warmup", "final"]
    records = [r for r in everything if r["stage"] == "rl"]
    assert len(records) == 2
    for r in records:
        assert len(r["skip_sets"]) == 2  # one nested model per accumulated rollout batch
        assert math.isfinite(r["kl"]) and r["kl"] >= 0
        assert not r["update_skipped"]
    assert records[1]["kl"] > 0  # after one update the adapters moved away from the reference
    adapter = load_file(run / "checkpoint-last" / "adapter" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    from lowres_reft.errors import UsageError

    with pytest.raises(UsageError, match="not writable"):
        trainer.train(load_recipe(ROOT / "recipes" / "tiny-cpu.toml", SMALL + [f"log.output_dir={blocker}"]))
