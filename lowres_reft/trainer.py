"""The Nested-ReFT training loop: nested rollout -> reward -> group advantages -> corrected GRPO loss -> update.

Wiring happens here and only here; every piece (sampling, rewards, loss math, checkpoints) is its own module.
"""

from __future__ import annotations

import json
import math
import random
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowres_reft import loss as L
from lowres_reft.checkpoint import latest_good_checkpoint, list_checkpoints, load_trainer_files, save_checkpoint
from lowres_reft.config import LossConfig, Recipe, recipe_to_toml
from lowres_reft.data import Problem, format_prompt, load_problems
from lowres_reft.errors import UsageError
from lowres_reft.evaluate import EvalResult, decode_completions, evaluate
from lowres_reft.logprobs import completion_logp
from lowres_reft.metrics import MetricsLog, Progress
from lowres_reft.model import Policy, load_policy
from lowres_reft.nested import SkipSchedule
from lowres_reft.rewards import score
from lowres_reft.rollout import RolloutBatch, sample


@dataclass
class ScoredBatch:
    rollout: RolloutBatch
    rewards: torch.Tensor  # (N,) float32
    advantages: torch.Tensor  # (N,) float32
    correct: list[bool]


def encode_prompts(tokenizer, problems: list[Problem], recipe: Recipe) -> list[list[int]]:
    """Formatted, tokenized prompts; over-long prompts keep their end (where the question is asked)."""
    limit = recipe.data.max_prompt_tokens
    out = []
    for problem in problems:
        ids = tokenizer(format_prompt(tokenizer, problem.question, recipe.data), add_special_tokens=False)["input_ids"]
        out.append(ids[-limit:])
    return out


