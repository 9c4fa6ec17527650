"""Data parallelism: 2 CPU processes (gloo) stay in sync and equal a single-process update on the same batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TINY_RUN_SETS, as_set_args

from lowres_reft.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_run_keeps_adapters_identical(tmp_path):
    sets = TINY_RUN_SETS + ["log.progress=plain", f"log.output_dir={tmp_path}", "train.steps=2", "log.run_name=ddp", "train.lr=0.01"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "lowres_reft", "run", str(ROOT / "recipes" / "tiny-cpu.toml")]
    cmd += as_set_args(sets)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:") or "Error" in line]
    assert result.returncode == 0, "\n".join(errors[-10:]) + result.stderr[-2000:]
    assert "2 processes" in result.stdout
    records = [r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["step"] for r in records] == [1, 2]  # rank 0 alone writes: no duplicated lines
    for r in records:
        assert r["adapters_in_sync"] is True
        assert len(r["skip_set"]) == 2  # one skip set per process: an ensemble of nested models
        assert r["rollout_tokens"] == 2 * 4 * r["mean_completion_len"]  # both shards counted
    assert (tmp_path / "ddp" / "checkpoint-last" / "adapter" / "adapter_model.safetensors").is_file()


def test_sharded_update_equals_single_process(tiny_cache, tiny_policy, tmp_path):
    """Two gloo processes each take half of a fixed rollout batch; their summed update equals one process's."""
    from dist_worker import shard_gradients

    from lowres_reft.rl.batch import ScoredBatch
    from lowres_reft.rl.loss import group_advantages
    from lowres_reft.rollout.engine import sample

    policy = tiny_policy()
    tok = policy.tokenizer
    prompts = [tok(t)["input_ids"] for t in ["Tom has 3 apples.", "Q: 2+2"] for _ in range(4)]
    rollout = sample(policy.model, prompts, max_new_tokens=8, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                     generator=torch.Generator().manual_seed(0), skip=(1,))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    batch = ScoredBatch(rollout, rewards, group_advantages(rewards, 4), [bool(x) for x in rewards])
    single = shard_gradients(tiny_cache, batch, 0, 1)
    batch_file, out = tmp_path / "batch.pt", tmp_path / "grads.pt"
    torch.save(batch, batch_file)
    # Separate processes (torchrun), not multiprocessing inside pytest: no helper process outlives the test.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(Path(__file__).resolve().parents[1] / "dist_worker.py"), str(tiny_cache), str(batch_file), str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = torch.load(out, weights_only=True)
    assert len(sharded) == len(single)
    assert any(float(g.abs().max()) > 0 for g in single)
    for a, b in zip(sharded, single):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
