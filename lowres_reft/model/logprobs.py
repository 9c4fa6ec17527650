"""Hidden states -> logits -> per-token log-probs, one code path for sampling and training.

`head_logits` maps final hidden states to logits exactly as the model's own forward does: the LM head, then
the architecture's post-head transform (Gemma's tanh soft-capping, Cohere's logit scale, Granite's logit
scaling, ...). The sampling loop and the training recompute both call it, so behavior and target log-probs
are computed the same way; skipping the transform silently shifts every importance ratio (by tens of nats
at Gemma 2's logit sizes).

For training, the LM head is applied to `chunk` tokens at a time inside activation checkpointing, so neither
the forward nor the backward ever holds a (tokens x vocab) float32 tensor for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lowres_reft.model.layers import decoder_stack, unwrap
from lowres_reft.utils.errors import UsageError

_LM_HEAD_FP32 = "lowres_lm_head_fp32"  # attribute of the causal LM read by `lm_head_fp32`


def set_lm_head_fp32(model: nn.Module, enabled: bool) -> None:
    """Ask `head_logits` (sampling and update alike) for a float32 LM head matmul ([model] lm_head_fp32).

    Kept on the model, so every caller of `head_logits` sees the same choice. Needs a plain linear head: a wrapped
    one (e.g. [lora] modules_to_save = ["lm_head"]) has its own forward, which a bare float32 matmul would bypass.
    """
    causal_lm = unwrap(model)
    head = getattr(causal_lm, "lm_head", None)
    if enabled and type(head) is not nn.Linear:
        raise UsageError(f"[model] lm_head_fp32 needs a plain linear LM head; {type(causal_lm).__name__}'s is "
                         f"{type(head).__name__} (e.g. trained through [lora] modules_to_save): set lm_head_fp32 = false")
    setattr(causal_lm, _LM_HEAD_FP32, enabled)


def lm_head_fp32(model: nn.Module) -> bool:
    return bool(getattr(unwrap(model), _LM_HEAD_FP32, False))


def _softcap(logits: Tensor, cap: float) -> Tensor:
    return torch.tanh(logits / cap) * cap


def _post_head(causal_lm: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The transform the model's forward applies after `lm_head` (None: logits = lm_head(h)).

    Keyed by model type because the same config name means different things (Granite divides by
    `logits_scaling`, HyperCLOVA X multiplies); `test_head_logits_equal_model_logits` checks each supported one.
    """
    config = causal_lm.config
    model_type = getattr(config, "model_type", "")
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        return lambda logits: _softcap(logits, cap)
    if model_type.startswith("cohere"):
        return lambda logits: logits * config.logit_scale
    if model_type.startswith("granite") or model_type == "minicpm3":
        return lambda logits: logits / config.logits_scaling
    if model_type == "hyperclovax":
        return lambda logits: logits * config.logits_scaling
    if model_type == "falcon_h1":
        return lambda logits: logits * causal_lm.model.lm_head_multiplier
    return None


def head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """(..., H) final hidden states (after the stack's norm) -> (..., V) logits, as `model(...).logits` has them.

    With [model] lm_head_fp32 (`set_lm_head_fp32`) the head's matmul runs in float32 and the logits are float32:
    bf16 logits are rounded to 8 significant bits (~0.06 at a logit of 16), which moves every log-prob.
    """
    causal_lm = unwrap(model)
    head = causal_lm.lm_head
    if lm_head_fp32(model):
        # Upcast for this matmul only (tied embeddings included): no persistent float32 copy of a (V, H) weight.
        bias = None if head.bias is None else head.bias.float()
        logits = nn.functional.linear(hidden.float(), head.weight.float(), bias)
    else:
        logits = head(hidden)
    transform = _post_head(causal_lm)
    return logits if transform is None else transform(logits)


@torch.no_grad()
def check_head_logits(model: nn.Module, num_tokens: int = 8) -> None:
    """Fail fast (UsageError) when `head_logits` does not reproduce the model's own logits: an architecture
    whose forward transforms the LM head's output in a way not known here would silently skew every ratio."""
    was_training = model.training
    model.eval()  # no dropout: both paths must see the same function
    try:
        device = next(p for p in model.parameters()).device
        ids = (torch.arange(num_tokens, device=device) % unwrap(model).config.vocab_size)[None]
        hidden = decoder_stack(model)(input_ids=ids, use_cache=False).last_hidden_state
        ours = head_logits(model, hidden).float()
        theirs = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    # A forgotten transform moves logits by a large fraction (soft-capping, a scale); rounding moves them by ~1e-3.
    if not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-2 * float(theirs.abs().max())):
        raise UsageError(f"{type(unwrap(model)).__name__}: unsupported architecture (its forward transforms the LM "
                         f"head's logits in a way the log-prob code does not reproduce; max difference "
                         f"{float((ours - theirs).abs().max()):.3g})")


def _token_logp(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, temperature: float) -> Tensor:
    logits = head(hidden).float() / temperature  # (C, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_logp(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, temperature: float, chunk: int) -> Tensor:
    """hidden (B, T, H), targets (B, T) -> (B, T) float32 log softmax(head(h) / temperature)[target].

    `head` maps (C, H) hidden states to (C, V) logits (`lambda h: head_logits(model, h)`, or a bare layer).
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    pieces = []
    for lo in range(0, flat_h.shape[0], chunk):
        h, t = flat_h[lo : lo + chunk], flat_t[lo : lo + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_logp, head, h, t, temperature, use_reentrant=False))
        else:
            pieces.append(_token_logp(head, h, t, temperature))
    return torch.cat(pieces).reshape(targets.shape)


def model_logp(model: nn.Module, hidden: Tensor, targets: Tensor, temperature: float, chunk: int) -> Tensor:
    """`chunked_logp` with the model's own hidden -> logits map (`head_logits`)."""
    return chunked_logp(lambda h: head_logits(model, h), hidden, targets, temperature, chunk)


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
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+T)
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # No KV cache: this forward sees every token at once, and a cache would only cost memory.
    hidden = decoder_stack(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
    prompt_len = prompt_ids.shape[1]
    # The hidden state at position p predicts token p + 1.
    predicting = hidden[:, prompt_len - 1 : -1]  # (B, T, H)
    return model_logp(model, predicting, completion_ids, temperature, chunk)
