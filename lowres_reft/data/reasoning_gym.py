"""reasoning-gym tasks as training data, scored by each task's own verifier (offline, procedurally generated).

`[data] name = "reasoning_gym:<task>"` (e.g. "reasoning_gym:basic_arithmetic", "reasoning_gym:gsm_symbolic"):

- train: `builtin_train_size` problems from `reasoning_gym.create_dataset(task, seed=shuffle_seed, **task_config)`;
- eval: `builtin_test_size` problems generated with the fixed seed `EVAL_SEED`, so every run evaluates on the
  same problems. Train never holds an eval question: train is drawn from a larger generated set with the eval
  questions removed (a task with few distinct questions can then give fewer than asked; a warning says so).
- `max_train_samples` / `max_eval_samples` truncate as for every data set.

Rewards: the reward function "reasoning_gym" (`[reward] functions = ["reasoning_gym"]`) scores a completion with
the task's `score_answer(answer, entry)` (1.0 correct, partial credit where the task gives it). The answer is
read from the completion as follows: the last `<answer>...</answer>` (reasoning-gym's own convention), else our
math extractor (`\\boxed{}`, `#### N`, "the answer is N", the last number). How the reward finds the task's entry:
each problem's gold answer is a `TaskAnswer`, a `str` (the task's answer, so logs, math_correct and eval.json see
the plain answer) that also carries the task name and the generated entry; no other module needs to know.

Evaluation accuracy and rollout accuracy use the math checker (math_correct) against that answer, like every
data set: they are meaningful for tasks with numeric or math answers (basic_arithmetic, gsm_symbolic, ...).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from lowres_reft.utils.errors import UsageError

PREFIX = "reasoning_gym:"
# Seed of the held-out (eval) problems: fixed, like the builtin arithmetic set's.
EVAL_SEED = 1234
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)

log = logging.getLogger(__name__)


class TaskAnswer(str):
    """The gold answer string of a reasoning-gym problem, carrying the task name and its entry for the verifier."""

    task: str
    entry: dict[str, Any]

    def __new__(cls, answer: str, task: str, entry: dict[str, Any]) -> TaskAnswer:
        obj = super().__new__(cls, answer)
        obj.task, obj.entry = task, entry
        return obj

    def __reduce__(self):  # pickled (gathered across processes) with its entry
        return (TaskAnswer, (str(self), self.task, self.entry))


def _generate(task: str, size: int, seed: int, config: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        import reasoning_gym
    except ImportError:
        raise UsageError(f"[data] name = \"{PREFIX}{task}\" needs the reasoning-gym package: pip install reasoning-gym") from None
    try:
        return list(reasoning_gym.create_dataset(task, size=size, seed=seed, **config))
    except (ValueError, TypeError, AssertionError, KeyError) as err:
        message = " ".join(str(err).split())[:200] or type(err).__name__
        if task not in reasoning_gym.factory.DATASETS:
            raise UsageError(f"[data] name: unknown reasoning-gym task {task!r} ({_close(task, reasoning_gym)})") from None
        raise UsageError(f"[data] task_config for reasoning-gym task {task!r}: {message}") from None


def _close(task: str, reasoning_gym) -> str:
    import difflib

    names = sorted(reasoning_gym.factory.DATASETS)
    close = difflib.get_close_matches(task, names, n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else f"{len(names)} tasks, e.g. {', '.join(names[:5])}"


def load_reasoning_gym(cfg, split: str) -> list:
    """The `split` ("train"/"eval") problems of `cfg.name` = "reasoning_gym:<task>" (a DataConfig)."""
    from lowres_reft.data.problems import Problem

    task = cfg.name.strip()[len(PREFIX):]
    if not task:
        raise UsageError(f'[data] name = "{cfg.name}": name the task, e.g. "{PREFIX}basic_arithmetic"')
    eval_entries = _generate(task, cfg.builtin_test_size, EVAL_SEED, cfg.task_config)
    if split == "eval":
        entries, limit = eval_entries, cfg.max_eval_samples
    else:
        held_out = {e["question"] for e in eval_entries}
        pool = _generate(task, cfg.builtin_train_size + cfg.builtin_test_size, cfg.shuffle_seed, cfg.task_config)
        entries = [e for e in pool if e["question"] not in held_out][: cfg.builtin_train_size]
        if len(entries) < cfg.builtin_train_size:
            log.warning("%s: only %d distinct training problems outside the eval set (asked for %d)",
                        cfg.name, len(entries), cfg.builtin_train_size)
        limit = cfg.max_train_samples
    problems = [Problem(e["question"], TaskAnswer(str(e["answer"]), task, e), None) for e in entries]
    return problems[:limit] if limit is not None else problems


def completion_answer(completion: str) -> str | None:
    """The answer a completion gives: its last <answer>...</answer>, else our math extractor's pick."""
    from lowres_reft.data.answers import extract_answer

    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    found = extract_answer(completion)
    return found.strip() if isinstance(found, str) else None


@functools.lru_cache(maxsize=None)
def _score_fn(task: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def reasoning_gym_reward(completion: str, gold: str) -> float:
    """The task's own score of the completion's answer (0.0 for a gold without a task entry). Never raises."""
    entry, task = getattr(gold, "entry", None), getattr(gold, "task", None)
    if entry is None or not isinstance(completion, str):
        return 0.0
    try:
        answer = completion_answer(completion)
        return float(_score_fn(task)(answer=answer, entry=entry)) if answer is not None else 0.0
    except Exception:  # a verifier failing on odd text counts as wrong
        return 0.0

