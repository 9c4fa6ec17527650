"""Experiment trackers (TensorBoard, W&B, MLflow, trackio, ...) through accelerate's tracker classes.

`[log] trackers = ["tensorboard", "wandb"]` (names as accelerate's `LoggerType` spells them; none by default)
mirrors every metrics line to those trackers; metrics.jsonl stays the source of truth and is written first.
The run config is the whole recipe, flattened to "section.key" (TensorBoard's hparams only take flat scalars).
Metric names are grouped as TRL and CleanRL do (`rollout/reward_mean`, `loss/kl`, `offpolicy/ess`,
`eval/accuracy`, ...) through one table, `GROUPED_NAMES`; a key missing from it goes under its stage
(`rl/<key>`, `warmup/<key>`), so nothing numeric is dropped. Lists and texts stay in metrics.jsonl only.

Where things go: TensorBoard (and aim) write under the run directory (`<run>/tensorboard/`); the hosted ones
use `[log] project` as their project/experiment and the run name as the run's name. Only rank 0 logs.
A tracker whose package is missing is a one-line error naming the pip package, raised before anything is
written (accelerate itself would skip it silently).
"""

from __future__ import annotations

import atexit
import difflib
import json
from pathlib import Path
from typing import Any

from lowres_reft.utils.errors import UsageError

# accelerate's tracker name -> the pip package that provides it.
PIP_PACKAGES = {
    "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
    "comet_ml": "comet-ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
}
# Trackers that take a run name through their own keyword (the rest only know the project).
_RUN_NAME_KWARG = {"wandb": "name", "trackio": "name", "mlflow": "run_name"}

# metrics.jsonl key -> tracker name, per stage. One table: add a row when the trainer logs something new.
GROUPED_NAMES: dict[str, dict[str, str]] = {
    "rl": {
        "reward_mean": "rollout/reward_mean", "reward_std": "rollout/reward_std",
        "rollout_accuracy": "rollout/accuracy", "rollout_tokens": "rollout/tokens",
        "rollout_seconds": "rollout/seconds", "rollout_tokens_per_s": "rollout/tokens_per_s",
        "mean_completion_len": "rollout/completion_len", "truncated_frac": "rollout/truncated_frac",
        "reward_timeouts": "rollout/reward_timeouts",
        "loss": "loss/loss", "kl": "loss/kl", "nested_kl": "loss/nested_kl", "clip_frac": "loss/clip_frac",
        "skip_ratio": "offpolicy/skip_ratio", "rho_mean": "offpolicy/rho_mean", "rho_min": "offpolicy/rho_min",
        "rho_max": "offpolicy/rho_max", "is_truncated_frac": "offpolicy/is_truncated_frac", "ess": "offpolicy/ess",
        "trace_mean": "offpolicy/trace_mean",
        "grad_norm": "train/grad_norm", "lr": "train/lr", "update_skipped": "train/update_skipped",
        "skipped_updates": "train/skipped_updates", "peak_mem_mb": "perf/peak_mem_mb",
        "step_seconds": "perf/step_seconds", "adapters_in_sync": "train/adapters_in_sync",
    },
    "eval": {"eval_accuracy": "eval/accuracy", "eval_n": "eval/n"},
    "warmup": {"loss": "warmup/loss", "lr": "warmup/lr", "grad_norm": "warmup/grad_norm", "tokens": "warmup/tokens",
               "update_skipped": "warmup/update_skipped", "step_seconds": "warmup/step_seconds"},
}
_NOT_METRICS = {"step", "stage", "warmup_step", "label"}


def grouped_metrics(record: dict[str, Any]) -> tuple[dict[str, float], int]:
    """A metrics.jsonl record -> ({grouped name: number}, tracker step). Booleans become 0/1; NaN stays NaN.

    Warm-up lines are stepped by their warm-up step (their own `warmup/` charts); the rest by the RL step.
    """
    stage = record.get("stage", "rl")
    table = GROUPED_NAMES.get(stage, {})
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_METRICS or isinstance(value, (str, list, tuple, dict)) or value is None:
            continue
        out[table.get(key, f"{stage}/{key}")] = float(value)
    step = record.get("warmup_step", 0) if stage == "warmup" else record.get("step", 0)
    return out, int(step)


def flat_config(recipe_dict: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"train": {"lr": 1e-5}} -> {"train.lr": 1e-5}; lists and tables become text (hparams take scalars only)."""
    out: dict[str, Any] = {}
    for section, values in recipe_dict.items():
        for key, value in values.items():
            if isinstance(value, list):
                value = ",".join(map(str, value))
            elif isinstance(value, dict):  # a generator's options table
                value = json.dumps(value, sort_keys=True)
            out[f"{section}.{key}"] = value
    return out


def check_trackers(names: tuple[str, ...]) -> None:
    """Unknown tracker names and missing packages -> one-line UsageError (call before writing anything)."""
    if not names:
        return
    import accelerate.utils

    for name in names:
        if name not in PIP_PACKAGES:
            close = difflib.get_close_matches(name, list(PIP_PACKAGES), n=1, cutoff=0.6)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            raise UsageError(f"[log] trackers: unknown tracker {name!r} ({hint}known: {', '.join(PIP_PACKAGES)})")
        if not getattr(accelerate.utils, f"is_{name}_available")():
            raise UsageError(f"[log] trackers: {name!r} needs the {PIP_PACKAGES[name]} package: "
                             f"pip install {PIP_PACKAGES[name]} (or remove it from [log] trackers)")


class TrackedLog:
    """The metrics.jsonl log, mirrored to experiment trackers (rank 0 only)."""

    def __init__(self, inner, trackers: list) -> None:
        self.inner, self.trackers, self.closed = inner, trackers, False
        atexit.register(self.close)  # a crashed run still closes its trackers (idempotent)

    def write(self, record: dict[str, Any]) -> None:
        self.inner.write(record)  # the source of truth first
        values, step = grouped_metrics(record)
        if values and not self.closed:
            for tracker in self.trackers:
                tracker.log(values, step=step)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for tracker in self.trackers:
                tracker.finish()


def open_trackers(inner, names: tuple[str, ...], project: str, run_name: str, run_dir: Path,
                  recipe_dict: dict[str, dict[str, Any]], resume_step: int | None = None):
    """`inner` (the metrics log) mirrored to the named trackers, started with the recipe as config."""
    if not names:
        return inner
    check_trackers(names)
    from accelerate import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    PartialState()  # accelerate's tracker classes log through its logger, which needs its process state
    trackers = []
    for name in dict.fromkeys(names):
        cls = LOGGER_TYPE_TO_CLASS[name]
        kwargs: dict[str, Any] = {}
        if name in _RUN_NAME_KWARG:
            kwargs[_RUN_NAME_KWARG[name]] = run_name
        if name == "tensorboard" and resume_step is not None:
            kwargs["purge_step"] = resume_step + 1  # drop events a killed run wrote after its checkpoint
        if cls.requires_logging_directory:
            tracker = cls(name, str(run_dir), **kwargs)  # <run>/tensorboard/
        else:
            tracker = cls(project, **kwargs)
        tracker.start()
        tracker.store_init_configuration(flat_config(recipe_dict))
        trackers.append(tracker)
    return TrackedLog(inner, trackers)
