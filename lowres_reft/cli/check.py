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
    print(memory_line(recipe))
    return 0


def memory_line(recipe) -> str:
    """The memory plan's total as a TOML comment: the peak phase on a 24 GiB GPU (or the CPU), or why there is none."""
    from lowres_reft.run.plan import fmt_gib, plan_memory, recipe_shape, resolve_auto
    from lowres_reft.utils.errors import UserError

    on_gpu = recipe.model.device != "cpu"
    budget = 24 << 30
    try:
        shape, _ = recipe_shape(recipe)
        resolved, _ = resolve_auto(recipe, shape, budget if on_gpu else None)
    except UserError as err:
        return f"# memory plan: {err}"
    plan = plan_memory(shape, resolved, on_gpu=on_gpu)
    peak = max(plan.phases[:-1], key=lambda phase: phase.total)
    where = f"of a 24 GiB GPU ({'fits' if peak.total <= budget * 0.9 else 'does not fit'})" if on_gpu else "(CPU)"
    return (f"# memory plan: peak {fmt_gib(peak.total)} in the {peak.name} phase {where}; every phase and item: "
            f"lowres-reft plan {recipe.source}")
