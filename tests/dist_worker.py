"""Worker for test_distributed.py, started by torchrun: this rank's gradients of its shard, summed over ranks."""

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import randomize_lora, tiny_model_cfg  # noqa: E402


def shard_gradients(cache, batch, rank: int, world: int) -> list[torch.Tensor]:
    from lowres_reft.config import LoraConfig, LossConfig, Recipe, RolloutConfig
    from lowres_reft.model.loader import load_policy
    from lowres_reft.rl.batch import ScoredBatch, global_totals
    from lowres_reft.rl.distributed import Dist, sum_gradients
    from lowres_reft.rl.update import accumulate_gradients

    policy = load_policy(tiny_model_cfg(), LoraConfig(r=4, alpha=8, dropout=0.0), cache_dir=cache)
    randomize_lora(policy.model, 0)
    ctx = Dist(rank=rank, world=world)
    per = batch.rewards.numel() // world
    rows = slice(rank * per, (rank + 1) * per)
    r = batch.rollout
    shard = ScoredBatch(
        replace(r, prompt_ids=r.prompt_ids[rows], prompt_mask=r.prompt_mask[rows], completion_ids=r.completion_ids[rows],
                completion_mask=r.completion_mask[rows], behavior_logp=r.behavior_logp[rows], truncated=r.truncated[rows]),
        batch.rewards[rows], batch.advantages[rows], batch.correct[rows],
    )
    max_new = r.completion_ids.shape[1]
    totals = global_totals(shard, Recipe(rollout=RolloutConfig(max_new_tokens=max_new)), ctx)
    accumulate_gradients(policy, shard, LossConfig(correction="retrace"), 1.0, 3, max_new, 1.0, None, totals)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    sum_gradients(params, ctx)
    return [p.grad.clone() for p in params]


if __name__ == "__main__":
    cache, batch_file, out = sys.argv[1:4]
    torch.distributed.init_process_group("gloo")
    try:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        grads = shard_gradients(cache, torch.load(batch_file, weights_only=False), rank, world)
        if rank == 0:
            torch.save(grads, out)
    finally:
        torch.distributed.destroy_process_group()
