"""The update: the corrected GRPO loss over a step's scored rollouts, micro-batch by micro-batch, then the optimizer.

`accumulate_gradients` is one backward over a batch (log-probs at the sampling temperature, correction weights,
policy objective, aggregation, optional KL to the adapter-free reference); `apply_updates` runs
`[loss] updates_per_batch` optimizer updates over the step's batches, skipping any whose loss or gradient is not
finite. The formulas are in `rl.loss`.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

from lowres_reft.rl import loss as L
from lowres_reft.rl.builders import trainable
from lowres_reft.rl.distributed import Dist, all_max, sum_gradients
from lowres_reft.rl.microbatch import by_length, by_prompt
from lowres_reft.rl.shared_prompt import supports_shared_prompt, update_logp
from lowres_reft.rl.warmup import SFTBatch, skip_distill_kl

if TYPE_CHECKING:
    from lowres_reft.config import LossConfig, Recipe
    from lowres_reft.model.loader import Policy
    from lowres_reft.rl.batch import ScoredBatch


def accumulate_gradients(policy: Policy, batch: ScoredBatch, cfg: LossConfig, temperature: float, micro: int,
                         max_new_tokens: int, scale: float, old_logp: torch.Tensor | None, totals: dict | None = None,
                         on_micro_batch=None, share_prompt: bool = False) -> dict:
    """Backward of the batch's loss (times `scale`), micro-batch by micro-batch. Returns logp (detached) + stats.

    Micro-batches of `micro` rows are formed by length and trimmed to their own used columns (`by_length`), or, with
    `share_prompt`, keep each prompt's rows together so its forward runs once (`by_prompt`, `shared_prompt`); the
    returned logp is (N, T) in the batch's row order, 0 where mask == 0. Loss and gradients equal those of row-order
    micro-batches padded to the batch's width: the aggregation normalizers are the whole batch's.

    `totals` are the aggregation normalizers (default: this batch's own token and sequence counts).
    Puts the model in train mode: gradient checkpointing only runs in train mode, and a model left in eval mode
    (from_pretrained's default, or any `model.eval()` before) would silently keep every layer's activations.
    Sampling and evaluation set eval mode themselves.
    """
    policy.model.train()
    r = batch.rollout
    mask = r.completion_mask
    if totals is None:
        totals = dict(total_tokens=max(1, int(mask.sum().item())), total_seqs=mask.shape[0], max_new_tokens=max_new_tokens)
    all_logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)  # (N, T), original row order
    share_prompt = share_prompt and supports_shared_prompt(policy.model)  # else by length: the tighter trim
    micro_batches = (by_prompt if share_prompt else by_length)(r, micro)  # trimmed: real lengths, not the widest row
    losses, kls, nested_kls, clipped, finite = 0.0, 0.0, 0.0, 0.0, True
    for done, mb in enumerate(micro_batches, 1):
        m = mb.completion_mask  # (b, t)
        logp = update_logp(policy.model, mb, temperature, cfg.logprob_chunk, share_prompt)  # (b, t)
        corr = L.correction_weights(logp.detach(), mb.take(r.behavior_logp), m, cfg.correction, cfg.is_cap, cfg.retrace_lambda)
        old = None if old_logp is None else mb.take(old_logp)
        objective, clip_frac = L.policy_objective(logp, corr.weights, batch.advantages[mb.rows], m, old,
                                                  cfg.clip_eps, cfg.clip_eps_high)
        micro_loss = -L.aggregate(objective, m, cfg.aggregation, **totals)
        if cfg.kl_beta > 0:
            with torch.no_grad(), policy.model.disable_adapter():
                ref_logp = update_logp(policy.model, mb, temperature, cfg.logprob_chunk, share_prompt)
            kl = L.aggregate(L.kl_k3(logp, ref_logp), m, cfg.aggregation, **totals)
            micro_loss = micro_loss + cfg.kl_beta * kl
            kls += float(kl.detach())
            del kl
        if cfg.nested_kl_beta > 0 and r.skip:  # skip distillation during RL, on this batch's own skip set
            nested = skip_distill_kl(policy.model, rollout_sft_batch(mb), list(r.skip)) / totals["total_tokens"]
            micro_loss = micro_loss + cfg.nested_kl_beta * nested
            nested_kls += float(nested.detach())
            del nested
        if not torch.isfinite(micro_loss):
            finite = False  # never backpropagate NaN/inf into the adapters; the step is skipped
        elif finite:
            (micro_loss * scale).backward()
        losses += float(micro_loss.detach())
        clipped += clip_frac * float(m.sum())
        all_logp[mb.rows, : mb.width] = torch.where(m != 0, logp.detach(), 0.0)
        if on_micro_batch is not None:
            on_micro_batch(done, len(micro_batches), 0)
        # Without a backward the graph keeps its saved activations: drop it before the next micro-batch's forward.
        del logp, objective, micro_loss
    stats = L.correction_weights(all_logp, r.behavior_logp, mask, cfg.correction, cfg.is_cap, cfg.retrace_lambda).stats
    return {"logp": all_logp, "loss": losses, "kl": kls, "nested_kl": nested_kls, "clip_frac": clipped / totals["total_tokens"],
            "finite": finite, **stats}


def rollout_sft_batch(mb) -> SFTBatch:
    """A micro-batch's rows, prompt + completion, as the warm-up's `SFTBatch` whose loss mask covers the completion
    tokens (left padding in the prompt: the position ids count real tokens only)."""
    ids = torch.cat([mb.prompt_ids, mb.completion_ids], dim=1)
    attention = torch.cat([mb.prompt_mask, mb.completion_mask.to(mb.prompt_mask.dtype)], dim=1)
    loss_mask = torch.cat([torch.zeros_like(mb.prompt_mask, dtype=torch.float32), mb.completion_mask.float()], dim=1)
    return SFTBatch(ids, attention, (attention.cumsum(-1) - 1).clamp(min=0), loss_mask)


def apply_updates(policy: Policy, recipe: Recipe, batches: list[ScoredBatch], totals: list[dict], optimizer, scheduler,
                  state: dict, ctx: Dist, on_micro_batch=None) -> tuple[list[dict], float, bool]:
    """`updates_per_batch` optimizer updates on the step's rollout batches. Non-finite loss/grad: update skipped."""
    params, cfg = trainable(policy), recipe.train
    old_logps: list[torch.Tensor | None] = [None] * len(batches)
    for _ in range(recipe.loss.updates_per_batch):
        results = []
        for i, batch in enumerate(batches):
            res = accumulate_gradients(policy, batch, recipe.loss, recipe.rollout.temperature, cfg.micro_batch_size,
                                       recipe.rollout.max_new_tokens, 1.0 / len(batches), old_logps[i], totals[i],
                                       on_micro_batch, cfg.shared_prompt_forward)
            old_logps[i] = res["logp"] if old_logps[i] is None else old_logps[i]
            results.append(res)
        sum_gradients(params, ctx)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        all_finite = all_max(0.0 if all(r["finite"] for r in results) else 1.0, ctx) == 0.0
        stepped = all_finite and math.isfinite(grad_norm)
        if stepped:
            optimizer.step()
        else:
            state["skipped_updates"] += 1
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the schedule advances per update, applied or skipped
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    return results, grad_norm, stepped
