"""The builtin reasoning task (``[data] name = "builtin:reasoning"``): multi-step word problems, no download.

Each problem follows one person's stock of one kind of object through 2-4 operations, each result carried into
the next step, with 1-2 distractor sentences (another person's objects, another kind of object, an age) whose
numbers must not be used:

    Question: Mia has 4 bags with 3 pens each. Tom has 9 pens. She gives away 5. She buys 8 more.
    How many pens does Mia have now?
    Reference solution: 4 bags with 3 pens each: 4*3=12. gives away 5: 12-5=7. buys 8 more: 7+8=15. The answer is 15.

The reference solution is a chain of steps, one per operation, each quoting the phrase of the question it works
on and then its equation, ending with "The answer is N." (48-122 characters, 84 on average: as many tokens with
the tiny character-level model). Quoting makes each step "copy the next relevant phrase, then compute": a small
model learns that copying quickly, and skipping a distractor sentence is one visible decision per step. The
reward checks the final answer only;
`[reward] require_final_answer = true` credits an explicitly stated answer, never a chain's intermediate result.

Numbers stay small (every value <= `MAX_VALUE`, operands of "+"/"-" <= 9, multipliers 2-4) so the arithmetic
is within reach of the tiny pretrained model (`lowres_reft.tiny.builder` pretrains on the same ranges).

Splits: every question text belongs to one pool by a stable hash of the text (one in 8 is held out,
`problems.in_eval_pool`, as for builtin:arithmetic), so train and held-out never share a question, whatever the
sizes and seeds.
"""

from __future__ import annotations

import random

from lowres_reft.data.problems import Problem, in_eval_pool, sample_split

# Bump when the questions or the reference solutions change: the "problems" pretraining corpus holds them, and
# the tiny model's cache key includes this.
TASK_VERSION = 3
# Seed of the held-out set: fixed, so every run evaluates on the same problems.
REASONING_EVAL_SEED = 4321
# Largest value a problem ever holds (start, intermediate results, answer); the pretraining covers it.
MAX_VALUE = 20
MAX_OPERAND = 9
MIN_OPS, MAX_OPS = 2, 4

_PEOPLE = (("Tom", "He"), ("Ann", "She"), ("Sam", "He"), ("Mia", "She"), ("Ben", "He"), ("Lily", "She"),
           ("Max", "He"), ("Zoe", "She"))
_OBJECTS = ("apple", "pen", "book", "card", "coin", "egg", "ball", "shell", "stamp", "cup")
# One operation on the stock: its wording ({P}: the pronoun, {n}: the operand).
# Short on purpose: with a character-level model every prompt character costs a token in every training forward.
# A step of the solution quotes the sentence's phrase (the text after the pronoun, or "{n} times as many").
_ADD = ("{P} buys {n} more.", "{P} finds {n} more.", "{P} gets {n} more.")
_SUB = ("{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}.")
_MUL = ("Then {p} has {n} times as many.",)


def _phrase(sentence: str) -> str:
    """The quoted part of an operation's sentence: "She buys 3 more." -> "buys 3 more"."""
    if sentence.startswith("Then "):
        return sentence.split(" has ", 1)[1][:-1]
    return sentence.split(" ", 1)[1][:-1]


def _plural(obj: str) -> str:
    return obj + "s"


def _start(rng: random.Random, name: str, obj: str) -> tuple[str, int, str | None]:
    """The opening sentence, the starting value, and its equation when the opening is itself an operation."""
    if rng.random() < 0.35:
        bags, each = rng.randint(2, 4), rng.randint(2, 5)
        phrase = f"{bags} bags with {each} {_plural(obj)} each"
        return f"{name} has {phrase}.", bags * each, f"{phrase}: {bags}*{each}={bags * each}"
    value = rng.randint(3, 12)
    return f"{name} has {value} {_plural(obj)}.", value, None


