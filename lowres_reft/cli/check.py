"""`lowres-reft check RECIPE [--set ...]`: validate a recipe (reward names included) and print it with every default."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    check = subparsers.add_parser("check", help="validate a recipe and print it resolved")
    check.add_argument("recipe")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    from lowres_reft.config import load_recipe
    from lowres_reft.config.toml import recipe_to_toml
    from lowres_reft.data.rewards import resolve_rewards

    recipe = load_recipe(args.recipe, args.overrides)
    resolve_rewards(recipe.reward.functions)  # `check` promises what `run` will accept: reward names included
    print(recipe_to_toml(recipe))
    return 0
