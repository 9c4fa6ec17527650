"""`lowres-reft plan RECIPE [--gpu-memory 24GiB] [--model-config NAME]`: the peak memory of each phase of a run,
itemized, against the GPU's memory, and the largest micro-batches that fit (`run.plan`). Works offline for the
built-in shapes (`--model-config`) and for any model whose config is cached or on disk."""

from __future__ import annotations

import argparse
import re

from lowres_reft.model.shapes import KNOWN_SHAPES
from lowres_reft.utils.errors import UsageError

UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "kb": 10**3, "mb": 10**6,
         "gb": 10**9, "tb": 10**12, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """"24GiB", "24 GB", "16G", "12000MiB" -> bytes (GiB/MiB/G/M binary, GB/MB decimal)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise UsageError(f"--gpu-memory {text!r}: expected a size such as 24GiB, 16GB or 12000MiB")
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise UsageError(f"--gpu-memory {text!r}: must be more than 0")
    return size


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="peak memory of each phase of a run, and the micro-batches that fit a GPU")
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--gpu-memory", default="24GiB", help="the GPU's memory (default 24GiB)")
    p.add_argument("--model-config", choices=KNOWN_SHAPES,
                   help="a built-in model shape instead of the recipe model's config (offline)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length to plan for (default: [data] max_prompt_tokens)")


def run(args: argparse.Namespace) -> int:
    from lowres_reft.config import load_recipe
    from lowres_reft.run.plan import MARGIN, describe, recipe_shape, resolve_auto

    budget = parse_size(args.gpu_memory)
    if args.prompt_tokens is not None and args.prompt_tokens < 1:
        raise UsageError(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")
    recipe = load_recipe(args.recipe, args.overrides)
    shape, source = recipe_shape(recipe, args.model_config)
    resolved, notes = resolve_auto(recipe, shape, budget, args.prompt_tokens)
    print(describe(resolved, shape, source, budget, args.prompt_tokens, notes, margin=MARGIN))
    return 0
