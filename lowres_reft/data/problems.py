"""A math problem (question, gold answer, optional worked solution) and the builtin arithmetic word problems.

The builtin set needs no download (it is what the tiny model learns on). Train and eval are disjoint by
construction: every question text is assigned to one split by a stable hash of the text.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

BUILTIN_ARITHMETIC = "builtin:arithmetic"
# Seed of the builtin held-out (eval) set: fixed, so every run evaluates on the same problems.
BUILTIN_EVAL_SEED = 1234
# One question in _EVAL_POOL_MOD goes to the held-out pool (chosen by a stable hash of its text).
_EVAL_POOL_MOD = 8


@dataclass(frozen=True)
class Problem:
    question: str
    # Gold final answer as a string ("18", "\\frac{1}{2}").
    answer: str
    # Worked solution ending with the answer (supervised warm-up); None if the data set has none.
    solution: str | None


# --------------------------------------------------------------------------------------------------
# Builtin arithmetic word problems
# --------------------------------------------------------------------------------------------------

_NAMES = (("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"), ("Ben", "he"), ("Lily", "she"))
_OBJECTS = ("apple", "pen", "book", "card", "coin", "egg", "ball")


def _count(n: int, obj: str) -> str:
    return f"{n} {obj}" if n == 1 else f"{n} {obj}s"


def _gen_add(rng: random.Random) -> tuple[str, str, int, int]:
    (name, pron), obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    q = f"{name} has {_count(a, obj)}. {pron.capitalize()} gets {b} more. How many {obj}s does {pron} have now?"
    return q, "+", a, b


def _gen_add_two(rng: random.Random) -> tuple[str, str, int, int]:
    (name, _), (other, _) = rng.sample(_NAMES, 2)
    obj = rng.choice(_OBJECTS)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    q = f"{name} has {_count(a, obj)} and {other} has {_count(b, obj)}. How many {obj}s do they have in all?"
    return q, "+", a, b


def _gen_sub(rng: random.Random) -> tuple[str, str, int, int]:
    (name, pron), obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    a = rng.randint(1, 20)
    b = rng.randint(1, a)
    q = f"{name} has {_count(a, obj)}. {pron.capitalize()} gives away {b}. How many {obj}s does {pron} have left?"
    return q, "-", a, b


def _gen_mul(rng: random.Random) -> tuple[str, str, int, int]:
    (name, pron), obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    a, b = rng.randint(2, 5), rng.randint(1, 10)
    q = f"{name} has {a} bags with {_count(b, obj)} each. How many {obj}s does {pron} have?"
    return q, "*", a, b


_TEMPLATES: tuple[Callable[[random.Random], tuple[str, str, int, int]], ...] = (_gen_add, _gen_add_two, _gen_sub, _gen_mul)
_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def in_eval_pool(question: str) -> bool:
    """Whether a generated question belongs to the held-out pool (one in _EVAL_POOL_MOD, by a stable hash)."""
    return zlib.crc32(question.encode("utf-8")) % _EVAL_POOL_MOD == 0


def sample_split(generate: Callable[[random.Random], Problem], n: int, seed: int, eval_pool: bool,
                 budget: int | None = None) -> list[Problem]:
    """`n` problems from `generate` whose questions belong to the pool `eval_pool` names, deterministic in `seed`.

    Distinct questions; with a `budget`, only for that many pool candidates (a small pool then repeats)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < n:
        problem = generate(rng)
        if in_eval_pool(problem.question) != eval_pool:
            continue
        if budget is not None:
            budget -= 1
        if problem.question in seen and (budget is None or budget > 0):
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def _arithmetic_problem(rng: random.Random) -> Problem:
    question, op, a, b = rng.choice(_TEMPLATES)(rng)
    answer = _OPS[op](a, b)
    return Problem(question=question, answer=str(answer), solution=f"{a}{op}{b}={answer}.")


def _arithmetic(n: int, seed: int, eval_pool: bool) -> list[Problem]:
    # Distinct questions while the pool allows it (it holds tens of thousands); repeats only beyond that.
    return sample_split(_arithmetic_problem, n, seed, eval_pool, budget=200 * n + 1000)


def builtin_arithmetic(n: int, seed: int) -> list[Problem]:
    """`n` short one-operation word problems (+, -, *; operands <= 20, answers >= 0), deterministic in `seed`.

    Solutions are the one equation, "3+4=7." (its last number is the answer). Questions come from the training
    pool only: the held-out pool used for evaluation (`builtin_arithmetic_eval`) never shares a question with it.
    """
    return _arithmetic(n, seed, eval_pool=False)


def builtin_arithmetic_eval(n: int, seed: int = BUILTIN_EVAL_SEED) -> list[Problem]:
    """`n` held-out builtin problems, disjoint (as question texts) from every `builtin_arithmetic` output."""
    return _arithmetic(n, seed, eval_pool=True)
