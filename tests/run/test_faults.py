"""Never lose a run: SIGKILL + resume, corrupted checkpoints, keep-last-K, disk errors, OOM messages."""

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_SETS, as_set_args, start_cli_then_signal

from lowres_reft.config import load_recipe
from lowres_reft.rollout import engine as rollout
from lowres_reft.run import checkpoint as ckpt_mod
from lowres_reft.run import loop as trainer
from lowres_reft.run.checkpoint import latest_good_checkpoint, verify_checkpoint
from lowres_reft.run.metrics import read_metrics
from lowres_reft.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny-cpu.toml"
SMALL = TINY_RUN_SETS + ["eval.before_training=false"]


def _recipe(tmp_path, *extra):
    return load_recipe(TINY, SMALL + [f"log.output_dir={tmp_path}", "log.progress=none", *extra])


def test_sigkill_mid_run_then_resume_has_no_torn_or_duplicated_lines(tmp_path):
    sets = SMALL + [f"log.output_dir={tmp_path}", "log.run_name=kill", "log.progress=plain", "train.steps=40", "checkpoint.every=1"]
    proc = start_cli_then_signal(["run", str(TINY), *as_set_args(sets)], ROOT, "step 3/", signal.SIGKILL, timeout=300)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "kill"
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as handle:  # what a kill in the middle of a write leaves behind
        handle.write('{"step": 99, "stage": "rl", "rew')
    done_step = json.loads((run / "checkpoint-last" / "trainer_state.json").read_text())["step"]
    result = trainer.train(_recipe(tmp_path, "log.run_name=kill", f"train.steps={done_step + 2}"), resume=True, log=lambda *a: None)
    lines = metrics.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses: no torn line survived
    steps = [r["step"] for r in records if r["stage"] == "rl"]
    assert steps == list(range(1, done_step + 3))
    assert result == run


def test_corrupted_newest_checkpoint_falls_back_to_previous(tmp_path):
    recipe = _recipe(tmp_path, "log.run_name=corrupt", "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=2")
    run = trainer.train(recipe, log=lambda *a: None)
    kept = sorted(p.name for p in run.glob("checkpoint-0*"))
    assert kept == ["checkpoint-000002", "checkpoint-000003"]  # keep_last = 2
    newest = run / "checkpoint-000003" / "adapter" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    assert "corrupted" in verify_checkpoint(run / "checkpoint-000003")
    warnings = []
    assert latest_good_checkpoint(run, warn=warnings.append) == run / "checkpoint-000002"
    assert "checkpoint-000003" in warnings[0] and "corrupted" in warnings[0]
    messages = []
    trainer.train(_recipe(tmp_path, "log.run_name=corrupt", "train.steps=4"), resume=True, log=messages.append)
    assert any("resumed from" in m and "checkpoint-000002" in m for m in messages)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "rl"]
    assert steps == [1, 2, 3, 4]


def test_disk_full_during_checkpoint_leaves_previous_intact(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, "log.run_name=full", "train.steps=2", "checkpoint.every=1")
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (2 torch files) succeeds, the second hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(UsageError, match="No space left on device"):
        trainer.train(recipe, log=lambda *a: None)
    run = tmp_path / "full"
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-000001", "checkpoint-last"]
    assert verify_checkpoint(run / "checkpoint-last") is None
    assert os.readlink(run / "checkpoint-last") == "checkpoint-000001"


def test_out_of_memory_in_rollout_names_the_knobs(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(rollout, "sample", oom)
    with pytest.raises(UsageError) as err:
        trainer.train(_recipe(tmp_path, "log.run_name=oom", "train.steps=1"), log=lambda *a: None)
    message = str(err.value)
    assert "micro_batch" in message and "max_new_tokens" in message and "group_size" in message
    assert "\n" not in message