def _operation(rng: random.Random, value: int) -> tuple[str, int] | None:
    """A random operation that keeps the value in 1..MAX_VALUE: (op, operand), or None when none fits."""
    choices = []
    if value + 1 <= MAX_VALUE:
        choices.append("+")
    if value >= 2:
        choices.append("-")
    if 2 * value <= MAX_VALUE:
        choices.append("*")
    if not choices:
        return None
    op = rng.choice(choices)
    if op == "+":
        return op, rng.randint(min(2, MAX_VALUE - value), min(MAX_OPERAND, MAX_VALUE - value))
    if op == "-":
        return op, rng.randint(min(2, value - 1), min(MAX_OPERAND, value - 1))
    return op, rng.randint(2, min(4, MAX_VALUE // value))


def _distractor(rng: random.Random, name: str, obj: str, kind: int) -> str:
    """A sentence with a number that the solution must not use (`kind` 0: another person's objects, 1: another
    kind of object, 2: an age)."""
    n = rng.randint(2, 20)
    if kind == 0:  # of the other gender, so that the next "He"/"She" still means `name`
        pron = dict(_PEOPLE)[name]
        other = rng.choice([p for p, q in _PEOPLE if q != pron])
        return f"{other} has {n} {_plural(obj)}."
    if kind == 1:
        other_obj = rng.choice([o for o in _OBJECTS if o != obj])
        return f"{name} also has {n} {_plural(other_obj)}."
    return f"{name} is {n} years old."


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def generate_problem(rng: random.Random) -> Problem:
    """One word problem with its reference chain "a op b=c. c op d=e. The answer is e."."""
    (name, pron), obj = rng.choice(_PEOPLE), rng.choice(_OBJECTS)
    n_ops = rng.randint(MIN_OPS, MAX_OPS)
    opening, value, first_eq = _start(rng, name, obj)
    sentences, steps = [opening], [first_eq] if first_eq else []
    while len(steps) < n_ops:
        picked = _operation(rng, value)
        if picked is None:
            break
        op, n = picked
        wording = rng.choice(_ADD if op == "+" else _SUB if op == "-" else _MUL)
        sentences.append(wording.format(P=pron, p=pron.lower(), n=n))
        result = _apply(op, value, n)
        steps.append(f"{_phrase(sentences[-1])}: {value}{op}{n}={result}")
        value = result
    for kind in rng.sample(range(3), rng.randint(1, 2)):  # after the opening, anywhere before the question
        sentences.insert(rng.randint(1, len(sentences)), _distractor(rng, name, obj, kind))
    question = " ".join(sentences) + f" How many {_plural(obj)} does {name} have now?"
    solution = " ".join(s + "." for s in steps) + f" The answer is {value}."
    return Problem(question=question, answer=str(value), solution=solution)


def pretraining_piece(rng: random.Random) -> tuple[str, str]:
    """(question + newline, its chain) of a training-pool problem, never a held-out one: the word problems of the
    tiny model's "problems" pretraining corpus (`lowres_reft.tiny.builder`). Half of the chains end with "The answer is N.":
    with none, the word "answer" was never a target, and after the warm-up greedy decoding wrote it but sampling
    (temperature 0.3) spread it over other tokens ("Thet is 9."): 1-5% of rollouts stated an answer, 78% greedy."""
    while True:
        problem = generate_problem(rng)
        if not in_eval_pool(problem.question):
            chain, answer = problem.solution.rsplit(" The answer is", 1)
            return problem.question + "\n", chain + (" The answer is" + answer if rng.random() < 0.5 else "")


def builtin_reasoning(n: int, seed: int) -> list[Problem]:
    """`n` distinct training problems, deterministic in `seed`; never a held-out question."""
    return sample_split(generate_problem, n, seed, eval_pool=False)


def builtin_reasoning_eval(n: int, seed: int = REASONING_EVAL_SEED) -> list[Problem]:
    """`n` distinct held-out problems, disjoint (as question texts) from every `builtin_reasoning` output."""
    return sample_split(generate_problem, n, seed, eval_pool=True)
