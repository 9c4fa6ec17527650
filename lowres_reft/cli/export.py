"""`lowres-reft export CHECKPOINT [--adapter DIR] [--merged DIR] [--dtype D]`: a checkpoint's adapter and/or a merged
16-bit model, each with a model card."""

from __future__ import annotations

import argparse

from lowres_reft.utils.errors import UserError


def add_parser(subparsers) -> None:
    export = subparsers.add_parser("export", help="export a checkpoint's adapter and/or a merged 16-bit model")
    export.add_argument("checkpoint", help="e.g. runs/<run>/checkpoint-last")
    export.add_argument("--adapter", dest="adapter_out", help="write the adapter directory here")
    export.add_argument("--merged", dest="merged_out", help="write the merged 16-bit model here")
    export.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="merged dtype (default: the recipe's [export] merged_dtype)")


def run(args: argparse.Namespace) -> int:
    from lowres_reft.run.export import export_checkpoint

    if not args.adapter_out and not args.merged_out:
        raise UserError("export: nothing to do; give --merged DIR and/or --adapter DIR")
    for path in export_checkpoint(args.checkpoint, args.adapter_out, args.merged_out, args.dtype):
        print(f"wrote {path}")
    return 0
