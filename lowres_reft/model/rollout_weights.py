"""Which weights the rollout engine decodes through: `[rollout] weights`.

"shared4bit" (default): the training model itself. Every projection of every kept layer runs bitsandbytes' 4-bit
matmul (dequantize + matmul) plus peft's LoRA branch (dropout, A, B, scale, add): several kernels per projection
per decode step, which dominates small-batch decoding.

"merged16": once per `generate` call (after the skip set is known), each KEPT decoder layer's LoRA-wrapped linear
is swapped for a plain `nn.Linear` in the compute dtype whose weight is dequant(W_4bit) + sum_a scale_a * B_a A_a
(peft's `get_delta_weight`, which includes rsLoRA's scale). Skipped layers are not materialized. The originals are
put back on exit (also on an exception) and the copies dropped, so training never sees them. The sampled
distribution differs from the 4-bit path only by the rounding of the merged weight (a bf16 copy on GPU), which the
loss's off-policy correction covers; bench rollout reports |log rho| at skip 0 for both modes.

Memory (estimated): the copy holds kept-layer parameters x 2 bytes (bf16): ~2.6 GB for 1.5B (28 layers, 1.31B decoder
params) at skip 0, ~2.0 GB at skip 0.25; ~13 GB for 7B (28 x 233M). See the recipes for the per-model budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lowres_reft.model.layers import LayerStack
from lowres_reft.utils.errors import UsageError

# `[rollout] weights` names (validated by config.RolloutConfig).
WEIGHT_MODES = ("shared4bit", "merged16")


def _dequantized(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) weight of a bnb Linear4bit (dequantized) or a plain nn.Linear, in `dtype`: always a new tensor
    (the caller adds the LoRA delta in place)."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, quant_state).to(dtype, copy=True)
    return weight.detach().to(dtype, copy=True)


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")


@torch.no_grad()
def merged_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear equal (up to rounding) to the LoRA-wrapped `module` in eval mode (dropout off).

    Refuses DoRA and LoRA biases (their merge is not a plain weight delta) with a one-line UsageError.
    """
    base = module.base_layer
    adapters = [] if module.disable_adapters else [a for a in module.active_adapters if a in module.lora_A]
    for adapter in adapters:
        if module.use_dora.get(adapter, False):
            raise UsageError('[rollout] weights = "merged16" does not support DoRA (lora.use_dora); use "shared4bit"')
        if getattr(module, "lora_bias", {}).get(adapter, False):
            raise UsageError('[rollout] weights = "merged16" does not support LoRA biases; use "shared4bit"')
    # Merge in float32, round once to the compute dtype.
    weight = _dequantized(base, torch.float32)
    for adapter in adapters:
        weight += module.get_delta_weight(adapter).float()
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=base.bias is not None, device=weight.device, dtype=dtype)
    linear.weight.copy_(weight)
    if base.bias is not None:
        linear.bias.copy_(base.bias)
    linear.requires_grad_(False)
    return linear


def _lora_modules(layer: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, LoRA-wrapped linear) for every LoRA-wrapped linear inside a decoder layer."""
    found = []
    for parent in layer.modules():
        for name, child in parent.named_children():
            if _is_lora(child):
                found.append((parent, name, child))
    return found


@contextmanager
def merged_weights(model: nn.Module, skip: Sequence[int]) -> Iterator[int]:
    """Inside: the kept decoder layers' LoRA-wrapped linears are replaced by merged 16-bit nn.Linear copies.

    Yields the bytes materialized. The original modules are restored on exit (also on an exception); no reference
    to a copy is kept, so its memory is freed when the caller drops the engine's outputs.
    """
    stack = LayerStack(model)
    dtype = stack.embed_tokens.weight.dtype  # the compute dtype of the hidden states
    skip_set = set(skip)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        materialized = 0
        for index, layer in enumerate(stack.layers):
            if index in skip_set:
                continue
            for parent, name, original in _lora_modules(layer):
                copy = merged_linear(original, dtype)
                setattr(parent, name, copy)
                swapped.append((parent, name, original))
                materialized += copy.weight.numel() * copy.weight.element_size()
        yield materialized
    finally:
        for parent, name, original in reversed(swapped):
            setattr(parent, name, original)
        swapped.clear()


@contextmanager
def rollout_weights(model: nn.Module, mode: str, skip: Sequence[int]) -> Iterator[None]:
    """The weights `mode` decodes through, for one `generate` call with `skip` bypassed."""
    assert mode in WEIGHT_MODES, mode
    if mode == "shared4bit":
        yield
        return
    with merged_weights(model, skip):
        yield


class WeightsEngine:
    """Wraps an engine so each `generate` decodes through `mode`'s weights; the batch's `seconds` include the
    materialization (it is part of the rollout's cost)."""

    def __init__(self, engine, model: nn.Module, mode: str) -> None:
        self.engine, self.model, self.mode = engine, model, mode

    def generate(self, prompts: list[list[int]], skip: tuple[int, ...] = ()):
        import dataclasses
        import time

        start = time.perf_counter()
        with rollout_weights(self.model, self.mode, skip):
            batch = self.engine.generate(prompts, skip)
        return dataclasses.replace(batch, seconds=time.perf_counter() - start)
