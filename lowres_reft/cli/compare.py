"""`lowres-reft compare RECIPE ...`: nested vs on-policy variants with the same seeds; table + plots
(`research.compare`)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    cmp = sub.add_parser("compare", help="run nested vs on-policy variants with the same seeds; table + plot")
    cmp.add_argument("recipe")
    cmp.add_argument("--skip-ratios", default="0,0.25,0.5", help="comma-separated skip ratios (default 0,0.25,0.5)")
    cmp.add_argument("--corrections", default="none,tis,retrace", help="comma-separated corrections for r > 0")
    cmp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    cmp.add_argument("--adaptive", action="store_true", help="also run behavior.schedule = adaptive (retrace)")
    cmp.add_argument("--out", help="output dir (default runs/compare-<recipe name>)")
    cmp.add_argument("--jobs", type=int, default=1,
                     help="runs at a time, each in its own process with cpu_count // jobs threads (default 1)")
    cmp.add_argument("--eval-every", type=int, metavar="K",
                     help="evaluate every K steps for the accuracy curves (default: the recipe's eval.every; 0 = start/final)")
    cmp.add_argument("--shared-start", action="store_true",
                     help="every variant of a seed starts from one shared start (base + warm-up, merged), built once")
    cmp.add_argument("--trl", action="store_true",
                     help="add TRL's GRPOTrainer (needs the [bench] extra); all variants then start from one shared start")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="recipe override applied to every variant")


def run(args: argparse.Namespace) -> int:
    from lowres_reft.research.compare import run as run_compare

    return run_compare(args)
