"""GRPO loss with off-policy corrections for rollouts sampled from a layer-skipped behavior policy.

Notation, per completion i of a group of G, token t, mask m_it (1 on real completion tokens, 0 on the
right padding):

    logp_t           log pi_theta(y_t | .)   current policy, carries the gradient
    behavior_logp_t  log mu(y_t | .)         recorded at sampling time, no gradient
    rho_t            exp(logp_t.detach() - behavior_logp_t)
    A_i              (R_i - mean_group R) / (std_group R + eps)     ("none" scale: R_i - mean_group R)
    w_t              correction weight, no gradient (`correction_weights`)
    objective_t      w_t * A_i * exp(logp_t - logp_t.detach())     value w*A, gradient w*A*grad(logp_t)
    kl_t             exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1                      (k3)

    loss (one micro-batch) = -aggregate(objective) + beta * aggregate(kl)     (same aggregation mode)

The trainer splits a rollout batch into micro-batches, so `aggregate` takes the normalizers of the whole
batch: the micro-batch losses then sum exactly to the loss of the whole batch.

Every function accepts float32 or float64 tensors and computes in that dtype (bf16/fp16 are upcast to
float32). Masks may be bool, int or float (nonzero = real token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean", "dr_grpo")
ADVANTAGE_SCALES = ("std", "none")


@dataclass(frozen=True)
class CorrectionOutput:
    weights: Tensor  # (B, T) w_t, no grad, 0 where mask == 0
    log_rho: Tensor  # (B, T) logp.detach() - behavior_logp, 0 where mask == 0
    stats: dict[str, float]  # rho_mean, rho_min, rho_max, is_truncated_frac, ess, trace_mean


class CorrectionParams(NamedTuple):
    """What a correction reads from the loss config (a `config.LossConfig` has the same fields)."""

    is_cap: float = 2.0
    retrace_lambda: float = 1.0


# A correction: (log_rho (B, T), mask m (B, T) bool, loss config) -> (weights (B, T) 0 where ~m,
# is_truncated_frac, trace_mean). Registered by name; [loss] correction is validated against this registry.
Correction = Callable[[Tensor, Tensor, Any], "tuple[Tensor, float, float]"]
CORRECTIONS: dict[str, Correction] = {}


def correction(name: str) -> Callable[[Correction], Correction]:
    """Register a correction under `name` (usable as [loss] correction = "name")."""

    def register(fn: Correction) -> Correction:
        CORRECTIONS[name] = fn
        return fn

    return register


def _dtype(x: Tensor) -> torch.dtype:
    """Compute dtype: float64 stays float64, anything else (bf16, fp16, float32, ints) becomes float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _frac(cond: Tensor, m: Tensor) -> float:
    """Fraction of the positions selected by bool `m` where `cond` holds (0.0 when `m` selects nothing)."""
    n = int(m.sum())
    return float((cond & m).sum()) / n if n else 0.0


def group_advantages(rewards: Tensor, group_size: int, scale: str = "std", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages, (N,) -> (N,), rows laid out group-contiguous ([0..G-1] is group 0, ...).

        scale="std":  A_i = (R_i - mean_g R) / (std_g R + eps)   std = unbiased sample std (torch.std, as TRL)
        scale="none": A_i =  R_i - mean_g R                        (Dr. GRPO)

    A group whose rewards are all equal gets exactly A = 0, also with eps = 0: equality is tested exactly
    (max == min), since the float mean of equal values can differ from them (8 x 0.1 in float32).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; expected one of {ADVANTAGE_SCALES}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale == "std" and group_size < 2:
        raise ValueError("scale='std' needs group_size >= 2")
    r = rewards.detach().to(_dtype(rewards)).reshape(-1, group_size)
    equal = r.amax(1, keepdim=True) == r.amin(1, keepdim=True)  # (groups, 1)
    centered = r - r.mean(1, keepdim=True)
    if scale == "none":
        return torch.where(equal, 0.0, centered).reshape(-1)
    denom = r.std(1, keepdim=True) + eps
    return torch.where(equal | ~(denom > 0), 0.0, centered / denom).reshape(-1)


def sequence_ess(log_rho: Tensor, mask: Tensor) -> float:
    """Normalized effective sample size of the uncapped sequence weights W_i = prod_t rho_t, in (0, 1].

        ESS = (sum_i W_i)^2 / (N * sum_i W_i^2)
            = exp(2 * logsumexp(log W) - logsumexp(2 * log W) - log N),   log W_i = sum_t m_it log_rho_it

    Computed in float64 log space, so log-ratios of +-hundreds are fine. N counts every row (an empty
    row has W = 1). 1.0 = all weights equal (on-policy), ~1/N = one sequence dominates. NaN for N = 0.
    """
    log_w = torch.where(mask != 0, log_rho.detach().double(), 0.0).sum(1)  # (B,)
    if log_w.numel() == 0:
        return float("nan")
    log_ess = 2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0) - math.log(log_w.numel())
    return min(1.0, math.exp(float(log_ess)))


