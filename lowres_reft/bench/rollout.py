"""`lowres-reft bench rollout`: tokens/s of nested rollouts per skip ratio vs `model.generate`.

Per skip ratio r: our sampling loop, `rollout.sample`, with `num_skipped(L, r)` random valid layers skipped;
`model.generate` on the same model at r = 0 as the baseline; every run produces exactly `--new-tokens` tokens per
sequence: `eos_ids=[-1]` for ours, `min_new_tokens = max_new_tokens` for generate. One repeat measures, in this
order: ours r_0, generate, ours r_1, ..., ours r_n, calibration (all layers but layer 0 skipped); each item is a
full rollout and a prefill-only rollout (`max_new_tokens = 1`). `--warmup` untimed repeats come first. Ratios are
computed per repeat (numerator and denominator from the same repeat) and the median over repeats reported.

Per-step decode time = (t_full - t_prefill) / (new_tokens - 1), where t_prefill is the prefill-only run (prompt
forward + 1 sampled token). The ideal speedup and the roofline bytes: see `bench.roofline`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowres_reft.bench.common import (
    MODEL_SHAPES,
    ModelDir,
    check_positive,
    check_warmup,
    fmt,
    fmt_bytes,
    make_report,
    max_or_none,
    max_rss_bytes,
    median,
    timed,
    write_json,
)
from lowres_reft.bench.roofline import (
    decode_weight_bytes,
    ideal_speedup,
    kv_bytes_per_step,
    model_bytes,
    peak_bandwidth,
    split_layer_time,
)
from lowres_reft.errors import UsageError

Item = tuple[str, float | None, tuple[int, ...]]  # (kind: ours/generate/calibration, skip ratio, skipped layers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shapes = ", ".join(MODEL_SHAPES)
    parser.add_argument("--model-config", choices=list(MODEL_SHAPES), help=f"built-in shape ({shapes})")
    parser.add_argument("--model", help="load this model (hub name or local path) instead of a built-in shape")
    parser.add_argument("--random-weights", action="store_true", help="random weights for --model-config (no download)")
    parser.add_argument("--batch", type=int, default=64, help="sequences per rollout (default 64)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default 128)")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence, exactly (default 256)")
    parser.add_argument("--skip-ratios", default="0,0.1,0.25,0.5", help="comma-separated skip ratios (0 is always measured)")
    parser.add_argument("--repeats", type=int, default=3, help="measured repeats; medians are reported (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats first (default 1)")
    parser.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", help="16-bit base instead of 4-bit NF4")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="compute dtype (auto: bf16/fp16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank on all decoder projections (default 16)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (default: temperature sampling)")
    parser.add_argument("--engine", default="loop", help="sampling engine, as [rollout] engine: loop, static, static_eager (default loop)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--no-generate", dest="baseline", action="store_false", help="skip the model.generate baseline")
    parser.add_argument("--protect-first", type=int, default=1)
    parser.add_argument("--protect-last", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache-dir", help="keep the random-weights model here for reuse (default: a temp dir, deleted)")
    parser.add_argument("--json", dest="json_out", help="write the report here")


def run_rollout(args: argparse.Namespace) -> int:
    ratios = _check_args(args)
    setup = _setup(args, ratios)
    timings = _measure(args, setup)
    # (t_other, t_layers) per repeat, from the r = 0 item (first) and the calibration item (last).
    splits = [split_layer_time(timings.times[0][j], timings.times[-1][j], setup.num_layers) for j in range(args.repeats)]
    results = _results(args, setup, timings, splits)
    summary = _summary(args, setup, timings, splits, results)
    report = make_report("bench rollout", setup.device, _run_config(args, setup), summary, results)
    print(rollout_table(report))
    write_json(report, args.json_out)
    return 0


# ----------------------------------------------------------------------------------------------------------
# Setup


def parse_ratios(text: str) -> list[float]:
    """Sorted distinct skip ratios from "0.1,0.25", with 0 always included."""
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--skip-ratios {text!r}: expected comma-separated numbers, e.g. 0,0.1,0.25,0.5") from None
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad:
        raise UsageError(f"--skip-ratios: {bad} not in [0, 1)")
    return sorted(set([0.0] + ratios))


def _check_args(args: argparse.Namespace) -> list[float]:
    ratios = parse_ratios(args.skip_ratios)
    check_positive(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                   lora_r=args.lora_r)
    check_warmup(args.warmup)
    if args.temperature <= 0 and not args.greedy:
        raise UsageError("--temperature must be > 0 (or use --greedy)")
    if (args.model_config is None) == (args.model is None):
        raise UsageError("bench rollout: give --model-config SHAPE --random-weights, or --model NAME_OR_PATH")
    if args.model_config is not None and not args.random_weights:
        raise UsageError("--model-config builds a model from a shape and needs --random-weights (or use --model PATH)")
    return ratios


@dataclass
class _Setup:
    policy: Any
    device: Any
    dtype: Any
    ratios: list[float]
    items: list[Item]  # measured in this order every repeat: ours r=0 first, calibration last
    prompt_tokens: Any  # (batch, prompt_len) int64 on the CPU

    @property
    def model(self):
        return self.policy.model

    @property
    def num_layers(self) -> int:
        return self.policy.num_layers

    @property
    def config(self):
        return self.policy.model.get_base_model().config


def _setup(args: argparse.Namespace, ratios: list[float]) -> _Setup:
    """Load the model (4-bit or 16-bit + LoRA, like training), draw the skip sets and the random prompts."""
    import torch

    from lowres_reft.config import LoraConfig, ModelConfig
    from lowres_reft.model import load_policy, resolve_device, resolve_dtype

    from lowres_reft.rollout import ENGINES

    if args.engine not in ENGINES:
        raise UsageError(f"--engine {args.engine!r}: unknown sampling engine (known: {', '.join(ENGINES)})")
    base_cfg = ModelConfig(dtype=args.dtype, load_in_4bit=args.load_in_4bit, device=args.device)
    device = resolve_device(base_cfg)
    dtype = resolve_dtype(base_cfg, device)
    lora = LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    with ModelDir(args.model_config, args.model, args.cache_dir, device, args.seed) as name:
        cfg = ModelConfig(name=name, dtype=args.dtype, load_in_4bit=args.load_in_4bit, device=args.device)
        policy = load_policy(cfg, lora, seed=args.seed)
    if policy.num_layers < 2:
        raise UsageError("bench rollout needs a model with at least 2 decoder layers")
    items = _items(args, ratios, policy.num_layers)
    vocab = policy.model.get_base_model().config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompt_tokens = torch.randint(2, vocab, (args.batch, args.prompt_len), generator=gen)
    return _Setup(policy, device, dtype, ratios, items, prompt_tokens)


def _items(args: argparse.Namespace, ratios: list[float], num_layers: int) -> list[Item]:
    from lowres_reft.nested import SkipSchedule

    skips: dict[float, tuple[int, ...]] = {}
    for r in ratios:
        try:
            skips[r] = SkipSchedule(num_layers, r, args.protect_first, args.protect_last, seed=args.seed).draw()
        except ValueError as err:
            raise UsageError(f"--skip-ratios {r}: {err}") from None
    items: list[Item] = [("ours", 0.0, skips[0.0])]
    if args.baseline:
        items.append(("generate", 0.0, ()))
    items += [("ours", r, skips[r]) for r in ratios if r > 0]
    items.append(("calibration", None, tuple(range(1, num_layers))))  # keep layer 0 only
    return items


# ----------------------------------------------------------------------------------------------------------
# Measure


class _Rollouts:
    """Builds the timed calls: one rollout of exactly n new tokens per sequence, returning the token count."""

    def __init__(self, args: argparse.Namespace, setup: _Setup) -> None:
        import torch

        self.args, self.model, self.device = args, setup.model, setup.device
        self.prompts = setup.prompt_tokens.tolist()
        self.ids = setup.prompt_tokens.to(setup.device)
        self.mask = torch.ones_like(self.ids)
        self.pad_id = setup.policy.tokenizer.pad_token_id
        self.eos_id = setup.policy.tokenizer.eos_token_id

    def call(self, kind: str, skip: tuple[int, ...], n: int) -> Callable[[], int]:
        return self._generate(n) if kind == "generate" else self._ours(skip, n)

    def _ours(self, skip: tuple[int, ...], n: int) -> Callable[[], int]:
        import torch

        from lowres_reft.rollout import make_engine

        args = self.args

        def call() -> int:
            g = torch.Generator(device=self.device).manual_seed(args.seed)
            engine = make_engine(args.engine, self.model, max_new_tokens=n, eos_ids=[-1], pad_id=self.pad_id,
                                 temperature=args.temperature, generator=g, greedy=args.greedy)
            return engine.generate(self.prompts, skip).num_tokens
        return call

    def _generate(self, n: int) -> Callable[[], int]:
        import torch

        args, model, ids, mask = self.args, self.model, self.ids, self.mask

        def call() -> int:
            torch.manual_seed(args.seed)
            kwargs = dict(do_sample=False) if args.greedy else dict(do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                         min_new_tokens=n, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                                         use_cache=True, **kwargs)
            finally:
                model.train(was_training)
            return int(out.shape[0] * (out.shape[1] - ids.shape[1]))
        return call


@dataclass
class _Timings:
    """Per item (index into `_Setup.items`), over the measured repeats (warm-up excluded)."""

    times: list[list[float]]  # full rollout seconds
    prefill: list[list[float]]  # prefill-only (max_new_tokens = 1) seconds
    peaks: list[list[int | None]]  # peak GPU bytes of both calls
    tokens: list[int]  # tokens of one full rollout


def _measure(args: argparse.Namespace, setup: _Setup) -> _Timings:
    rollouts = _Rollouts(args, setup)
    n, count = args.new_tokens, len(setup.items)
    timings = _Timings([[] for _ in range(count)], [[] for _ in range(count)], [[] for _ in range(count)], [0] * count)
    print(f"bench rollout: {setup.num_layers} layers, batch {args.batch}, prompt {args.prompt_len}, new tokens {n}, "
          f"ratios {setup.ratios}, {args.warmup} warm-up + {args.repeats} repeats on {setup.device}", flush=True)
    for rep in range(args.warmup + args.repeats):
        for i, (kind, _, skip) in enumerate(setup.items):
            full, first = rollouts.call(kind, skip, n), rollouts.call(kind, skip, 1)
            seconds, peak, tokens = timed(full, setup.device)
            pre_seconds, pre_peak, _ = timed(first, setup.device)
            if rep >= args.warmup:
                timings.times[i].append(seconds)
                timings.prefill[i].append(pre_seconds)
                timings.peaks[i].append(max_or_none(peak, pre_peak))
                timings.tokens[i] = tokens
        label = "warm-up" if rep < args.warmup else f"repeat {rep - args.warmup + 1}/{args.repeats}"
        print(f"  {label} done", flush=True)
    return timings


# ----------------------------------------------------------------------------------------------------------
# Report


def _results(args: argparse.Namespace, setup: _Setup, timings: _Timings, splits: list[tuple[float, float]]) -> list[dict]:
    import torch

    device = setup.device
    bandwidth = peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    element_size = torch.finfo(setup.dtype).bits // 8
    return [_result_row(args, setup, timings, splits, i, bandwidth, element_size) for i in range(len(setup.items))]


def _result_row(args: argparse.Namespace, setup: _Setup, timings: _Timings, splits: list[tuple[float, float]], i: int,
                bandwidth: float | None, element_size: int) -> dict:
    """One item's row: medians over repeats of per-repeat times and ratios (ratios only for our loop)."""
    kind, r, skip = setup.items[i]
    times, n, num_layers, k = timings.times, args.new_tokens, setup.num_layers, len(skip)
    step_times = [(t - p) / (n - 1) if n > 1 else None for t, p in zip(times[i], timings.prefill[i])]
    step_s = median(step_times)
    speedups = ideals = fracs = None
    if kind == "ours":
        speedups = [times[0][j] / times[i][j] for j in range(args.repeats)]
        ideals = [ideal_speedup(times[0][j], *splits[j], num_layers, k) for j in range(args.repeats)]
        fracs = [s / d if d else None for s, d in zip(speedups, ideals)]
    wbytes = decode_weight_bytes(setup.model, skip, args.batch)
    achieved = wbytes["total"] / step_s if step_s else None
    seconds = median(times[i])
    return {
        "kind": kind,
        "skip_ratio": r,
        "layers_total": num_layers,
        "layers_skipped": k,
        "layers_kept": num_layers - k,
        "skip": list(skip),
        "seconds": seconds,
        "seconds_repeats": times[i],
        "prefill_seconds": median(timings.prefill[i]),
        "decode_step_seconds": step_s,
        "tokens": timings.tokens[i],
        "tokens_per_s": timings.tokens[i] / seconds,
        "speedup_vs_r0": median(speedups) if speedups else None,
        "ideal_speedup": median(ideals) if ideals else None,
        "fraction_of_ideal": median(fracs) if fracs else None,
        "weight_bytes_per_step": wbytes["total"],
        "weight_bytes_breakdown": wbytes,
        "kv_bytes_per_step_mean": kv_bytes_per_step(setup.config, num_layers - k, args.batch, args.prompt_len, n,
                                                    element_size),
        "achieved_weight_bandwidth_Bps": achieved,
        "roofline_fraction": achieved / bandwidth if achieved and bandwidth else None,
        "peak_gpu_mem_bytes": max(timings.peaks[i]) if setup.device.type == "cuda" else None,
        "max_rss_bytes": max_rss_bytes(),
    }


