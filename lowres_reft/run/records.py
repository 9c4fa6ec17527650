"""What a run logs per RL step (`step_record`, merged over processes by `metrics.merge_records`) and its summary."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowres_reft.model.loader import Policy
    from lowres_reft.rl.batch import ScoredBatch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def step_record(step: int, batches: list[ScoredBatch], results: list[dict], grad_norm: float, stepped: bool,
                state: dict, scheduler, policy: Policy, t0: float, skip_ratio: float) -> dict:
    """This process's metrics for one step (merged over processes by merge_records)."""
    tokens = sum(b.rollout.num_tokens for b in batches)
    seconds = sum(b.rollout.seconds for b in batches)
    lengths = torch.cat([b.rollout.completion_mask.sum(1) for b in batches])
    mean = lambda key: sum(r[key] for r in results) / len(results)  # noqa: E731
    return {
        "step": step,
        "stage": "rl",
        "rewards": torch.cat([b.rewards for b in batches]).tolist(),  # replaced by reward_mean/std when merged
        "correct": sum(sum(b.correct) for b in batches),
        "reward_timeouts": sum(b.reward_timeouts for b in batches),
        "rollout_tokens": tokens,
        "rollout_seconds": seconds,
        "rollout_tokens_per_s": tokens / max(seconds, 1e-9),
        "mean_completion_len": float(lengths.float().mean()),
        "truncated_frac": float(torch.cat([b.rollout.truncated for b in batches]).float().mean()),
        "skip_ratio": skip_ratio,
        "skip_set": list(batches[0].rollout.skip),
        "skip_sets": [list(s) for b in batches for s in (b.rollout.skip_sets or (b.rollout.skip,))],
        "rho_mean": mean("rho_mean"),
        "rho_min": min(r["rho_min"] for r in results),
        "rho_max": max(r["rho_max"] for r in results),
        "is_truncated_frac": mean("is_truncated_frac"),
        "ess": mean("ess"),
        "trace_mean": mean("trace_mean"),
        "loss": mean("loss"),  # this process's share of the global-normalized loss; summed over processes
        "clip_frac": mean("clip_frac"),
        "kl": mean("kl"),
        "nested_kl": mean("nested_kl"),
        "grad_norm": grad_norm,
        "update_skipped": not stepped,
        "skipped_updates": state["skipped_updates"],
        "lr": scheduler.get_last_lr()[0],
        "peak_mem_mb": peak_memory_mb(policy.device),
        "step_seconds": time.perf_counter() - t0,
    }


def summary(history: list[dict], metrics_path: Path, checkpoint: Path) -> str:
    lines = ["", "  step | eval           | accuracy", "  -----+----------------+---------"]
    lines += [f"  {h['step']:>4} | {h['label']:<14} | {h['accuracy']:.3f} (n={h['n']})" for h in history]
    lines += [f"  metrics: {metrics_path}", f"  checkpoint: {checkpoint}"]
    return "\n".join(lines)
