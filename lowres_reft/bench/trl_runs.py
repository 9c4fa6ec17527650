"""The runs behind `lowres-reft bench trl`: the shared start, one training run per tool, the shared evaluation.

How each setting is matched between TRL's `GRPOTrainer` and our trainer (the point of the benchmark):
- start: `prepare_base` builds the recipe's tiny pretrained base, runs our supervised warm-up (`[warmup]`) on it
  once per seed, merges the adapters into the dequantized base and saves a plain float32 HF model directory.
  Both tools load that directory through `model.load_policy` (4-bit NF4, fresh LoRA with the recipe's r / alpha /
  targets / dropout, seeded init, float32 LoRA weights), so both start from the same weights bit for bit.
  TRL casts LoRA weights of quantized models to bf16 when the trainer is built; `build_trl_trainer` casts them
  back to float32 (the same `Parameter` objects, so the optimizer keeps them).
- prompts and order: our order is `trainer.prompt_indices(step, 0, ...)`; `trl_rows` lays the dataset out in that
  order and TRL runs with `shuffle_dataset=False`, so its `RepeatSampler` walks it sequentially, each prompt
  repeated `num_generations` times side by side, one generation batch per step (= our group-contiguous rows).
  The prompt text is our `format_prompt` output, passed as a plain string (TRL tokenizes it as is, no chat
  template; the builtin tokenizer adds no special tokens, which the tests check).
- reward: our `rewards.score` with the recipe's `[reward]` settings, wrapped as a TRL reward function.
- sampling: group size, prompts per step, max_new_tokens, temperature, top_p (top_k off, no repetition penalty).
- update: the optimizer and LR scheduler are OURS (`trainer.build_optimizer` / `build_lr_scheduler`: AdamW, weight
  decay, the recipe's schedule with its warm-up) handed to TRL's Trainer, so the LR per update is identical;
  max_grad_norm; beta = [loss] kl_beta (0: no KL, no reference model); loss_type from [loss] aggregation
  (token_mean = "dapo", seq_mean = "grpo", dr_grpo = "dr_grpo"); scale_rewards from advantage_scale;
  num_iterations = 1, one update per batch, no eval and no checkpoints during training, bf16 off.
  Our on-policy variant ("ours-r0") skips no layer and uses correction "none": its ratio is exactly 1, as TRL's
  is with num_iterations = 1.
Measured in the child process: per-step wall time (ours: the trainer's `step_seconds`; TRL: a callback from
`on_step_begin` to `on_step_end`), rollout tokens (completion tokens up to and including the end-of-text token)
and the time spent sampling (ours: the sampling loop's own clock; TRL: the model's `generate` wrapped with a
clock), and the child's peak RSS. Held-out accuracy: `evaluate_adapter`, the same code for both tools.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from lowres_reft.utils.errors import UsageError

LOSS_TYPES = {"token_mean": "dapo", "seq_mean": "grpo", "dr_grpo": "dr_grpo"}
SCALE_REWARDS = {"std": "group", "none": "none"}
# What the variants change in the recipe (ours); "trl" runs the recipe's settings through TRL.
OURS_OVERRIDES = {
    "ours-r0": ["behavior.skip_ratio=0", 'loss.correction="none"'],
    "ours-r0.25": [],  # the recipe's own nested settings (tiny-cpu: r = 0.25, Retrace)
}


def check_comparable(recipe) -> None:
    """Settings TRL's GRPOTrainer cannot mirror: refuse them with one line."""
    if recipe.train.grad_accum != 1:
        raise UsageError("bench trl: [train] grad_accum must be 1 (one rollout batch per update, like TRL's default)")
    if recipe.loss.updates_per_batch != 1:
        raise UsageError("bench trl: [loss] updates_per_batch must be 1 (TRL num_iterations = 1)")
    if recipe.model.device == "cuda":
        raise UsageError('bench trl: runs on the CPU; set model.device="cpu"')


# ----------------------------------------------------------------------------------------------------------
# The shared start


