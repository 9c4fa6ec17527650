"""`lowres-reft bench trl`: our trainer side by side with TRL's `GRPOTrainer` on identical settings (CPU).

For every seed: one shared start (the recipe's base + our warm-up, merged; see `trl_runs.py` for how every setting
is matched), then one training run per variant, each in a fresh single-threaded subprocess, one at a time, the
tools alternating (seed 0: trl, ours-r0, ours-r0.25; seed 1: the same order, ...). Each run's adapter is then
evaluated by the same code (greedy, held-out set). Reported per variant, mean +- std over seeds: step time
(first step excluded as warm-up; with it in the JSON), rollout tokens/s, the child's peak RSS, held-out accuracy;
ratios are of the means, vs TRL. Needs trl (`pip install "lowres-reft[bench]"`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from lowres_reft.bench.common import check_positive, fmt, make_report, write_json
from lowres_reft.utils.errors import UsageError

VARIANTS = ("trl", "ours-r0", "ours-r0.25")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="recipes/tiny-cpu.toml", help="recipe giving every setting (default tiny-cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe key (repeatable)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the recipe's [train] steps)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of every run (default 1)")
    parser.add_argument("--out", default="runs/bench-trl", help="working directory: starts, runs, logs (default runs/bench-trl)")
    parser.add_argument("--json", dest="json_out", help="write the report here")


def parse_list(text: str, name: str, convert=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"--{name}: give at least one value")
    try:
        return [convert(t) for t in items]
    except ValueError:
        raise UsageError(f"--{name}: cannot read {text!r} as a comma-separated list of integers") from None


def check_args(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    seeds = parse_list(args.seeds, "seeds", int)
    variants = parse_list(args.variants, "variants")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UsageError(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    if len(set(variants)) != len(variants) or len(set(seeds)) != len(seeds):
        raise UsageError("--variants and --seeds must not repeat a value")
    if args.steps is not None:
        check_positive(steps=args.steps)
    if importlib.util.find_spec("trl") is None:
        raise UsageError('bench trl needs TRL: pip install "lowres-reft[bench]"')
    return seeds, variants


def run_trl_side(args: argparse.Namespace) -> int:
    from lowres_reft.config import load_recipe

    seeds, variants = check_args(args)
    recipe = load_recipe(args.recipe, args.overrides)
    steps = args.steps or recipe.train.steps
    from lowres_reft.bench import trl_runs

    trl_runs.check_comparable(recipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench trl: {recipe.source}, {steps} steps, seeds {seeds}, variants {variants}, {args.threads} thread(s); "
          f"work dir {out}", flush=True)
    results, starts = [], []
    for seed in seeds:
        base = trl_runs.prepare_base(recipe, seed, out / f"start-seed{seed}", log=lambda *a: None)
        start_acc = trl_runs.evaluate_adapter(recipe, base, None)
        starts.append({"seed": seed, "accuracy": start_acc})
        print(f"seed {seed}: start (base + warm-up) accuracy {start_acc:.3f}", flush=True)
        for variant in variants:
            row = run_child(args, variant, seed, steps, base, out)
            row["accuracy"] = trl_runs.evaluate_adapter(recipe, base, Path(row["adapter"]))
            results.append(row)
            print(f"seed {seed} {variant}: step {row['step_s']:.3f}s, rollout {row['rollout_tok_s']:.0f} tok/s, "
                  f"peak RSS {row['max_rss_bytes'] / 2**20:.0f} MiB, accuracy {row['accuracy']:.3f}", flush=True)
    summary = summarize(results, variants)
    config = {"recipe": str(recipe.source), "overrides": args.overrides, "steps": steps, "seeds": seeds,
              "variants": variants, "threads": args.threads, "trl": _trl_version(), "starts": starts}
    import torch

    report = make_report(command_line(), torch.device("cpu"), config, summary, results)
    print(trl_table(report))
    write_json(report, args.json_out)
    return 0


def command_line() -> str:
    return "lowres-reft " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "lowres-reft bench trl"


def _trl_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("trl")


def run_child(args: argparse.Namespace, variant: str, seed: int, steps: int, base: Path, out: Path) -> dict:
    """One training run in a fresh subprocess; returns its per-run numbers."""
    run_dir = out / "runs" / f"{variant}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    spec = {"variant": variant, "seed": seed, "steps": steps, "base": str(base), "run_dir": str(run_dir),
            "recipe": str(args.recipe), "overrides": list(args.overrides), "threads": args.threads,
            "result": str(out / "runs" / f"{variant}-seed{seed}.json")}
    spec_path = out / "runs" / f"{variant}-seed{seed}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = out / "runs" / f"{variant}-seed{seed}.log"
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "lowres_reft.bench.trl_runs", str(spec_path)], stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        lines = log_path.read_text(errors="replace").strip().splitlines()
        raise UsageError(f"bench trl: {variant} seed {seed} failed (exit {proc.returncode}): "
                         f"{lines[-1] if lines else 'no output'}; log: {log_path}")
    raw = json.loads(Path(spec["result"]).read_text())
    return run_row(variant, seed, raw)


def run_row(variant: str, seed: int, raw: dict) -> dict:
    """Per-run numbers from the child's raw lists: step time without/with the first step, rollout tokens/s."""
    steps = raw["step_seconds"]
    timed = steps[1:] if len(steps) > 1 else steps
    tokens, seconds = sum(raw["rollout_tokens"]), sum(raw["rollout_seconds"])
    return {"variant": variant, "seed": seed, "steps": len(steps), "step_s": statistics.fmean(timed),
            "step_s_with_first": statistics.fmean(steps), "rollout_tokens": tokens, "rollout_seconds": seconds,
            "rollout_tok_s": tokens / max(seconds, 1e-9), "max_rss_bytes": raw["max_rss_bytes"],
            "wall_seconds": raw["wall_seconds"], "torch_threads": raw["torch_threads"], "adapter": raw["adapter"],
            "step_seconds": steps}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[dict], variants: list[str]) -> dict:
    """Per variant: mean and std over seeds of each measurement, and the ratio of means vs TRL."""
    out = {}
    for variant in variants:
        rows = [r for r in results if r["variant"] == variant]
        entry = {"seeds": len(rows)}
        for key in ("step_s", "step_s_with_first", "rollout_tok_s", "max_rss_bytes", "accuracy"):
            entry[key], entry[key + "_std"] = mean_std([float(r[key]) for r in rows])
        out[variant] = entry
    if "trl" in out:
        ref = out["trl"]
        for entry in out.values():
            entry["step_time_vs_trl"] = entry["step_s"] / ref["step_s"]
            entry["rollout_tok_s_vs_trl"] = entry["rollout_tok_s"] / ref["rollout_tok_s"]
            entry["max_rss_vs_trl"] = entry["max_rss_bytes"] / ref["max_rss_bytes"]
    return out


def trl_table(report: dict) -> str:
    """Markdown: one row per variant, mean +- std over seeds, ratios vs TRL."""
    lines = ["| variant | step time (s) | vs TRL | rollout tok/s | vs TRL | peak RSS (MiB) | held-out accuracy |",
             "|---|---|---|---|---|---|---|"]
    for variant, s in report["summary"].items():
        lines.append(
            f"| {variant} | {s['step_s']:.3f} ± {s['step_s_std']:.3f} | {fmt(s.get('step_time_vs_trl'), '.2f')}× "
            f"| {s['rollout_tok_s']:.0f} ± {s['rollout_tok_s_std']:.0f} | {fmt(s.get('rollout_tok_s_vs_trl'), '.2f')}× "
            f"| {s['max_rss_bytes'] / 2**20:.0f} ± {s['max_rss_bytes_std'] / 2**20:.0f} "
            f"| {100 * s['accuracy']:.1f} ± {100 * s['accuracy_std']:.1f} % |")
    return "\n".join(lines)
