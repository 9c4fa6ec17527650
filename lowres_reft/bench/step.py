"""`lowres-reft bench step`: time and peak memory of full training steps with a recipe's sizes, by phase.

A step: rollouts (prompts_per_step x group_size sequences of exactly max_new_tokens, random prompt tokens, nested
model with the recipe's skip schedule), random rewards (uniform, so group advantages are non-zero), then
`trainer.apply_updates` (the trainer's own update: log-probs, loss, backward, clip, optimizer step, LR scheduler;
`updates_per_batch` times). Phases: rollout; optimizer = `optimizer.step()` only, timed with the optimizer's step
pre/post hooks; logprob_backward = the rest of `apply_updates` (log-probs, loss, backward, grad clipping,
zero_grad, scheduler). Time and peak memory per phase.

This is the one module of the package that imports `trainer` (its builders and its update).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from lowres_reft.bench.common import (
    ModelDir,
    allocated,
    check_positive,
    check_warmup,
    fmt,
    fmt_bytes,
    make_report,
    max_or_none,
    max_rss_bytes,
    median,
    peak_allocated,
    reset_peak,
    sync,
    timed,
    write_json,
)
from lowres_reft.bench.roofline import model_bytes
from lowres_reft.model.shapes import MODEL_SHAPES, infer_shape
from lowres_reft.utils.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="recipes/qwen-1.5b-gsm8k.toml", help="recipe giving the sizes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe key (repeatable)")
    parser.add_argument("--model-config", choices=list(MODEL_SHAPES), help="built-in shape (default: from the recipe's model name)")
    parser.add_argument("--random-weights", action="store_true", help="random weights of the built-in shape (no download)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens per prompt (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache-dir", help="keep the random-weights model here for reuse (default: a temp dir, deleted)")
    parser.add_argument("--json", dest="json_out", help="write the report here")
    parser.add_argument("--plain-forward-too", action="store_true",
                        help="also time each step's log-probs + backward with the per-row prompt forward "
                             "([train] shared_prompt_forward = false), on the same batches, side by side")


def run_step(args: argparse.Namespace) -> int:
    check_positive(steps=args.steps, prompt_len=args.prompt_len)
    check_warmup(args.warmup)
    setup = _setup(args)
    ro, tr = setup.recipe.rollout, setup.recipe.train
    print(f"bench step: {setup.recipe.source}, {setup.num_layers} layers, {tr.grad_accum} x {ro.prompts_per_step} "
          f"prompts x {ro.group_size} completions x {ro.max_new_tokens} tokens, skip ratio {setup.start_ratio}, "
          f"micro-batch {tr.micro_batch_size}, {args.warmup} warm-up + {args.steps} steps on {setup.device}", flush=True)
    phases = _Phases(args, setup)
    results = []
    for index in range(args.warmup + args.steps):
        measured = phases.measure()
        print(f"  step {index + 1}/{args.warmup + args.steps}{' (warm-up)' if index < args.warmup else ''}: rollout "
              f"{measured.rollout_s:.2f} s, log-probs + backward {measured.logprob_backward_s:.2f} s, optimizer "
              f"{measured.optimizer_s:.3f} s", flush=True)
        if index >= args.warmup:
            results.append(_result_row(index - args.warmup + 1, setup, measured, phases.paired))
    report = make_report("bench step", setup.device, _run_config(args, setup), _summary(setup, results), results)
    print(step_table(report))
    write_json(report, args.json_out)
    return 0


# ----------------------------------------------------------------------------------------------------------
# Setup


@dataclass
class _Setup:
    recipe: Any  # with model.name pointing at the random-weights build when a shape is used
    shape: str | None
    device: Any
    policy: Any
    allocated_after_load: int | None
    schedule: Any  # the recipe's skip schedule
    start_ratio: float
    optimizer: Any
    scheduler: Any

    @property
    def num_layers(self) -> int:
        return self.policy.num_layers

    @property
    def sequences(self) -> int:
        """Sequences per rollout batch (one gradient-accumulation slice)."""
        return self.recipe.rollout.prompts_per_step * self.recipe.rollout.group_size


def _resolve_shape(args: argparse.Namespace, recipe) -> str | None:
    """The built-in shape to build with random weights (from --model-config or the recipe's model name), or None."""
    from lowres_reft.model.builtin import TINY_NAME

    shape = args.model_config
    if shape is None and args.random_weights and recipe.model.name != TINY_NAME:
        shape = infer_shape(recipe.model.name)
        if shape not in MODEL_SHAPES:  # random-weight models are built for the Qwen2.5 shapes only
            raise UsageError(f"bench step: no built-in shape for model {recipe.model.name!r}; give --model-config "
                             f"({', '.join(MODEL_SHAPES)})")
    if shape is not None and not args.random_weights:
        raise UsageError("--model-config builds a model from a shape and needs --random-weights")
    return shape


def _setup(args: argparse.Namespace) -> _Setup:
    """Load the recipe and the policy, and build the trainer's skip schedule, optimizer and LR scheduler."""
    import dataclasses
    import tempfile

    from lowres_reft.config import load_recipe
    from lowres_reft.model.loader import load_policy, resolve_device
    from lowres_reft.rl.builders import build_lr_scheduler, build_optimizer, build_skip_schedule, layer_ranking
    from lowres_reft.run.plan import fit_memory

    recipe = load_recipe(args.recipe, args.overrides)
    shape = _resolve_shape(args, recipe)
    device = resolve_device(recipe.model)
    with tempfile.TemporaryDirectory(prefix="lowres-reft-bench-") as scratch, \
            ModelDir(shape, recipe.model.name, args.cache_dir, device, args.seed) as name:
        if shape is not None:
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name=name))
        policy = load_policy(recipe.model, recipe.lora, cache_dir=args.cache_dir or scratch,
                             gradient_checkpointing=recipe.train.gradient_checkpointing, seed=recipe.train.seed)
    recipe, _ = fit_memory(recipe, policy, [[0] * args.prompt_len], log=lambda *a: None)  # "auto" micro-batches
    allocated_after_load = allocated(device)
    ranking = None
    if recipe.behavior.skip_layers == "influence":  # measured on random text, as the bench has no data
        import torch

        vocab = policy.model.get_base_model().config.vocab_size
        gen = torch.Generator().manual_seed(args.seed)
        texts = torch.randint(2, vocab, (recipe.behavior.influence_texts, args.prompt_len), generator=gen).tolist()
        ranking = layer_ranking(policy, recipe, texts)[0]
    schedule = build_skip_schedule(policy.num_layers, recipe, recipe.train.seed, ranking)
    optimizer = build_optimizer(policy, recipe)
    scheduler = build_lr_scheduler(optimizer, recipe, (args.warmup + args.steps) * recipe.loss.updates_per_batch)
    return _Setup(recipe, shape, device, policy, allocated_after_load, schedule, schedule.skip_ratio, optimizer, scheduler)


