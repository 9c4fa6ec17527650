"""`lowres-reft bench rollout|step|trl`: throughput and memory of nested rollouts, of a full training step, and
a side-by-side run against TRL's GRPOTrainer.

The CLI face of the package (`cli.PLUGGED` loads it): `add_parser(subparsers)` and `run(args)`. The pieces:
  common.py    model shapes and random-weight models, timing, peak memory, environment, the JSON report
  roofline.py  pure math: layer-time split, ideal speedup, GPU peak bandwidth, bytes read per decode step
  rollout.py   `bench rollout`: tokens/s of our sampling loop per skip ratio vs `model.generate`
  step.py      `bench step`: time and peak memory of full training steps, by phase
  trl_side.py  `bench trl`: ours vs TRL's GRPOTrainer on identical settings (seeds, alternating, subprocesses)
  trl_runs.py  its runs: the shared start, one training run per tool (child process), the shared evaluation
No module imports torch or transformers at import time, so `lowres-reft --help` stays fast.
JSON: see BENCHMARKS.md (`schema_version` 1).
"""

from __future__ import annotations

import argparse

from lowres_reft.bench import rollout, step, trl_side
from lowres_reft.bench.common import set_threads


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="measure rollout throughput and training-step time/memory")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    rollout.add_arguments(sub.add_parser("rollout", help="tokens/s of nested rollouts per skip ratio vs model.generate"))
    step.add_arguments(sub.add_parser("step", help="time and peak memory of full training steps, by phase"))
    trl_side.add_arguments(sub.add_parser("trl", help="side by side with TRL's GRPOTrainer on identical settings (CPU)"))


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.bench_command == "rollout":
        return rollout.run_rollout(args)
    if args.bench_command == "trl":
        return trl_side.run_trl_side(args)
    return step.run_step(args)
