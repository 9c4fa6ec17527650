"""`lowres-reft eval TARGET`: accuracy of a model on a math data set, with a confidence interval.

TARGET is one of
  * a run checkpoint (`runs/<run>/checkpoint-000010`, `runs/<run>/checkpoint-last`): a directory with
    `adapter/` and `recipe.toml`. The recipe's base model is loaded as the recipe says (4-bit NF4 by default)
    and the adapter on top, exactly as during training (`load_policy`); `builtin:tiny` bases are found in the
    directory holding the run, as `export` does. A run directory (`runs/<run>`) means its `checkpoint-last`
    (or, without that link, its newest checkpoint that verifies).
  * a merged export or any plain Hugging Face model directory (has `config.json`), or a hub name: loaded with
    `AutoModelForCausalLM`, no LoRA, in `--dtype` ("auto": bf16/fp16 on CUDA, float32 on CPU), or 4-bit NF4
    with `--load-in-4bit`.
  * `builtin:tiny`: the untrained builtin tiny model (the tiny-cpu recipe's sizes), cached under `--cache-dir`.

Data: `--data` (default: the checkpoint recipe's `[data]`, else gsm8k) through `data.load_problems` with
`eval_split = --split` and `max_eval_samples = --n` (default: the whole split; the first N of the split
shuffled with the recipe's `shuffle_seed`, 0 by default, so every model sees the same N problems). Prompts go
through the same `format_prompt`/`encode_prompts` as training; a checkpoint keeps its recipe's prompt settings
(system prompt, chat template, max prompt tokens).

Decoding: greedy by default (pass@1 = accuracy). With `--temperature T > 0` every problem gets `--samples S`
(default `--k`) sampled completions and the command reports pass@k with the unbiased estimator
1 - C(S-c, k) / C(S, k) (c correct out of S; with S = k that is "any of the k is correct"), averaged over the
problems, plus the mean per-sample accuracy (the unbiased pass@1). Sampling is seeded (`--seed`).

Confidence intervals: 95% Wilson score intervals over the n problems. For greedy pass@1 (and sampled pass@k
with S = k) the per-problem scores are 0/1 and this is the usual binomial interval; for fractional per-problem
scores (S > k, or pass@1 from several samples) the interval uses the sum of the scores as the success count,
which is conservative (a [0, 1] variable with mean p has variance <= p(1 - p)).

Output: a summary on stdout (or one JSON object with `--json`, the text then goes to stderr) and a JSONL of
per-problem predictions, written atomically (temp file + rename) after the whole evaluation:
  `--out FILE`, default
    * checkpoint: `<run dir>/eval-<checkpoint-NNNNNN>-<data>-<split>[-n<N>][-k<K>-t<T>].jsonl` (next to the
      checkpoints, not inside one: checkpoints are pruned by `keep_last`);
    * other targets: `./<model dir or hub name's last part>-eval-<data>-<split>[...].jsonl`.
One row per problem: index, question, gold, completions, answers (extracted), correct (flags), truncated
(flags), score (the problem's pass@k estimate).

Errors (target missing or not a model/checkpoint, bad numbers, data problems) are one-line `UsageError`s,
raised before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowres_reft.run.targets import Target, resolve_target
from lowres_reft.utils.errors import UsageError

DEFAULT_DATA = "gsm8k"
DEFAULT_SPLIT = "test"
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_BATCH_SIZE = 32


# ------------------------------------------------------------------------------------------ arguments


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="accuracy (pass@1 / pass@k with a 95%% CI) of a checkpoint, merged model or hub model",
        description="Evaluate a run checkpoint, a run dir (its checkpoint-last), a merged/plain HF model dir, "
                    "a hub name or builtin:tiny on a math data set. Greedy pass@1 by default; --temperature "
                    "with --k samples completions and reports pass@k. Writes per-problem predictions as JSONL.",
    )
    p.add_argument("target", help="runs/<run>/checkpoint-NNNNNN, runs/<run>, a model dir, a hub name, or builtin:tiny")
    from lowres_reft.data.datasets import KNOWN_DATASETS

    p.add_argument("--data", help=f"dataset: {', '.join(KNOWN_DATASETS)} (default: a checkpoint's recipe [data], else gsm8k)")
    p.add_argument("--data-path", help="local copy of the dataset (file or directory); required for jsonl/parquet/csv")
    p.add_argument("--split", help="split to evaluate (default: a checkpoint's eval_split, else test)")
    p.add_argument("--n", type=int, help="evaluate the first N problems of the (seeded-shuffled) split (default: all)")
    p.add_argument("--k", type=int, default=1, help="report pass@k (default 1); k > 1 needs --temperature > 0")
    p.add_argument("--samples", type=int, help="completions per problem when sampling (default: k; must be >= k)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, help="sequences generated at once (default: a checkpoint's [eval] batch_size, else 32)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per completion at most (default: a checkpoint's [eval] max_new_tokens, else 512)")
    p.add_argument("--out", help="predictions JSONL (default: next to the checkpoints for a checkpoint, else ./<model>-eval-<data>-<split>.jsonl)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="load the base in 4-bit NF4 (default: the checkpoint recipe's setting; off for plain models)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype (default: the checkpoint recipe's; auto for plain models: bf16/fp16 on CUDA, float32 on CPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run (default: the checkpoint recipe's, else auto: CUDA when available)")
    p.add_argument("--system-prompt", help="override the system prompt (chat-template models)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="use the tokenizer's chat template when it has one (default: on, or the recipe's)")
    p.add_argument("--cache-dir", default="runs", help="where builtin:tiny is built/cached (default runs/)")
    return p


@dataclass
class Settings:
    greedy: bool
    k: int
    samples: int
    temperature: float
    top_p: float
    seed: int
    batch_size: int
    max_new_tokens: int


def _settings(args: argparse.Namespace, recipe) -> Settings:
    if args.k < 1:
        raise UsageError(f"--k {args.k}: must be >= 1")
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n {args.n}: must be >= 1 (or leave it out for the whole split)")
    from lowres_reft.config import MAX_SEED, MIN_TEMPERATURE

    if not math.isfinite(args.temperature) or args.temperature < 0 or 0 < args.temperature < MIN_TEMPERATURE:
        raise UsageError(f"--temperature {args.temperature}: must be 0 (greedy) or >= {MIN_TEMPERATURE:g}")
    if not 0 <= args.seed < MAX_SEED:
        raise UsageError(f"--seed {args.seed}: must be in [0, 2^63)")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p {args.top_p}: must be in (0, 1]")
    greedy = args.temperature == 0.0
    samples = args.samples if args.samples is not None else args.k
    if samples < args.k:
        raise UsageError(f"--samples {samples}: must be >= --k {args.k}")
    if greedy and samples > 1:
        raise UsageError(
            f"--k {args.k} / --samples {samples} with greedy decoding would repeat one completion; "
            "add --temperature > 0 (e.g. --temperature 0.6) to sample"
        )
    batch_size = args.batch_size if args.batch_size is not None else (recipe.eval.batch_size if recipe else DEFAULT_BATCH_SIZE)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (
        recipe.eval.max_new_tokens if recipe else DEFAULT_MAX_NEW_TOKENS)
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    if max_new < 1:
        raise UsageError(f"--max-new-tokens {max_new}: must be >= 1")
    return Settings(greedy, args.k, samples, args.temperature, args.top_p, args.seed, batch_size, max_new)


def _data_config(args: argparse.Namespace, recipe):
    from lowres_reft.config import DataConfig
    from lowres_reft.data.datasets import BUILTIN_DATASETS

    base = recipe.data if recipe is not None else DataConfig(name=DEFAULT_DATA, path=None, max_eval_samples=None)
    changes: dict[str, Any] = {"max_eval_samples": args.n}
    if args.data is not None and (recipe is None or args.data != recipe.data.name):
        # another data set: the recipe's paths and field names belong to its own data set
        changes.update(name=args.data, path=None, eval_path=None, question_field=None, answer_field=None,
                       solution_field=None)
    if args.data_path is not None:  # what to evaluate: a file is the eval split itself
        changes["eval_path"] = args.data_path
    if args.split is not None:
        changes["eval_split"] = args.split
    elif args.data is not None and recipe is not None and args.data != recipe.data.name:
        changes["eval_split"] = DEFAULT_SPLIT
    if args.system_prompt is not None:
        changes["system_prompt"] = args.system_prompt
    if args.chat_template is not None:
        changes["use_chat_template"] = args.chat_template
    cfg = dataclasses.replace(base, **changes)
    if cfg.name.strip() in BUILTIN_DATASETS and args.split is not None and args.split != "test":
        raise UsageError(f"--split {args.split}: the builtin data set {cfg.name} has one held-out split, test "
                         "(leave --split out)")
    if cfg.name.strip() in BUILTIN_DATASETS and args.n is not None:
        cfg = dataclasses.replace(cfg, builtin_test_size=max(args.n, cfg.builtin_test_size))
    return cfg


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def default_out(target: Target, data_name: str, split: str, settings: Settings, n: int | None) -> Path:
    stem = f"eval-{_slug(data_name)}-{_slug(split)}"
    if n is not None:
        stem += f"-n{n}"
    if not settings.greedy:
        stem += f"-k{settings.k}" + (f"-s{settings.samples}" if settings.samples != settings.k else "")
        stem += f"-t{settings.temperature:g}" + (f"-p{settings.top_p:g}" if settings.top_p < 1 else "")
        stem += f"-seed{settings.seed}" if settings.seed else ""
    if target.kind == "checkpoint":  # eval-checkpoint-NNNNNN-...: never matches the checkpoint-* dir glob
        ckpt = target.checkpoint.resolve()
        return ckpt.parent / f"eval-{ckpt.name}-{stem[len('eval-'):]}.jsonl"
    if target.kind == "builtin":
        label = "builtin-tiny"
    else:
        label = _slug(Path(target.name.rstrip("/")).name)
    return Path(f"{label}-{stem}.jsonl")


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give a file name (e.g. {out / 'preds.jsonl'})")
    parent = out.parent if str(out.parent) else Path(".")
    from lowres_reft.utils.fsutil import nearest_existing, writable_dir

    existing = nearest_existing(parent)
    if not writable_dir(existing):
        raise UsageError(f"--out {out}: cannot write in {existing}")


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    from lowres_reft.utils.fsutil import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------- model


def model_config(target: Target, args: argparse.Namespace):
    """The ModelConfig to load the target with: a checkpoint's recipe with the flags applied, else the flags."""
    import torch

    from lowres_reft.config import ModelConfig

    if target.kind == "checkpoint":
        model_cfg = target.recipe.model
        changes = {k: v for k, v in (("load_in_4bit", args.load_in_4bit), ("dtype", args.dtype), ("device", args.device))
                   if v is not None}
        if "device" not in changes and model_cfg.device == "cuda" and not torch.cuda.is_available():
            changes["device"] = "cpu"  # like export: a CUDA-trained checkpoint still evaluates on the CPU
        return dataclasses.replace(model_cfg, **changes)
    model_cfg = ModelConfig(name=target.name, dtype=args.dtype or "auto", load_in_4bit=bool(args.load_in_4bit),
                            device=args.device or "auto")
    if target.kind == "builtin":
        model_cfg = dataclasses.replace(model_cfg, dtype=args.dtype or "float32")
    return model_cfg


