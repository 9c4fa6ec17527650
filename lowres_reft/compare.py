"""`lowres-reft compare`: nested vs on-policy side by side, same seeds, one table (markdown + JSON) and one plot.

Each variant (skip ratio x correction, plus the adaptive schedule when asked) runs the recipe once per seed through
the normal trainer. r = 0 is standard on-policy ReFT and runs once, with correction "none" (at r = 0 and top_p = 1
every ratio is 1, so the corrections coincide). Runs already finished in the output dir are reused, so an
interrupted sweep continues where it stopped. With `--jobs N > 1` the pending runs go to N `lowres-reft run`
subprocesses at a time, each limited to cpu_count // N threads, with its output in `<out>/<run>.log`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def add_parser(sub) -> None:
    cmp = sub.add_parser("compare", help="run nested vs on-policy variants with the same seeds; table + plot")
    cmp.add_argument("recipe")
    cmp.add_argument("--skip-ratios", default="0,0.25,0.5", help="comma-separated skip ratios (default 0,0.25,0.5)")
    cmp.add_argument("--corrections", default="none,tis,retrace", help="comma-separated corrections for r > 0")
    cmp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    cmp.add_argument("--adaptive", action="store_true", help="also run behavior.schedule = adaptive (retrace)")
    cmp.add_argument("--out", help="output dir (default runs/compare-<recipe name>)")
    cmp.add_argument("--jobs", type=int, default=1,
                     help="runs at a time, each in its own process with cpu_count // jobs threads (default 1)")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="recipe override applied to every variant")


def parse_list(text: str, kind, name: str) -> list:
    from lowres_reft.errors import UsageError

    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{name}: expected a comma-separated list, got {text!r}") from None
    if not values:
        raise UsageError(f"--{name}: empty list")
    return values


def variants(ratios: list[float], corrections: list[str], adaptive: bool) -> list[dict]:
    """The variant grid: name + recipe overrides."""
    out = []
    for r in ratios:
        for c in (["none"] if r == 0 else corrections):
            out.append({"name": f"r={r:g} {c}", "skip_ratio": r, "correction": c,
                        "sets": [f"behavior.skip_ratio={r}", f"loss.correction={c}"]})
    if adaptive:
        out.append({"name": "adaptive retrace", "skip_ratio": None, "correction": "retrace",
                    "sets": ["behavior.schedule=adaptive", "loss.correction=retrace"]})
    return out


def summarize_run(run_dir: Path) -> dict:
    """Numbers of one finished run, read back from its metrics.jsonl and eval.json."""
    from lowres_reft.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    rl = [r for r in records if r.get("stage") == "rl"]
    evals = {e["label"]: e["accuracy"] for e in json.loads((run_dir / "eval.json").read_text())["history"]}
    ess = [r["ess"] for r in rl if r.get("ess") is not None]
    return {
        "final_accuracy": evals.get("final"),
        "start_accuracy": evals.get("after_warmup", evals.get("before_training")),
        "rollout_tokens_per_s": sum(r["rollout_tokens"] for r in rl) / max(1e-9, sum(r["rollout_seconds"] for r in rl)),
        "rollout_seconds": sum(r["rollout_seconds"] for r in rl),
        "mean_ess": sum(ess) / len(ess) if ess else None,
        "mean_skip_ratio": sum(r.get("skip_ratio", 0.0) for r in rl) / max(1, len(rl)),
    }


def aggregate(runs: list[dict]) -> dict:
    """mean and std (over seeds) of every numeric field."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r[key], (int, float))]
        if values:
            out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def markdown_table(rows: list[dict], seeds: list[int]) -> str:
    def cell(stat, scale=1.0, digits=1):
        return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}" if stat else "n/a"

    lines = [
        f"| variant | start acc % | final acc % | rollout tok/s | rollout time s | mean ESS | mean r |  (mean ± std over seeds {seeds})",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["stats"]
        lines.append(
            f"| {row['name']} | {cell(s.get('start_accuracy'), 100)} | {cell(s.get('final_accuracy'), 100)} | "
            f"{cell(s.get('rollout_tokens_per_s'), 1, 0)} | {cell(s.get('rollout_seconds'), 1, 1)} | "
            f"{cell(s.get('mean_ess'), 1, 2)} | {cell(s.get('mean_skip_ratio'), 1, 2)} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title, scale in zip(axes, ("final_accuracy", "rollout_tokens_per_s", "mean_ess"),
                                     ("final eval accuracy (%)", "rollout tokens/s", "mean ESS"), (100, 1, 1)):
        means = [r["stats"].get(key, {}).get("mean", 0.0) * scale for r in rows]
        stds = [r["stats"].get(key, {}).get("std", 0.0) * scale for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from lowres_reft.config import load_recipe
    from lowres_reft.errors import UsageError
    from lowres_reft.trainer import train

    ratios = parse_list(args.skip_ratios, float, "skip-ratios")
    corrections = parse_list(args.corrections, str, "corrections")
    seeds = parse_list(args.seeds, int, "seeds")
    if args.jobs < 1:
        raise UsageError(f"--jobs: expected a number of runs at a time >= 1, got {args.jobs}")
    base = load_recipe(args.recipe, args.overrides)  # validate once before running anything
    grid = variants(ratios, corrections, args.adaptive)
    for v in grid:  # validate every variant's recipe up front too
        load_recipe(args.recipe, args.overrides + v["sets"])
    out = Path(args.out or Path(base.log.output_dir) / f"compare-{base.run_name}")
    out.mkdir(parents=True, exist_ok=True)
    runs = [(v, seed, f"{v['name'].replace('=', '').replace(' ', '-')}-seed{seed}") for v in grid for seed in seeds]
    pending = [(v, seed, name) for v, seed, name in runs if not _finished(out / name)]
    settings = {name: args.overrides + v["sets"] + [f"train.seed={seed}", f"log.output_dir={out}",
                                                    f"log.run_name={name}", "log.progress=none"]
                for v, seed, name in pending}
    if args.jobs > 1 and len(pending) > 1:
        failed = _run_parallel(args.recipe, base, out, pending, settings, args.jobs)
        if failed:
            for name, code in failed:
                print(f"compare: run {name} failed (exit {code}), see {out / (name + '.log')}", file=sys.stderr)
            return 1
    else:
        for v, seed, name in pending:
            print(f"== {v['name']} seed {seed}", flush=True)
            train(load_recipe(args.recipe, settings[name]), resume=(out / name).exists(), log=lambda *a: None)
    rows = []
    for v in grid:
        done = [summarize_run(out / name) | {"seed": seed} for w, seed, name in runs if w is v]
        rows.append({"name": v["name"], "skip_ratio": v["skip_ratio"], "correction": v["correction"],
                     "runs": done, "stats": aggregate([{k: x for k, x in r.items() if k != "seed"} for r in done])})
    table = markdown_table(rows, seeds)
    (out / "compare.md").write_text(table)
    (out / "compare.json").write_text(json.dumps({"recipe": str(args.recipe), "overrides": args.overrides,
                                                  "seeds": seeds, "variants": rows}, indent=1))
    plot(rows, out / "compare.png")
    print(table)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


def _run_parallel(recipe: str, base, out: Path, pending: list, settings: dict, jobs: int) -> list[tuple[str, int]]:
    """Run `pending` as `lowres-reft run` subprocesses, `jobs` at a time; returns the (name, exit code) failures."""
    from lowres_reft.model import model_path

    model_path(base.model, out)  # build the builtin model once, before the runs share its cache
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def one(item) -> tuple[str, int]:
        v, seed, name = item
        command = [sys.executable, "-m", "lowres_reft", "run", str(recipe),
                   *[arg for s in settings[name] for arg in ("--set", s)]]
        if (out / name).exists():
            command.append("--resume")
        print(f"== {v['name']} seed {seed} (log: {out / (name + '.log')})", flush=True)
        with open(out / f"{name}.log", "w") as log:
            return name, subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, pending))
    return [(name, code) for name, code in results if code != 0]


def _finished(run_dir: Path) -> bool:
    path = run_dir / "eval.json"
    if not path.is_file():
        return False
    return any(e.get("label") == "final" for e in json.loads(path.read_text())["history"])
