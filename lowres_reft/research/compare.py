"""`lowres-reft compare`: nested vs on-policy side by side, same seeds, one table (markdown + JSON) and one plot.

Each variant (skip ratio x correction, plus the adaptive schedule when asked) runs the recipe once per seed through
the normal trainer. r = 0 is standard on-policy ReFT and runs once, with correction "none" (at r = 0 and top_p = 1
every ratio is 1, so the corrections coincide). Runs already finished in the output dir are reused, so an
interrupted sweep continues where it stopped. With `--jobs N > 1` the pending runs go to N `lowres-reft run`
subprocesses at a time, each limited to cpu_count // N threads, with its output in `<out>/<run>.log`.

Every run evaluates every `--eval-every` steps (default: the recipe's `[eval] every`), and its accuracy curve
against RL wall time and rollout tokens (`curves.py`; evaluation time not counted) gives the equal-time table
and `compare-time.png`: does nested pay off at equal wall time? A run without warm-up evaluates before training,
so each curve starts at its start accuracy. `--shared-start`: per seed, every variant starts from the same shared
start (the recipe's base + warm-up and skip distillation, merged, built once), so the warm-up is paid once and is the
same for all. `--trl` adds TRL's `GRPOTrainer` (`research/trl_curves.py`), always from the shared start, and TRL's runs
join ours in the same `--jobs` scheduling (subprocesses with the same thread count as ours).
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


def parse_list(text: str, kind, name: str) -> list:
    from lowres_reft.utils.errors import UsageError

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
    """Numbers of one finished run, read back from its metrics.jsonl and eval.json, with its accuracy curve."""
    from lowres_reft.research.curves import curve_from_metrics
    from lowres_reft.run.metrics import read_metrics

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
        "curve": curve_from_metrics(records),
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
    from lowres_reft.utils.errors import UsageError

    ratios = parse_list(args.skip_ratios, float, "skip-ratios")
    corrections = parse_list(args.corrections, str, "corrections")
    seeds = parse_list(args.seeds, int, "seeds")
    if args.jobs < 1:
        raise UsageError(f"--jobs: expected a number of runs at a time >= 1, got {args.jobs}")
    if args.eval_every is not None and args.eval_every < 0:
        raise UsageError(f"--eval-every: expected a number of steps >= 0, got {args.eval_every}")
    if args.trl:
        from lowres_reft.bench import trl_runs
        from lowres_reft.research import trl_curves

        trl_curves.check_available()
    base = load_recipe(args.recipe, args.overrides)  # validate once before running anything
    if args.trl:
        trl_runs.check_comparable(base)
    eval_every = base.eval.every if args.eval_every is None else args.eval_every
    grid = variants(ratios, corrections, args.adaptive)
    for v in grid:  # validate every variant's recipe up front too
        load_recipe(args.recipe, args.overrides + v["sets"])
    out = Path(args.out or Path(base.log.output_dir) / f"compare-{base.run_name}")
    out.mkdir(parents=True, exist_ok=True)
    common = args.overrides + [f"eval.every={eval_every}", f"log.output_dir={out}", "log.progress=none"]
    if base.warmup.steps == 0:  # the curve's first point: the start's accuracy (after a warm-up, it is evaluated)
        common.append("eval.before_training=true")
    shared = args.trl or args.shared_start
    prefix = "shared-" if shared else ""  # runs from the shared start are not those with their own warm-up
    runs = [(v, seed, f"{prefix}{v['name'].replace('=', '').replace(' ', '-')}-seed{seed}") for v in grid for seed in seeds]
    pending = [(v, seed, name) for v, seed, name in runs if not _finished(out / name)]
    starts = {}
    if shared:  # the shared starts first: every run of the seed loads it
        from lowres_reft.research import trl_curves

        start_recipe = load_recipe(args.recipe, args.overrides + [f"log.output_dir={out}"])
        starts = {seed: trl_curves.shared_start(start_recipe, seed, out) for seed in seeds}
    settings = {name: common + v["sets"] + [f"train.seed={seed}", f"log.run_name={name}"]
                + (trl_curves.start_overrides(out, seed) if shared else []) for v, seed, name in pending}
    trl_pending = [seed for seed in starts if args.trl and not trl_curves.finished(out, seed)]
    if not _run_all(args, base, out, pending, settings, trl_pending, eval_every):
        return 1
    for seed in trl_pending:
        trl_curves.evaluate_run(start_recipe, out, seed)
    rows = []
    for v in grid:
        done = [summarize_run(out / name) | {"seed": seed} for w, seed, name in runs if w is v]
        rows.append({"name": v["name"], "skip_ratio": v["skip_ratio"], "correction": v["correction"], "runs": done})
    if args.trl:
        rows.append({"name": "trl", "skip_ratio": 0.0, "correction": "none",
                     "runs": [trl_curves.read_run(out, seed) | {"seed": seed} for seed in seeds]})
    for row in rows:
        row["stats"] = aggregate([{k: x for k, x in r.items() if k != "seed"} for r in row["runs"]])
    write_outputs(args, out, rows, seeds, eval_every)
    return 0


def write_outputs(args: argparse.Namespace, out: Path, rows: list[dict], seeds: list[int], eval_every: int) -> None:
    """compare.md (the per-variant table, then the equal-time one), compare.json, compare.png, compare-time.png."""
    from lowres_reft.research.curves import budget_markdown, equal_budget

    curves = {row["name"]: [r["curve"] for r in row["runs"]] for row in rows}
    reference = "r=0 none" if "r=0 none" in curves else rows[0]["name"]
    equal_time = equal_budget(curves, reference)
    table = markdown_table(rows, seeds) + "\n" + budget_markdown(equal_time)
    (out / "compare.md").write_text(table)
    (out / "compare.json").write_text(json.dumps({"recipe": str(args.recipe), "overrides": args.overrides,
                                                  "seeds": seeds, "eval_every": eval_every, "trl": args.trl,
                                                  "variants": rows, "equal_time": equal_time}, indent=1))
    plot(rows, out / "compare.png")
    plot_curves(curves, out / "compare-time.png")
    print(table)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}, {out / 'compare-time.png'}")


def plot_curves(curves: dict[str, list[list[dict]]], path: Path) -> None:
    """Accuracy vs RL seconds and vs rollout tokens: per variant the mean over seeds (a step line) +- std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowres_reft.research.curves import mean_curve

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, cost, label in zip(axes, ("rl_seconds", "rollout_tokens"), ("RL wall time (s, evaluation excluded)",
                                                                         "rollout tokens")):
        colors = plt.get_cmap("tab20").colors  # one color per variant (tab10 repeats after 10 variants)
        for i, (name, runs) in enumerate(curves.items()):
            m = mean_curve(runs, cost)
            mean = [100 * a for a in m["mean"]]
            style = ({"color": "black", "linestyle": "--"} if name == "trl" else {"color": colors[(2 * i) % 20 + (i // 10) % 2]})
            line = ax.step(m["x"], mean, where="post", label=name, linewidth=2.2 if name.startswith("r=0 ") else 1.4,
                           **style)[0]
            ax.fill_between(m["x"], [a - 100 * s for a, s in zip(mean, m["std"])],
                            [a + 100 * s for a, s in zip(mean, m["std"])], step="post", alpha=0.1,
                            color=line.get_color())
            for c in runs:  # each seed's evaluations, so one sees where runs end
                ax.plot([p[cost] for p in c], [100 * p["accuracy"] for p in c], ".", color=line.get_color(), alpha=0.5)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("accuracy vs training cost (mean ± std over seeds; a seed holds its last value after it ends)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_all(args, base, out: Path, pending: list, settings: dict, trl_pending: list[int], eval_every: int) -> bool:
    """Run our pending runs and TRL's; False (after saying which) when any failed.

    `--jobs N > 1`: all of them N at a time, each a subprocess with cpu_count // N threads. Else ours run in this
    process one after another, then TRL's, one at a time, in a subprocess with this process's thread count."""
    import torch

    from lowres_reft.config import load_recipe
    from lowres_reft.run.loop import train

    jobs = [(f"{v['name']} seed {seed}", name, _run_command(args.recipe, settings[name], (out / name).exists()))
            for v, seed, name in pending]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else torch.get_num_threads()
    if trl_pending:
        from lowres_reft.research import trl_curves

        jobs += [(f"trl seed {seed}", f"trl-seed{seed}",
                  trl_curves.child_command(args.recipe, args.overrides + [f"log.output_dir={out}"], out, seed,
                                           base.train.steps, eval_every, threads)) for seed in trl_pending]
    if args.jobs > 1 and len(jobs) > 1:
        failed = _run_parallel(base, out, jobs, args.jobs, threads)
    else:
        for v, seed, name in pending:
            print(f"== {v['name']} seed {seed}", flush=True)
            train(load_recipe(args.recipe, settings[name]), resume=(out / name).exists(), log=lambda *a: None)
        failed = [(name, code) for label, name, command in jobs[len(pending):]
                  if (code := _run_logged(out, label, name, command, threads)) != 0]
    for name, code in failed:
        print(f"compare: run {name} failed (exit {code}), see {out / (name + '.log')}", file=sys.stderr)
    return not failed


def _run_command(recipe: str, overrides: list[str], resume: bool) -> list[str]:
    command = [sys.executable, "-m", "lowres_reft", "run", str(recipe), *[arg for s in overrides for arg in ("--set", s)]]
    return command + ["--resume"] if resume else command


def _run_parallel(base, out: Path, jobs: list, parallel: int, threads: int) -> list[tuple[str, int]]:
    """Run the (label, name, command) `jobs` as subprocesses, `parallel` at a time; returns the (name, exit code)
    failures."""
    from lowres_reft.model.loader import model_path

    model_path(base.model, out)  # build the builtin model once, before the runs share its cache

    def one(job) -> tuple[str, int]:
        label, name, command = job
        return name, _run_logged(out, label, name, command, threads)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results = list(pool.map(one, jobs))
    return [(name, code) for name, code in results if code != 0]


def _run_logged(out: Path, label: str, name: str, command: list[str], threads: int) -> int:
    """One subprocess limited to `threads` threads, its output in `<out>/<name>.log`; its exit code."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"== {label} (log: {out / (name + '.log')})", flush=True)
    with open(out / f"{name}.log", "w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def _finished(run_dir: Path) -> bool:
    path = run_dir / "eval.json"
    if not path.is_file():
        return False
    return any(e.get("label") == "final" for e in json.loads(path.read_text())["history"])
