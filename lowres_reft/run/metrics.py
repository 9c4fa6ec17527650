"""Metrics: an append-only JSONL log (one whole line per write) and a progress display."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from lowres_reft.utils.errors import UsageError
from lowres_reft.utils.fsutil import atomic_write_text

PROGRESS_KEYS = (("reward", "reward_mean"), ("acc", "rollout_accuracy"), ("tok/s", "rollout_tokens_per_s"),
                 ("ess", "ess"), ("loss", "loss"))


def json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null / strings."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


class MetricsWriteError(UsageError):
    """metrics.jsonl could not be written (disk full, quota, permissions); the file has no torn line."""


class MetricsLog:
    """Append-only JSONL, one write() per line. On resume, lines of steps after the checkpoint (and torn lines)
    are dropped; metrics are never deleted (a run restarted from step 0 moves the old file aside)."""

    def __init__(self, path: Path, resume_step: int | None = None, pending: list[dict[str, Any]] = ()) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and path.exists():
            path.rename(_free_name(path))
        for record in pending:  # lines the previous process computed but could not write (disk full)
            self.write(record)

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn line from a killed process
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one line with a single write(); on failure the file is cut back so no torn line stays."""
        data = (json.dumps(json_safe(record), sort_keys=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                if _write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write (no space left on device?)")
            except OSError as err:
                os.ftruncate(fd, size)
                raise MetricsWriteError(f"could not write {self.path} ({err.strerror or err})") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        """Nothing to release (every write opens and closes the file); trackers wrapping this log close theirs."""


def _write(fd: int, data: bytes) -> int:
    return os.write(fd, data)


def _free_name(path: Path) -> Path:
    """`metrics.jsonl.old-N` with the first free N."""
    n = 1
    while path.with_name(f"{path.name}.old-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.old-{n}")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """A tqdm bar on a terminal, one plain line per step otherwise.

    Within a step, `within(phase)` gives the callback that rollout and update loops call after each micro-batch:
    a second, transient tqdm bar on a terminal; in plain mode one line per micro-batch when the phase has more
    than one (a one-micro-batch phase says nothing the step line does not).
    """

    def __init__(self, total: int, initial: int, mode: str = "auto") -> None:
        self.mode = ("bar" if sys.stderr.isatty() else "plain") if mode == "auto" else mode
        self.total = total
        self.step = initial
        self.bar = None
        self.inner = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def within(self, phase: str):
        """Callback(done, total, tokens) for the micro-batches of `phase` ("rollout", "update") of the next step."""

        def report(done: int, total: int, tokens: int = 0) -> None:
            detail = f" ({tokens} tokens)" if tokens else ""
            if self.bar is not None:
                self._inner_bar(phase, done, total, detail)
            elif self.mode == "plain" and total > 1:
                print(f"  step {self.step + 1}/{self.total} {phase} {done}/{total}{detail}", flush=True)

        return report

    def _inner_bar(self, phase: str, done: int, total: int, detail: str) -> None:
        from tqdm import tqdm

        if self.inner is None or done == 1:
            if self.inner is not None:
                self.inner.close()
            self.inner = tqdm(total=total, desc=f"  {phase}", position=1, leave=False, dynamic_ncols=True)
        self.inner.n = done
        self.inner.set_postfix_str(detail.strip(" ()"), refresh=True)
        if done >= total:
            self.inner.close()
            self.inner = None

    def update(self, record: dict[str, Any]) -> None:
        self.step = record["step"]
        shown = {label: record.get(key) for label, key in PROGRESS_KEYS}
        text = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items() if v is not None)
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif self.mode == "plain":
            print(f"step {record['step']}/{self.total} {text} skip={list(record.get('skip_set', []))}", flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.mode != "none":
            print(text, flush=True)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
        if self.bar is not None:
            self.bar.close()


# How per-process values combine: sums (losses are already normalized by global counts), extremes, or means.
_SUMMED = {"rollout_tokens", "rollout_tokens_per_s", "loss", "kl", "nested_kl", "correct", "reward_timeouts"}
_MIN, _MAX = {"rho_min"}, {"rho_max", "peak_mem_mb", "step_seconds", "rollout_seconds"}
_SAME = {"step", "stage", "grad_norm", "update_skipped", "skipped_updates", "lr", "skip_ratio"}


def merge_records(records: list[dict]) -> dict:
    """One metrics line from every process's step_record: tokens/s summed, rewards averaged, skip sets listed."""
    import torch

    first = records[0]
    rewards = torch.tensor([x for r in records for x in r["rewards"]])
    merged = {"step": first["step"], "stage": first["stage"], "reward_mean": float(rewards.mean()),
              "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
              "rollout_accuracy": sum(r["correct"] for r in records) / rewards.numel()}
    for key, value in first.items():
        if key in merged or key in ("rewards", "correct"):
            continue
        values = [r[key] for r in records]
        if key in ("skip_set", "skip_sets"):
            merged[key] = value if len(records) == 1 else values  # per process: an ensemble of nested models
        elif key in _SAME:
            merged[key] = value
        elif key in _SUMMED:
            merged[key] = sum(values)
        elif key in _MIN:
            merged[key] = min(values)
        elif key in _MAX:
            merged[key] = max(values)
        else:
            merged[key] = sum(values) / len(values)
    return merged


class NullLog:
    """Metrics sink of the non-main processes."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
