"""`lowres-reft bench rollout`: tokens/s of nested rollouts per skip ratio vs `model.generate`.

Groups: every engine in `--engines` x every weights mode in `--weights` (`[rollout] engine` / `[rollout] weights`),
side by side in one run. Per group and skip ratio r: the engine with `num_skipped(L, r)` random valid layers
skipped (the same skip sets for every group); `model.generate` on the same model at r = 0 is the baseline (once,
in the first group). One repeat measures, per group in this order: ours r_0, [generate], ours r_1, ..., ours r_n,
calibration (all layers but layer 0 skipped); each item is a full rollout and a prefill-only rollout
(`max_new_tokens = 1`). `--warmup` untimed repeats come first. Ratios are computed per repeat (numerator and
denominator from the same repeat, within a group) and the median over repeats reported.

Lengths. Prompts: `--prompt-len` tokens, or with `--prompt-len-spread S` a uniform length in
[prompt_len - S, prompt_len] per row, left-padded. Completions: by default exactly `--new-tokens` per row (no EOS:
`eos_ids=[-1]`, `min_new_tokens` for generate). With `--eos-mean M`, a seeded random set of V / M token ids acts as
EOS for every engine and for generate alike; a random-weights model's next-token distribution is close to flat, so
completion lengths are roughly geometric with mean ~M, capped at `--new-tokens` (the spread real rollouts have;
the actual lengths are reported). "Useful" tokens are those up to and including the EOS; "slot" tokens are
rows x decode steps run (a finished row still occupies its slot until the whole batch is done); `tokens` and
`tokens_per_s` are the useful ones.

Per-step decode time = (t_full - t_prefill) / (steps - 1), where steps = slot tokens / rows and t_prefill is the
prefill-only run (prompt forward + 1 sampled token). The ideal speedup and the roofline bytes: see
`bench.roofline`. Off-policy gap of each group at r = 0: one extra untimed sampled rollout, its behavior
log-probs against the training recompute (`completion_logp`, the shared 4-bit path): mean and max |log rho|.
Report schema version 2 (version 1 had one engine and no EOS; rows now carry engine, weights, useful/slot tokens).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lowres_reft.bench.common import (
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
from lowres_reft.bench.rollout_calls import Rollouts
from lowres_reft.bench.roofline import (
    decode_weight_bytes,
    ideal_speedup,
    kv_bytes_per_step,
    model_bytes,
    peak_bandwidth,
    split_layer_time,
)
from lowres_reft.model.shapes import MODEL_SHAPES
from lowres_reft.utils.errors import UsageError

# (kind: ours/generate/calibration, skip ratio, skipped layers, engine, weights mode)
Item = tuple[str, float | None, tuple[int, ...], str, str]
ROLLOUT_SCHEMA_VERSION = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shapes = ", ".join(MODEL_SHAPES)
    parser.add_argument("--model-config", choices=list(MODEL_SHAPES), help=f"built-in shape ({shapes})")
    parser.add_argument("--model", help="load this model (hub name or local path) instead of a built-in shape")
    parser.add_argument("--random-weights", action="store_true", help="random weights for --model-config (no download)")
    parser.add_argument("--batch", type=int, default=64, help="sequences per rollout (default 64)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default 128)")
    parser.add_argument("--prompt-len-spread", type=int, default=0,
                        help="prompt lengths uniform in [prompt-len - spread, prompt-len], left-padded (default 0)")
    parser.add_argument("--new-tokens", type=int, default=256,
                        help="tokens generated per sequence: exactly, or at most with --eos-mean (default 256)")
    parser.add_argument("--eos-mean", type=int, default=0,
                        help="end completions at EOS with roughly geometric lengths of this mean (0: no EOS)")
    parser.add_argument("--skip-ratios", default="0,0.1,0.25,0.5", help="comma-separated skip ratios (0 is always measured)")
    parser.add_argument("--repeats", type=int, default=3, help="measured repeats; medians are reported (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats first (default 1)")
    parser.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", help="16-bit base instead of 4-bit NF4")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="compute dtype (auto: bf16/fp16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank on all decoder projections (default 16)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (default: temperature sampling)")
    parser.add_argument("--engines", "--engine", dest="engines", default="loop",
                        help="comma-separated sampling engines, as [rollout] engine: loop, static, static_eager (default loop)")
    parser.add_argument("--weights", default="shared4bit",
                        help="comma-separated weights modes, as [rollout] weights (default shared4bit)")
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
    _measure_log_rho(args, setup, timings)
    splits = _splits(args, setup, timings)
    results = _results(args, setup, timings, splits)
    summary = _summary(args, setup, timings, splits, results)
    report = make_report("bench rollout", setup.device, _run_config(args, setup), summary, results,
                         schema_version=ROLLOUT_SCHEMA_VERSION)
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


def parse_names(text: str, option: str, registry) -> list[str]:
    """Distinct names from "a,b", each one of `registry`'s (a registry's keys or a tuple of names), in order."""
    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [n for n in names if n not in registry]
    if not names or bad:
        raise UsageError(f"{option} {text!r}: expected comma-separated names from {', '.join(registry)}")
    return names


def _check_args(args: argparse.Namespace) -> list[float]:
    ratios = parse_ratios(args.skip_ratios)
    check_positive(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                   lora_r=args.lora_r)
    check_warmup(args.warmup)
    if not 0 <= args.prompt_len_spread < args.prompt_len:
        raise UsageError("--prompt-len-spread must be >= 0 and < --prompt-len")
    if args.eos_mean < 0:
        raise UsageError("--eos-mean must be >= 0 (0: no EOS, exactly --new-tokens per sequence)")
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
    items: list[Item]  # measured in this order every repeat: per group, ours r=0 first, calibration last
    prompts: list[list[int]]  # batch random prompts, of --prompt-len (or spread) tokens
    eos_ids: list[int]  # the stop set ([-1]: none, every row runs --new-tokens)

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
    from lowres_reft.model.loader import load_policy, resolve_device, resolve_dtype
    from lowres_reft.model.rollout_weights import WEIGHT_MODES
    from lowres_reft.rollout.engine import ENGINES

    args.engine_list = parse_names(args.engines, "--engines", ENGINES)
    args.weights_list = parse_names(args.weights, "--weights", WEIGHT_MODES)
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
    lengths = torch.randint(args.prompt_len - args.prompt_len_spread, args.prompt_len + 1, (args.batch,), generator=gen)
    prompts = [torch.randint(2, vocab, (int(n),), generator=gen).tolist() for n in lengths]
    eos_ids = [-1]
    if args.eos_mean:
        stop = max(1, round(vocab / args.eos_mean))
        eos_ids = (torch.randperm(vocab - 2, generator=gen)[:stop] + 2).tolist()
    return _Setup(policy, device, dtype, ratios, items, prompts, eos_ids)


def _items(args: argparse.Namespace, ratios: list[float], num_layers: int) -> list[Item]:
    from lowres_reft.model.nested import SkipSchedule

    skips: dict[float, tuple[int, ...]] = {}
    for r in ratios:
        try:
            skips[r] = SkipSchedule(num_layers, r, args.protect_first, args.protect_last, seed=args.seed).draw()
        except ValueError as err:
            raise UsageError(f"--skip-ratios {r}: {err}") from None
    items: list[Item] = []
    for engine in args.engine_list:
        for weights in args.weights_list:
            items.append(("ours", 0.0, skips[0.0], engine, weights))
            if args.baseline and len(items) == 1:
                items.append(("generate", 0.0, (), "generate", "shared4bit"))
            items += [("ours", r, skips[r], engine, weights) for r in ratios if r > 0]
            items.append(("calibration", None, tuple(range(1, num_layers)), engine, weights))  # keep layer 0 only
    return items


def _group(setup: _Setup, i: int) -> tuple[int, int]:
    """(index of the r = 0 item, index of the calibration item) of item i's engine/weights group."""
    engine, weights = setup.items[i][3:]
    if setup.items[i][0] == "generate":
        engine, weights = setup.items[0][3:]
    same = [j for j, item in enumerate(setup.items) if item[3:] == (engine, weights)]
    return same[0], same[-1]


