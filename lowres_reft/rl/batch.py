"""A step's rollout batch, scored: which prompts (a pure function of the step), G completions of each from the
nested model (one or several skip sets), rewards and group advantages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowres_reft.data.rewards import score
from lowres_reft.rl import loss as L
from lowres_reft.rl.distributed import Dist, all_sum
from lowres_reft.rollout.engine import Engine, RolloutBatch, decode_completions, merge_rollouts
from lowres_reft.utils.errors import UsageError

if TYPE_CHECKING:
    from lowres_reft.config import Recipe
    from lowres_reft.data.problems import Problem


@dataclass
class ScoredBatch:
    rollout: RolloutBatch
    rewards: torch.Tensor  # (N,) float32
    advantages: torch.Tensor  # (N,) float32
    correct: list[bool]
    reward_timeouts: int = 0  # reward calls abandoned after [reward] timeout_s (scored 0)


def prompt_indices(step: int, accum: int, recipe: Recipe, n: int) -> list[int]:
    """Indices of the prompts for (step, accum): epochs over a seeded permutation; a pure function of the step."""
    per = recipe.rollout.prompts_per_step
    first = ((step - 1) * recipe.train.grad_accum + accum) * per
    out = []
    for g in range(first, first + per):
        epoch, pos = divmod(g, n)
        order = list(range(n))
        random.Random(recipe.train.seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[pos])
    return out


def rollout_rows(engine: Engine, recipe: Recipe, prompts: list[list[int]], skip: tuple[int, ...]) -> RolloutBatch:
    """G completions of each prompt, group-contiguous (the G completions of a prompt side by side)."""
    return engine.generate([p for p in prompts for _ in range(recipe.rollout.group_size)], skip)


def prompt_runs(indices: list[int], count: int) -> list[list[int]]:
    """`indices` cut into `count` consecutive runs of near-equal size (the first ones one longer; empty ones dropped)."""
    size, extra = divmod(len(indices), count)
    bounds = [0]
    for k in range(count):
        bounds.append(bounds[-1] + size + (k < extra))
    return [indices[lo:hi] for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def collect(engine: Engine, tokenizer, recipe: Recipe, problems: list[Problem], prompts: list[list[int]],
            indices: list[int], skips: list[tuple[int, ...]]) -> ScoredBatch:
    """prompts_per_step prompts x G completions from the nested model, scored, with group advantages; the prompts
    in `len(skips)` runs, each sampled with its own skip set ([behavior] sets_per_batch)."""
    G = recipe.rollout.group_size
    skips = skips[:1] if len(set(skips)) == 1 else skips  # one set (e.g. r = 0): one sampling pass
    parts = [rollout_rows(engine, recipe, [prompts[i] for i in run], skip)
             for run, skip in zip(prompt_runs(indices, len(skips)), skips)]
    rollout = merge_rollouts(parts, tokenizer.pad_token_id)
    texts = decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
    golds = [problems[i].answer for i in indices for _ in range(G)]
    scores = score(texts, golds, recipe.reward.functions, recipe.reward.format_weight,
                   recipe.reward.require_final_answer, recipe.reward.timeout_s)
    rewards_t = torch.tensor(scores.rewards, dtype=torch.float32, device=rollout.completion_ids.device)
    advantages = L.group_advantages(rewards_t, G, recipe.loss.advantage_scale, recipe.loss.advantage_eps)
    return ScoredBatch(rollout, rewards_t, advantages, scores.correct, scores.timeouts)


def collect_or_explain(engine: Engine, tokenizer, recipe: Recipe, *args, memory_note: str = "") -> ScoredBatch:
    """`collect`, with CUDA running out of memory turned into one line naming the keys to lower (and `memory_note`,
    the memory plan's figure for the phase)."""
    try:
        return collect(engine, tokenizer, recipe, *args)
    except torch.cuda.OutOfMemoryError:
        r = recipe.rollout
        raise UsageError(
            f"out of GPU memory while generating {r.prompts_per_step}x{r.group_size} rollouts of up to {r.max_new_tokens} "
            "tokens; lower [rollout] micro_batch (sequences generated at once), max_new_tokens or group_size"
            + (f" ({memory_note})" if memory_note else "")
        ) from None


def global_totals(batch: ScoredBatch, recipe: Recipe, ctx: Dist) -> dict:
    """Loss normalizers over the whole global batch (all processes), so sharding does not change the update."""
    tokens, seqs = all_sum([float(batch.rollout.completion_mask.sum()), float(batch.rollout.completion_mask.shape[0])], ctx)
    return dict(total_tokens=max(1, int(tokens)), total_seqs=int(seqs), max_new_tokens=recipe.rollout.max_new_tokens)