# ----------------------------------------------------------------------------------------------------------
# Measure


class _OptimizerClock:
    """Times `optimizer.step()` (and its peak memory) inside `trainer.apply_updates` via the optimizer's step hooks."""

    def __init__(self, optimizer, device) -> None:
        self.device = device
        self.seconds, self.peak_before, self.peak, self._start = 0.0, None, None, 0.0
        optimizer.register_step_pre_hook(self.pre)
        optimizer.register_step_post_hook(self.post)

    def reset(self) -> None:
        self.seconds, self.peak_before, self.peak = 0.0, None, None

    def pre(self, *_) -> None:
        sync(self.device)
        self.peak_before = max_or_none(self.peak_before, peak_allocated(self.device))  # the backward phase's peak so far
        reset_peak(self.device)
        self._start = time.perf_counter()

    def post(self, *_) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._start
        self.peak = max_or_none(self.peak, peak_allocated(self.device))
        reset_peak(self.device)


@dataclass
class _Measured:
    """One step: its rollout batches and update outputs, seconds and peak GPU bytes (None on CPU) per phase."""

    batches: list
    outs: list[dict]
    grad_norm: float
    stepped: bool
    rollout_s: float
    logprob_backward_s: float
    optimizer_s: float
    peak_rollout: int | None
    peak_logprob_backward: int | None
    peak_optimizer: int | None