# ----------------------------------------------------------------------------------------------------------
# Measure


@dataclass
class _Timings:
    """Per item (index into `_Setup.items`), over the measured repeats (warm-up excluded)."""

    times: list[list[float]]  # full rollout seconds
    prefill: list[list[float]]  # prefill-only (max_new_tokens = 1) seconds
    peaks: list[list[int | None]]  # peak GPU bytes of both calls
    tokens: list[int]  # useful tokens of one full rollout
    slots: list[int]  # slot tokens (rows x steps) of one full rollout
    log_rho: dict[int, tuple[float, float]]  # r = 0 item -> (mean, max) |log rho|, sampled runs only


def _measure(args: argparse.Namespace, setup: _Setup) -> _Timings:
    rollouts = Rollouts(args, setup)
    n, count = args.new_tokens, len(setup.items)
    timings = _Timings([[] for _ in range(count)], [[] for _ in range(count)], [[] for _ in range(count)], [0] * count,
                       [0] * count, {})
    groups = sorted({item[3:] for item in setup.items if item[0] != "generate"})
    print(f"bench rollout: {setup.num_layers} layers, batch {args.batch}, prompt {args.prompt_len}"
          f"{f' - {args.prompt_len_spread}' if args.prompt_len_spread else ''}, new tokens {n}"
          f"{f' (EOS mean {args.eos_mean})' if args.eos_mean else ''}, ratios {setup.ratios}, groups {groups}, "
          f"{args.warmup} warm-up + {args.repeats} repeats on {setup.device}", flush=True)
    for rep in range(args.warmup + args.repeats):
        for i, item in enumerate(setup.items):
            full, first = rollouts.call(item, n), rollouts.call(item, 1)
            seconds, peak, (tokens, slots) = timed(full, setup.device)
            pre_seconds, pre_peak, _ = timed(first, setup.device)
            kind, r, _, engine, weights = item
            print(f"    {kind} {engine}/{weights} r={r}: {seconds:.2f} s full ({tokens} useful / {slots} slot tokens), "
                  f"{pre_seconds:.2f} s prefill", flush=True)  # progress: a run cut off by a time limit still says something
            if rep >= args.warmup:
                timings.times[i].append(seconds)
                timings.prefill[i].append(pre_seconds)
                timings.peaks[i].append(max_or_none(peak, pre_peak))
                timings.tokens[i], timings.slots[i] = tokens, slots
        label = "warm-up" if rep < args.warmup else f"repeat {rep - args.warmup + 1}/{args.repeats}"
        print(f"  {label} done", flush=True)
    return timings


