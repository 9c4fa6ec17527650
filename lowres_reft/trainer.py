"""The Nested-ReFT training loop: nested rollout -> reward -> group advantages -> corrected GRPO loss -> update.

Wiring happens here and only here; every piece (sampling, rewards, loss math, checkpoints) is its own module.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lowres_reft import loss as L
from lowres_reft.checkpoint import check_resume, latest_good_checkpoint, list_checkpoints, load_trainer_files, save_checkpoint
from lowres_reft.config import LossConfig, Recipe
from lowres_reft.builders import build_engine, build_lr_scheduler, build_optimizer, build_skip_schedule, trainable
from lowres_reft.data import Problem, encode_prompts, load_problems
from lowres_reft.distributed import Dist, adapter_fingerprint, all_max, all_sum, barrier, gather_objects, init_distributed, sum_gradients
from lowres_reft.errors import UsageError
from lowres_reft.evaluation import decode_completions, evaluate
from lowres_reft.fsutil import atomic_write_text, nearest_existing, writable_dir
from lowres_reft.logprobs import check_head_logits
from lowres_reft.metrics import MetricsLog, MetricsWriteError, Progress, merge_records
from lowres_reft.model import Policy, check_model_name, eos_token_ids, load_policy, model_path
from lowres_reft.nested import adapt_skip_ratio
from lowres_reft.microbatch import by_length, by_prompt
from lowres_reft.rewards import resolve_rewards, score
from lowres_reft.rollout import Engine, RolloutBatch, check_generation_length, make_engine, merge_rollouts
from lowres_reft.rundir import RunLock, check_not_locked
from lowres_reft.shared_prompt import supports_shared_prompt, update_logp
from lowres_reft.tracking import check_trackers, open_trackers
from lowres_reft.typed_toml import recipe_to_toml


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


def accumulate_gradients(policy: Policy, batch: ScoredBatch, cfg: LossConfig, temperature: float, micro: int,
                         max_new_tokens: int, scale: float, old_logp: torch.Tensor | None, totals: dict | None = None,
                         on_micro_batch=None, share_prompt: bool = False) -> dict:
    """Backward of the batch's loss (times `scale`), micro-batch by micro-batch. Returns logp (detached) + stats.

    Micro-batches of `micro` rows are formed by length and trimmed to their own used columns (`by_length`), or, with
    `share_prompt`, keep each prompt's rows together so its forward runs once (`by_prompt`, `shared_prompt`); the
    returned logp is (N, T) in the batch's row order, 0 where mask == 0. Loss and gradients equal those of row-order
    micro-batches padded to the batch's width: the aggregation normalizers are the whole batch's.

    `totals` are the aggregation normalizers (default: this batch's own token and sequence counts).
    Puts the model in train mode: gradient checkpointing only runs in train mode, and a model left in eval mode
    (from_pretrained's default, or any `model.eval()` before) would silently keep every layer's activations.
    Sampling and evaluation set eval mode themselves.
    """
    policy.model.train()
    r = batch.rollout
    mask = r.completion_mask
    if totals is None:
        totals = dict(total_tokens=max(1, int(mask.sum().item())), total_seqs=mask.shape[0], max_new_tokens=max_new_tokens)
    all_logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)  # (N, T), original row order
    share_prompt = share_prompt and supports_shared_prompt(policy.model)  # else by length: the tighter trim
    micro_batches = (by_prompt if share_prompt else by_length)(r, micro)  # trimmed: real lengths, not the widest row
    losses, kls, clipped, finite = 0.0, 0.0, 0.0, True
    for done, mb in enumerate(micro_batches, 1):
        m = mb.completion_mask  # (b, t)
        logp = update_logp(policy.model, mb, temperature, cfg.logprob_chunk, share_prompt)  # (b, t)
        corr = L.correction_weights(logp.detach(), mb.take(r.behavior_logp), m, cfg.correction, cfg.is_cap, cfg.retrace_lambda)
        old = None if old_logp is None else mb.take(old_logp)
        objective, clip_frac = L.policy_objective(logp, corr.weights, batch.advantages[mb.rows], m, old,
                                                  cfg.clip_eps, cfg.clip_eps_high)
        micro_loss = -L.aggregate(objective, m, cfg.aggregation, **totals)
        if cfg.kl_beta > 0:
            with torch.no_grad(), policy.model.disable_adapter():
                ref_logp = update_logp(policy.model, mb, temperature, cfg.logprob_chunk, share_prompt)
            kl = L.aggregate(L.kl_k3(logp, ref_logp), m, cfg.aggregation, **totals)
            micro_loss = micro_loss + cfg.kl_beta * kl
            kls += float(kl.detach())
            del kl
        if not torch.isfinite(micro_loss):
            finite = False  # never backpropagate NaN/inf into the adapters; the step is skipped
        elif finite:
            (micro_loss * scale).backward()
        losses += float(micro_loss.detach())
        clipped += clip_frac * float(m.sum())
        all_logp[mb.rows, : mb.width] = torch.where(m != 0, logp.detach(), 0.0)
        if on_micro_batch is not None:
            on_micro_batch(done, len(micro_batches), 0)
        # Without a backward the graph keeps its saved activations: drop it before the next micro-batch's forward.
        del logp, objective, micro_loss
    stats = L.correction_weights(all_logp, r.behavior_logp, mask, cfg.correction, cfg.is_cap, cfg.retrace_lambda).stats
    return {"logp": all_logp, "loss": losses, "kl": kls, "clip_frac": clipped / totals["total_tokens"], "finite": finite, **stats}


def apply_updates(policy: Policy, recipe: Recipe, batches: list[ScoredBatch], totals: list[dict], optimizer, scheduler,
                  state: dict, ctx: Dist, on_micro_batch=None) -> tuple[list[dict], float, bool]:
    """`updates_per_batch` optimizer updates on the step's rollout batches. Non-finite loss/grad: update skipped."""
    params, cfg = trainable(policy), recipe.train
    old_logps: list[torch.Tensor | None] = [None] * len(batches)
    for _ in range(recipe.loss.updates_per_batch):
        results = []
        for i, batch in enumerate(batches):
            res = accumulate_gradients(policy, batch, recipe.loss, recipe.rollout.temperature, cfg.micro_batch_size,
                                       recipe.rollout.max_new_tokens, 1.0 / len(batches), old_logps[i], totals[i],
                                       on_micro_batch, cfg.shared_prompt_forward)
            old_logps[i] = res["logp"] if old_logps[i] is None else old_logps[i]
            results.append(res)
        sum_gradients(params, ctx)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        all_finite = all_max(0.0 if all(r["finite"] for r in results) else 1.0, ctx) == 0.0
        stepped = all_finite and math.isfinite(grad_norm)
        if stepped:
            optimizer.step()
        else:
            state["skipped_updates"] += 1
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the schedule advances per update, applied or skipped
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    return results, grad_norm, stepped


def check_run_dir(recipe: Recipe, resume: bool) -> Path:
    """The run directory, checked (writable, not clobbering a run) without creating anything yet."""
    run_dir = Path(recipe.log.output_dir) / recipe.run_name
    check_not_locked(run_dir)  # a live run there: say so before anything else (and before loading the model)
    existing = nearest_existing(run_dir)
    if not writable_dir(existing):
        raise UsageError(f"output directory {run_dir} is not writable ({existing} is not a writable directory); set [log] output_dir")
    if not resume and list_checkpoints(run_dir):
        raise UsageError(f"{run_dir} already holds checkpoints: add --resume to continue it, or set [log] run_name to start a new run")
    return run_dir


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class RunStopped(KeyboardInterrupt):
    """The run stopped on a signal; the CLI exits with 128 + the signal number (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


class StopFlag:
    """First Ctrl-C or SIGTERM (what `kill` and job schedulers send) asks the loop to checkpoint and stop after the
    current step; a second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = 0  # the signal number asked for, 0 = none
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise RunStopped(signum)
        self.requested = signum
        name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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
    eos_ids = eos_token_ids(policy)
    schedule = build_skip_schedule(policy.num_layers, recipe, cfg.seed + 7919 * ctx.rank)
    adaptive = beh.schedule == "adaptive"
    optimizer = build_optimizer(policy, recipe, say)
    scheduler = build_lr_scheduler(optimizer, recipe, cfg.steps * recipe.loss.updates_per_batch)
    generator = torch.Generator(device=policy.device).manual_seed(cfg.seed + 7919 * ctx.rank)
    state = {"step": 0, "skipped_updates": 0, "eval_history": []}
    if ckpt is not None:
        opt_state, rng, state = load_trainer_files(ckpt)
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

    def checkpoint(step: int) -> Path | None:
        state["skip_schedule"] = gather_objects(schedule.state_dict(), ctx)
        generators = gather_objects(generator.get_state(), ctx)
        path = None
        if ctx.is_main:
            rng = {"torch": torch.get_rng_state(), **{f"generator_{r}": g for r, g in enumerate(generators)}}
            path = save_checkpoint(run_dir, step, policy.model, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                                   rng, state, recipe_to_toml(recipe), keep_last=recipe.checkpoint.keep_last)
        barrier(ctx)
        return path

    if state["step"] == 0:
        if recipe.eval.before_training:
            evaluator(0, "before_training", say)
        if recipe.warmup.steps > 0 or recipe.warmup.skip_distill_steps > 0:
            from lowres_reft.warmup import run_warmup

            run_warmup(policy, recipe, train_problems, metrics, say)
            evaluator(0, "after_warmup", say)
    progress = Progress(cfg.steps, state["step"], recipe.log.progress if ctx.is_main else "none")
    engine = build_engine(policy, recipe, generator, eos_ids, on_micro_batch=progress.within("rollout"))
    stop = StopFlag()
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
                                   [schedule.draw() for _ in range(recipe.behavior.sets_per_batch)])
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
        stop.restore()
        progress.close()
    evaluator(step, "final", say)
    path = checkpoint(step)
    metrics.close()
    if ctx.is_main:
        from lowres_reft.report import write_report

        say(summary(state["eval_history"], run_dir / "metrics.jsonl", path) + f"\n  report: {write_report(run_dir)}")
    return run_dir


WRITE_FAILED = 1000  # halt code of a failed metrics write (signal numbers are below it)


def stop_with_checkpoint(checkpoint, step: int, halt: int, write_error: Exception | None, progress: Progress, say) -> None:
    """Save a checkpoint at `step`, then stop: on a signal (RunStopped), or because metrics.jsonl could not be written."""
    failed = write_error or UsageError("the main process could not write metrics.jsonl")
    try:
        path = checkpoint(step)
    except UsageError as err:
        if halt != WRITE_FAILED:
            raise
        raise UsageError(f"{failed}, and {err}") from None
    progress.close()
    if halt == WRITE_FAILED:
        raise UsageError(f"{failed}; stopped at step {step} with checkpoint {path}: free disk space, then continue with --resume")
    say(f"stopped at step {step}; checkpoint {path}; continue with --resume")
    raise RunStopped(halt)


def check_unchanged(run_dir: Path, ckpt: Path | None) -> None:
    """While this run loaded, another one may have written checkpoints there: refuse rather than mix them."""
    now = latest_good_checkpoint(run_dir, warn=lambda *a: None)
    if (now and now.name) != (ckpt and ckpt.name):
        raise UsageError(f"{run_dir} changed while this run was loading (another run wrote {now.name if now else 'to it'}); "
                         "start it again")


class NullLog:
    """Metrics sink of the non-main processes."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Evaluator:
    """Greedy accuracy of the full model, sharded over processes; rank 0 writes eval.json and a metrics line."""

    def __init__(self, policy, recipe, problems, prompts, eos_ids, run_dir, history, metrics, ctx) -> None:
        self.policy, self.recipe, self.problems, self.prompts, self.eos_ids = policy, recipe, problems, prompts, eos_ids
        self.run_dir, self.history, self.metrics, self.ctx = run_dir, history, metrics, ctx
        # Greedy, the full model (no layers skipped), [eval] max_new_tokens.
        self.engine = make_engine(recipe.rollout.engine, policy.model, max_new_tokens=recipe.eval.max_new_tokens,
                                  eos_ids=eos_ids, pad_id=policy.tokenizer.pad_token_id, greedy=True,
                                  weights=recipe.rollout.weights)

    def __call__(self, step: int, label: str, say) -> float:
        ctx, r, w = self.ctx, self.ctx.rank, self.ctx.world
        result = evaluate(self.engine, self.policy.tokenizer, self.problems[r::w], self.prompts[r::w],
                          self.recipe.eval.batch_size, require_final=self.recipe.reward.require_final_answer)
        predictions = [p for shard in gather_objects(result.predictions, ctx) for p in shard]
        n = len(predictions)
        accuracy = sum(p["correct"] for p in predictions) / max(n, 1)
        if ctx.is_main:
            self.history.append({"step": step, "label": label, "accuracy": accuracy, "n": n})
            atomic_write_text(self.run_dir / "eval.json",
                              json.dumps({"history": self.history, "last_predictions": predictions[:50]}, indent=1))
            self.metrics.write({"step": step, "stage": "eval", "label": label, "eval_accuracy": accuracy, "eval_n": n})
            say(f"eval {label.replace('_', ' ')}: accuracy {accuracy:.3f} on {n} problems")
        return accuracy


def collect_or_explain(engine: Engine, tokenizer, recipe: Recipe, *args) -> ScoredBatch:
    try:
        return collect(engine, tokenizer, recipe, *args)
    except torch.cuda.OutOfMemoryError:
        r = recipe.rollout
        raise UsageError(
            f"out of GPU memory while generating {r.prompts_per_step}x{r.group_size} rollouts of up to {r.max_new_tokens} "
            "tokens; lower [rollout] micro_batch (sequences generated at once), max_new_tokens or group_size"
        ) from None


def global_totals(batch: ScoredBatch, recipe: Recipe, ctx: Dist) -> dict:
    """Loss normalizers over the whole global batch (all processes), so sharding does not change the update."""
    tokens, seqs = all_sum([float(batch.rollout.completion_mask.sum()), float(batch.rollout.completion_mask.shape[0])], ctx)
    return dict(total_tokens=max(1, int(tokens)), total_seqs=int(seqs), max_new_tokens=recipe.rollout.max_new_tokens)


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
