"""Data-parallel helpers for `accelerate launch -m lowres_reft run ...` (or torchrun).

Each process generates rollouts for its shard of the step's prompts (whole groups stay on one process) with its
own skip sets (an ensemble of nested behavior policies, as in the paper's theorem). The loss on every process is
normalized by the *global* token/sequence counts and the adapter gradients are summed across processes, so one
update equals a single-process update on the same global batch. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed() -> Dist:
    """Join the process group when launched by accelerate/torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # nccl on CUDA (and sets the device), gloo on CPU
    return Dist(rank=state.process_index, world=state.num_processes)


def all_sum(values: list[float], ctx: Dist) -> list[float]:
    if not ctx.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_max(value: float, ctx: Dist) -> float:
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def gather_objects(obj: Any, ctx: Dist) -> list[Any]:
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        dist.barrier()


def sum_gradients(params: list[torch.nn.Parameter], ctx: Dist) -> None:
    """Sum the adapter gradients over processes in one flat all-reduce (missing grads count as zero)."""
    if not ctx.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param, grad in zip(params, grads):
        n = grad.numel()
        param.grad = flat[offset : offset + n].view_as(param).to(param.dtype)
        offset += n


def adapter_fingerprint(params: list[torch.nn.Parameter]) -> list[float]:
    """Cheap exact fingerprint of the trainable weights (per-tensor float64 sums) to check processes agree."""
    return [float(p.detach().double().sum()) for p in params]


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