def _summary(args: argparse.Namespace, setup: _Setup, timings: _Timings, splits: list[tuple[float, float]],
             results: list[dict]) -> dict:
    times, cuda = timings.times, setup.device.type == "cuda"
    return {
        "t_other_s": median([s[0] for s in splits]),
        "t_layers_s": median([s[1] for s in splits]),
        "t_other_share": median([s[0] / times[0][j] for j, s in enumerate(splits)]),
        # items[1] is the generate baseline when it was measured.
        "ours_r0_speedup_vs_generate": (median([times[1][j] / times[0][j] for j in range(args.repeats)])
                                        if args.baseline else None),
        "model_bytes": model_bytes(setup.model),
        "peak_gpu_mem_bytes": max((row["peak_gpu_mem_bytes"] for row in results), default=None) if cuda else None,
        "max_rss_bytes": max_rss_bytes(),
    }


def _run_config(args: argparse.Namespace, setup: _Setup) -> dict:
    config, policy = setup.config, setup.policy
    return {
        "model_config": args.model_config, "model": args.model, "random_weights": bool(args.random_weights),
        "num_layers": setup.num_layers, "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size, "tie_word_embeddings": bool(config.tie_word_embeddings),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "skip_ratios": setup.ratios,
        "repeats": args.repeats, "warmup": args.warmup, "load_in_4bit": bool(args.load_in_4bit),
        "dtype": str(setup.dtype).removeprefix("torch."),
        "device": str(setup.device), "lora_r": args.lora_r, "greedy": bool(args.greedy),
        "temperature": None if args.greedy else args.temperature, "baseline_generate": bool(args.baseline),
        "protect_first": args.protect_first, "protect_last": args.protect_last, "seed": args.seed,
        "trainable_params": policy.trainable_params, "total_params": policy.total_params,
    }


