"""The sampling seam: engines (`Engine.generate(prompts, skip) -> RolloutBatch`) and the default one's loop,
which gives completions plus the behavior log-prob of every sampled token.

Everything that samples (training rollouts, eval during training, `lowres-reft eval`, `bench`) builds an engine with
`make_engine([rollout] engine, model, ...)`; "loop" (`LoopEngine`, the `sample` loop below) is the default and the
reference; "static" (`StaticEngine`, decoding in `static_engine.py`) gives the same tokens and log-probs from preallocated buffers.

Both engines sample by inverse CDF from one uniform per row and step, all drawn up front (`draw_uniforms`), and
drop finished rows from the decode batch (`DecodeState.compact`): a row's tokens do not depend on the engine,
on when other rows finish, or on the batch composition, and decode cost follows the live rows.

Behavior log-probs are recorded inside the loop (no extra forward pass) under exactly the distribution
sampled from: log_softmax(logits / temperature), and with top_p < 1 the nucleus-truncated, renormalized
distribution (tokens outside the nucleus have probability 0 under the behavior policy). So with top_p < 1
rollouts are slightly off-policy even at skip_ratio 0, and the loss's correction accounts for it.
Memory is O(tokens): one (batch, vocab) row of logits lives at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from lowres_reft.model.layers import cache_kwarg, decoder_stack
from lowres_reft.model.logprobs import head_logits
from lowres_reft.model.nested import skip_layers
from lowres_reft.model.rollout_weights import WeightsEngine
from lowres_reft.rollout.sampling import DecodeState, draw_uniforms, new_token_budget, nucleus_logprobs  # noqa: F401 (re-exported)
from lowres_reft.rollout.static import static_decode
from lowres_reft.utils.errors import UsageError


@dataclass
class RolloutBatch:
    prompt_ids: Tensor  # (N, P) long, left-padded
    prompt_mask: Tensor  # (N, P) long
    completion_ids: Tensor  # (N, T) long, right-padded with pad_id
    completion_mask: Tensor  # (N, T) float, 1 for sampled tokens up to and including EOS
    behavior_logp: Tensor  # (N, T) float32, 0 where mask == 0
    truncated: Tensor  # (N,) bool: no EOS within max_new_tokens
    skip: tuple[int, ...]
    seconds: float
    skip_sets: tuple[tuple[int, ...], ...] = ()  # merged batches (`merge_rollouts`): each part's skip set

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum().item())

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


def merge_rollouts(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Rollout batches (each from its own skip set) as one, rows in order: prompts left-padded and completions
    right-padded to the widest part; `skip` is the first part's, `skip_sets` every part's; seconds add up."""
    if len(parts) == 1:
        return parts[0]
    P, T = max(p.prompt_ids.shape[1] for p in parts), max(p.completion_ids.shape[1] for p in parts)

    def cat(name: str, width: int, left: bool, fill: float) -> Tensor:
        tensors = [getattr(p, name) for p in parts]
        return torch.cat([nn.functional.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=fill)
                          for t in tensors])

    return RolloutBatch(
        prompt_ids=cat("prompt_ids", P, True, pad_id), prompt_mask=cat("prompt_mask", P, True, 0),
        completion_ids=cat("completion_ids", T, False, pad_id), completion_mask=cat("completion_mask", T, False, 0.0),
        behavior_logp=cat("behavior_logp", T, False, 0.0), truncated=torch.cat([p.truncated for p in parts]),
        skip=parts[0].skip, seconds=sum(p.seconds for p in parts),
        skip_sets=tuple(s for p in parts for s in (p.skip_sets or (p.skip,))),
    )


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """list of token lists -> (ids, mask), both (N, max_len), padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def context_length(model: nn.Module) -> int | None:
    """The model's context window (config.max_position_embeddings), or None when it does not say."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_generation_length(model: nn.Module, key: str, max_new_tokens: int) -> None:
    """One-line UsageError when `max_new_tokens` exceeds the model's context window (checked before anything
    is generated or written: the sampling buffers would be sized by it)."""
    limit = context_length(model)
    if limit is not None and max_new_tokens > limit:
        raise UsageError(f"{key} = {max_new_tokens} exceeds the model's context length of {limit} tokens; use at most {limit}")


