"""Verifiable math rewards and the reward registry: `[reward] functions` names functions registered here.

A reward is `fn(completion, gold) -> float`; the math rewards read the completion's final answer and compare it
with the gold one through `answers.py` (extraction and equivalence, with time-bounded math-verify checks). `score`
calls the configured rewards on a batch with a per-call timeout; no exception ever leaves a reward function: a
failure while checking counts as wrong.
"""

from __future__ import annotations

import importlib
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from lowres_reft.data.answers import explicit_answer, extract_answer, is_equivalent
from lowres_reft.utils.errors import ConfigError, UsageError, did_you_mean

RewardFn = Callable[[str, str], float]

# --------------------------------------------------------------------------------------------------
# Reward functions and registry


def math_correct(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer equals the gold answer, else 0.0."""
    return 1.0 if is_equivalent(extract_answer(completion), gold) else 0.0


def math_correct_final(completion: str, gold: str) -> float:
    """math_correct that credits only an explicitly stated final answer (`[reward] require_final_answer`)."""
    return 1.0 if is_equivalent(extract_answer(completion, require_final=True), gold) else 0.0


def format_reward(completion: str, gold: str) -> float:
    """1.0 if the completion states its final answer explicitly (`\\boxed{}`, `####`, "the answer is")."""
    del gold
    try:
        return 1.0 if isinstance(completion, str) and explicit_answer(completion) else 0.0
    except Exception:
        return 0.0


def reasoning_gym_reward(completion: str, gold: str) -> float:
    """A reasoning-gym task's own verifier (see reasoning_gym_data.py); needs [data] name = "reasoning_gym:<task>"."""
    from lowres_reft.data.reasoning_gym import reasoning_gym_reward as task_score

    return task_score(completion, gold)


REWARDS: dict[str, RewardFn] = {
    "math_correct": math_correct,
    "format": format_reward,
    "reasoning_gym": reasoning_gym_reward,
}


def _one_line(x: object) -> str:
    return " ".join(str(x).split())


def get_reward_fn(name: str) -> RewardFn:
    """A reward function by registry name, or by explicit dotted path "package.module:function"."""
    if not isinstance(name, str):
        raise ConfigError(f"reward function name must be a string, got {name!r}")
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        known = ", ".join(sorted(REWARDS))
        hint = did_you_mean(name, REWARDS)
        raise ConfigError(
            f"unknown reward function {name!r}{hint}; known: {known} "
            f"(or name your own as 'package.module:function')"
        )
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"bad reward function path {name!r}; expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except BaseException as e:  # an import can raise anything, SystemExit included
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ConfigError(
            f"cannot import module {module_name!r} for reward function {name!r}: "
            f"{type(e).__name__}: {_one_line(e)}"
        ) from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (reward function {name!r})")
    if not callable(fn):
        raise ConfigError(f"reward function {name!r} is not callable")
    return fn


class Scores(NamedTuple):
    rewards: list[float]  # total reward per completion
    correct: list[bool]  # math_correct == 1 per completion
    timeouts: int  # reward calls abandoned after timeout_s (each scored 0)


class _RewardWorker:
    """A daemon thread running reward calls one at a time. A call that overruns its timeout is abandoned with
    its worker (Python threads cannot be killed); the next call gets a fresh worker. Daemon, so a hung call
    never keeps the process alive at exit."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="reward-worker", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, args, box = self.jobs.get()
            try:
                box.put((True, fn(*args)))
            except BaseException as e:  # handed to the caller, which names the function and the completion
                box.put((False, e))

    def call(self, fn: RewardFn, args: tuple, timeout_s: float) -> tuple[str, object]:
        """("ok", value) | ("raised", exception) | ("timeout", None). Waits in short slices so that the main
        thread's signal handlers (Ctrl-C) run while a reward is being computed."""
        box: queue.SimpleQueue = queue.SimpleQueue()
        self.jobs.put((fn, args, box))
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else math.inf
        while True:
            try:
                ok, value = box.get(timeout=min(_WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))
                return ("ok" if ok else "raised"), value
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return "timeout", None


_WAIT_SLICE_S = 0.1


def _describe(completion: str, index: int) -> str:
    text = _one_line(completion)
    return f"completion {index} ({text[:60]!r}{'...' if len(text) > 60 else ''})"


def _as_reward(name: str, value: object, completion: str, index: int) -> float:
    """A reward function's return value as a finite float, else a one-line UsageError naming both."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = None
    if isinstance(value, (str, bytes)) or number is None:
        raise UsageError(f"reward function {name!r} returned {value!r} (not a number) for {_describe(completion, index)}")
    if not math.isfinite(number):
        # NaN/inf would zero the group's advantages (or poison the loss) and the run would learn nothing silently.
        raise UsageError(f"reward function {name!r} returned {number} (rewards must be finite) for {_describe(completion, index)}")
    return number


def resolve_rewards(functions: Sequence[str]) -> list[tuple[str, RewardFn]]:
    """(name, function) for every configured reward; unknown names raise ConfigError before a run starts."""
    return [(name, get_reward_fn(name)) for name in functions]


def score(
    completions: Sequence[str],
    golds: Sequence[str],
    functions: tuple[str, ...] = ("math_correct",),
    format_weight: float = 0.1,
    require_final_answer: bool = False,
    timeout_s: float = 0.0,
) -> Scores:
    """Total reward per completion (sum of `functions`, "format" scaled by `format_weight`), correctness, and
    the number of reward calls that timed out.

    Correctness (math_correct == 1) is reported whether or not "math_correct" is among the functions.
    require_final_answer: "math_correct" (and the correctness) credit only an explicitly stated final answer.
    Every call runs in a worker thread; one that takes longer than `timeout_s` (> 0) scores 0 and is counted.
    A function that raises, or returns something that is not a finite number, stops scoring with a one-line
    UsageError naming the function and the completion's index in the batch.
    """
    if len(completions) != len(golds):
        raise ValueError(f"score: {len(completions)} completions but {len(golds)} gold answers")
    correct_fn = math_correct_final if require_final_answer else math_correct
    resolved = [(name, correct_fn if name == "math_correct" else fn) for name, fn in resolve_rewards(functions)]
    worker = _RewardWorker()
    totals: list[float] = []
    correct: list[bool] = []
    timeouts = 0
    for index, (completion, gold) in enumerate(zip(completions, golds)):
        total = 0.0
        is_right: bool | None = None
        for name, fn in resolved:
            status, result = worker.call(fn, (completion, gold), timeout_s)
            if status == "raised":
                if isinstance(result, KeyboardInterrupt):
                    raise result
                raise UsageError(f"reward function {name!r} raised {type(result).__name__}: "
                                 f"{_one_line(result)[:200]} on {_describe(completion, index)}")
            if status == "timeout":
                timeouts += 1
                worker = _RewardWorker()  # the old one is stuck in the abandoned call
                value = 0.0
            else:
                value = _as_reward(name, result, completion, index)
            if name == "math_correct":
                is_right = value == 1.0
            total += format_weight * value if name == "format" else value
        if is_right is None:
            is_right = correct_fn(completion, gold) == 1.0
        totals.append(total)
        correct.append(is_right)
    return Scores(totals, correct, timeouts)