def correction_weights(
    logp: Tensor,
    behavior_logp: Tensor,
    mask: Tensor,
    method: str,
    is_cap: float = 2.0,
    retrace_lambda: float = 1.0,
) -> CorrectionOutput:
    """Off-policy correction weights w_t, (B, T) -> (B, T), no gradient, 0 where mask == 0.

    With rho_t = exp(logp_t.detach() - behavior_logp_t) and c = is_cap (inf = uncapped):
        none:    w_t = 1
        tis:     w_t = min(rho_t, c)                                     (token-level truncated IS)
        seq_is:  w_t = min(prod_s rho_s, c)  over the row's masked tokens, same for every token
                 (uncapped it is the unbiased sequence importance weight pi(y)/mu(y))
        retrace: w_t = min(rho_t, c) * prod_{s>t} lambda * min(1, rho_s)   over the row's future masked
                 tokens (empty product = 1 at the last token; lambda = 0 keeps only the last token)
    All products are sums of logs (a reverse cumulative sum for retrace) and exp is taken of the capped
    log, so a finite cap never overflows; padding contributes nothing whatever its log-probs are.

    stats (floats over this batch's masked tokens): rho_mean, rho_min, rho_max (NaN without tokens);
    is_truncated_frac: fraction of tokens with rho_t > c (seq_is: of non-empty rows with prod rho > c;
    none: 0); ess: `sequence_ess` of the uncapped sequence weights; trace_mean: retrace only, the mean
    of prod_{s>t} c_s over masked tokens, NaN for the other methods.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; expected one of {tuple(CORRECTIONS)}")
    dtype = _dtype(logp)
    m = mask != 0
    log_rho = torch.where(m, logp.detach().to(dtype) - behavior_logp.detach().to(dtype), 0.0)
    weights, truncated, trace_mean = CORRECTIONS[method](log_rho, m, CorrectionParams(is_cap, retrace_lambda))
    rho = log_rho[m].double().exp()
    empty = rho.numel() == 0
    stats = {
        "rho_mean": float("nan") if empty else float(rho.mean()),
        "rho_min": float("nan") if empty else float(rho.min()),
        "rho_max": float("nan") if empty else float(rho.max()),
        "is_truncated_frac": truncated,
        "ess": sequence_ess(log_rho, m),
        "trace_mean": trace_mean,
    }
    return CorrectionOutput(weights=weights, log_rho=log_rho, stats=stats)


@correction("none")
def _no_correction(log_rho: Tensor, m: Tensor, cfg) -> tuple[Tensor, float, float]:
    return m.to(log_rho.dtype), 0.0, float("nan")


@correction("tis")
def _token_is(log_rho: Tensor, m: Tensor, cfg) -> tuple[Tensor, float, float]:
    log_cap = math.log(cfg.is_cap)  # inf when uncapped
    weights = torch.where(m, log_rho.clamp(max=log_cap).exp(), 0.0)
    return weights, _frac(log_rho > log_cap, m), float("nan")


@correction("seq_is")
def _sequence_is(log_rho: Tensor, m: Tensor, cfg) -> tuple[Tensor, float, float]:
    log_cap = math.log(cfg.is_cap)
    log_w = log_rho.sum(1, keepdim=True)  # (B, 1) log prod_t rho_t
    weights = torch.where(m, log_w.clamp(max=log_cap).exp(), 0.0)
    return weights, _frac(log_w.squeeze(1) > log_cap, m.any(1)), float("nan")


@correction("retrace")
def _retrace(log_rho: Tensor, m: Tensor, cfg) -> tuple[Tensor, float, float]:
    log_cap = math.log(cfg.is_cap)
    log_lambda = math.log(cfg.retrace_lambda) if cfg.retrace_lambda > 0 else -math.inf
    log_c = torch.where(m, log_rho.clamp(max=0.0) + log_lambda, 0.0)  # log c_s; c = 1 on padding
    suffix = log_c.flip(1).cumsum(1).flip(1)  # sum_{s>=t} log c_s
    log_trace = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], 1)  # sum_{s>t}, no inf-inf
    weights = torch.where(m, (log_rho.clamp(max=log_cap) + log_trace).exp(), 0.0)
    trace_mean = float(log_trace.exp()[m].double().mean()) if m.any() else float("nan")
    return weights, _frac(log_rho > log_cap, m), trace_mean


def policy_objective(
    logp: Tensor,
    weights: Tensor,
    advantages: Tensor,
    mask: Tensor,
    old_logp: Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float = 0.2,
) -> tuple[Tensor, float]:
    """Per-token objective to maximize, (B, T) (0 where mask == 0), and the clip fraction.

    logp (B, T) has the gradient; weights (B, T) and advantages (B,) are treated as constants.
        old_logp None:  obj_t = w_t * A_i * exp(logp_t - logp_t.detach())
                        (value w*A, gradient w*A*grad logp_t); clip fraction 0.0
        old_logp given: obj_t = w_t * min(r_t * A_i, clip(r_t, 1 - eps, 1 + eps_high) * A_i),
                        r_t = exp(logp_t - old_logp_t)   (PPO; old_logp = the first update's log-probs)
    Clip fraction: share of masked tokens where the clipped branch is active (its gradient is zero):
    (r_t > 1 + eps_high and A_i > 0) or (r_t < 1 - eps and A_i < 0).
    """
    dtype = _dtype(logp)
    m = mask != 0
    logp = torch.where(m, logp.to(dtype), 0.0)  # padding values never reach exp (no inf * 0 in backward)
    w = torch.where(m, weights.detach().to(dtype), 0.0)
    adv = advantages.detach().to(dtype).unsqueeze(1)  # (B, 1)
    if old_logp is None:
        return torch.where(m, w * adv * torch.exp(logp - logp.detach()), 0.0), 0.0
    ratio = torch.exp(logp - torch.where(m, old_logp.detach().to(dtype), 0.0))
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high)
    obj = w * torch.minimum(ratio * adv, clipped * adv)
    active = ((ratio > 1.0 + clip_eps_high) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
    return torch.where(m, obj, 0.0), _frac(active, m)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per token, (B, T), >= 0, gradient through logp.

        kl_t = exp(d_t) - d_t - 1,   d_t = ref_logp_t - logp_t      (computed as expm1(d) - d)
    Not masked: pass the result through `aggregate`, which ignores padding.
    """
    dtype = _dtype(logp)
    d = ref_logp.detach().to(dtype) - logp.to(dtype)
    return torch.expm1(d) - d


def aggregate(
    values: Tensor, mask: Tensor, mode: str, *, total_tokens: int, total_seqs: int, max_new_tokens: int
) -> Tensor:
    """Reduce a per-token quantity x (B, T) of one micro-batch to a scalar with the whole batch's normalizers.

        token_mean: sum_it x_it m_it / total_tokens                       (masked tokens of the whole batch)
        seq_mean:   sum_i [sum_t x_it m_it / len_i] / total_seqs          (GRPO; len_i = sum_t m_it, >= 1)
        dr_grpo:    sum_it x_it m_it / (total_seqs * max_new_tokens)      (Dr. GRPO, constant normalizer)
    Padding values are ignored (even inf/NaN). total_tokens and total_seqs are guarded to >= 1, so an
    empty batch aggregates to 0.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")
    m = mask != 0
    x = torch.where(m, values.to(_dtype(values)), 0.0)
    if mode == "token_mean":
        return x.sum() / max(total_tokens, 1)
    if mode == "seq_mean":
        return (x.sum(1) / m.sum(1).clamp(min=1)).sum() / max(total_seqs, 1)
    return x.sum() / (max(total_seqs, 1) * max_new_tokens)