def rollout_table(report: dict) -> str:
    head = (f"{'kind':<11} {'r':>5} {'kept':>5} {'seconds':>9} {'tok/s':>10} {'speedup':>8} {'ideal':>7} {'frac':>6} "
            f"{'step ms':>8} {'W GB/step':>9} {'GB/s':>8} {'roofline':>8} {'peak mem':>9}")
    lines = [head, "-" * len(head)]
    for row in report["results"]:
        lines.append(
            f"{row['kind']:<11} {fmt(row['skip_ratio'], '.2f'):>5} {row['layers_kept']:>5} {row['seconds']:>9.3f} "
            f"{row['tokens_per_s']:>10.1f} {fmt(row['speedup_vs_r0'], '.3f'):>8} {fmt(row['ideal_speedup'], '.3f'):>7} "
            f"{fmt(row['fraction_of_ideal'], '.3f'):>6} "
            f"{fmt(row['decode_step_seconds'] and row['decode_step_seconds'] * 1e3, '.2f'):>8} "
            f"{row['weight_bytes_per_step'] / 1e9:>9.4f} "
            f"{fmt(row['achieved_weight_bandwidth_Bps'] and row['achieved_weight_bandwidth_Bps'] / 1e9, '.1f'):>8} "
            f"{fmt(row['roofline_fraction'], '.3f'):>8} {fmt_bytes(row['peak_gpu_mem_bytes']):>9}")
    s = report["summary"]
    lines.append(f"t_other {s['t_other_s']:.4f}s ({100 * s['t_other_share']:.1f}% of r=0), t_layers {s['t_layers_s']:.4f}s; "
                 f"ours r=0 vs generate: {fmt(s['ours_r0_speedup_vs_generate'], '.3f')} (time ratio generate/ours); "
                 f"max RSS {fmt_bytes(s['max_rss_bytes'])}; device {report['device']['name']}")
    return "\n".join(lines)
