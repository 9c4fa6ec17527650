"""Per-token log-probs of completions under the full target model, chunked over the vocabulary projection.

The LM head is applied to `chunk` tokens at a time inside activation checkpointing, so neither the forward
nor the backward ever holds a (tokens x vocab) float32 tensor for the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _token_logp(lm_head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float) -> Tensor:
    logits = lm_head(hidden).float() / temperature  # (C, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_logp(lm_head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float, chunk: int) -> Tensor:
    """hidden (B, T, H), targets (B, T) -> (B, T) float32 log softmax(lm_head(h) / temperature)[target]."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    pieces = []
    for lo in range(0, flat_h.shape[0], chunk):
        h, t = flat_h[lo : lo + chunk], flat_t[lo : lo + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_logp, lm_head, h, t, temperature, use_reentrant=False))
        else:
            pieces.append(_token_logp(lm_head, h, t, temperature))
    return torch.cat(pieces).reshape(targets.shape)


def completion_logp(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float,
    chunk: int = 1024,
) -> Tensor:
    """log pi(y_t | prompt, y_<t) for each completion token: (B, P), (B, T) -> (B, T) float32.

    Positions match the sampling loop: position = index among the row's real tokens.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+T)
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = inner.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    prompt_len = prompt_ids.shape[1]
    # The hidden state at position p predicts token p + 1.
    predicting = hidden[:, prompt_len - 1 : -1]  # (B, T, H)
    return chunked_logp(inner.lm_head, predicting, completion_ids, temperature, chunk)
