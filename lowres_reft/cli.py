"""`lowres-reft run|export`: parse arguments, load the recipe, call one function.

User errors (`UserError`) print one line to stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import warnings

from lowres_reft.errors import UserError

DEFAULT_RECIPE = "recipes/tiny-reasoning.toml"  # the demo (`make demo`)
# Subcommands living in their own modules; each module has add_parser(subparsers) and run(args) -> int,
# and keeps heavy imports (torch, transformers) inside run() so `--help` stays fast.
PLUGGED = {"eval": "lowres_reft.evalcmd", "bench": "lowres_reft.bench", "compare": "lowres_reft.compare",
           "build-base": "lowres_reft.basecmd"}


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is first imported
    if "datasets" in sys.modules:  # already imported (in-process callers): switch the bars off directly
        sys.modules["datasets"].disable_progress_bars()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowres-reft", description="Nested-ReFT: RL fine-tuning with layer-skipped off-policy rollouts.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a recipe")
    run.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help=f"TOML recipe (default {DEFAULT_RECIPE})")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a recipe key, e.g. --set train.steps=20 (repeatable)")
    run.add_argument("--resume", action="store_true", help="continue from the run's last good checkpoint")

    export = sub.add_parser("export", help="export a checkpoint's adapter and/or a merged 16-bit model")
    export.add_argument("checkpoint", help="e.g. runs/<run>/checkpoint-last")
    export.add_argument("--adapter", dest="adapter_out", help="write the adapter directory here")
    export.add_argument("--merged", dest="merged_out", help="write the merged 16-bit model here")
    export.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="merged dtype (default: the recipe's [export] merged_dtype)")

    check = sub.add_parser("check", help="validate a recipe and print it resolved")
    check.add_argument("recipe")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    for name, module in PLUGGED.items():
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    from lowres_reft.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from lowres_reft.trainer import train

    try:
        train(recipe, resume=args.resume)
    except KeyboardInterrupt as stop:  # trainer.RunStopped carries 128 + the signal number
        return getattr(stop, "exit_code", 130)
    return 0


def _export(args: argparse.Namespace) -> int:
    from lowres_reft.export import export_checkpoint

    if not args.adapter_out and not args.merged_out:
        raise UserError("export: nothing to do; give --merged DIR and/or --adapter DIR")
    for path in export_checkpoint(args.checkpoint, args.adapter_out, args.merged_out, args.dtype):
        print(f"wrote {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from lowres_reft.config import load_recipe
    from lowres_reft.typed_toml import recipe_to_toml
    from lowres_reft.rewards import resolve_rewards

    recipe = load_recipe(args.recipe, args.overrides)
    resolve_rewards(recipe.reward.functions)  # `check` promises what `run` will accept: reward names included
    print(recipe_to_toml(recipe))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    handlers = {"run": _run, "export": _export, "check": _check}
    try:
        if args.command in PLUGGED:
            return importlib.import_module(PLUGGED[args.command]).run(args)
        return handlers[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
