"""TRL's `GRPOTrainer` as one variant of `lowres-reft compare --trl`: the shared start, the run, its curve.

Per seed, every variant (ours and TRL) starts from the harness's shared start (`trl_runs.prepare_base`: the
recipe's base + our warm-up, merged), so every curve starts at the same accuracy. The TRL run is the harness's
child process (`python -m lowres_reft.bench.trl_runs SPEC`), saving its adapter every `eval_every` steps; each
saved adapter is evaluated afterwards by the harness's shared evaluation (`evaluate_adapter`), placed at the
cumulative per-step time (the harness's step clock) and rollout tokens of its step.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from lowres_reft.research.curves import curve_from_steps
from lowres_reft.utils.errors import UsageError
from lowres_reft.utils.fsutil import atomic_write_text


def check_available() -> None:
    if importlib.util.find_spec("trl") is None:
        raise UsageError('compare --trl needs TRL: pip install "lowres-reft[bench]"')


def start_dir(out: Path, seed: int) -> Path:
    return out / f"start-seed{seed}"


def shared_start(recipe, seed: int, out: Path) -> Path:
    """The seed's shared start (built once; reused when already in `out`)."""
    from lowres_reft.bench.trl_runs import prepare_base

    target = start_dir(out, seed)
    if not (target / "config.json").is_file():
        print(f"== shared start seed {seed} (base + warm-up, merged)", flush=True)
        prepare_base(recipe, seed, target, log=lambda *a: None)
    return target


def start_overrides(out: Path, seed: int) -> list[str]:
    """What our variants change to start from the shared start: its weights, no second warm-up (nor skip
    distillation: the start has it when the recipe asks), a start eval."""
    return [f"model.name={start_dir(out, seed).resolve()}", "warmup.steps=0", "warmup.skip_distill_steps=0",
            "eval.before_training=true"]


def run_dir(out: Path, seed: int) -> Path:
    return out / f"trl-seed{seed}"


def finished(out: Path, seed: int) -> bool:
    return (run_dir(out, seed) / "curve.json").is_file()


def child_command(recipe_path: str, overrides: list[str], out: Path, seed: int, steps: int, eval_every: int,
                  threads: int) -> list[str]:
    """The harness's child process for TRL's run of this seed (writes its spec file)."""
    work = run_dir(out, seed)
    work.mkdir(parents=True, exist_ok=True)
    spec = {"variant": "trl", "seed": seed, "steps": steps, "base": str(start_dir(out, seed)), "run_dir": str(work),
            "recipe": str(recipe_path), "overrides": list(overrides), "threads": threads,
            "result": str(work / "result.json"), "save_every": eval_every}
    atomic_write_text(work / "spec.json", json.dumps(spec))
    return [sys.executable, "-m", "lowres_reft.bench.trl_runs", str(work / "spec.json")]


def evaluate_run(recipe, out: Path, seed: int) -> None:
    """Evaluate the start and every saved adapter of the finished TRL run; writes `trl-seed<N>/curve.json`."""
    from lowres_reft.bench.trl_runs import evaluate_adapter

    work, base = run_dir(out, seed), start_dir(out, seed)
    raw = json.loads((work / "result.json").read_text())
    steps = len(raw["step_seconds"])
    saved = [(step, Path(path)) for step, path in raw["checkpoints"]] + [(steps, Path(raw["adapter"]))]
    evals = [(0, evaluate_adapter(recipe, base, None))]
    evals += [(step, evaluate_adapter(recipe, base, path)) for step, path in saved]
    curve = curve_from_steps(raw["step_seconds"], raw["rollout_tokens"], evals)
    rollout_seconds = sum(raw["rollout_seconds"])
    summary = {"final_accuracy": curve[-1]["accuracy"], "start_accuracy": curve[0]["accuracy"],
               "rollout_tokens_per_s": sum(raw["rollout_tokens"]) / max(1e-9, rollout_seconds),
               "rollout_seconds": rollout_seconds, "mean_ess": None, "mean_skip_ratio": 0.0}
    atomic_write_text(work / "curve.json", json.dumps({"curve": curve, "summary": summary}, indent=1))


def read_run(out: Path, seed: int) -> dict:
    """The finished run's summary numbers (as `compare.summarize_run` gives for ours) with its curve."""
    data = json.loads((run_dir(out, seed) / "curve.json").read_text())
    return data["summary"] | {"curve": data["curve"]}