def _measure_log_rho(args: argparse.Namespace, setup: _Setup, timings: _Timings) -> None:
    """Per group's r = 0 item (sampled runs): |log rho| of its behavior log-probs vs the training recompute."""
    import torch

    from lowres_reft.model.logprobs import completion_logp

    if args.greedy:
        return
    rollouts = Rollouts(args, setup)
    for i, (kind, r, _, engine, weights) in enumerate(setup.items):
        if kind != "ours" or r != 0.0:
            continue
        batch = rollouts.engine(engine, weights, args.new_tokens).generate(setup.prompts, ())
        with torch.no_grad():
            logp = completion_logp(setup.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                   batch.completion_mask, temperature=args.temperature, chunk=256)
        gap = (logp - batch.behavior_logp)[batch.completion_mask.bool()].abs()
        timings.log_rho[i] = (float(gap.mean()), float(gap.max()))


def _splits(args: argparse.Namespace, setup: _Setup, timings: _Timings) -> dict[int, list[tuple[float, float]]]:
    """Per group (its r = 0 item index): (t_other, t_layers) per repeat, from the r = 0 and calibration items."""
    out = {}
    for i in range(len(setup.items)):
        r0, calib = _group(setup, i)
        if r0 not in out:
            out[r0] = [split_layer_time(timings.times[r0][j], timings.times[calib][j], setup.num_layers)
                       for j in range(args.repeats)]
    return out


# ----------------------------------------------------------------------------------------------------------
# Report


