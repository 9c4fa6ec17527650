"""The static-cache engine (`[rollout] engine = "static"`): the same tokens and behavior log-probs as the loop
engine, with every per-token buffer preallocated and written in place.

Per micro-batch, inside `skip_layers` (so the skip set is drawn before anything is built): one preallocated
K/V buffer per *kept* layer, (B, kv_heads, P + max_new, head_dim) (transformers' `StaticLayer`); the attention
mask (B, P + max_new), whose slot P + t is set to 1 when token t is fed; the (B, 1) input-id and position
buffers. No per-token `torch.cat`. Sliding-window layers get a full-length buffer too: the window is applied by
the mask over cache slots, exactly as the loop engine's dynamic cache does.

Rows that finish leave the batch (`DecodeState.compact`: the cache's batch dimension, the mask and the positions
are index-selected), and decoding stops when every row is done.

On CUDA ("static"), the decode step (decoder stack + `head_logits`) is captured as a CUDA graph once per micro-batch
(after the skip set is drawn) and replayed per token; sampling and bookkeeping run eagerly between replays. The
"all rows done" check (a host sync) runs every `SYNC_EVERY` tokens, and the batch is compacted, and the step
re-captured, only when the live rows have fallen to half the captured batch or fewer: at most log2(B) captures
per micro-batch. Finished rows still in a captured batch are fed padding and their outputs ignored. On CPU, and
with "static_eager", the same code runs eagerly, checks every token and compacts whenever a row finishes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowres_reft.model.layers import decoder_stack
from lowres_reft.model.logprobs import head_logits
from lowres_reft.rollout.sampling import DecodeState, draw_uniforms, new_token_budget

SYNC_EVERY = 8  # CUDA-graph mode: tokens between host syncs (the all-done check and compaction)
WARMUP_RUNS = 2  # eager runs on a side stream before a capture (lazy kernel/workspace initialization)

Step = Callable[[Tensor, Tensor, Tensor], Tensor]  # (ids (B, 1), positions (B, 1), mask (B, S)) -> logits (B, V)


def static_cache(config, max_len: int):
    """A cache of one preallocated (written in place) layer per layer of `config` (the kept layers inside
    `skip_layers`). Every layer is full length, also sliding-window ones: the mask applies the window."""
    from transformers.cache_utils import Cache, StaticLayer

    return Cache(layers=[StaticLayer(max_cache_len=max_len) for _ in range(config.num_hidden_layers)])


def select_cache_rows(cache, keep: Tensor) -> None:
    """Keep only the batch rows `keep` (B',) of every cache layer (new, smaller buffers)."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys = layer.keys.index_select(0, keep)
            layer.values = layer.values.index_select(0, keep)
            layer.batch_size = len(keep)


def _rewind(cache) -> None:
    """Undo one decode step's cache write (its slot is overwritten by the next step)."""
    for layer in cache.layers:
        layer.cumulative_length.sub_(1)


class _Graph:
    """The decode step captured as a CUDA graph over fixed buffers; `__call__` replays it."""

    def __init__(self, step: Step, cache, ids: Tensor, positions: Tensor, mask: Tensor) -> None:
        self.ids, self.positions, self.mask = ids, positions, mask
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                step(ids, positions, mask)
                _rewind(cache)  # warm-up runs must leave the cache as it was
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(ids, positions, mask)  # recorded, not run: the cache advances at replay

    def __call__(self, ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        assert ids is self.ids and positions is self.positions and mask is self.mask
        self.graph.replay()
        return self.logits


@torch.no_grad()
def static_decode(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: Tensor,
    pad_id: int,
    generator: torch.Generator | None,
    greedy: bool,
    *,
    cache_key: str,
    limit: int | None,
    cuda_graphs: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`rollout._decode`'s contract, with a static cache (and, on CUDA with `cuda_graphs`, graph replay).

    cache_key: the decoder stack's cache keyword (`layers.cache_kwarg`); limit: the context length, or None.
    """
    n, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    steps = new_token_budget(limit, prompt_len, max_new_tokens)
    stack = decoder_stack(model)
    cache = static_cache(stack.config, prompt_len + steps)

    def step(ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        hidden = stack(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{cache_key: cache}).last_hidden_state
        return head_logits(model, hidden[:, -1, :])  # the same hidden -> logits map as the training recompute

    mask = torch.zeros((n, prompt_len + steps), dtype=prompt_mask.dtype, device=device)
    mask[:, :prompt_len] = prompt_mask
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    state = DecodeState(n, steps, pad_id, eos_ids, device)
    uniforms = None if greedy else draw_uniforms(n, steps, generator, device)
    logits = step(prompt_ids, positions, mask)  # prefill: (N, V)
    positions = positions[:, -1:].clone()  # (B, 1), advanced in place
    ids = torch.empty((n, 1), dtype=torch.long, device=device)
    use_graphs = cuda_graphs and device.type == "cuda"
    graph: _Graph | None = None
    for t in range(steps):
        token = state.record(t, logits, None if uniforms is None else uniforms[t], temperature, top_p)
        if t == steps - 1:
            break
        if not use_graphs or (t + 1) % SYNC_EVERY == 0:
            if state.done():
                break
            live, batch = state.live_count(), len(state.rows)
            if live < batch and (not use_graphs or 2 * live <= batch):
                keep = state.compact()
                select_cache_rows(cache, keep)
                token, mask, positions = token[keep], mask[keep], positions[keep]
                ids, graph = ids[keep], None
        ids.copy_(token[:, None])
        positions.add_(1)
        mask[:, prompt_len + t] = 1
        if use_graphs and graph is None:
            graph = _capture_or_none(step, cache, ids, positions, mask)
            use_graphs = graph is not None
        logits = graph(ids, positions, mask) if graph is not None else step(ids, positions, mask)
    return state.outputs()


def _capture_or_none(step: Step, cache, ids: Tensor, positions: Tensor, mask: Tensor) -> _Graph | None:
    """Capture the decode step; None (and one warning: eager decoding from here on) when the model's forward
    cannot be captured (e.g. a host sync inside it)."""
    try:
        return _Graph(step, cache, ids, positions, mask)
    except RuntimeError as err:
        warnings.warn(f"static engine: the decode step could not be captured as a CUDA graph ({err}); decoding eagerly")
        torch.cuda.synchronize()
        return None

