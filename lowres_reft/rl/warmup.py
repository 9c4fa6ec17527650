"""Supervised warm-up of the LoRA adapters on reference solutions, before RL (the original ReFT's first stage).

`run_warmup` trains the adapters (the only parameters with `requires_grad`) for `[warmup] steps` AdamW steps
(its own optimizer, lr `[warmup] lr`, no schedule) on batches of `[warmup] batch_size` problems that have a
reference solution, in a seeded order (`[train] seed`; epochs over a fresh permutation each).

One example = the prompt the RL stage samples from (`format_prompt`, tokenized without special tokens, its start
cut to `[data] max_prompt_tokens` as the trainer does) followed by the completion `format_solution(...)` + the
end-of-text token. The loss is the token-mean cross-entropy over the completion tokens of the whole batch only:
prompt tokens and padding carry no loss. Rows are right-padded; position ids count the row's real tokens
(`position = index among the row's real tokens`), the convention of the sampling loop and `completion_logp`.
Sequences longer than `[warmup] max_tokens` lose prompt tokens from the start first, then completion tokens
from the end. The batch is processed in micro-batches of `[train] micro_batch_size` rows (the loss is still
normalized by the whole batch's completion tokens), and the vocabulary projection is chunked
(`[loss] logprob_chunk`) so no (tokens x vocab) float32 logits tensor exists for the batch.

`[warmup] skip_distill_steps` > 0 adds that many steps of skip distillation after the supervised ones (same
examples, optimizer and micro-batches; a skip set per step drawn as the behavior policy draws it): the loss is
KL(teacher || nested) + KL(teacher || full) per completion token, the teacher being the full model as the
supervised steps left it (`skip_distill_kl`). It makes a base that never saw LayerDrop tolerate the nested
rollouts' skipped layers; with nothing to skip (r = 0) there is no distillation, unless `[warmup]
skip_distill_ratio` > 0 sets the distillation's own ratio.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from lowres_reft.data.problems import Problem
from lowres_reft.data.prompts import format_prompt, format_solution
from lowres_reft.model.layers import LayerStack, decoder_stack
from lowres_reft.model.logprobs import head_logits, model_logp
from lowres_reft.model.nested import num_skipped, skip_layers
from lowres_reft.utils.errors import UsageError


@dataclass
class SFTBatch:
    input_ids: Tensor  # (B, T) long, right-padded with pad_id
    attention_mask: Tensor  # (B, T) long, 1 for real tokens
    position_ids: Tensor  # (B, T) long: index among the row's real tokens
    loss_mask: Tensor  # (B, T) float: 1 where input_ids[b, t] is a completion token (a target), else 0

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum().item())


def fit_example(prompt: list[int], completion: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Cut (prompt, completion) to at most `max_tokens` tokens together: the prompt's start first (one prompt
    token is kept, it conditions the first completion token), then the completion's end."""
    over = len(prompt) + len(completion) - max_tokens
    if over > 0:
        cut = min(over, max(0, len(prompt) - 1))
        prompt = prompt[cut:]
        over -= cut
    if over > 0:
        completion = completion[: len(completion) - over]
    return prompt, completion


