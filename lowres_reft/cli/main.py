"""`lowres-reft COMMAND ...`: the parser of every subcommand, and the one place user errors become exit code 2.

User errors (`UserError`) print one line to stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from lowres_reft.utils.errors import UserError

# One module per subcommand, each with add_parser(subparsers) and run(args) -> int, keeping heavy imports (torch,
# transformers) inside run() so `--help` stays fast.
COMMANDS = {
    "run": "lowres_reft.cli.run",
    "export": "lowres_reft.cli.export",
    "check": "lowres_reft.cli.check",
    "eval": "lowres_reft.cli.eval",
    "bench": "lowres_reft.cli.bench",
    "compare": "lowres_reft.cli.compare",
    "build-base": "lowres_reft.cli.build_base",
    "layers": "lowres_reft.cli.layers",
    "plan": "lowres_reft.cli.plan",
}


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
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return importlib.import_module(COMMANDS[args.command]).run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