class _Phases:
    """The two timed phases of a training step, run with the trainer's own rollout rows and update."""

    def __init__(self, args: argparse.Namespace, setup: _Setup) -> None:
        import torch

        from lowres_reft.rl.distributed import Dist

        self.setup = setup
        self.generator = torch.Generator(device=setup.device).manual_seed(setup.recipe.train.seed)
        self.cpu_gen = torch.Generator().manual_seed(args.seed)
        self.vocab = setup.policy.model.get_base_model().config.vocab_size
        self.prompt_len = args.prompt_len
        self.clock = _OptimizerClock(setup.optimizer, setup.device)
        self.state = {"skipped_updates": 0}
        self.single = Dist()
        self.plain_forward_too, self.paired = args.plain_forward_too, None

    def rollout(self) -> list:
        """grad_accum batches of full-length rollouts on random prompts, scored with uniform random rewards."""
        import torch

        from lowres_reft.rl import loss as loss_fn
        from lowres_reft.rl.batch import ScoredBatch, rollout_rows
        from lowres_reft.rl.builders import build_engine

        setup, recipe = self.setup, self.setup.recipe
        ro, n_seq = recipe.rollout, setup.sequences
        engine = build_engine(setup.policy, recipe, self.generator, eos_ids=[-1])  # full length
        batches = []
        for _ in range(recipe.train.grad_accum):
            prompts = torch.randint(2, self.vocab, (ro.prompts_per_step, self.prompt_len), generator=self.cpu_gen).tolist()
            rollout = rollout_rows(engine, recipe, prompts, setup.schedule.draw())
            rewards = torch.rand(n_seq, generator=self.cpu_gen).to(rollout.completion_ids.device)
            advantages = loss_fn.group_advantages(rewards, ro.group_size, recipe.loss.advantage_scale,
                                                  recipe.loss.advantage_eps)
            batches.append(ScoredBatch(rollout, rewards, advantages, [False] * n_seq))
        return batches

    def update(self, batches: list) -> tuple:
        """`trainer.apply_updates` on the batches: (per-update results, grad norm, whether the optimizer stepped)."""
        from lowres_reft.rl.batch import global_totals
        from lowres_reft.rl.update import apply_updates

        setup, recipe = self.setup, self.setup.recipe
        totals = [global_totals(b, recipe, self.single) for b in batches]
        return apply_updates(setup.policy, recipe, batches, totals, setup.optimizer, setup.scheduler, self.state,
                             self.single)

    def backward_only(self, batches: list, share_prompt: bool) -> None:
        """The update's log-probs + backward on the batches (no optimizer step; gradients dropped after)."""
        from lowres_reft.rl.batch import global_totals
        from lowres_reft.rl.builders import trainable
        from lowres_reft.rl.update import accumulate_gradients

        setup, recipe = self.setup, self.setup.recipe
        for batch in batches:
            accumulate_gradients(setup.policy, batch, recipe.loss, recipe.rollout.temperature,
                                 recipe.train.micro_batch_size, recipe.rollout.max_new_tokens, 1.0 / len(batches), None,
                                 global_totals(batch, recipe, self.single), share_prompt=share_prompt)
        for p in trainable(setup.policy):
            p.grad = None

    def measure(self) -> _Measured:
        device, clock = self.setup.device, self.clock
        t_rollout, peak_rollout, batches = timed(self.rollout, device)
        if self.plain_forward_too:  # both forwards on the same batches and weights, the shared one first
            self.paired = [timed(self.backward_only, device, batches, share)[0] for share in (True, False)]
        clock.reset()
        t_update, peak_rest, (outs, grad_norm, stepped) = timed(self.update, device, batches)
        return _Measured(batches, outs, grad_norm, stepped, rollout_s=t_rollout, logprob_backward_s=t_update - clock.seconds,
                         optimizer_s=clock.seconds, peak_rollout=peak_rollout,
                         peak_logprob_backward=max_or_none(clock.peak_before, peak_rest), peak_optimizer=clock.peak)


# ----------------------------------------------------------------------------------------------------------
# Report


def _result_row(step: int, setup: _Setup, m: _Measured, paired: list[float] | None = None) -> dict:
    num_layers = setup.num_layers
    tokens = sum(b.rollout.num_tokens for b in m.batches)
    peaks = [p for p in (m.peak_rollout, m.peak_logprob_backward, m.peak_optimizer) if p is not None]
    return {
        "step": step,
        "skip_sets": [list(b.rollout.skip) for b in m.batches],
        "layers_total": num_layers,
        "layers_kept": [num_layers - len(b.rollout.skip) for b in m.batches],
        "sequences": setup.sequences * len(m.batches),
        "rollout_tokens": tokens,
        "rollout_seconds": m.rollout_s,
        "rollout_tokens_per_s": tokens / m.rollout_s,
        "logprob_backward_seconds": m.logprob_backward_s,
        "optimizer_seconds": m.optimizer_s,
        "step_seconds": m.rollout_s + m.logprob_backward_s + m.optimizer_s,
        "peak_gpu_mem_rollout_bytes": m.peak_rollout,
        "peak_gpu_mem_logprob_backward_bytes": m.peak_logprob_backward,
        "peak_gpu_mem_optimizer_bytes": m.peak_optimizer,
        "peak_gpu_mem_bytes": max(peaks) if peaks else None,
        "max_rss_bytes": max_rss_bytes(),
        "loss": sum(r["loss"] for r in m.outs) / len(m.outs),
        "grad_norm": m.grad_norm,
        "update_skipped": not m.stepped,
        # --plain-forward-too: log-probs + backward of the same batches, shared prompt forward vs per-row forward
        "backward_only_shared_seconds": None if paired is None else paired[0],
        "backward_only_plain_seconds": None if paired is None else paired[1],
    }