def _results(args: argparse.Namespace, setup: _Setup, timings: _Timings, splits: dict) -> list[dict]:
    import torch

    device = setup.device
    bandwidth = peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    element_size = torch.finfo(setup.dtype).bits // 8
    return [_result_row(args, setup, timings, splits, i, bandwidth, element_size) for i in range(len(setup.items))]


def _weight_bytes(setup: _Setup, item: Item, batch: int) -> dict[str, int]:
    """Decode-step weight bytes, counted on the weights the item decodes through (merged copies for merged16)."""
    from lowres_reft.model.rollout_weights import rollout_weights

    with rollout_weights(setup.model, item[4], item[2]):
        return decode_weight_bytes(setup.model, item[2], batch)


def _result_row(args: argparse.Namespace, setup: _Setup, timings: _Timings, splits: dict, i: int,
                bandwidth: float | None, element_size: int) -> dict:
    """One item's row: medians over repeats of per-repeat times and ratios (ratios only for our engines, against the
    r = 0 item of the same engine/weights group)."""
    kind, r, skip, engine, weights = setup.items[i]
    times, num_layers, k, batch = timings.times, setup.num_layers, len(skip), args.batch
    r0, _ = _group(setup, i)
    steps = timings.slots[i] // batch
    step_times = [(t - p) / (steps - 1) if steps > 1 else None for t, p in zip(times[i], timings.prefill[i])]
    step_s = median(step_times)
    speedups = ideals = fracs = None
    if kind == "ours":
        speedups = [times[r0][j] / times[i][j] for j in range(args.repeats)]
        ideals = [ideal_speedup(times[r0][j], *splits[r0][j], num_layers, k) for j in range(args.repeats)]
        fracs = [s / d if d else None for s, d in zip(speedups, ideals)]
    wbytes = _weight_bytes(setup, setup.items[i], batch)
    achieved = wbytes["total"] / step_s if step_s else None
    seconds = median(times[i])
    mean_prompt = round(sum(len(p) for p in setup.prompts) / batch)
    log_rho = timings.log_rho.get(i, (None, None))
    return {
        "kind": kind,
        "engine": engine,
        "weights": weights,
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
        "slot_tokens": timings.slots[i],
        "slot_tokens_per_s": timings.slots[i] / seconds,
        "speedup_vs_r0": median(speedups) if speedups else None,
        "ideal_speedup": median(ideals) if ideals else None,
        "fraction_of_ideal": median(fracs) if fracs else None,
        "log_rho_abs_mean": log_rho[0],
        "log_rho_abs_max": log_rho[1],
        "weight_bytes_per_step": wbytes["total"],
        "weight_bytes_breakdown": wbytes,
        "kv_bytes_per_step_mean": kv_bytes_per_step(setup.config, num_layers - k, batch, mean_prompt, max(steps, 1),
                                                    element_size),
        "achieved_weight_bandwidth_Bps": achieved,
        "roofline_fraction": achieved / bandwidth if achieved and bandwidth else None,
        "peak_gpu_mem_bytes": max(timings.peaks[i]) if setup.device.type == "cuda" else None,
        "max_rss_bytes": max_rss_bytes(),
    }