# ------------------------------------------------------------------------------------------------ run


def _fmt_ci(ci) -> str:
    return f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}] (Wilson score interval)"


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    target = resolve_target(args.target, args.cache_dir)
    settings = _settings(args, target.recipe)
    data_cfg = _data_config(args, target.recipe)
    from lowres_reft.data.datasets import BUILTIN_DATASETS

    split_label = "held-out" if data_cfg.name.strip() in BUILTIN_DATASETS else data_cfg.eval_split
    out = Path(args.out) if args.out else default_out(target, data_cfg.name, data_cfg.eval_split, settings, args.n)
    _check_out(out)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))

    import torch

    from lowres_reft.config import Recipe
    from lowres_reft.data.datasets import load_problems
    from lowres_reft.data.prompts import encode_prompts
    from lowres_reft.model.loader import eos_token_ids, load_policy
    from lowres_reft.rollout.engine import check_generation_length, make_engine
    from lowres_reft.run.evaluation import CONFIDENCE, sample_completions, score_completions

    try:
        problems = load_problems(data_cfg, "eval")
    except UsageError as err:
        raise UsageError(_in_flags(str(err), args)) from None
    model_cfg = model_config(target, args)
    if target.kind == "checkpoint":  # the recipe's base + the checkpoint's adapter, exactly as during training
        policy = load_policy(model_cfg, target.recipe.lora, target.cache_dir, adapter_dir=target.checkpoint / "adapter")
    else:  # a plain model: no LoRA, nothing trains
        policy = load_policy(model_cfg, None, target.cache_dir or ".")
    policy.model.eval()

    check_generation_length(policy.model, "--max-new-tokens", settings.max_new_tokens)
    recipe = dataclasses.replace(target.recipe or Recipe(), data=data_cfg)
    prompts = encode_prompts(policy.tokenizer, problems, recipe)
    eos_ids = eos_token_ids(policy)

    if target.kind == "checkpoint" and target.recipe.model.load_in_4bit and not model_cfg.load_in_4bit:
        say("note: --no-load-in-4bit puts the adapter on the unquantized base; it was trained on the 4-bit one")
    if target.kind == "checkpoint":
        what = f"checkpoint {target.checkpoint.resolve().name} of {model_cfg.name} ({'4-bit NF4' if model_cfg.load_in_4bit else model_cfg.dtype} + LoRA)"
    else:
        what = f"{model_cfg.name} ({'4-bit NF4' if model_cfg.load_in_4bit else next(policy.model.parameters()).dtype}, no LoRA)"
    decoding = "greedy" if settings.greedy else (
        f"{settings.samples} samples/problem at temperature {settings.temperature:g}"
        + (f", top-p {settings.top_p:g}" if settings.top_p < 1 else "") + f", seed {settings.seed}")
    say(f"eval {what} on {data_cfg.name} {split_label}: {len(problems)} problems, {decoding}, "
        f"max {settings.max_new_tokens} new tokens, device {policy.device}")

    step = max(1, len(problems) * settings.samples // 10)
    last = [0]

    def progress(done: int, total: int) -> None:
        if done == total or done - last[0] >= step:
            last[0] = done
            print(f"  {done}/{total} completions, {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    generator = None if settings.greedy else torch.Generator(device=policy.device).manual_seed(settings.seed)
    engine = make_engine(recipe.rollout.engine, policy.model, max_new_tokens=settings.max_new_tokens, eos_ids=eos_ids,
                         pad_id=policy.tokenizer.pad_token_id, temperature=settings.temperature or 1.0,
                         top_p=settings.top_p, generator=generator, greedy=settings.greedy,
                         weights=recipe.rollout.weights)
    t0 = time.perf_counter()
    completions = sample_completions(engine, policy.tokenizer, prompts, settings.samples, settings.batch_size, progress)
    gen_seconds = time.perf_counter() - t0
    rows, stats = score_completions(problems, completions, settings.samples, settings.k)
    write_jsonl_atomic(out, rows)

    n = stats["n"]
    tokens = sum(c["tokens"] for c in completions)
    seconds = time.perf_counter() - start
    if settings.greedy:
        say(f"pass@1 = {stats['pass_at_k']:.3f} ({stats['problems_solved']}/{n} correct), {_fmt_ci(stats['pass_at_k_ci'])}")
    else:
        how = "any of the k samples correct" if settings.samples == settings.k else \
            f"unbiased estimator from {settings.samples} samples/problem"
        say(f"pass@{settings.k} = {stats['pass_at_k']:.3f} ({how}), {_fmt_ci(stats['pass_at_k_ci'])}")
        if settings.k > 1 or settings.samples > 1:
            say(f"pass@1 = {stats['mean_accuracy']:.3f} (mean per-sample accuracy), {_fmt_ci(stats['mean_accuracy_ci'])}")
    truncated = sum(c["truncated"] for c in completions) / max(1, len(completions))
    say(f"n = {n} problems, {len(completions)} completions, {tokens} tokens, {truncated:.1%} truncated; "
        f"generation {gen_seconds:.1f} s ({tokens / max(gen_seconds, 1e-9):.0f} tokens/s), total {seconds:.1f} s")
    say(f"predictions: {out}")
    if args.json:
        summary = {
            "target": args.target, "kind": target.kind, "model": model_cfg.name,
            "checkpoint": str(target.checkpoint.resolve()) if target.checkpoint else None,
            "load_in_4bit": model_cfg.load_in_4bit, "lora": target.kind == "checkpoint",
            "data": data_cfg.name, "data_path": data_cfg.eval_path or data_cfg.path, "split": split_label, "n": n,
            "greedy": settings.greedy, "k": settings.k, "samples": settings.samples,
            "temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed,
            "max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size,
            "pass_at_k": stats["pass_at_k"], "pass_at_k_ci": stats["pass_at_k_ci"],
            "pass_at_1": stats["mean_accuracy"], "pass_at_1_ci": stats["mean_accuracy_ci"],
            "problems_solved": stats["problems_solved"], "ci": "wilson", "confidence": CONFIDENCE,
            "tokens": tokens, "truncated_frac": truncated, "generation_seconds": gen_seconds,
            "seconds": seconds, "out": str(out),
        }
        print(json.dumps(summary), flush=True)
    return 0


# The [data] keys this command sets from its flags: an error about one of them names the flag the user typed.
_FLAGS = (("[data] eval_path", "--data-path", "data_path"), ("[data] eval_split", "--split", "split"),
          ("[data] name", "--data", "data"))


def _in_flags(message: str, args: argparse.Namespace) -> str:
    for key, flag, attr in _FLAGS:
        if getattr(args, attr) is not None:
            message = message.replace(key, flag)
    return message
