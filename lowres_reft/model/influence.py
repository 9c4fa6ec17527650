"""How much each decoder layer changes the hidden state: block influence, and the layers to skip first.

Block influence of layer l (the layer-redundancy measure of ShortGPT, Men et al. 2024): the mean over real tokens
of 1 - cos(h_in, h_out), h_in the hidden state entering the layer and h_out the one leaving it (the residual stream,
before the final norm). 0 = the layer leaves the direction of every token's state unchanged (skipping it changes
little); larger = the layer rewrites the state. Measured with forward hooks on the layers of one ordinary forward,
so it sees what the layers really receive.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lowres_reft.model.layers import LayerStack


def block_influence(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """Per layer, the sum over the real tokens of (ids, mask) (both (N, T), left- or right-padded) of
    1 - cos(layer input, layer output), float64 (L,), and the number of real tokens. Callers sum batches and
    divide. No gradient; the model's mode is left as it was."""
    stack = LayerStack(model)
    sums = torch.zeros(stack.count, dtype=torch.float64)
    keep = mask.bool()

    def hook(index: int):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(hidden_in[keep].double(), hidden_out[keep].double(), dim=-1)
            sums[index] += float((1.0 - cos).sum())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(stack.layers)]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sums, int(keep.sum())


def least_influential(scores: Sequence[float], valid: Sequence[int]) -> list[int]:
    """The `valid` layers ordered from the least influential (the first to skip) to the most; ties by index."""
    return sorted(valid, key=lambda layer: (scores[layer], layer))