def prepare_base(recipe, seed: int, target: Path, log=print) -> Path:
    """The recipe's base + our supervised warm-up (seeded; with its skip distillation when the recipe has one, at
    the recipe's skip ratio), merged into a float32 HF model directory at `target`."""
    import torch

    from lowres_reft.data.datasets import load_problems
    from lowres_reft.model.loader import load_policy
    from lowres_reft.rl.warmup import run_warmup
    from lowres_reft.run.export import merge_dequantized
    from lowres_reft.run.metrics import NullLog
    from lowres_reft.run.plan import fit_memory

    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, seed=seed))
    policy = load_policy(recipe.model, recipe.lora, recipe.log.output_dir, seed=seed)
    recipe, _ = fit_memory(recipe, policy, [], log)  # "auto" micro-batches
    if recipe.warmup.steps > 0 or recipe.warmup.skip_distill_steps > 0:
        torch.manual_seed(seed)
        run_warmup(policy, recipe, load_problems(recipe.data, "train"), NullLog(), log)
    policy.model.eval()
    with torch.no_grad():
        merged = merge_dequantized(policy.model).to(torch.float32)
    merged.config.dtype = torch.float32
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    policy.tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def base_model_config(recipe, base: Path):
    """The recipe's [model] pointing at the merged start (4-bit NF4 as the recipe says)."""
    return dataclasses.replace(recipe.model, name=str(base.resolve()))


# ----------------------------------------------------------------------------------------------------------
# The TRL side


def trl_rows(problems, prompt_texts: list[str], recipe, steps: int) -> list[dict]:
    """The TRL dataset: one row per prompt in our trainer's order (`prompt_indices` of steps 1..steps)."""
    from lowres_reft.rl.batch import prompt_indices

    rows = []
    for step in range(1, steps + 1):
        for i in prompt_indices(step, 0, recipe, len(problems)):
            rows.append({"prompt": prompt_texts[i], "answer": problems[i].answer, "index": i})
    return rows


def trl_reward(recipe):
    """Our reward (`rewards.score` with the recipe's [reward] settings) as a TRL reward function."""
    from lowres_reft.data.rewards import score

    cfg = recipe.reward

    def lowres_reft_reward(completions, answer, **_):
        return score(completions, answer, cfg.functions, cfg.format_weight, cfg.require_final_answer, cfg.timeout_s).rewards

    return lowres_reft_reward


def grpo_config(recipe, steps: int, seed: int, output_dir: Path):
    from trl import GRPOConfig

    ro, tr, lo = recipe.rollout, recipe.train, recipe.loss
    return GRPOConfig(
        output_dir=str(output_dir), max_steps=steps, seed=seed, data_seed=seed,
        per_device_train_batch_size=ro.prompts_per_step * ro.group_size, gradient_accumulation_steps=1,
        num_generations=ro.group_size, max_completion_length=ro.max_new_tokens, shuffle_dataset=False,
        temperature=ro.temperature, top_p=ro.top_p, top_k=0, repetition_penalty=1.0,
        learning_rate=tr.lr, weight_decay=tr.weight_decay, max_grad_norm=tr.max_grad_norm,
        beta=lo.kl_beta, loss_type=LOSS_TYPES[lo.aggregation], scale_rewards=SCALE_REWARDS[lo.advantage_scale],
        epsilon=lo.clip_eps, epsilon_high=lo.clip_eps_high, num_iterations=1, mask_truncated_completions=False,
        gradient_checkpointing=tr.gradient_checkpointing, bf16=False, fp16=False, use_cpu=True,
        eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10,
        dataloader_num_workers=0, remove_unused_columns=False,
    )


