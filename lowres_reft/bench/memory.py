"""`lowres-reft bench memory`: the memory plan (`run.plan`) beside the measured peak of each phase.

A recipe's sizes on a random-weights model of a built-in shape (`--layers N` builds it with N decoder layers, so the
big shapes stay quick on a CPU; the plan is made for the same N). After one optimizer step on zero gradients (so the
optimizer's states exist, as in every step but the first), it measures, each from a reset peak:
- rollout: the training engine's `generate` of prompts_per_step x group_size random prompts of exactly
  `--prompt-len` tokens, every row running to max_new_tokens (no stop token), with a skip set of the recipe's ratio;
- logprob: the trainer's `accumulate_gradients` over that batch (micro-batches, shared prompt forward, backward);
- optimizer: `optimizer.step()` with those gradients;
- eval: greedy generation with the full model, `[eval] batch_size` rows of the same prompts.
Peaks: `torch.cuda.max_memory_allocated` on a GPU; on a CPU the live tensor bytes (`live_bytes.LiveBytes`, seeded
with the model's parameters, quantization state, gradients, optimizer states and the rollout batch).
"""

from __future__ import annotations

import argparse
from typing import Any

from lowres_reft.bench.common import ModelDir, fmt_bytes, make_report, write_json
from lowres_reft.model.shapes import MODEL_SHAPES, infer_shape
from lowres_reft.utils.errors import UsageError

PHASES = ("rollout", "logprob", "optimizer", "eval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="recipes/qwen-1.5b-gsm8k.toml", help="recipe giving the sizes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--model-config", choices=list(MODEL_SHAPES), help="built-in shape (default: from the recipe)")
    parser.add_argument("--random-weights", action="store_true", help="random weights of the built-in shape")
    parser.add_argument("--layers", type=int, help="decoder layers of the random model (default: the shape's)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per prompt (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache-dir", help="keep the random-weights model here for reuse")
    parser.add_argument("--json", dest="json_out", help="write the report here")


def run_memory(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from lowres_reft.config import load_recipe
    from lowres_reft.model.loader import load_policy, resolve_device
    from lowres_reft.model.shapes import ModelShape
    from lowres_reft.rl.builders import build_optimizer
    from lowres_reft.run.plan import fit_memory, plan_memory

    if args.layers is not None and args.layers < 2:
        raise UsageError(f"--layers must be >= 2, got {args.layers}")
    if args.prompt_len < 1:
        raise UsageError(f"--prompt-len must be >= 1, got {args.prompt_len}")
    recipe = load_recipe(args.recipe, args.overrides)
    shape = args.model_config or infer_shape(recipe.model.name)
    if shape not in MODEL_SHAPES or not args.random_weights:  # random-weight models: the Qwen2.5 shapes
        raise UsageError("bench memory: give --model-config SHAPE --random-weights (a shape of: " + ", ".join(MODEL_SHAPES) + ")")
    device = resolve_device(recipe.model)
    with ModelDir(shape, None, args.cache_dir, device, args.seed, args.layers) as name:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name=name))
        policy = load_policy(recipe.model, recipe.lora, cache_dir=args.cache_dir or ".",
                             gradient_checkpointing=recipe.train.gradient_checkpointing, seed=recipe.train.seed)
    recipe, _ = fit_memory(recipe, policy, [[0] * args.prompt_len], log=lambda *a: None)  # "auto" micro-batches
    optimizer = build_optimizer(policy, recipe, log=lambda *a: None)
    plan = plan_memory(ModelShape.from_config(policy.model.get_base_model().config), recipe, args.prompt_len,
                       on_gpu=device.type == "cuda")
    measured = _measure(args, recipe, policy, optimizer, torch)
    rows = [{"phase": p, "plan_bytes": plan.phase(p).total, "measured_bytes": measured[p],
             "plan_over_measured": plan.phase(p).total / measured[p]} for p in PHASES]
    print(f"bench memory: {shape}" + (f" with {args.layers} layers" if args.layers else "") + f", {recipe.model.dtype}, "
          f"{'4-bit NF4' if recipe.model.load_in_4bit else '16-bit'} + LoRA r={recipe.lora.r} on {device}; "
          f"{plan.settings}")
    print(f"{'phase':<10} {'plan':>10} {'measured':>10} {'plan/meas':>9}")
    for row in rows:
        print(f"{row['phase']:<10} {fmt_bytes(row['plan_bytes']):>10} {fmt_bytes(row['measured_bytes']):>10} "
              f"{row['plan_over_measured']:>9.3f}")
    config = {"recipe": args.recipe, "overrides": args.overrides, "model_config": shape, "layers": args.layers,
              "prompt_len": args.prompt_len, **plan.settings}
    report = make_report("bench memory", device, config, {"plan_items": {p.name: p.items for p in plan.phases}}, rows)
    write_json(report, args.json_out)
    return 0


def _measure(args: argparse.Namespace, recipe, policy, optimizer, torch) -> dict[str, int]:
    from lowres_reft.bench.live_bytes import LiveBytes, model_tensors
    from lowres_reft.model.nested import SkipSchedule
    from lowres_reft.rl import loss as L
    from lowres_reft.rl.batch import ScoredBatch, global_totals
    from lowres_reft.rl.builders import build_engine, trainable
    from lowres_reft.rl.distributed import Dist
    from lowres_reft.rl.update import accumulate_gradients
    from lowres_reft.rollout.engine import make_engine

    device, model, ro = policy.device, policy.model, recipe.rollout
    params = trainable(policy)
    for p in params:  # one step on zero gradients: the optimizer's states exist from here on, as after step 1
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.get_base_model().config.vocab_size
    prompts = torch.randint(2, vocab, (ro.prompts_per_step, args.prompt_len), generator=gen).tolist()
    rows = [p for p in prompts for _ in range(ro.group_size)]
    beh = recipe.behavior
    skip = SkipSchedule(policy.num_layers, beh.skip_ratio, beh.protect_first, beh.protect_last, seed=args.seed).draw()
    engine = build_engine(policy, recipe, torch.Generator(device=device).manual_seed(args.seed), eos_ids=[-1])

    def peak(fn, extra=()):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = fn()
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device)), out
        with LiveBytes(model_tensors(model, optimizer) + list(extra)) as live:
            out = fn()
        return live.peak, out

    measured: dict[str, Any] = {}
    measured["rollout"], batch = peak(lambda: engine.generate(rows, skip))
    rewards = torch.rand(len(rows), generator=gen).to(device)
    scored = ScoredBatch(batch, rewards, L.group_advantages(rewards, ro.group_size), [False] * len(rows))
    totals = global_totals(scored, recipe, Dist())
    batch_tensors = [batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                     batch.behavior_logp, rewards, scored.advantages]
    measured["logprob"], _ = peak(lambda: accumulate_gradients(
        policy, scored, recipe.loss, ro.temperature, recipe.train.micro_batch_size, ro.max_new_tokens, 1.0, None, totals,
        share_prompt=recipe.train.shared_prompt_forward), batch_tensors)
    measured["optimizer"], _ = peak(optimizer.step, batch_tensors)
    optimizer.zero_grad(set_to_none=True)
    evaluator = make_engine(ro.engine, model, max_new_tokens=recipe.eval.max_new_tokens, eos_ids=[-1],
                            pad_id=policy.tokenizer.pad_token_id, greedy=True, weights=ro.weights)
    eval_rows = (rows * -(-recipe.eval.batch_size // len(rows)))[: recipe.eval.batch_size]
    measured["eval"], _ = peak(lambda: evaluator.generate(eval_rows), batch_tensors)
    return measured
