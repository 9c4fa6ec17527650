"""Builders the training loop (and `bench step`) wire together: sampling engine, optimizer, LR schedule, skip sets.

Plain functions from the recipe to ready objects; the loop itself lives in `trainer.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowres_reft.model.nested import SkipSchedule
from lowres_reft.rollout.engine import Engine, make_engine
from lowres_reft.utils.errors import UsageError
from lowres_reft.utils.schedules import lr_factor

if TYPE_CHECKING:
    from lowres_reft.config import Recipe
    from lowres_reft.model.loader import Policy


def build_engine(policy: Policy, recipe: Recipe, generator: torch.Generator, eos_ids: list[int],
                 on_micro_batch=None) -> Engine:
    """The training rollouts' sampling engine: `[rollout] engine` with the [rollout] sampling settings."""
    r = recipe.rollout
    return make_engine(r.engine, policy.model, max_new_tokens=r.max_new_tokens, eos_ids=eos_ids,
                       pad_id=policy.tokenizer.pad_token_id, temperature=r.temperature, top_p=r.top_p,
                       generator=generator, micro_batch=r.micro_batch, on_micro_batch=on_micro_batch, weights=r.weights)


def build_optimizer(policy: Policy, recipe: Recipe, log=print) -> torch.optim.Optimizer:
    params = trainable(policy)
    cfg = recipe.train
    if cfg.optimizer == "paged_adamw_8bit":
        if policy.device.type == "cuda":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        log("note: paged_adamw_8bit needs CUDA; using torch AdamW on this device")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total_updates: int):
    cfg = recipe.train
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u, total_updates, cfg.warmup_steps, cfg.lr_schedule))


def build_skip_schedule(num_layers: int, recipe: Recipe, seed: int) -> SkipSchedule:
    """The behavior's skip-set schedule; "adaptive" = random sets whose ratio the loop adjusts after each step."""
    beh = recipe.behavior
    adaptive = beh.schedule == "adaptive"
    start_ratio = min(beh.max_ratio, max(beh.min_ratio, beh.skip_ratio)) if adaptive else beh.skip_ratio
    try:
        schedule = SkipSchedule(num_layers, start_ratio, beh.protect_first, beh.protect_last,
                                "random" if adaptive else beh.schedule, beh.layers, seed, beh.layout)
        schedule.check_ratio(beh.max_ratio if adaptive else start_ratio)
    except ValueError as err:
        raise UsageError(f"{recipe.source}: [behavior] {err}") from None
    return schedule


def trainable(policy: Policy) -> list[torch.nn.Parameter]:
    return [p for p in policy.model.parameters() if p.requires_grad]