class Clock:
    """Per-step times (a TRL callback) and generation time/tokens (a wrapper around the model's `generate`)."""

    def __init__(self, eos_ids: list[int]) -> None:
        self.eos_ids = eos_ids
        self.step_seconds: list[float] = []
        self.rollout_seconds: list[float] = []
        self.rollout_tokens: list[int] = []
        self._start = 0.0
        self._gen_seconds = 0.0
        self._gen_tokens = 0

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class StepClock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock._start, clock._gen_seconds, clock._gen_tokens = time.perf_counter(), 0.0, 0

            def on_step_end(self, args, state, control, **kwargs):
                clock.step_seconds.append(time.perf_counter() - clock._start)
                clock.rollout_seconds.append(clock._gen_seconds)
                clock.rollout_tokens.append(clock._gen_tokens)

        return StepClock()

    def wrap_generate(self, model) -> None:
        import torch

        inner = model.generate

        def generate(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self._gen_seconds += time.perf_counter() - start
            prompt_len = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
            completion = out[:, prompt_len:]
            is_eos = torch.isin(completion, torch.tensor(self.eos_ids, device=completion.device))
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completion.shape[1])
            self._gen_tokens += int(first.sum())
            return out

        model.generate = generate


def build_trl_trainer(recipe, base: Path, seed: int, steps: int, output_dir: Path, clock: Clock | None = None):
    """TRL's GRPOTrainer on the merged start, our prompts in our order, our reward, optimizer and LR schedule."""
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    from lowres_reft.data.datasets import load_problems
    from lowres_reft.data.prompts import encode_prompts, format_prompt
    from lowres_reft.model.loader import load_policy
    from lowres_reft.rl.builders import build_lr_scheduler, build_optimizer

    policy = load_policy(base_model_config(recipe, base), recipe.lora, recipe.log.output_dir, seed=seed)
    problems = load_problems(recipe.data, "train")
    texts = [format_prompt(policy.tokenizer, p.question, recipe.data) for p in problems]
    ours = encode_prompts(policy.tokenizer, problems, recipe)
    if any(len(policy.tokenizer(t)["input_ids"]) != len(ids) for t, ids in zip(texts, ours)):
        raise UsageError("bench trl: TRL would tokenize the prompts differently (special tokens or [data] "
                         "max_prompt_tokens truncation); the comparison needs identical prompt tokens")
    optimizer = build_optimizer(policy, recipe, log=lambda *a: None)
    scheduler = build_lr_scheduler(optimizer, recipe, steps)
    trainer = GRPOTrainer(
        model=policy.model, reward_funcs=[trl_reward(recipe)], args=grpo_config(recipe, steps, seed, output_dir),
        train_dataset=Dataset.from_list(trl_rows(problems, texts, recipe, steps)), processing_class=policy.tokenizer,
        optimizers=(optimizer, scheduler), callbacks=[clock.callback()] if clock else None,
    )
    for param in policy.model.parameters():  # undo TRL's bf16 cast of quantized models' LoRA weights
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
    if clock is not None:
        clock.wrap_generate(policy.model)
    return trainer, policy


def run_trl(recipe, base: Path, seed: int, steps: int, run_dir: Path, save_every: int = 0) -> dict:
    """TRL's training run; `save_every` > 0 also saves the adapter after every that many steps (but the last)."""
    from lowres_reft.model.loader import eos_token_ids

    clock = Clock([])
    trainer, policy = build_trl_trainer(recipe, base, seed, steps, run_dir / "trl", clock)
    clock.eos_ids = eos_token_ids(policy)
    saved: list[list] = []
    if save_every:
        trainer.add_callback(adapter_saver(save_every, steps, run_dir, saved))
    trainer.train()
    adapter = run_dir / "adapter"
    policy.model.save_pretrained(adapter, safe_serialization=True)
    return {"step_seconds": clock.step_seconds, "rollout_seconds": clock.rollout_seconds,
            "rollout_tokens": clock.rollout_tokens, "adapter": str(adapter), "checkpoints": saved}


