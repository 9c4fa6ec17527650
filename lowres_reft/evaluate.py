"""Greedy pass@1 accuracy of the full target model (no layers skipped) on a list of problems."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowres_reft.rewards import math_correct, math_correct_final
from lowres_reft.rollout import sample


@dataclass
class EvalResult:
    accuracy: float
    n: int
    predictions: list[dict] = field(default_factory=list)  # question, gold, completion, correct


def decode_completions(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    return [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(completion_ids.cpu(), completion_mask.cpu())
    ]


def evaluate(
    model: nn.Module,
    tokenizer,
    problems: list,
    prompts: list[list[int]],
    eos_ids: list[int],
    max_new_tokens: int,
    batch_size: int,
    require_final: bool = False,
) -> EvalResult:
    """`require_final`: credit only an explicitly stated final answer, as `[reward] require_final_answer` does for
    the rewards (else a step-by-step chain cut off mid-way would count whenever an intermediate result is right)."""
    correct_fn = math_correct_final if require_final else math_correct
    predictions = []
    for lo in range(0, len(prompts), batch_size):
        batch = sample(model, prompts[lo : lo + batch_size], max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                       pad_id=tokenizer.pad_token_id, greedy=True)
        texts = decode_completions(tokenizer, batch.completion_ids, batch.completion_mask)
        for problem, text in zip(problems[lo : lo + batch_size], texts):
            correct = correct_fn(text, problem.answer) == 1.0
            predictions.append({"question": problem.question, "gold": problem.answer, "completion": text, "correct": correct})
    n = len(predictions)
    accuracy = sum(p["correct"] for p in predictions) / max(n, 1)
    return EvalResult(accuracy=accuracy, n=n, predictions=predictions)
