"""`lowres-reft build-base`: build the pretrained tiny base a recipe names and ship it into the package.

    lowres-reft build-base recipes/tiny-reasoning.toml recipes/tiny-cpu.toml       # rebuild the shipped bases
    lowres-reft build-base recipes/tiny-cpu.toml --set model.tiny_pretrain_steps=50 --out /tmp/bases

Each recipe's `[model]` must be `builtin:tiny` with `tiny_pretrain_steps > 0`. The base is always built afresh
(never taken from a cache or from the package), then copied with its manifest entry into `--out` (default: the
package's own `lowres_reft/tiny/bases/`, see `tiny.shipped`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("build-base", help="build the pretrained tiny base of a recipe and ship it")
    parser.add_argument("recipes", nargs="+", help="recipes whose [model] is builtin:tiny with tiny_pretrain_steps > 0")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe key in every recipe (repeatable)")
    parser.add_argument("--out", help="where to ship the bases (default: the package's lowres_reft/tiny/bases/)")


def run(args: argparse.Namespace) -> int:
    from lowres_reft.config import load_recipe
    from lowres_reft.model.builtin import TINY_NAME
    from lowres_reft.tiny.shipped import SHIPPED_DIR
    from lowres_reft.utils.errors import UsageError

    recipes = [load_recipe(path, args.overrides) for path in args.recipes]
    for path, recipe in zip(args.recipes, recipes):
        if recipe.model.name != TINY_NAME or recipe.model.tiny_pretrain_steps <= 0:
            raise UsageError(f"build-base: {path} does not use a pretrained tiny base ([model] name = "
                             f'"{TINY_NAME}" with tiny_pretrain_steps > 0)')
    out = Path(args.out) if args.out else SHIPPED_DIR
    out.mkdir(parents=True, exist_ok=True)
    for path, recipe in zip(args.recipes, recipes):
        shipped = build_and_ship(recipe.model, out)
        print(f"{path}: shipped {shipped}")
    return 0


def builder_args(model_cfg) -> dict:
    """The `tiny.builder.ensure_tiny_model` arguments a recipe's [model] gives (what the shipped base's name hashes)."""
    return {"layers": model_cfg.tiny_layers, "hidden": model_cfg.tiny_hidden, "heads": model_cfg.tiny_heads,
            "pretrain_steps": model_cfg.tiny_pretrain_steps, "layer_drop": model_cfg.tiny_layerdrop,
            "corpus": model_cfg.tiny_corpus, "seed": 0}


def build_and_ship(model_cfg, out: Path) -> Path:
    import torch
    import transformers

    from lowres_reft.tiny.builder import ensure_tiny_model
    from lowres_reft.tiny.shipped import ship
    from lowres_reft.utils.machine import cpu_name

    builder = builder_args(model_cfg)
    with tempfile.TemporaryDirectory(prefix="lowres-reft-base-") as scratch:
        start = time.perf_counter()
        built = ensure_tiny_model(scratch, log=print, use_shipped=False, **builder)
        info = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "seconds": round(time.perf_counter() - start, 1),
                "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__,
                "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY", torch.backends.cpu.get_cpu_capability())}
        return ship(built, builder, info, out)

