"""Opening a run: everything checked and loaded before the first write, then the run directory taken.

`open_session` validates what can fail (model name, reward names, trackers, data, the run directory, a checkpoint to
resume and its recipe, the memory plan), loads the policy, builds the skip-set schedule, optimizer, LR scheduler and
generator (restored from the checkpoint on `--resume`), and only then takes the run directory's lock and opens the
metrics log and trackers. The `Session` it returns is what the loop (`run.loop`) works with, and knows how to write a
checkpoint of itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from lowres_reft.config.toml import recipe_to_toml
from lowres_reft.data.datasets import load_problems
from lowres_reft.data.prompts import encode_prompts
from lowres_reft.data.rewards import resolve_rewards
from lowres_reft.model.loader import check_model_name, eos_token_ids, load_policy, model_path
from lowres_reft.model.logprobs import check_head_logits
from lowres_reft.rl.builders import (
    build_lr_scheduler,
    build_optimizer,
    build_skip_schedule,
    layer_ranking,
    ranking_texts,
)
from lowres_reft.rl.distributed import Dist, all_max, barrier, gather_objects, init_distributed
from lowres_reft.rl.warmup import WarmupStop
from lowres_reft.rollout.engine import check_generation_length
from lowres_reft.run.checkpoint import (
    check_resume,
    finished,
    latest_good_checkpoint,
    load_trainer_files,
    save_checkpoint,
)
from lowres_reft.run.evaluation import Evaluator
from lowres_reft.run.metrics import MetricsLog, NullLog
from lowres_reft.run.plan import fit_memory
from lowres_reft.run.rundir import RunLock, check_run_dir, check_unchanged
from lowres_reft.run.tracking import check_trackers, open_trackers
from lowres_reft.utils.errors import UsageError

if TYPE_CHECKING:
    from lowres_reft.config import Recipe
    from lowres_reft.model.loader import Policy


@dataclass
class Session:
    recipe: Recipe  # with "auto" micro-batches resolved
    ctx: Dist
    say: Callable[..., None]  # log on the main process only
    policy: Policy
    problems: list  # training problems
    prompts: list[list[int]]  # their tokenized prompts
    eos_ids: list[int]
    run_dir: Path
    schedule: Any  # the skip-set schedule
    ranking: list[int] | None  # skippable layers, least influential first ([behavior] skip_layers = "influence")
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    state: dict  # step, counters, eval history (what trainer_state.json holds)
    warmup_resume: WarmupStop | None  # a warm-up stopped part-way, to go on from
    metrics: Any
    evaluator: Evaluator
    memory_note: str  # the memory plan's rollout figure, for an out-of-memory message

    def checkpoint(self, step: int, warmup: WarmupStop | None = None) -> Path | None:
        """Save checkpoint-<step> (every process's skip schedule and generator, gathered); a warm-up stopped part-way
        adds its optimizer and teacher."""
        ctx = self.ctx
        self.state["skip_schedule"] = gather_objects(self.schedule.state_dict(), ctx)
        generators = gather_objects(self.generator.get_state(), ctx)
        path = None
        if ctx.is_main:
            rng = {"torch": torch.get_rng_state(), **{f"generator_{r}": g for r, g in enumerate(generators)}}
            tensors = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            if warmup is not None:
                tensors["warmup"] = {"optimizer": warmup.optimizer, "teacher": warmup.teacher}
            path = save_checkpoint(self.run_dir, step, self.policy.model, tensors, rng, self.state,
                                   recipe_to_toml(self.recipe), keep_last=self.recipe.checkpoint.keep_last)
        barrier(ctx)
        return path


def open_session(recipe: Recipe, resume: bool, log, cleanup: contextlib.ExitStack) -> Session | Path:
    """The run, checked, loaded and opened; or its directory when `--resume` finds it finished (nothing written)."""
    ctx = init_distributed()
    say = log if ctx.is_main else (lambda *a, **k: None)
    resume = resume or recipe.checkpoint.resume == "latest"
    check_model_name(recipe.model)  # fail on bad input before writing anything
    resolve_rewards(recipe.reward.functions)  # unknown names / unimportable modules: one line, nothing written
    check_trackers(recipe.log.trackers)
    train_problems, eval_problems = load_problems(recipe.data, "train"), load_problems(recipe.data, "eval")
    run_dir = check_run_dir(recipe, resume)
    ckpt = latest_good_checkpoint(run_dir, warn=say) if resume else None
    if resume and ckpt is None:
        say(f"no checkpoint in {run_dir} to resume from; starting from step 0")
    if ckpt is not None:
        check_resume(recipe, ckpt, ctx.world)
        if finished(ckpt, recipe.train.steps):  # nothing to do: write nothing, change nothing
            say(f"{run_dir} already finished its {recipe.train.steps} steps ({ckpt.name}); nothing to do "
                "(raise [train] steps to train it further)")
            return run_dir
    if recipe.rollout.prompts_per_step % ctx.world:
        raise UsageError(f"[rollout] prompts_per_step = {recipe.rollout.prompts_per_step} must be a multiple of the "
                         f"{ctx.world} processes")
    policy = _load(recipe, ckpt, ctx, say)
    train_prompts = encode_prompts(policy.tokenizer, train_problems, recipe)
    recipe, memory_note = fit_memory(recipe, policy, train_prompts, say)  # "auto" micro-batches; refuse what cannot fit
    cfg = recipe.train
    ranked = layer_ranking(policy, recipe, ranking_texts(policy.tokenizer, train_problems, recipe))
    ranking = ranked[0] if ranked else None
    if ranked:
        say(f"block influence per layer (base model): {' '.join(f'{x:.3f}' for x in ranked[1])}; "
            f"skippable layers, least influential first: {ranking}")
    schedule = build_skip_schedule(policy.num_layers, recipe, cfg.seed + 7919 * ctx.rank, ranking)
    optimizer = build_optimizer(policy, recipe, say)
    scheduler = build_lr_scheduler(optimizer, recipe, cfg.steps * recipe.loss.updates_per_batch)
    generator = torch.Generator(device=policy.device).manual_seed(cfg.seed + 7919 * ctx.rank)
    state = {"step": 0, "skipped_updates": 0, "eval_history": []}
    warmup_resume = None
    if ckpt is not None:
        opt_state, rng, state = load_trainer_files(ckpt)
        if "warmup" in state:  # stopped during the warm-up: go on from its step
            saved = opt_state.get("warmup", {})
            warmup_resume = WarmupStop(state["warmup"]["step"], saved.get("optimizer"), saved.get("teacher"),
                                       state["warmup"].get("distill"))
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        schedule.load_state_dict(state["skip_schedule"][ctx.rank])
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng[f"generator_{ctx.rank}"])
        say(f"resumed from {ckpt} at step {state['step']}")
    metrics = _open_outputs(recipe, run_dir, ckpt, state, ctx, say, cleanup)
    eos_ids = eos_token_ids(policy)
    evaluator = Evaluator(policy, recipe, eval_problems, encode_prompts(policy.tokenizer, eval_problems, recipe), eos_ids,
                          run_dir, state["eval_history"], metrics, ctx)
    return Session(recipe, ctx, say, policy, train_problems, train_prompts, eos_ids, run_dir, schedule, ranking,
                   optimizer, scheduler, generator, state, warmup_resume, metrics, evaluator, memory_note)


def _load(recipe: Recipe, ckpt: Path | None, ctx: Dist, say) -> Policy:
    """The policy (the checkpoint's adapters on `--resume`), its logit transform and context length checked."""
    if ctx.enabled:  # build/cache the builtin model once (rank 0) before every process reads it
        if ctx.is_main:
            model_path(recipe.model, recipe.log.output_dir)
        barrier(ctx)
    cfg = recipe.train
    torch.manual_seed(cfg.seed)
    policy = load_policy(recipe.model, recipe.lora, recipe.log.output_dir, adapter_dir=ckpt / "adapter" if ckpt else None,
                         gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed)
    check_head_logits(policy.model)  # sampled and recomputed log-probs use the model's own logit transform
    for key, value in (("[rollout] max_new_tokens", recipe.rollout.max_new_tokens),
                       ("[eval] max_new_tokens", recipe.eval.max_new_tokens)):
        check_generation_length(policy.model, key, value)
    say(f"model {recipe.model.name}: {policy.trainable_params:,} trainable / {policy.total_params:,} total parameters "
        f"({100 * policy.trainable_params / policy.total_params:.2f}%), {policy.num_layers} layers, device {policy.device}"
        + (f", {ctx.world} processes" if ctx.enabled else ""))
    return policy


def _open_outputs(recipe: Recipe, run_dir: Path, ckpt: Path | None, state: dict, ctx: Dist, say, cleanup):
    """Everything is validated and loaded: take the run directory's lock (main process), then open the metrics log and
    the trackers. Returns the metrics sink (a no-op on the other processes)."""
    pending = state.pop("unwritten_metrics", [])
    resume_step = state["step"] if ckpt else None
    lock_error = None
    if ctx.is_main:
        try:
            cleanup.enter_context(RunLock(run_dir, say))
            check_unchanged(run_dir, ckpt)
        except UsageError as err:
            lock_error = err
    if all_max(float(ctx.is_main and lock_error is not None), ctx) > 0:
        raise lock_error if ctx.is_main else UsageError(f"{run_dir}: the main process could not open the run directory")
    if not ctx.is_main:
        return NullLog()
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_step, pending=pending)
    metrics = open_trackers(metrics, recipe.log.trackers, recipe.log.project, recipe.run_name, run_dir,
                            recipe.to_dict(), resume_step=resume_step)
    cleanup.callback(metrics.close)  # trackers flush and finish however the run ends
    return metrics