def adapter_saver(every: int, steps: int, run_dir: Path, saved: list):
    """A TRL callback saving the adapter to `run_dir/adapter-step-N` after steps N = every, 2 every, ... < steps.

    Added after the clock's callback, so the save happens after the step's time is taken (not counted)."""
    from transformers import TrainerCallback

    class AdapterSaver(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step % every == 0 and step < steps:
                path = run_dir / f"adapter-step-{step}"
                model.save_pretrained(path, safe_serialization=True)
                saved.append([step, str(path)])

    return AdapterSaver()


# ----------------------------------------------------------------------------------------------------------
# Our side


def ours_overrides(variant: str, seed: int, steps: int, run_dir: Path) -> list[str]:
    """Recipe overrides of our run: the variant's, the seed and steps, no warm-up/eval/checkpoints mid-run."""
    return OURS_OVERRIDES[variant] + [
        f"train.seed={seed}", f"train.steps={steps}", "warmup.steps=0", "warmup.skip_distill_steps=0",
        "eval.before_training=false", "eval.every=0",
        "checkpoint.every=0", "log.progress=none", f"log.output_dir={run_dir.parent}", f"log.run_name={run_dir.name}",
        "data.max_eval_samples=1",  # the trainer's own final eval is not the measurement: keep it minimal
    ]


def run_ours(recipe, base: Path, run_dir: Path) -> dict:
    """Our trainer on the merged start (`recipe` already carries `ours_overrides`)."""
    from lowres_reft.run.loop import train

    recipe = dataclasses.replace(recipe, model=base_model_config(recipe, base))
    out = train(recipe)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rl = [r for r in records if r.get("stage") == "rl"]
    return {"step_seconds": [r["step_seconds"] for r in rl], "rollout_seconds": [r["rollout_seconds"] for r in rl],
            "rollout_tokens": [r["rollout_tokens"] for r in rl], "adapter": str(out / "checkpoint-last" / "adapter")}


# ----------------------------------------------------------------------------------------------------------
# The shared evaluation


def evaluate_adapter(recipe, base: Path, adapter: Path | None) -> float:
    """Greedy held-out accuracy of the merged start in 4-bit + `adapter` (None: the start itself)."""
    from lowres_reft.data.datasets import load_problems
    from lowres_reft.data.prompts import encode_prompts
    from lowres_reft.model.loader import eos_token_ids, load_policy
    from lowres_reft.rollout.engine import make_engine
    from lowres_reft.run.evaluation import evaluate

    policy = load_policy(base_model_config(recipe, base), recipe.lora, recipe.log.output_dir, adapter_dir=adapter)
    problems = load_problems(recipe.data, "eval")
    prompts = encode_prompts(policy.tokenizer, problems, recipe)
    engine = make_engine(recipe.rollout.engine, policy.model, max_new_tokens=recipe.eval.max_new_tokens,
                         eos_ids=eos_token_ids(policy), pad_id=policy.tokenizer.pad_token_id, greedy=True)
    return evaluate(engine, policy.tokenizer, problems, prompts, recipe.eval.batch_size,
                    require_final=recipe.reward.require_final_answer).accuracy


# ----------------------------------------------------------------------------------------------------------
# Child process entry: `python -m lowres_reft.bench.trl_runs SPEC.json` (one training run, then exit)


def child_main(spec_path: str) -> int:
    import os
    import warnings

    import torch

    from lowres_reft.bench.common import max_rss_bytes
    from lowres_reft.config import load_recipe

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    run_dir, base, variant, seed, steps = Path(spec["run_dir"]), Path(spec["base"]), spec["variant"], spec["seed"], spec["steps"]
    start = time.perf_counter()
    if variant == "trl":
        result = run_trl(load_recipe(spec["recipe"], spec["overrides"]), base, seed, steps, run_dir,
                         spec.get("save_every", 0))
    else:
        recipe = load_recipe(spec["recipe"], spec["overrides"] + ours_overrides(variant, seed, steps, run_dir))
        result = run_ours(recipe, base, run_dir)
    result.update(max_rss_bytes=max_rss_bytes(), wall_seconds=time.perf_counter() - start,
                  torch_threads=torch.get_num_threads())
    tmp = Path(spec["result"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(spec["result"])
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