def _summary(args: argparse.Namespace, setup: _Setup, timings: _Timings, splits: dict, results: list[dict]) -> dict:
    """The first group's split and baseline ratio at the top (as in schema 1), and one entry per group."""
    times, cuda = timings.times, setup.device.type == "cuda"
    generate = next((i for i, item in enumerate(setup.items) if item[0] == "generate"), None)

    def group(r0: int) -> dict:
        split = splits[r0]
        return {
            "engine": setup.items[r0][3], "weights": setup.items[r0][4],
            "t_other_s": median([s[0] for s in split]),
            "t_layers_s": median([s[1] for s in split]),
            "t_other_share": median([s[0] / times[r0][j] for j, s in enumerate(split)]),
            # Useful tokens/s ratio (equal to the time ratio without EOS): our r = 0 over generate's.
            "r0_speedup_vs_generate": (median([(timings.tokens[r0] / times[r0][j]) / (timings.tokens[generate] / times[generate][j])
                                               for j in range(args.repeats)]) if generate is not None else None),
            "log_rho_abs_mean": timings.log_rho.get(r0, (None, None))[0],
            "log_rho_abs_max": timings.log_rho.get(r0, (None, None))[1],
        }

    groups = [group(r0) for r0 in splits]
    first = groups[0]
    return {
        "t_other_s": first["t_other_s"],
        "t_layers_s": first["t_layers_s"],
        "t_other_share": first["t_other_share"],
        "ours_r0_speedup_vs_generate": first["r0_speedup_vs_generate"],
        "groups": groups,
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
        "batch": args.batch, "prompt_len": args.prompt_len, "prompt_len_spread": args.prompt_len_spread,
        "prompt_lens": sorted(len(p) for p in setup.prompts), "new_tokens": args.new_tokens, "eos_mean": args.eos_mean,
        "eos_ids_count": 0 if args.eos_mean == 0 else len(setup.eos_ids), "engines": args.engine_list,
        "weights": args.weights_list, "skip_ratios": setup.ratios,
        "repeats": args.repeats, "warmup": args.warmup, "load_in_4bit": bool(args.load_in_4bit),
        "dtype": str(setup.dtype).removeprefix("torch."),
        "device": str(setup.device), "lora_r": args.lora_r, "greedy": bool(args.greedy),
        "temperature": None if args.greedy else args.temperature, "baseline_generate": bool(args.baseline),
        "protect_first": args.protect_first, "protect_last": args.protect_last, "seed": args.seed,
        "trainable_params": policy.trainable_params, "total_params": policy.total_params,
    }


def rollout_table(report: dict) -> str:
    head = (f"{'kind':<11} {'engine':<8} {'weights':<10} {'r':>5} {'kept':>5} {'seconds':>9} {'tok/s':>10} "
            f"{'slot tok/s':>10} {'speedup':>8} {'ideal':>7} {'frac':>6} {'|lrho|':>8} {'step ms':>8} {'W GB/step':>9} "
            f"{'GB/s':>8} {'roofline':>8} {'peak mem':>9}")
    lines = [head, "-" * len(head)]
    for row in report["results"]:
        lines.append(
            f"{row['kind']:<11} {row['engine']:<8} {row['weights']:<10} {fmt(row['skip_ratio'], '.2f'):>5} "
            f"{row['layers_kept']:>5} {row['seconds']:>9.3f} {row['tokens_per_s']:>10.1f} {row['slot_tokens_per_s']:>10.1f} "
            f"{fmt(row['speedup_vs_r0'], '.3f'):>8} {fmt(row['ideal_speedup'], '.3f'):>7} "
            f"{fmt(row['fraction_of_ideal'], '.3f'):>6} {fmt(row['log_rho_abs_mean'], '.2e'):>8} "
            f"{fmt(row['decode_step_seconds'] and row['decode_step_seconds'] * 1e3, '.2f'):>8} "
            f"{row['weight_bytes_per_step'] / 1e9:>9.4f} "
            f"{fmt(row['achieved_weight_bandwidth_Bps'] and row['achieved_weight_bandwidth_Bps'] / 1e9, '.1f'):>8} "
            f"{fmt(row['roofline_fraction'], '.3f'):>8} {fmt_bytes(row['peak_gpu_mem_bytes']):>9}")
    s = report["summary"]
    for g in s["groups"]:
        lines.append(f"{g['engine']}/{g['weights']}: t_other {g['t_other_s']:.4f}s ({100 * g['t_other_share']:.1f}% of r=0), "
                     f"t_layers {g['t_layers_s']:.4f}s; r=0 vs generate: {fmt(g['r0_speedup_vs_generate'], '.3f')} "
                     f"(useful tok/s ratio); |log rho| at r=0 mean {fmt(g['log_rho_abs_mean'], '.2e')} "
                     f"max {fmt(g['log_rho_abs_max'], '.2e')}")
    lines.append(f"max RSS {fmt_bytes(s['max_rss_bytes'])}; device {report['device']['name']}")
    return "\n".join(lines)