@torch.no_grad()
def _decode(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from transformers import DynamicCache

    n = prompt_ids.shape[0]
    device = prompt_ids.device
    cache = DynamicCache(config=model.config)  # built inside skip_layers: one cache layer per kept layer
    cache_key = cache_kwarg(model)
    stack = decoder_stack(model)
    attention_mask = prompt_mask
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    input_ids = prompt_ids
    steps = new_token_budget(context_length(model), prompt_ids.shape[1], max_new_tokens)
    state = DecodeState(n, steps, pad_id, eos_ids, device)
    uniforms = None if greedy else draw_uniforms(n, steps, generator, device)
    for step in range(steps):
        # The decoder stack, then the same hidden -> logits map as the training recompute (`head_logits`).
        hidden = stack(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_key: cache},
        ).last_hidden_state
        logits = head_logits(model, hidden[:, -1, :])  # (B, V)
        token = state.record(step, logits, None if uniforms is None else uniforms[step], temperature, top_p)
        if state.done():
            break
        if state.live_count() < len(state.rows):  # rows finished: cost follows the live rows
            keep = state.compact()
            cache.batch_select_indices(keep)
            token, attention_mask, position_ids = token[keep], attention_mask[keep], position_ids[keep]
        input_ids = token[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(token), 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return state.outputs()


def sample(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    skip: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    greedy: bool = False,
    micro_batch: int = 0,
    on_micro_batch: Callable[[int, int, int], None] | None = None,
    decode: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
) -> RolloutBatch:
    """Sample one completion per prompt (repeat prompts G times for a group) from the nested model.

    prompts: N token lists. Returns a RolloutBatch; behavior_logp is log mu(y_t | .) of each sampled token.
    on_micro_batch(done, total, tokens so far) is called after each micro-batch (progress display).
    decode: the per-micro-batch decode (an engine's; default the dynamic-cache loop `_decode`).
    """
    decode = decode or _decode
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    size = micro_batch or len(prompts)
    parts = []
    try:
        with skip_layers(model, skip):
            for lo in range(0, len(prompts), size):
                parts.append(
                    decode(model, prompt_ids[lo : lo + size], prompt_mask[lo : lo + size], max_new_tokens,
                            temperature, top_p, eos, pad_id, generator, greedy)
                )
                if on_micro_batch is not None:
                    on_micro_batch(len(parts), -(-len(prompts) // size), int(sum(p[2].sum().item() for p in parts)))
    finally:
        model.train(was_training)
    width = max(p[0].shape[1] for p in parts)
    def cat(i: int, fill: float) -> Tensor:
        return torch.cat([nn.functional.pad(p[i], (0, width - p[i].shape[1]), value=fill) for p in parts])
    completion_ids = cat(0, pad_id)
    behavior_logp, completion_mask = cat(1, 0.0), cat(2, 0.0)
    truncated = torch.cat([p[3] for p in parts])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        behavior_logp=behavior_logp,
        truncated=truncated,
        skip=tuple(skip),
        seconds=time.perf_counter() - start,
    )


# ------------------------------------------------------------------------------------------------ engines


class Engine(Protocol):
    """The one sampling seam: the trainer, eval during training, `lowres-reft eval` and `bench` all call an engine.

    An engine is built for one sampling setup (model, length, temperature, seeded generator, ...) and then asked
    for completions of token-id prompts from the model with the decoder layers in `skip` bypassed. A faster
    engine (e.g. a static KV cache) is one new class registered in ENGINES and chosen by `[rollout] engine`.
    """

    def generate(self, prompts: list[list[int]], skip: tuple[int, ...] = ()) -> RolloutBatch: ...


@dataclass
class LoopEngine:
    """The default engine: `sample`, a plain decode loop over the (nested) model with a dynamic KV cache."""

    model: nn.Module
    max_new_tokens: int
    eos_ids: list[int]
    pad_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    greedy: bool = False
    micro_batch: int = 0
    on_micro_batch: Callable[[int, int, int], None] | None = None

    def generate(self, prompts: list[list[int]], skip: tuple[int, ...] = ()) -> RolloutBatch:
        return sample(self.model, prompts, max_new_tokens=self.max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id,
                      temperature=self.temperature, top_p=self.top_p, skip=skip, generator=self.generator,
                      greedy=self.greedy, micro_batch=self.micro_batch, on_micro_batch=self.on_micro_batch,
                      decode=self.decode)

    def decode(self, *args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One micro-batch's decode (`_decode`'s arguments and results); an engine subclass replaces it."""
        return _decode(*args)


@dataclass
class StaticEngine(LoopEngine):
    """Static KV cache and buffers written in place (`static_engine.static_decode`); CUDA graphs on CUDA."""

    cuda_graphs: bool = True

    def decode(self, model: nn.Module, prompt_ids: Tensor, *args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return static_decode(model, prompt_ids, *args, cache_key=cache_kwarg(model), cuda_graphs=self.cuda_graphs,
                             limit=context_length(model))


def _static_eager_engine(model: nn.Module, **settings) -> Engine:
    return StaticEngine(model, **settings, cuda_graphs=False)


# Engines by the name `[rollout] engine` gives; the recipe is validated against these keys. "loop" is the reference;
# "static" preallocates the KV cache and buffers and replays a CUDA graph per token on CUDA; "static_eager" is
# "static" without CUDA graphs.
ENGINES: dict[str, Callable[..., Engine]] = {"loop": LoopEngine, "static": StaticEngine,
                                             "static_eager": _static_eager_engine}


def make_engine(name: str, model: nn.Module, weights: str = "shared4bit", **settings) -> Engine:
    """The engine registered as `name`, for `model`, with the LoopEngine-style keyword settings, decoding through
    the `weights` mode (`[rollout] weights`, see `rollout_weights`)."""
    engine = ENGINES[name](model, **settings)
    return engine if weights == "shared4bit" else WeightsEngine(engine, model, weights)


def decode_completions(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    return [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(completion_ids.cpu(), completion_mask.cpu())
    ]
