"""What `lowres-reft eval TARGET` names: a run checkpoint (adapter + recipe), a run directory (its last good
checkpoint), a Hugging Face model directory or hub name, or the builtin tiny model. `resolve_target` raises a
one-line `UsageError` for anything that is none of these, before anything is loaded.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowres_reft.model.builtin import TINY_NAME
from lowres_reft.utils.errors import UsageError

_TRAIN_HINT = "train first with `lowres-reft run <recipe>`"


@dataclass
class Target:
    kind: str  # "checkpoint" | "model" | "builtin"
    text: str  # what the user typed
    name: str  # checkpoint dir, model dir / hub name, or builtin:tiny
    recipe: Any = None  # checkpoints: the Recipe
    checkpoint: Path | None = None
    cache_dir: Path | None = None  # where builtin:tiny lives


def _looks_like_path(text: str) -> bool:
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        return True
    # "runs/myrun" when ./runs exists is a local path, not a hub repo name
    head = text.split("/", 1)[0]
    return "/" in text and Path(head).expanduser().is_dir()


def resolve_target(text: str, cache_dir: str | Path = "runs") -> Target:
    """What TARGET names; raises UsageError (one line) when it is nothing we can evaluate."""
    if text == TINY_NAME:
        return Target("builtin", text, TINY_NAME, cache_dir=Path(cache_dir))
    if text.startswith("builtin:"):
        raise UsageError(f"{text}: unknown builtin model (the only one is {TINY_NAME})")
    path = Path(text).expanduser()
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{text}: broken symlink (points to {os.readlink(path)}, which does not exist)")
    if not path.exists():
        if _looks_like_path(text):
            raise UsageError(f"{text}: no such model, checkpoint or run directory")
        return Target("model", text, text)  # a hub name: loading says whether it is reachable
    if not path.is_dir():
        raise UsageError(f"{text}: not a model directory, checkpoint or run directory (it is a file)")
    if (path / "adapter").is_dir() or (path / "recipe.toml").is_file():
        return _checkpoint_target(text, path)
    if (path / "config.json").is_file():
        _check_model_config(text, path / "config.json")
        return Target("model", text, str(path))
    if (path / "adapter_config.json").is_file():
        raise UsageError(
            f"{text}: an adapter-only directory; evaluate the checkpoint it was exported from, "
            "or a merged export (`lowres-reft export <checkpoint> --merged DIR`)"
        )
    from lowres_reft.run.checkpoint import LAST, latest_good_checkpoint, list_checkpoints

    if (path / LAST).exists():
        return _checkpoint_target(text, path / LAST)
    if list_checkpoints(path):
        good = latest_good_checkpoint(path, warn=lambda msg: print(msg, file=sys.stderr))
        if good is None:
            raise UsageError(f"{text}: run directory has no complete checkpoint; {_TRAIN_HINT}")
        return _checkpoint_target(text, good)
    if (path / "metrics.jsonl").is_file():
        raise UsageError(f"{text}: run directory has no checkpoint yet; {_TRAIN_HINT}")
    raise UsageError(
        f"{text}: not a model directory (no config.json), checkpoint (adapter/ + recipe.toml) "
        "or run directory (checkpoint-*)"
    )


def _check_model_config(text: str, config: Path) -> None:
    """A Hugging Face model directory's config.json names its model_type; anything else is not a model."""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{text}: not a model directory (config.json is unreadable: {type(err).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise UsageError(f"{text}: not a model directory (config.json has no model_type)")


def _checkpoint_target(text: str, ckpt: Path) -> Target:
    if not (ckpt / "adapter" / "adapter_config.json").is_file():
        raise UsageError(f"{ckpt}: not a checkpoint (no adapter/adapter_config.json); {_TRAIN_HINT}")
    if not (ckpt / "recipe.toml").is_file():
        raise UsageError(f"{ckpt}: not a checkpoint (no recipe.toml); {_TRAIN_HINT}")
    from lowres_reft.config import load_recipe
    from lowres_reft.run.checkpoint import check_checkpoint

    check_checkpoint(ckpt)

    recipe = load_recipe(ckpt / "recipe.toml")
    resolved = ckpt.resolve()
    return Target("checkpoint", text, str(ckpt), recipe=recipe, checkpoint=ckpt, cache_dir=resolved.parent.parent)