def build_sft_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                    max_tokens: int | None = None) -> SFTBatch:
    """Token lists -> a right-padded batch whose loss mask covers the completion tokens only.

    Row b is prompts[b] + completions[b] (cut to `max_tokens` by `fit_example`); `loss_mask[b, t] = 1` exactly
    for the completion tokens (the targets: the logits at t - 1 predict them); prompt tokens and padding are 0.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError("need as many completions as prompts, and at least one")
    rows = [fit_example(p, c, max_tokens) if max_tokens else (p, c) for p, c in zip(prompts, completions)]
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        input_ids[b, :n] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[b, :n] = 1
        loss_mask[b, len(p) : n] = 1.0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return SFTBatch(input_ids, attention_mask, position_ids, loss_mask)


def _completion_hidden(model, batch: SFTBatch) -> tuple[Tensor, Tensor]:
    """(N, H) hidden states predicting the N loss-masked tokens, and those (N,) tokens, in row-major order."""
    device = next(p for p in model.parameters()).device
    ids = batch.input_ids.to(device)
    # use_cache=False: a training forward has no later tokens to decode; a KV cache would only hold memory.
    hidden = decoder_stack(model)(input_ids=ids, attention_mask=batch.attention_mask.to(device),
                                  position_ids=batch.position_ids.to(device), use_cache=False).last_hidden_state
    # The hidden state at position t predicts token t + 1: keep only the positions whose next token has a loss.
    keep = batch.loss_mask[:, 1:].to(device).bool()
    return hidden[:, :-1][keep], ids[:, 1:][keep]


def sft_token_logp(model, batch: SFTBatch, chunk: int = 1024) -> Tensor:
    """log p(target) of every loss-masked token, (N,) float32 in row-major order of `batch.loss_mask[:, 1:]`."""
    selected, targets = _completion_hidden(model, batch)
    return model_logp(model, selected[None], targets[None], 1.0, chunk)[0]


def skip_distill_kl(model, batch: SFTBatch, skip: list[int], chunk: int = 256,
                    teacher: list[Tensor] | None = None) -> Tensor:
    """Token sum of KL(teacher || model with `skip` skipped) over the completion tokens of `batch`.

    Without `teacher` the teacher is the full model as it is (detached). With `teacher` (values of the trainable
    parameters, in `model.parameters()` order, snapshotted when the distillation began) the teacher is the full
    model with those values, and KL(teacher || full model) is added: the nested model is pulled to the full one
    while the full one stays where it was. Without that anchor the adapters collapse both to one constant output
    (measured: KL 0.000 and held-out accuracy 0% after 100 steps). Positions go through the head `chunk` at a time.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad(), _values(params, teacher):
        target, _ = _completion_hidden(model, batch)
    with skip_layers(model, skip):
        students = [_completion_hidden(model, batch)[0]]
    if teacher is not None:
        students.append(_completion_hidden(model, batch)[0])
    total = target.new_zeros((), dtype=torch.float32)
    for lo in range(0, target.shape[0], chunk):
        with torch.no_grad():
            p_log = torch.log_softmax(head_logits(model, target[lo : lo + chunk]).float(), dim=-1)
        for student in students:
            q_log = torch.log_softmax(head_logits(model, student[lo : lo + chunk]).float(), dim=-1)
            total = total + (p_log.exp() * (p_log - q_log)).sum()
    return total


@contextmanager
def _values(params: list[Tensor], values: list[Tensor] | None):
    """`params` hold `values` inside the block (None: unchanged), their own values again after it."""
    if values is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


def sft_loss(model, batch: SFTBatch, chunk: int = 1024) -> Tensor:
    """Token-mean cross-entropy over the completion tokens of `batch` (prompt and padding carry no loss)."""
    logp = sft_token_logp(model, batch, chunk)
    return -logp.sum() / max(1, logp.numel())


def warmup_examples(tokenizer, problems: list[Problem], recipe) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids + EOS) of every problem with a reference solution."""
    usable = [p for p in problems if p.solution]
    if not usable:
        raise UsageError(f"[warmup] needs reference solutions; dataset {recipe.data.name} has none "
                         "(set [warmup] steps = 0, or name the solution column with [data] solution_field)")
    if tokenizer.eos_token_id is None:
        raise UsageError("[warmup] needs a tokenizer with an end-of-text token")
    limit = recipe.data.max_prompt_tokens
    prompts, completions = [], []
    for problem in usable:
        prompt = tokenizer(format_prompt(tokenizer, problem.question, recipe.data), add_special_tokens=False)["input_ids"]
        text = format_solution(problem.solution, tokenizer, recipe.data)
        completion = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompts.append(prompt[-limit:])
        completions.append(completion)
    return prompts, completions


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Example indices of warm-up step `step` (0-based): epochs over a seeded permutation; a pure function."""
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(g, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + 7_777 + epoch).shuffle(order)
        out.append(order[pos])
    return out


@dataclass
class WarmupStop:
    """A warm-up stopped after `step` of its steps (Ctrl-C / SIGTERM): what resuming it needs."""

    step: int
    optimizer: dict  # the warm-up's AdamW state
    teacher: list[Tensor] | None  # the distillation's teacher values, once the distillation began
    distill: dict | None  # the distillation's skip-set schedule (its RNG)


