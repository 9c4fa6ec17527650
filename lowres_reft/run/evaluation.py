"""Evaluation: greedy pass@1 during training, sampled pass@k for `lowres-reft eval`, and their statistics.

Generation goes through a sampling engine (`rollout.Engine`); scoring through the math answer check. The
statistics are pure: the unbiased pass@k estimator and Wilson score intervals.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from lowres_reft.data.answers import extract_answer, is_equivalent
from lowres_reft.data.rewards import math_correct, math_correct_final
from lowres_reft.rl.distributed import gather_objects
from lowres_reft.rollout.engine import decode_completions, make_engine
from lowres_reft.utils.fsutil import atomic_write_text

if TYPE_CHECKING:
    from lowres_reft.rollout.engine import Engine

CONFIDENCE = 0.95


@dataclass
class EvalResult:
    accuracy: float
    n: int
    predictions: list[dict] = field(default_factory=list)  # question, gold, completion, correct


def evaluate(engine: Engine, tokenizer, problems: list, prompts: list[list[int]], batch_size: int,
             require_final: bool = False) -> EvalResult:
    """Greedy pass@1 accuracy of the full model (no layers skipped): `engine` must be a greedy one.

    `require_final`: credit only an explicitly stated final answer, as `[reward] require_final_answer` does for
    the rewards (else a step-by-step chain cut off mid-way would count whenever an intermediate result is right)."""
    correct_fn = math_correct_final if require_final else math_correct
    predictions = []
    for lo in range(0, len(prompts), batch_size):
        batch = engine.generate(prompts[lo : lo + batch_size])
        texts = decode_completions(tokenizer, batch.completion_ids, batch.completion_mask)
        for problem, text in zip(problems[lo : lo + batch_size], texts):
            correct = correct_fn(text, problem.answer) == 1.0
            predictions.append({"question": problem.question, "gold": problem.answer, "completion": text, "correct": correct})
    n = len(predictions)
    accuracy = sum(p["correct"] for p in predictions) / max(n, 1)
    return EvalResult(accuracy=accuracy, n=n, predictions=predictions)


def sample_completions(engine: Engine, tokenizer, prompts: list[list[int]], samples: int, batch_size: int,
                       progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """`samples` completions per prompt, `batch_size` sequences per engine call; one dict per completion
    (text, tokens, truncated), problem-major order."""
    rows = [i for i in range(len(prompts)) for _ in range(samples)]
    out: list[dict] = []
    for lo in range(0, len(rows), batch_size):
        batch = engine.generate([prompts[i] for i in rows[lo : lo + batch_size]])
        texts = decode_completions(tokenizer, batch.completion_ids, batch.completion_mask)
        lengths = batch.completion_mask.sum(1).long().tolist()
        for text, length, truncated in zip(texts, lengths, batch.truncated.tolist()):
            out.append({"text": text, "tokens": int(length), "truncated": bool(truncated)})
        if progress is not None:
            progress(len(out), len(rows))
    return out


def score_completions(problems: list, completions: list[dict], samples: int, k: int) -> tuple[list[dict], dict[str, Any]]:
    """Per-problem prediction rows (index, question, gold, completions, answers, correct, truncated, tokens,
    score) and the `summarize` statistics of `samples` completions per problem (problem-major)."""
    rows, flags = [], []
    for i, problem in enumerate(problems):
        mine = completions[i * samples : (i + 1) * samples]
        answers = [extract_answer(c["text"]) for c in mine]
        correct = [bool(is_equivalent(a, problem.answer)) for a in answers]
        flags.append(correct)
        rows.append({"index": i, "question": problem.question, "gold": problem.answer,
                     "completions": [c["text"] for c in mine], "answers": answers, "correct": correct,
                     "truncated": [c["truncated"] for c in mine], "tokens": [c["tokens"] for c in mine]})
    stats = summarize(flags, k)
    for row, score in zip(rows, stats["scores"]):
        row["score"] = score
    return rows, stats


# ------------------------------------------------------------------------------------------ statistics


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n` at two-sided level `confidence`.

    center = (p + z^2 / 2n) / (1 + z^2 / n), half width = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2),
    with p = successes / n and z the (1 + confidence) / 2 normal quantile (1.96 for 95%).
    """
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the ends (no rounding residue)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct: 1 - C(n - c, k) / C(n, k) (Chen et al., 2021)."""
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct: list[list[bool]], k: int, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """pass@k and mean per-sample accuracy (with Wilson intervals) of per-problem correctness flags."""
    if not correct:
        raise ValueError("no problems to summarize")
    n = len(correct)
    scores = [pass_at_k(len(flags), sum(flags), k) for flags in correct]
    per_sample = [sum(flags) / len(flags) for flags in correct]
    pass_k, mean_acc = sum(scores) / n, sum(per_sample) / n
    return {
        "n": n,
        "k": k,
        "pass_at_k": pass_k,
        "pass_at_k_ci": list(wilson_interval(min(float(n), sum(scores)), n, confidence)),
        "mean_accuracy": mean_acc,
        "mean_accuracy_ci": list(wilson_interval(min(float(n), sum(per_sample)), n, confidence)),
        "problems_solved": sum(1 for flags in correct if any(flags)),
        "scores": scores,
    }


class Evaluator:
    """Greedy accuracy of the full model, sharded over processes; rank 0 writes eval.json and a metrics line."""

    def __init__(self, policy, recipe, problems, prompts, eos_ids, run_dir, history, metrics, ctx) -> None:
        self.policy, self.recipe, self.problems, self.prompts, self.eos_ids = policy, recipe, problems, prompts, eos_ids
        self.run_dir, self.history, self.metrics, self.ctx = run_dir, history, metrics, ctx
        # Greedy, the full model (no layers skipped), [eval] max_new_tokens.
        self.engine = make_engine(recipe.rollout.engine, policy.model, max_new_tokens=recipe.eval.max_new_tokens,
                                  eos_ids=eos_ids, pad_id=policy.tokenizer.pad_token_id, greedy=True,
                                  weights=recipe.rollout.weights)

    def __call__(self, step: int, label: str, say) -> float:
        ctx, r, w = self.ctx, self.ctx.rank, self.ctx.world
        result = evaluate(self.engine, self.policy.tokenizer, self.problems[r::w], self.prompts[r::w],
                          self.recipe.eval.batch_size, require_final=self.recipe.reward.require_final_answer)
        predictions = [p for shard in gather_objects(result.predictions, ctx) for p in shard]
        n = len(predictions)
        accuracy = sum(p["correct"] for p in predictions) / max(n, 1)
        if ctx.is_main:
            self.history.append({"step": step, "label": label, "accuracy": accuracy, "n": n})
            atomic_write_text(self.run_dir / "eval.json",
                              json.dumps({"history": self.history, "last_predictions": predictions[:50]}, indent=1))
            self.metrics.write({"step": step, "stage": "eval", "label": label, "eval_accuracy": accuracy, "eval_n": n})
            say(f"eval {label.replace('_', ' ')}: accuracy {accuracy:.3f} on {n} problems")
        return accuracy
