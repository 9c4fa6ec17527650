"""Checkpoints: adapter (safetensors) + optimizer + scheduler + RNG + trainer state + recipe, written atomically.

Layout of `<run>/checkpoint-000010/`:
  adapter/            peft adapter (adapter_model.safetensors, adapter_config.json)
  optimizer.pt        optimizer + scheduler state dicts (tensors and numbers only: loaded with weights_only=True)
  rng.pt              torch CPU/CUDA and sampling-generator RNG states (weights_only)
  trainer_state.json  step, counters, skip-schedule and Python RNG state
  recipe.toml         the full recipe the run used
  manifest.json       sha256 of every file above (written last: a checkpoint without it is incomplete)
`<run>/checkpoint-last` is a symlink to the newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lowres_reft.config import Recipe, load_recipe, sections
from lowres_reft.config.toml import toml_value
from lowres_reft.utils.errors import UsageError

MANIFEST = "manifest.json"
LAST = "checkpoint-last"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer_state: dict[str, Any],
    rng_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    recipe_toml: str,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint-<step> via a temp dir + rename, point checkpoint-last at it, prune old ones."""
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".tmp-checkpoint-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
        sort_target_modules(tmp / "adapter" / "adapter_config.json")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_state, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (tmp / "recipe.toml").write_text(recipe_toml)
        write_manifest(tmp, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:  # disk full, quota, permissions: the previous checkpoint stays the newest complete one
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(
            f"could not write checkpoint {final} ({err.strerror or err}); free disk space or set [log] output_dir "
            f"(the previous checkpoint is intact)"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    link_tmp = run_dir / f".{LAST}.{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(final.name)
    os.replace(link_tmp, run_dir / LAST)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_manifest(path: Path, step: int) -> None:
    """manifest.json: the sha256 of every file of the checkpoint dir (written last)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(path)): _sha256(p) for p in files}
    (path / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))


def check_checkpoint(path: Path) -> None:
    """UsageError (one line) unless the checkpoint is complete and every checksum matches."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise UsageError(f"{path}: checkpoint {problem}; use an earlier checkpoint-NNNNNN of the run")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint dirs (complete or not), oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob("checkpoint-[0-9]*") if p.is_dir())


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is complete and every checksum matches, else what is wrong."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "incomplete (no manifest.json)"
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json is corrupted"
    for name, digest in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def latest_good_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; corrupted ones are reported and skipped."""
    for candidate in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        warn(f"warning: skipping {candidate}: {problem}")
    return None


def sort_target_modules(config_path: Path) -> None:
    """peft writes `target_modules` from a set, in a different order on each run: sort it, so the same adapter has
    the same bytes (and checksums) every time it is saved."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def finished(ckpt: Path, steps: int) -> bool:
    """Whether checkpoint `ckpt` (verified) ends a run of `steps` steps: saved after the final evaluation."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return state.get("step", 0) >= steps and any(h.get("label") == "final" for h in state.get("eval_history", []))


def load_trainer_files(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(optimizer_state, rng_state, trainer_state) of a verified checkpoint."""
    check_checkpoint(path)
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    rng_state = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return optimizer_state, rng_state, trainer_state


# ------------------------------------------------------------------------------------------ resuming

RESUMABLE_KEYS = frozenset({
    "train.steps", "train.micro_batch_size", "train.gradient_checkpointing",
    "rollout.micro_batch", "rollout.engine", "rollout.weights", "loss.logprob_chunk",
    "data.eval_split", "data.max_eval_samples",
    "eval.every", "eval.max_new_tokens", "eval.batch_size", "eval.before_training",
    "checkpoint.every", "checkpoint.keep_last", "checkpoint.resume",
    "log.output_dir", "log.run_name", "log.progress", "log.trackers", "log.project",
    "export.merged_dtype",
})


def recipe_changes(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """(section.key, old value, new value) for every key whose value differs, in recipe order."""
    changes = []
    for section in sections():
        before, after = dataclasses.asdict(getattr(old, section)), dataclasses.asdict(getattr(new, section))
        changes += [(f"{section}.{key}", before[key], after[key]) for key in before if before[key] != after[key]]
    return changes


def describe_change(key: str, old: Any, new: Any) -> str:
    """`train.lr: 0.0005 -> 0.1` (values as TOML; an unset value as "unset")."""
    show = lambda v: "unset" if v is None else toml_value(list(v) if isinstance(v, tuple) else v)  # noqa: E731
    return f"{key}: {show(old)} -> {show(new)}"


def check_resume(recipe: Recipe, ckpt: Path, world: int) -> None:
    """Refuse to resume `ckpt` with a recipe that changes what the run is, or with another number of processes."""
    saved = load_recipe(ckpt / "recipe.toml")
    fixed = [describe_change(*c) for c in recipe_changes(saved, recipe) if c[0] not in RESUMABLE_KEYS]
    if fixed:
        raise UsageError(f"cannot resume {ckpt} with a changed recipe ({', '.join(fixed)}); restore these values, "
                         "or set [log] run_name to start a new run")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if recipe.train.steps < state["step"]:
        raise UsageError(f"[train] steps = {recipe.train.steps} is before the checkpoint's step {state['step']} ({ckpt}); "
                         f"set train.steps >= {state['step']}")
    saved_world = len(state.get("skip_schedule", [None]))
    if saved_world != world:  # the skip schedules and sampling generators are per process
        raise UsageError(f"{ckpt} was written by {saved_world} process(es); resume it with {saved_world} "
                         f"(this run has {world})")
