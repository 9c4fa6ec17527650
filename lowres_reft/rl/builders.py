"""Builders the training loop (and `bench step`) wire together: sampling engine, optimizer, LR schedule, skip sets.

Plain functions from the recipe to ready objects; the loop itself lives in `trainer.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowres_reft.data.prompts import format_prompt, format_solution
from lowres_reft.model.influence import block_influence, least_influential
from lowres_reft.model.nested import SkipSchedule, valid_layers
from lowres_reft.rollout.engine import Engine, left_pad, make_engine
from lowres_reft.utils.errors import UsageError
from lowres_reft.utils.schedules import lr_factor

if TYPE_CHECKING:
    from lowres_reft.config import Recipe
    from lowres_reft.data.problems import Problem
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


def build_skip_schedule(num_layers: int, recipe: Recipe, seed: int, ranking: list[int] | None = None) -> SkipSchedule:
    """The behavior's skip-set schedule; "adaptive" = random sets whose ratio the loop adjusts after each step.
    `ranking` (`layer_ranking`) is required with `[behavior] skip_layers = "influence"` and ignored otherwise."""
    beh = recipe.behavior
    adaptive = beh.schedule == "adaptive"
    start_ratio = min(beh.max_ratio, max(beh.min_ratio, beh.skip_ratio)) if adaptive else beh.skip_ratio
    influence = beh.skip_layers == "influence"
    assert ranking is not None or not influence, 'skip_layers = "influence" needs the ranking (rl.builders.layer_ranking)'
    try:
        schedule = SkipSchedule(num_layers, start_ratio, beh.protect_first, beh.protect_last,
                                "random" if adaptive else beh.schedule, beh.layers, seed, beh.layout,
                                ranking if influence else None, beh.influence_pool)
        schedule.check_ratio(beh.max_ratio if adaptive else start_ratio)
    except ValueError as err:
        raise UsageError(f"{recipe.source}: [behavior] {err}") from None
    return schedule


def trainable(policy: Policy) -> list[torch.nn.Parameter]:
    return [p for p in policy.model.parameters() if p.requires_grad]


def layer_ranking(policy: Policy, recipe: Recipe, texts: list[list[int]]) -> tuple[list[int], list[float]] | None:
    """With `[behavior] skip_layers = "influence"`: the valid layers least influential first, and every layer's block
    influence, measured on the base model (adapters off, so a resumed run measures the same) over `texts` (token id
    lists; the first `influence_texts` are used), 16 at a time. None otherwise."""
    beh = recipe.behavior
    if beh.skip_layers != "influence":
        return None
    model, texts = policy.model, texts[: beh.influence_texts]
    if not texts:
        raise UsageError('[behavior] skip_layers = "influence" needs training texts to measure the layers on')
    sums, tokens = None, 0
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            for lo in range(0, len(texts), 16):
                ids, mask = left_pad(texts[lo : lo + 16], policy.tokenizer.pad_token_id, policy.device)
                part, n = block_influence(model, ids, mask)
                sums, tokens = (part if sums is None else sums + part), tokens + n
    finally:
        model.train(was_training)
    scores = (sums / max(tokens, 1)).tolist()
    return least_influential(scores, valid_layers(len(scores), beh.protect_first, beh.protect_last)), scores


def ranking_texts(tokenizer, problems: list[Problem], recipe: Recipe) -> list[list[int]]:
    """What the layers are measured on: the first `[behavior] influence_texts` training problems as the model reads
    them in training, prompt + reference solution (the prompt alone when a problem has none), as token ids."""
    texts = []
    for problem in problems[: recipe.behavior.influence_texts]:
        text = format_prompt(tokenizer, problem.question, recipe.data)
        if problem.solution:
            text += format_solution(problem.solution, tokenizer, recipe.data)
        texts.append(tokenizer(text, add_special_tokens=False)["input_ids"][-recipe.warmup.max_tokens:])
    return texts
