"""The Nested-ReFT training loop: nested rollout -> reward -> group advantages -> corrected GRPO loss -> update.

Wiring happens here and only here; every piece (sampling, rewards, loss math, checkpoints) is its own module.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowres_reft.model.nested import adapt_skip_ratio
from lowres_reft.rl.batch import collect_or_explain, global_totals, prompt_indices
from lowres_reft.rl.builders import build_engine, trainable
from lowres_reft.rl.distributed import adapter_fingerprint, all_max, gather_objects
from lowres_reft.rl.update import apply_updates
from lowres_reft.run.metrics import MetricsWriteError, Progress, merge_records
from lowres_reft.run.records import step_record, summary
from lowres_reft.run.session import Session, open_session
from lowres_reft.run.stop import WRITE_FAILED, RunStopped, StopFlag, stop_with_checkpoint

if TYPE_CHECKING:
    from lowres_reft.config import Recipe


def train(recipe: Recipe, resume: bool = False, log=print) -> Path:
    """Run the recipe. Returns the run directory (metrics.jsonl, eval.json, checkpoint-*)."""
    with contextlib.ExitStack() as cleanup:  # releases the run dir's lock however the run ends
        return _train(recipe, resume, log, cleanup)


def _train(recipe: Recipe, resume: bool, log, cleanup: contextlib.ExitStack) -> Path:
    run = open_session(recipe, resume, log, cleanup)
    if isinstance(run, Path):  # resumed a finished run: nothing to do
        return run
    stop = StopFlag()
    cleanup.callback(stop.restore)  # the signal handlers go back however the run ends
    should_stop = lambda: int(all_max(float(stop.requested), run.ctx))  # noqa: E731 - every process agrees
    if run.state["step"] == 0:
        warm_up(run, should_stop)
    step = rl_steps(run, stop)
    run.evaluator(step, "final", run.say)
    path = run.checkpoint(step)
    run.metrics.close()
    if run.ctx.is_main:
        from lowres_reft.run.report import write_report

        run.say(summary(run.state["eval_history"], run.run_dir / "metrics.jsonl", path)
                + f"\n  report: {write_report(run.run_dir)}")
    return run.run_dir


def rl_steps(run: Session, stop: StopFlag) -> int:
    """The RL steps from the session's step to `[train] steps`; returns the last step done."""
    recipe, ctx, policy, state, schedule = run.recipe, run.ctx, run.policy, run.state, run.schedule
    cfg, beh = recipe.train, recipe.behavior
    progress = Progress(cfg.steps, state["step"], recipe.log.progress if ctx.is_main else "none")
    engine = build_engine(policy, recipe, run.generator, run.eos_ids, on_micro_batch=progress.within("rollout"))
    step = state["step"]
    try:
        for step in range(state["step"] + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            if policy.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(policy.device)
            # 1. Rollouts: grad_accum batches (this process's shard of each), each from a freshly drawn nested model.
            batches = [collect_or_explain(engine, policy.tokenizer, recipe, run.problems, run.prompts,
                                          prompt_indices(step, a, recipe, len(run.prompts))[ctx.rank :: ctx.world],
                                          [schedule.draw() for _ in range(beh.sets_per_batch)], memory_note=run.memory_note)
                       for a in range(cfg.grad_accum)]
            totals = [global_totals(b, recipe, ctx) for b in batches]
            # 2. Updates: the corrected GRPO loss (PPO-clipped against the first update's log-probs when repeated).
            results, grad_norm, stepped = apply_updates(policy, recipe, batches, totals, run.optimizer, run.scheduler,
                                                        state, ctx, progress.within("update"))
            # 3. Log (reduced over processes), adapt the skip ratio, evaluate, checkpoint.
            record = merge_records(gather_objects(step_record(step, batches, results, grad_norm, stepped, state,
                                                              run.scheduler, policy, t0, schedule.skip_ratio), ctx))
            if ctx.enabled:  # every process must hold the same adapters after the synchronized update
                prints = gather_objects(adapter_fingerprint(trainable(policy)), ctx)
                record["adapters_in_sync"] = all(p == prints[0] for p in prints)
            write_error = None
            try:
                run.metrics.write(record)
            except MetricsWriteError as err:  # disk full: keep the line in the checkpoint, written on --resume
                write_error, state["unwritten_metrics"] = err, [record]
            progress.update(record)
            if beh.schedule == "adaptive":
                schedule.set_ratio(adapt_skip_ratio(schedule.skip_ratio, record["ess"], beh.target_ess, beh.adapt_rate,
                                                    beh.min_ratio, beh.max_ratio))
            if recipe.eval.every and step % recipe.eval.every == 0 and step < cfg.steps and write_error is None:
                run.evaluator(step, f"step_{step}", progress.message)
            state["step"] = step
            halt = int(all_max(float(WRITE_FAILED if write_error is not None else stop.requested), ctx))
            if recipe.checkpoint.every and step % recipe.checkpoint.every == 0 and step < cfg.steps and not halt:
                run.checkpoint(step)
            if halt:
                stop_with_checkpoint(run.checkpoint, step, halt, write_error, progress, run.say)
    finally:
        progress.close()
    return step


def warm_up(run: Session, should_stop) -> None:
    """The stage before RL (step 0): evaluation before training, the supervised warm-up and skip distillation, the
    evaluation after it. A first Ctrl-C / SIGTERM ends the warm-up after its current step with a checkpoint that
    `--resume` continues from (`state["warmup"]` holds its step while the stage is unfinished)."""
    from lowres_reft.rl.warmup import run_warmup

    recipe, say = run.recipe, run.say
    if run.warmup_resume is None and recipe.eval.before_training:
        run.evaluator(0, "before_training", say)
    if recipe.warmup.steps <= 0 and recipe.warmup.skip_distill_steps <= 0:
        return
    stopped = run_warmup(run.policy, recipe, run.problems, run.metrics, say, run.ranking, should_stop, run.warmup_resume)
    if stopped is not None:
        run.state["warmup"] = {"step": stopped.step, "distill": stopped.distill}
        path = run.checkpoint(0, stopped)
        say(f"stopped in the warm-up after its step {stopped.step}; checkpoint {path}; continue with --resume")
        raise RunStopped(should_stop())
    run.evaluator(0, "after_warmup", say)
    run.state.pop("warmup", None)
