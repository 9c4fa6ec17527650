"""`lowres-reft run [RECIPE] [--set SECTION.KEY=VALUE ...] [--resume]`: train a recipe (the demo's by default)."""

from __future__ import annotations

import argparse

DEFAULT_RECIPE = "recipes/tiny-reasoning.toml"  # the demo (`make demo`)


def add_parser(subparsers) -> None:
    run = subparsers.add_parser("run", help="train a recipe")
    run.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help=f"TOML recipe (default {DEFAULT_RECIPE})")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a recipe key, e.g. --set train.steps=20 (repeatable)")
    run.add_argument("--resume", action="store_true", help="continue from the run's last good checkpoint")


def run(args: argparse.Namespace) -> int:
    from lowres_reft.config import load_recipe
    from lowres_reft.run.loop import train

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        train(recipe, resume=args.resume)
    except KeyboardInterrupt as stop:  # run.stop.RunStopped carries 128 + the signal number
        return getattr(stop, "exit_code", 130)
    return 0
