"""`lowres-reft bench rollout|step`: throughput and memory of nested rollouts and of a full training step.

The CLI face of the package (`cli.PLUGGED` loads it): `add_parser(subparsers)` and `run(args)`. The pieces:
  common.py    model shapes and random-weight models, timing, peak memory, environment, the JSON report
  roofline.py  pure math: layer-time split, ideal speedup, GPU peak bandwidth, bytes read per decode step
  rollout.py   `bench rollout`: tokens/s of our sampling loop per skip ratio vs `model.generate`
  step.py      `bench step`: time and peak memory of full training steps, by phase
No module imports torch or transformers at import time, so `lowres-reft --help` stays fast.
JSON: see BENCHMARKS.md (`schema_version` 1).
"""

from __future__ import annotations

import argparse

from lowres_reft.bench import rollout, step
from lowres_reft.bench.common import set_threads


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="measure rollout throughput and training-step time/memory")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    rollout.add_arguments(sub.add_parser("rollout", help="tokens/s of nested rollouts per skip ratio vs model.generate"))
    step.add_arguments(sub.add_parser("step", help="time and peak memory of full training steps, by phase"))


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.bench_command == "rollout":
        return rollout.run_rollout(args)
    return step.run_step(args)
