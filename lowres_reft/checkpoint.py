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

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lowres_reft.errors import UsageError

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


def load_trainer_files(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(optimizer_state, rng_state, trainer_state) of a verified checkpoint."""
    check_checkpoint(path)
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    rng_state = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return optimizer_state, rng_state, trainer_state