def _summary(setup: _Setup, results: list[dict]) -> dict:
    phases = ("rollout_seconds", "logprob_backward_seconds", "optimizer_seconds", "step_seconds")
    summary = {f"median_{key}": median([row[key] for row in results]) for key in phases}
    summary["median_rollout_tokens_per_s"] = median([row["rollout_tokens_per_s"] for row in results])
    summary["median_rollout_share"] = median([row["rollout_seconds"] / row["step_seconds"] for row in results])
    if results[0]["backward_only_plain_seconds"] is not None:
        summary["median_plain_over_shared"] = median([row["backward_only_plain_seconds"] / row["backward_only_shared_seconds"]
                                                      for row in results])
    for key in ("peak_gpu_mem_rollout_bytes", "peak_gpu_mem_logprob_backward_bytes", "peak_gpu_mem_optimizer_bytes",
                "peak_gpu_mem_bytes"):
        summary[key] = max(row[key] for row in results) if setup.device.type == "cuda" else None
    summary["allocated_after_load_bytes"] = setup.allocated_after_load
    summary["model_bytes"] = model_bytes(setup.policy.model)
    summary["max_rss_bytes"] = max_rss_bytes()
    return summary


def _run_config(args: argparse.Namespace, setup: _Setup) -> dict:
    recipe, shape, policy = setup.recipe, setup.shape, setup.policy
    ro, tr = recipe.rollout, recipe.train
    return {
        "recipe": recipe.source, "overrides": list(args.overrides), "model_config": shape,
        "model": None if shape else recipe.model.name, "random_weights": bool(args.random_weights or shape),
        "num_layers": setup.num_layers, "load_in_4bit": recipe.model.load_in_4bit, "dtype": recipe.model.dtype,
        "device": str(setup.device), "prompts_per_step": ro.prompts_per_step, "group_size": ro.group_size,
        "max_new_tokens": ro.max_new_tokens, "prompt_len": args.prompt_len, "rollout_micro_batch": ro.micro_batch,
        "skip_ratio": setup.start_ratio, "schedule": recipe.behavior.schedule, "grad_accum": tr.grad_accum,
        "micro_batch_size": tr.micro_batch_size, "gradient_checkpointing": tr.gradient_checkpointing,
        "shared_prompt_forward": tr.shared_prompt_forward,
        "optimizer": tr.optimizer, "optimizer_class": type(setup.optimizer).__name__,
        "updates_per_batch": recipe.loss.updates_per_batch,
        "correction": recipe.loss.correction, "kl_beta": recipe.loss.kl_beta, "lora_r": recipe.lora.r,
        "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
        "trainable_params": policy.trainable_params, "total_params": policy.total_params,
    }


def step_table(report: dict) -> str:
    head = (f"{'step':>4} {'rollout s':>10} {'tok/s':>9} {'logp+bwd s':>11} {'optim s':>8} {'total s':>8} "
            f"{'mem roll':>9} {'mem bwd':>9} {'mem opt':>9} {'loss':>9} {'kept':>8}")
    lines = [head, "-" * len(head)]
    for row in report["results"]:
        lines.append(
            f"{row['step']:>4} {row['rollout_seconds']:>10.3f} {row['rollout_tokens_per_s']:>9.1f} "
            f"{row['logprob_backward_seconds']:>11.3f} {row['optimizer_seconds']:>8.3f} {row['step_seconds']:>8.3f} "
            f"{fmt_bytes(row['peak_gpu_mem_rollout_bytes']):>9} {fmt_bytes(row['peak_gpu_mem_logprob_backward_bytes']):>9} "
            f"{fmt_bytes(row['peak_gpu_mem_optimizer_bytes']):>9} {fmt(row['loss'], '.4f'):>9} "
            f"{','.join(str(k) for k in row['layers_kept']):>8}")
    s = report["summary"]
    lines.append(f"median step {s['median_step_seconds']:.3f}s (rollout {s['median_rollout_seconds']:.3f}s, "
                 f"logprob+backward {s['median_logprob_backward_seconds']:.3f}s, optimizer {s['median_optimizer_seconds']:.3f}s); "
                 f"peak GPU memory {fmt_bytes(s['peak_gpu_mem_bytes'])}; max RSS {fmt_bytes(s['max_rss_bytes'])}; "
                 f"device {report['device']['name']}; rollouts {100 * s['median_rollout_share']:.0f}% of a step")
    if "median_plain_over_shared" in s:
        lines.append(f"log-probs + backward, same batches: per-row prompt forward / shared prompt forward = "
                     f"{s['median_plain_over_shared']:.2f}x (median)")
    return "\n".join(lines)
