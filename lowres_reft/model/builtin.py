"""Builtin models: `[model] name`s that are not hub names or paths but are made by this package on demand.

The loader resolves such a name through `BUILTIN_MODELS`: name -> "module:function", a function taking the
`[model]` section and a cache directory and returning the directory to load. The loader imports the module only
when a recipe names the model, so loading a real checkpoint never imports the code that builds (and pretrains)
a builtin one, and the model package depends on no builder.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowres_reft.config import ModelConfig

TINY_NAME = "builtin:tiny"
BUILTIN_MODELS = {TINY_NAME: "lowres_reft.tiny:resolve_model_dir"}


def builtin_model_dir(cfg: ModelConfig, cache_dir: str | Path) -> Path | None:
    """The directory of builtin model `cfg.name` (shipped, cached or built now), or None for any other name."""
    target = BUILTIN_MODELS.get(cfg.name)
    if target is None:
        return None
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(cfg, Path(cache_dir))
