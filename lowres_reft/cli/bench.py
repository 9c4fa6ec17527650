"""`lowres-reft bench rollout|step|trl|memory`: throughput and memory of nested rollouts, of a full training step, a
side-by-side run against TRL's GRPOTrainer, and the memory plan against measurement (the `bench` package)."""

from __future__ import annotations

import argparse

from lowres_reft.bench import memory, rollout, step, trl_side
from lowres_reft.bench.common import set_threads


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="measure rollout throughput and training-step time/memory")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    rollout.add_arguments(sub.add_parser("rollout", help="tokens/s of nested rollouts per skip ratio vs model.generate"))
    step.add_arguments(sub.add_parser("step", help="time and peak memory of full training steps, by phase"))
    trl_side.add_arguments(sub.add_parser("trl", help="side by side with TRL's GRPOTrainer on identical settings (CPU)"))
    memory.add_arguments(sub.add_parser("memory", help="the memory plan beside the measured peak of each phase"))


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.bench_command == "rollout":
        return rollout.run_rollout(args)
    if args.bench_command == "trl":
        return trl_side.run_trl_side(args)
    if args.bench_command == "memory":
        return memory.run_memory(args)
    return step.run_step(args)