def eos_token_ids(policy: Policy) -> list[int]:
    ids = {policy.tokenizer.eos_token_id}
    configured = getattr(getattr(policy.model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


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


def lr_factor(update: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base LR at optimizer update `update` (0-based): linear warmup, then the schedule."""
    if warmup > 0 and update < warmup:
        return (update + 1) / warmup
    progress = (update - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def build_optimizer(policy: Policy, recipe: Recipe, log=print) -> torch.optim.Optimizer:
    params = [p for p in policy.model.parameters() if p.requires_grad]
    cfg = recipe.train
    if cfg.optimizer == "paged_adamw_8bit":
        if policy.device.type == "cuda":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        log("note: paged_adamw_8bit needs CUDA; using torch AdamW on this device")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def collect(policy: Policy, recipe: Recipe, problems: list[Problem], prompts: list[list[int]], indices: list[int],
            skip: tuple[int, ...], generator: torch.Generator, eos_ids: list[int]) -> ScoredBatch:
    """prompts_per_step prompts x G completions from the nested model, scored, with group advantages."""
    G = recipe.rollout.group_size
    rows = [i for i in indices for _ in range(G)]  # group-contiguous: G completions of a prompt side by side
    rollout = sample(
        policy.model, [prompts[i] for i in rows], max_new_tokens=recipe.rollout.max_new_tokens, eos_ids=eos_ids,
        pad_id=policy.tokenizer.pad_token_id, temperature=recipe.rollout.temperature, top_p=recipe.rollout.top_p,
        skip=skip, generator=generator, micro_batch=recipe.rollout.micro_batch,
    )
    texts = decode_completions(policy.tokenizer, rollout.completion_ids, rollout.completion_mask)
    rewards, correct = score(texts, [problems[i].answer for i in rows], recipe.reward.functions, recipe.reward.format_weight)
    rewards_t = torch.tensor(rewards, dtype=torch.float32, device=rollout.completion_ids.device)
    advantages = L.group_advantages(rewards_t, G, recipe.loss.advantage_scale, recipe.loss.advantage_eps)
    return ScoredBatch(rollout, rewards_t, advantages, correct)


def accumulate_gradients(policy: Policy, batch: ScoredBatch, cfg: LossConfig, temperature: float, micro: int,
                         max_new_tokens: int, scale: float, old_logp: torch.Tensor | None) -> dict:
    """Backward of the batch's loss (times `scale`), micro-batch by micro-batch. Returns logp (detached) + stats."""
    r = batch.rollout
    mask = r.completion_mask
    totals = dict(total_tokens=max(1, int(mask.sum().item())), total_seqs=mask.shape[0], max_new_tokens=max_new_tokens)
    logps, losses, kls, clipped, finite = [], 0.0, 0.0, 0.0, True
    for lo in range(0, mask.shape[0], micro):
        sl = slice(lo, lo + micro)
        logp = completion_logp(policy.model, r.prompt_ids[sl], r.prompt_mask[sl], r.completion_ids[sl], mask[sl],
                               temperature, cfg.logprob_chunk)  # (b, T)
        corr = L.correction_weights(logp.detach(), r.behavior_logp[sl], mask[sl], cfg.correction, cfg.is_cap, cfg.retrace_lambda)
        old = None if old_logp is None else old_logp[sl]
        objective, clip_frac = L.policy_objective(logp, corr.weights, batch.advantages[sl], mask[sl], old,
                                                  cfg.clip_eps, cfg.clip_eps_high)
        micro_loss = -L.aggregate(objective, mask[sl], cfg.aggregation, **totals)
        if cfg.kl_beta > 0:
            with torch.no_grad(), policy.model.disable_adapter():
                ref_logp = completion_logp(policy.model, r.prompt_ids[sl], r.prompt_mask[sl], r.completion_ids[sl],
                                           mask[sl], temperature, cfg.logprob_chunk)
            kl = L.aggregate(L.kl_k3(logp, ref_logp), mask[sl], cfg.aggregation, **totals)
            micro_loss = micro_loss + cfg.kl_beta * kl
            kls += float(kl.detach())
        if not torch.isfinite(micro_loss):
            finite = False  # never backpropagate NaN/inf into the adapters; the step is skipped
        elif finite:
            (micro_loss * scale).backward()
        losses += float(micro_loss.detach())
        clipped += clip_frac * float(mask[sl].sum())
        logps.append(logp.detach())
    all_logp = torch.cat(logps)
    stats = L.correction_weights(all_logp, r.behavior_logp, mask, cfg.correction, cfg.is_cap, cfg.retrace_lambda).stats
    return {"logp": all_logp, "loss": losses, "kl": kls, "clip_frac": clipped / totals["total_tokens"], "finite": finite, **stats}


def prepare_run_dir(recipe: Recipe, resume: bool) -> Path:
    run_dir = Path(recipe.log.output_dir) / recipe.run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{id(run_dir)}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"output directory {run_dir} is not writable ({err.strerror}); set [log] output_dir") from None
    if not resume and list_checkpoints(run_dir):
        raise UsageError(f"{run_dir} already holds checkpoints: add --resume to continue it, or set [log] run_name to start a new run")
    return run_dir


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StopFlag:
    """First Ctrl-C asks the loop to checkpoint and stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self.previous)


def run_eval(policy: Policy, recipe: Recipe, problems, prompts, eos_ids, step: int, run_dir: Path, history: list,
             label: str = "") -> EvalResult:
    result = evaluate(policy.model, policy.tokenizer, problems, prompts, eos_ids, recipe.eval.max_new_tokens, recipe.eval.batch_size)
    history.append({"step": step, "label": label or f"step_{step}", "accuracy": result.accuracy, "n": result.n})
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps({"history": history, "last_predictions": result.predictions[:50]}, indent=1))
    tmp.replace(run_dir / "eval.json")
    return result


def train(recipe: Recipe, resume: bool = False, log=print) -> Path:
    """Run the recipe. Returns the run directory (metrics.jsonl, eval.json, checkpoint-*)."""
    resume = resume or recipe.checkpoint.resume == "latest"
    run_dir = prepare_run_dir(recipe, resume)
    ckpt = latest_good_checkpoint(run_dir, warn=log) if resume else None
    if resume and ckpt is None:
        log(f"no checkpoint in {run_dir} to resume from; starting from step 0")
    torch.manual_seed(recipe.train.seed)
    policy = load_policy(recipe.model, recipe.lora, recipe.log.output_dir, adapter_dir=ckpt / "adapter" if ckpt else None,
                         gradient_checkpointing=recipe.train.gradient_checkpointing, seed=recipe.train.seed)
    log(f"model {recipe.model.name}: {policy.trainable_params:,} trainable / {policy.total_params:,} total parameters "
        f"({100 * policy.trainable_params / policy.total_params:.2f}%), {policy.num_layers} layers, device {policy.device}")
    train_problems, eval_problems = load_problems(recipe.data, "train"), load_problems(recipe.data, "eval")
    train_prompts = encode_prompts(policy.tokenizer, train_problems, recipe)
    eval_prompts = encode_prompts(policy.tokenizer, eval_problems, recipe)
    eos_ids = eos_token_ids(policy)
    beh, cfg = recipe.behavior, recipe.train
    schedule = SkipSchedule(policy.num_layers, beh.skip_ratio, beh.protect_first, beh.protect_last, beh.schedule, beh.layers, cfg.seed)
    optimizer = build_optimizer(policy, recipe, log)
    total_updates = cfg.steps * recipe.loss.updates_per_batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u, total_updates, cfg.warmup_steps, cfg.lr_schedule))
    generator = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    state = {"step": 0, "skipped_updates": 0, "eval_history": []}
    if ckpt is not None:
        opt_state, rng, state = load_trainer_files(ckpt)
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        schedule.load_state_dict(state["skip_schedule"])
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["generator"])
        log(f"resumed from {ckpt} at step {state['step']}")
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=state["step"] if ckpt else None)
    recipe_text = recipe_to_toml(recipe)

    def checkpoint(step: int) -> Path:
        state["skip_schedule"] = schedule.state_dict()
        rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
        return save_checkpoint(run_dir, step, policy.model, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                               rng, state, recipe_text, keep_last=recipe.checkpoint.keep_last)

    if state["step"] == 0:
        evals = [("before_training", recipe.eval.before_training)]
        if recipe.warmup.steps > 0:
            evals.append(("after_warmup", True))
        for label, wanted in evals:
            if label == "after_warmup":
                from lowres_reft.warmup import run_warmup

                run_warmup(policy, recipe, train_problems, metrics, log)
            if wanted:
                result = run_eval(policy, recipe, eval_problems, eval_prompts, eos_ids, 0, run_dir, state["eval_history"], label)
                metrics.write({"step": 0, "stage": "eval", "label": label, "eval_accuracy": result.accuracy, "eval_n": result.n})
                log(f"eval {label.replace('_', ' ')}: accuracy {result.accuracy:.3f} on {result.n} problems")
    progress = Progress(cfg.steps, state["step"], recipe.log.progress)
    stop = StopFlag()
    step = state["step"]
    try:
        for step in range(state["step"] + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            if policy.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(policy.device)
            # 1. Rollouts: grad_accum batches, each from a freshly drawn nested model (an ensemble of behaviors).
            batches = [
                collect(policy, recipe, train_problems, train_prompts, prompt_indices(step, a, recipe, len(train_prompts)),
                        schedule.draw(), generator, eos_ids)
                for a in range(cfg.grad_accum)
            ]
            # 2. Updates: the corrected GRPO loss, clipped against the first update's log-probs when repeated.
            old_logps: list[torch.Tensor | None] = [None] * len(batches)
            for update in range(recipe.loss.updates_per_batch):
                results = []
                for i, batch in enumerate(batches):
                    res = accumulate_gradients(policy, batch, recipe.loss, recipe.rollout.temperature, cfg.micro_batch_size,
                                               recipe.rollout.max_new_tokens, 1.0 / len(batches), old_logps[i])
                    old_logps[i] = old_logps[i] if old_logps[i] is not None else res["logp"]
                    results.append(res)
                params = [p for p in policy.model.parameters() if p.requires_grad]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                stepped = all(r["finite"] for r in results) and math.isfinite(grad_norm)
                if stepped:
                    optimizer.step()
                else:
                    state["skipped_updates"] += 1
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            # 3. Log.
            record = step_record(step, batches, results, grad_norm, stepped, state, scheduler, policy, t0)
            metrics.write(record)
            progress.update(record)
            if recipe.eval.every and step % recipe.eval.every == 0 and step < cfg.steps:
                result = run_eval(policy, recipe, eval_problems, eval_prompts, eos_ids, step, run_dir, state["eval_history"])
                metrics.write({"step": step, "stage": "eval", "eval_accuracy": result.accuracy, "eval_n": result.n})
                progress.message(f"step {step}: eval accuracy {result.accuracy:.3f}")
            state["step"] = step
            if recipe.checkpoint.every and step % recipe.checkpoint.every == 0 and step < cfg.steps:
                checkpoint(step)
            if stop.requested:
                path = checkpoint(step)
                progress.close()
                log(f"stopped at step {step}; checkpoint {path}; continue with --resume")
                raise KeyboardInterrupt
    finally:
        stop.restore()
        progress.close()
    result = run_eval(policy, recipe, eval_problems, eval_prompts, eos_ids, step, run_dir, state["eval_history"], "final")
    metrics.write({"step": step, "stage": "eval", "label": "final", "eval_accuracy": result.accuracy, "eval_n": result.n})
    path = checkpoint(step)
    log(summary(state["eval_history"], run_dir / "metrics.jsonl", path))
    return run_dir


def step_record(step: int, batches: list[ScoredBatch], results: list[dict], grad_norm: float, stepped: bool,
                state: dict, scheduler, policy: Policy, t0: float) -> dict:
    rewards = torch.cat([b.rewards for b in batches])
    tokens = sum(b.rollout.num_tokens for b in batches)
    seconds = sum(b.rollout.seconds for b in batches)
    lengths = torch.cat([b.rollout.completion_mask.sum(1) for b in batches])
    mean = lambda key: sum(r[key] for r in results) / len(results)  # noqa: E731
    return {
        "step": step,
        "stage": "rl",
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "rollout_accuracy": sum(sum(b.correct) for b in batches) / rewards.numel(),
        "rollout_tokens": tokens,
        "rollout_seconds": seconds,
        "rollout_tokens_per_s": tokens / max(seconds, 1e-9),
        "mean_completion_len": float(lengths.float().mean()),
        "truncated_frac": float(torch.cat([b.rollout.truncated for b in batches]).float().mean()),
        "skip_set": list(batches[0].rollout.skip),
        "skip_sets": [list(b.rollout.skip) for b in batches],
        "rho_mean": mean("rho_mean"),
        "rho_min": min(r["rho_min"] for r in results),
        "rho_max": max(r["rho_max"] for r in results),
        "is_truncated_frac": mean("is_truncated_frac"),
        "ess": mean("ess"),
        "trace_mean": mean("trace_mean"),
        "loss": mean("loss"),
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
