"""The Nested-ReFT training loop: nested rollout -> reward -> group advantages -> corrected GRPO loss -> update.

Wiring happens here and only here; every piece (sampling, rewards, loss math, checkpoints) is its own module.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowres_reft.config.toml import recipe_to_toml
from lowres_reft.data.datasets import load_problems
from lowres_reft.data.prompts import encode_prompts
from lowres_reft.data.rewards import resolve_rewards
from lowres_reft.model.loader import check_model_name, eos_token_ids, load_policy, model_path
from lowres_reft.model.logprobs import check_head_logits
from lowres_reft.model.nested import adapt_skip_ratio
from lowres_reft.rl.batch import collect_or_explain, global_totals, prompt_indices
from lowres_reft.rl.builders import (
    build_engine,
    build_lr_scheduler,
    build_optimizer,
    build_skip_schedule,
    layer_ranking,
    ranking_texts,
    trainable,
)
from lowres_reft.rl.distributed import adapter_fingerprint, all_max, barrier, gather_objects, init_distributed
from lowres_reft.rl.update import apply_updates
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
from lowres_reft.run.metrics import MetricsLog, MetricsWriteError, NullLog, Progress, merge_records
from lowres_reft.run.plan import fit_memory
from lowres_reft.run.records import step_record, summary
from lowres_reft.run.rundir import RunLock, check_run_dir, check_unchanged
from lowres_reft.run.stop import WRITE_FAILED, RunStopped, StopFlag, stop_with_checkpoint
from lowres_reft.run.tracking import check_trackers, open_trackers
from lowres_reft.utils.errors import UsageError

if TYPE_CHECKING:
    from lowres_reft.config import Recipe


def train(recipe: Recipe, resume: bool = False, log=print) -> Path:
    """Run the recipe. Returns the run directory (metrics.jsonl, eval.json, checkpoint-*)."""
    with contextlib.ExitStack() as cleanup:  # releases the run dir's lock however the run ends
        return _train(recipe, resume, log, cleanup)


def _train(recipe: Recipe, resume: bool, log, cleanup: contextlib.ExitStack) -> Path:
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
    cfg, beh = recipe.train, recipe.behavior
    if recipe.rollout.prompts_per_step % ctx.world:
        raise UsageError(f"[rollout] prompts_per_step = {recipe.rollout.prompts_per_step} must be a multiple of the {ctx.world} processes")
    if ctx.enabled:  # build/cache the builtin model once (rank 0) before every process reads it
        if ctx.is_main:
            model_path(recipe.model, recipe.log.output_dir)
        barrier(ctx)
    torch.manual_seed(cfg.seed)
    policy = load_policy(recipe.model, recipe.lora, recipe.log.output_dir, adapter_dir=ckpt / "adapter" if ckpt else None,
                         gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed)
    check_head_logits(policy.model)  # sampled and recomputed log-probs use the model's own logit transform
    for key, value in (("[rollout] max_new_tokens", recipe.rollout.max_new_tokens), ("[eval] max_new_tokens", recipe.eval.max_new_tokens)):
        check_generation_length(policy.model, key, value)
    say(f"model {recipe.model.name}: {policy.trainable_params:,} trainable / {policy.total_params:,} total parameters "
        f"({100 * policy.trainable_params / policy.total_params:.2f}%), {policy.num_layers} layers, device {policy.device}"
        + (f", {ctx.world} processes" if ctx.enabled else ""))
    train_prompts = encode_prompts(policy.tokenizer, train_problems, recipe)
    recipe, memory_note = fit_memory(recipe, policy, train_prompts, say)  # "auto" micro-batches; refuse what cannot fit
    cfg = recipe.train
    eos_ids = eos_token_ids(policy)
    ranked = layer_ranking(policy, recipe, ranking_texts(policy.tokenizer, train_problems, recipe))
    ranking = ranked[0] if ranked else None
    if ranked:
        say(f"block influence per layer (base model): {' '.join(f'{x:.3f}' for x in ranked[1])}; "
            f"skippable layers, least influential first: {ranking}")
    schedule = build_skip_schedule(policy.num_layers, recipe, cfg.seed + 7919 * ctx.rank, ranking)
    adaptive = beh.schedule == "adaptive"
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
    pending = state.pop("unwritten_metrics", [])
    resume_step = state["step"] if ckpt else None
    lock_error = None
    if ctx.is_main:  # everything is validated and loaded: from here on the run writes its outputs
        try:
            cleanup.enter_context(RunLock(run_dir, say))
            check_unchanged(run_dir, ckpt)
        except UsageError as err:
            lock_error = err
    if all_max(float(ctx.is_main and lock_error is not None), ctx) > 0:
        raise lock_error if ctx.is_main else UsageError(f"{run_dir}: the main process could not open the run directory")
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_step, pending=pending) if ctx.is_main else NullLog()
    if ctx.is_main:
        metrics = open_trackers(metrics, recipe.log.trackers, recipe.log.project, recipe.run_name, run_dir,
                                recipe.to_dict(), resume_step=resume_step)
        cleanup.callback(metrics.close)  # trackers flush and finish however the run ends
    evaluator = Evaluator(policy, recipe, eval_problems, encode_prompts(policy.tokenizer, eval_problems, recipe), eos_ids,
                          run_dir, state["eval_history"], metrics, ctx)

    def checkpoint(step: int, warmup: WarmupStop | None = None) -> Path | None:
        state["skip_schedule"] = gather_objects(schedule.state_dict(), ctx)
        generators = gather_objects(generator.get_state(), ctx)
        path = None
        if ctx.is_main:
            rng = {"torch": torch.get_rng_state(), **{f"generator_{r}": g for r, g in enumerate(generators)}}
            tensors = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            if warmup is not None:  # a warm-up stopped part-way: its optimizer and teacher, to go on from there
                tensors["warmup"] = {"optimizer": warmup.optimizer, "teacher": warmup.teacher}
            path = save_checkpoint(run_dir, step, policy.model, tensors, rng, state, recipe_to_toml(recipe),
                                   keep_last=recipe.checkpoint.keep_last)
        barrier(ctx)
        return path

    stop = StopFlag()
    cleanup.callback(stop.restore)  # the signal handlers go back however the run ends
    if state["step"] == 0:
        warm_up(policy, recipe, train_problems, metrics, evaluator, state, warmup_resume, ranking, checkpoint,
                lambda: int(all_max(float(stop.requested), ctx)), say)
    progress = Progress(cfg.steps, state["step"], recipe.log.progress if ctx.is_main else "none")
    engine = build_engine(policy, recipe, generator, eos_ids, on_micro_batch=progress.within("rollout"))
    step = state["step"]
    try:
        for step in range(state["step"] + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            if policy.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(policy.device)
            # 1. Rollouts: grad_accum batches (this process's shard of each), each from a freshly drawn nested model.
            batches = [
                collect_or_explain(engine, policy.tokenizer, recipe, train_problems, train_prompts,
                                   prompt_indices(step, a, recipe, len(train_prompts))[ctx.rank :: ctx.world],
                                   [schedule.draw() for _ in range(recipe.behavior.sets_per_batch)], memory_note=memory_note)
                for a in range(cfg.grad_accum)
            ]
            totals = [global_totals(b, recipe, ctx) for b in batches]
            # 2. Updates: the corrected GRPO loss (PPO-clipped against the first update's log-probs when repeated).
            results, grad_norm, stepped = apply_updates(policy, recipe, batches, totals, optimizer, scheduler, state, ctx,
                                                        progress.within("update"))
            # 3. Log (reduced over processes), adapt the skip ratio, evaluate, checkpoint.
            record = merge_records(gather_objects(step_record(step, batches, results, grad_norm, stepped, state, scheduler,
                                                              policy, t0, schedule.skip_ratio), ctx))
            if ctx.enabled:  # every process must hold the same adapters after the synchronized update
                prints = gather_objects(adapter_fingerprint(trainable(policy)), ctx)
                record["adapters_in_sync"] = all(p == prints[0] for p in prints)
            write_error = None
            try:
                metrics.write(record)
            except MetricsWriteError as err:  # disk full: keep the line in the checkpoint, written on --resume
                write_error, state["unwritten_metrics"] = err, [record]
            progress.update(record)
            if adaptive:
                schedule.set_ratio(adapt_skip_ratio(schedule.skip_ratio, record["ess"], beh.target_ess, beh.adapt_rate,
                                                    beh.min_ratio, beh.max_ratio))
            if recipe.eval.every and step % recipe.eval.every == 0 and step < cfg.steps and write_error is None:
                evaluator(step, f"step_{step}", progress.message)
            state["step"] = step
            halt = int(all_max(float(WRITE_FAILED if write_error is not None else stop.requested), ctx))
            if recipe.checkpoint.every and step % recipe.checkpoint.every == 0 and step < cfg.steps and not halt:
                checkpoint(step)
            if halt:
                stop_with_checkpoint(checkpoint, step, halt, write_error, progress, say)
    finally:
        progress.close()
    evaluator(step, "final", say)
    path = checkpoint(step)
    metrics.close()
    if ctx.is_main:
        from lowres_reft.run.report import write_report

        say(summary(state["eval_history"], run_dir / "metrics.jsonl", path) + f"\n  report: {write_report(run_dir)}")
    return run_dir


def warm_up(policy, recipe: Recipe, problems, metrics, evaluator, state: dict, resume: WarmupStop | None, ranking,
            checkpoint, should_stop, say) -> None:
    """The stage before RL (step 0): evaluation before training, the supervised warm-up and skip distillation, the
    evaluation after it. A first Ctrl-C / SIGTERM ends the warm-up after its current step with a checkpoint that
    `--resume` continues from (`state["warmup"]` holds its step while the stage is unfinished)."""
    from lowres_reft.rl.warmup import run_warmup

    if resume is None and recipe.eval.before_training:
        evaluator(0, "before_training", say)
    if recipe.warmup.steps <= 0 and recipe.warmup.skip_distill_steps <= 0:
        return
    stopped = run_warmup(policy, recipe, problems, metrics, say, ranking, should_stop, resume)
    if stopped is not None:
        state["warmup"] = {"step": stopped.step, "distill": stopped.distill}
        path = checkpoint(0, stopped)
        say(f"stopped in the warm-up after its step {stopped.step}; checkpoint {path}; continue with --resume")
        raise RunStopped(should_stop())
    evaluator(0, "after_warmup", say)
    state.pop("warmup", None)
