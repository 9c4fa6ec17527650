"""`lowres-reft layers RECIPE`: per decoder layer, its block influence and what skipping it alone costs (KL to the full
model, ESS of sampled completions), over held-out problems (`research.layers`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("layers", help="which decoder layers matter: block influence, KL and ESS per skipped layer")
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--texts", type=int, default=64, help="held-out problems for influence and KL (default 64)")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts sampled per skipped layer (default 32)")
    p.add_argument("--samples", type=int, default=4, help="completions per prompt (default 4)")
    p.add_argument("--after-warmup", action="store_true", help="measure after the recipe's supervised warm-up steps")
    p.add_argument("--json", dest="json_out", help="write the report here")
    p.add_argument("--plot", help="write a bar plot (PNG) here")


def run(args: argparse.Namespace) -> int:
    from lowres_reft.config import load_recipe
    from lowres_reft.research import layers
    from lowres_reft.utils.errors import UsageError

    for name in ("texts", "prompts", "samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    recipe = load_recipe(args.recipe, args.overrides)
    reports = layers.measure_layers(recipe, args.texts, args.prompts, args.samples, args.after_warmup)
    print(layers.table(reports))
    info = layers.summary(reports)
    print(f"least influential first: {info['least_influential_first']}; Spearman(block influence, KL) = "
          f"{info['spearman_influence_kl']:.2f}" if info["spearman_influence_kl"] is not None else "")
    meta = {"recipe": args.recipe, "overrides": args.overrides, "texts": args.texts, "prompts": args.prompts,
            "samples": args.samples, "after_warmup": args.after_warmup}
    if args.json_out:
        layers.write_json(reports, meta, Path(args.json_out))
    if args.plot:
        where = "after the supervised warm-up" if args.after_warmup else "base model"
        layers.plot(reports, Path(args.plot), f"{Path(args.recipe).name}: {reports and len(reports)} layers, {where}")
    return 0
