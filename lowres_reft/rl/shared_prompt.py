"""Update log-probs with each distinct prompt forwarded once: the G completions of a prompt share its forward.

GRPO's update recomputes log pi(y_t | prompt, y_<t) for every row, and a batch holds G completions of each prompt,
so the plain recompute (`logprobs.completion_logp`) runs every prompt G times. Here the micro-batch's distinct
prompts run once, with a KV cache (u rows, P columns); their keys and values are gathered to the rows that share
them, and the completions run on top of that prefix (b rows, T columns). The causal attention reads the same keys
and values at the same positions, so the log-probs equal the plain recompute's up to float rounding, and the
backward of the completions flows through the gathered keys and values into the one prompt forward, which
accumulates the G rows' gradients as the plain recompute would.

The prefix cache is read-only (`_PrefixLayer.update` returns prefix + new states and stores nothing), so a layer
replayed by activation checkpointing reads the same states as its first run; the prompt forward itself runs
without checkpointing (it holds 1/G of the prompt activations the plain recompute would).

Supported where every layer attends to the whole past (no sliding window); elsewhere, and when the layers leave
the given cache unfilled or unread (then remembered on the model), `shared_prompt_logp` returns None and the caller
uses the plain recompute. A layer that dropped the cache while the stack still masks for it would fail loudly (a
key/mask length mismatch), not silently: checked under activation checkpointing on transformers 5.24 only.
With LoRA dropout the G rows share their prompt's dropout draw (the plain recompute draws one per row).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lowres_reft.model.layers import LayerStack, cache_kwarg, decoder_stack, unwrap
from lowres_reft.model.logprobs import completion_logp, model_logp


def distinct_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(b, P) left-padded prompts -> (first row of each distinct prompt (u,), each row's prompt index (b,)).

    Prompts are in order of first appearance; rows with equal ids and mask share an index.
    """
    key = torch.cat([prompt_ids * prompt_mask, prompt_mask], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)  # sorted order: renumber by first appearance
    first: dict[int, int] = {}
    for row, k in enumerate(inverse.tolist()):
        first.setdefault(k, row)
    rows = torch.tensor(list(first.values()), dtype=torch.long, device=prompt_ids.device)
    renumber = torch.empty(len(first), dtype=torch.long, device=prompt_ids.device)
    renumber[torch.tensor(list(first.keys()), dtype=torch.long, device=prompt_ids.device)] = torch.arange(
        len(first), device=prompt_ids.device)
    return rows, renumber[inverse]


_UNUSABLE = "lowres_shared_prompt_unusable"  # set on the causal LM once its layers ignored the prefix cache


def supports_shared_prompt(model: nn.Module) -> bool:
    """True when every decoder layer attends to the whole past (a sliding window would need its own cache) and no
    earlier call found the layers ignoring the given cache."""
    if getattr(unwrap(model), _UNUSABLE, False):
        return False
    config = LayerStack(model).config
    types = getattr(config, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return getattr(config, "sliding_window", None) is None


def _prefix_cache(keys: list[Tensor], values: list[Tensor]):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class _PrefixLayer(DynamicLayer):
        """A fixed prefix: `update` returns prefix + new states and stores nothing (replays see the same states)."""

        def __init__(self, k: Tensor, v: Tensor) -> None:
            super().__init__()
            self.lazy_initialization(k, v)
            self.keys, self.values, self.reads = k, v, 0

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            self.reads += 1
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    cache = DynamicCache()
    cache.layers = [_PrefixLayer(k, v) for k, v in zip(keys, values)]
    return cache


@contextmanager
def _layer_flags(model: nn.Module, **flags):
    """Set attributes on every decoder layer for the duration (instance attributes shadow the class's)."""
    layers = list(decoder_stack(model).layers)
    saved = [{k: layer.__dict__[k] for k in flags if k in layer.__dict__} for layer in layers]
    for layer in layers:
        for k, v in flags.items():
            setattr(layer, k, v)
    try:
        yield
    finally:
        for layer, old in zip(layers, saved):
            for k in flags:
                if k in old:
                    setattr(layer, k, old[k])
                else:
                    delattr(layer, k)


def shared_prompt_logp(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float,
    chunk: int = 1024,
) -> Tensor | None:
    """`completion_logp` with each distinct prompt forwarded once: (b, P), (b, T) -> (b, T) float32, or None when
    this model cannot share (see the module docstring) or no prompt repeats in the micro-batch."""
    first, index = distinct_prompts(prompt_ids, prompt_mask)  # (u,), (b,)
    if len(first) == len(index) or not supports_shared_prompt(model):
        return None
    from transformers import DynamicCache

    stack, cache_key = decoder_stack(model), cache_kwarg(model)
    p_ids, p_mask = prompt_ids[first], prompt_mask[first]  # (u, P)
    positions = (p_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_cache = DynamicCache(config=model.config)
    # use_cache=False in both forwards: the layers fill and read a cache they are given either way, and the flag
    # only tells the stack to make one (under checkpointing, transformers would force it off with a warning).
    with _layer_flags(model, gradient_checkpointing=False):  # a replayed prompt forward would write the cache twice
        prompt_hidden = stack(input_ids=p_ids, attention_mask=p_mask, position_ids=positions, use_cache=False,
                              **{cache_key: prompt_cache}).last_hidden_state  # (u, P, H)
    layers = prompt_cache.layers
    if len(layers) != len(stack.layers) or any(layer.get_seq_length() != p_ids.shape[1] for layer in layers):
        return _unusable(model)
    cache = _prefix_cache([layer.keys[index] for layer in layers], [layer.values[index] for layer in layers])
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)  # (b, P+T)
    completion_positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, prompt_ids.shape[1]:]
    with _layer_flags(model, _can_checkpoint_with_cache=True):  # read-only prefix: a replay reads the same states
        hidden = stack(input_ids=completion_ids, attention_mask=attention_mask, position_ids=completion_positions,
                       use_cache=False, **{cache_key: cache}).last_hidden_state  # (b, T, H)
    if any(layer.reads == 0 for layer in cache.layers):  # a layer ran without its prefix: not usable here
        return _unusable(model)
    # The prompt's last hidden state predicts the first completion token; completion position t predicts t + 1.
    predicting = torch.cat([prompt_hidden[index, -1:], hidden[:, :-1]], dim=1)  # (b, T, H)
    return model_logp(model, predicting, completion_ids, temperature, chunk)


def _unusable(model: nn.Module) -> None:
    """Remember that this model's layers do not fill or read a given cache (this transformers version), so later
    micro-batches go straight to the plain recompute instead of paying for two wasted forwards each."""
    setattr(unwrap(model), _UNUSABLE, True)
    return None


def update_logp(model: nn.Module, mb, temperature: float, chunk: int, share: bool) -> Tensor:
    """A micro-batch's (`microbatch.MicroBatch`) update log-probs (b, t): the shared prompt forward where it applies
    (`share` and a repeated prompt on a supporting model), else the plain per-row recompute."""
    args = (model, mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask, temperature, chunk)
    logp = shared_prompt_logp(*args) if share else None
    return completion_logp(*args) if logp is None else logp