def run_warmup(policy, recipe, problems: list[Problem], metrics, log=print, ranking: list[int] | None = None,
               should_stop=None, resume: WarmupStop | None = None) -> WarmupStop | None:
    """Supervised fine-tuning of the adapters on the problems' reference solutions (see the module docstring).

    Writes one metrics record per step (`stage = "warmup"`). The model is in train mode during the warm-up and
    left in the mode it was found in; gradients are cleared afterwards. After each step, `should_stop()` (a signal
    number, 0 = go on) may end it early: the `WarmupStop` returned is what `resume` takes to go on from there.
    """
    cfg = recipe.warmup
    if cfg.steps <= 0 and cfg.skip_distill_steps <= 0:
        return None
    model, tokenizer = policy.model, policy.tokenizer
    prompts, completions = warmup_examples(tokenizer, problems, recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("[warmup] the model has no trainable (adapter) parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=recipe.train.weight_decay)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if ranking is None and recipe.behavior.skip_layers == "influence":
        from lowres_reft.rl.builders import layer_ranking, ranking_texts

        ranking = layer_ranking(policy, recipe, ranking_texts(tokenizer, problems, recipe))[0]
    skips = distill_schedule(recipe, model, ranking)
    distill = cfg.skip_distill_steps if skips is not None else 0
    steps = cfg.steps + distill
    every = max(1, steps // 5)
    first, teacher = 0, None
    if resume is not None:
        first = resume.step
        optimizer.load_state_dict(resume.optimizer)
        teacher = None if resume.teacher is None else [t.to(p.device) for t, p in zip(resume.teacher, params)]
        if skips is not None and resume.distill is not None:
            skips.load_state_dict(resume.distill)
        log(f"warm-up resumed after step {first} of {steps}")
    else:
        log(f"warm-up: {cfg.steps} supervised steps on {len(prompts)} reference solutions "
            f"(batch {cfg.batch_size}, lr {cfg.lr:g})" + (f", then {distill} steps of skip distillation" if distill else ""))
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        for k in range(first, steps):
            skip = list(skips.draw()) if k >= cfg.steps else None
            if k == cfg.steps:  # the teacher: the full model as the supervised steps left it
                teacher = [p.detach().clone() for p in params]
            record = _warmup_step(model, recipe, params, optimizer, prompts, completions, pad_id, k, skip, teacher)
            metrics.write(record)
            if (k + 1) % every == 0 or k + 1 == steps:
                what = "loss" if skip is None else f"distillation KL (skip {skip})"
                log(f"warm-up step {k + 1}/{steps}: {what} {record['loss']:.3f} ({time.perf_counter() - start:.0f}s)")
            if should_stop is not None and should_stop():
                return WarmupStop(k + 1, optimizer.state_dict(), teacher, skips.state_dict() if skips else None)
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p in params:
            p.grad = None
        model.train(was_training)
    return None


def _warmup_step(model, recipe, params, optimizer, prompts, completions, pad_id: int, k: int, skip: list[int] | None,
                 teacher: list[Tensor] | None) -> dict:
    """Warm-up step `k` (0-based): supervised cross-entropy (`skip` None) or skip distillation, micro-batch by
    micro-batch, then the update unless the loss or the gradient is not finite. Returns its metrics record."""
    cfg, t0 = recipe.warmup, time.perf_counter()
    idx = batch_indices(k, cfg.batch_size, len(prompts), recipe.train.seed)
    rows = [fit_example(prompts[i], completions[i], cfg.max_tokens) for i in idx]
    total = sum(len(c) for _, c in rows)
    loss_sum, skipped = 0.0, False
    micro = max(1, recipe.train.micro_batch_size)
    for lo in range(0, len(rows), micro):
        part = rows[lo : lo + micro]
        batch = build_sft_batch([p for p, _ in part], [c for _, c in part], pad_id)
        # Normalized by the whole batch's completion tokens: the sum over micro-batches is the token mean.
        if skip is None:
            loss = -sft_token_logp(model, batch, recipe.loss.logprob_chunk).sum() / max(1, total)
        else:
            loss = skip_distill_kl(model, batch, skip, teacher=teacher) / max(1, total)
        if not torch.isfinite(loss):
            skipped = True
            break
        loss.backward()
        loss_sum += float(loss.detach())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm)) if not skipped else math.nan
    if not skipped and math.isfinite(grad_norm):
        optimizer.step()
    else:
        skipped = True
    optimizer.zero_grad(set_to_none=True)
    return {"step": 0, "stage": "warmup", "warmup_step": k + 1, "loss": loss_sum if not skipped else math.nan,
            "skip_distill": skip, "lr": cfg.lr, "grad_norm": grad_norm, "tokens": total, "update_skipped": skipped,
            "step_seconds": time.perf_counter() - t0}


def distill_schedule(recipe, model, ranking: list[int] | None = None):
    """The skip sets of skip distillation: the behavior's own schedule (`build_skip_schedule`, from the influence pool
    with `[behavior] skip_layers = "influence"`: `ranking`), at its largest ratio under the adaptive schedule, or at
    `[warmup] skip_distill_ratio` when that is > 0 (e.g. distillation before on-policy RL, as a control); None when it
    skips nothing (r = 0)."""
    from lowres_reft.rl.builders import build_skip_schedule

    count = LayerStack(model).count
    ratio = recipe.warmup.skip_distill_ratio
    if ratio > 0:  # random sets of that ratio (config refuses it with a fixed schedule)
        behavior = dataclasses.replace(recipe.behavior, skip_ratio=ratio, schedule="random")
        recipe = dataclasses.replace(recipe, behavior=behavior)
    schedule = build_skip_schedule(count, recipe, recipe.train.seed + 31_337, ranking)
    if recipe.behavior.schedule == "adaptive":
        schedule.set_ratio(recipe.behavior.max_ratio)
    if schedule.schedule != "fixed" and num_skipped(count, schedule.skip_ratio) == 0:
        return None
    return schedule
