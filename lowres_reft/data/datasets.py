"""Math problem data sets -> `Problem` lists (`load_problems`); their prompts are `data.prompts`.

`load_problems(cfg, split)` reads the data set named by `[data] name`:

- ``builtin:arithmetic``: short procedurally generated word problems (no download), for the tiny
  character-level model. Train = ``builtin_arithmetic(builtin_train_size, seed=shuffle_seed)``; eval = a
  held-out set of ``builtin_test_size`` problems generated with a fixed seed. The two splits are disjoint by
  construction: every question text is assigned to one split by a stable hash of the text, so no question can
  ever appear in both, whatever the sizes and seeds. ``train_split`` / ``eval_split`` are ignored and the
  builtin problems are not re-shuffled (they are already random), only truncated to ``max_*_samples``.
- ``builtin:reasoning``: multi-step word problems (2-4 operations, distractors) with step-by-step reference
  chains ending in "The answer is N." (`lowres_reft.data.reasoning`); splits and sizes as for ``builtin:arithmetic``.
- ``gsm8k`` (hub ``openai/gsm8k``, config ``main``): the gold answer is the text after ``####`` (commas
  removed); the solution is the worked answer without the ``<<...>>`` calculator annotations, its final
  ``#### N`` line rewritten as ``The answer is N.``.
- ``svamp`` (hub ``ChilleD/SVAMP``): question = ``Body`` + " " + ``Question`` (a period is added to a Body that
  lacks one); answer = ``Answer`` as a number string (8.0 -> "8"); solution from ``Equation`` when present,
  numbers tidied: ``"( 3.0 + 5.0 )"`` -> ``"(3 + 5) = 8. The answer is 8."``; None without an equation.
- ``math12k`` (hub ``hiyouga/math12k``): ``problem``, ``answer`` (LaTeX), ``solution`` when the rows have one.
- ``math500`` (hub ``HuggingFaceH4/MATH-500``): ``problem``, ``answer``, ``solution``. It only has a ``test``
  split: it is an evaluation set (use it with ``eval_split = "test"``, train on something else).
- ``jsonl`` / ``parquet`` / ``csv``: local files, ``[data] path`` required (a file, or a directory holding
  ``{split}.jsonl`` etc.). Fields: ``question_field`` / ``answer_field`` (default "question" / "answer") and
  ``solution_field`` (default none: ``Problem.solution`` is None).

For the hub data sets, ``[data] path`` loads a local copy in the same schema instead of the hub: a
.jsonl/.json/.parquet/.csv file, a directory written by ``save_to_disk``, or a directory of data files in the
hub layout (``train.jsonl``, ``data/train-00000-of-00001.parquet``, ``main/test-*.parquet``, ...). The
``*_field`` keys override the built-in field names. A single local file is the train split only: the eval split
then comes from ``[data] eval_path`` (one file as both would measure accuracy on training problems); a directory
holds one file per split.

The chosen split (``train_split`` for "train", ``eval_split`` for "eval") is shuffled with ``shuffle_seed``
and truncated to ``max_train_samples`` / ``max_eval_samples``. Rows with an empty question or answer are
skipped (with a logged warning).

Everything the user can get wrong (unknown name, missing path, missing field, unknown split, hub not reachable
or data set not cached) raises `UsageError` with a one-line message saying which recipe key to change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from lowres_reft.data.files import SCHEMA_NAMES, load_table
from lowres_reft.data.problems import BUILTIN_ARITHMETIC, Problem, builtin_arithmetic, builtin_arithmetic_eval
from lowres_reft.utils.errors import UsageError, did_you_mean

if TYPE_CHECKING:
    from lowres_reft.config import DataConfig

# Multi-step word problems with step-by-step reference chains (lowres_reft/reasoning.py).
BUILTIN_REASONING = "builtin:reasoning"
KNOWN_DATASETS: tuple[str, ...] = (BUILTIN_ARITHMETIC, BUILTIN_REASONING, *SCHEMA_NAMES, "reasoning_gym:<task>")
# Generated locally; their eval split is a fixed held-out set of `builtin_test_size` problems.
BUILTIN_DATASETS = (BUILTIN_ARITHMETIC, BUILTIN_REASONING)


def load_problems(cfg: DataConfig, split: Literal["train", "eval"]) -> list[Problem]:
    """The problems of `split` ("train" -> cfg.train_split, "eval" -> cfg.eval_split), shuffled and truncated.

    Raises UsageError (one line) for anything the recipe can fix.
    """
    if split not in ("train", "eval"):
        raise ValueError(f'split must be "train" or "eval", got {split!r}')
    limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    name = cfg.name.strip()
    if name == BUILTIN_ARITHMETIC:
        if split == "train":
            problems = builtin_arithmetic(cfg.builtin_train_size, seed=cfg.shuffle_seed)
        else:
            problems = builtin_arithmetic_eval(cfg.builtin_test_size)
        return problems[:limit] if limit is not None else problems
    if name == BUILTIN_REASONING:
        from lowres_reft.data import reasoning

        if split == "train":
            problems = reasoning.builtin_reasoning(cfg.builtin_train_size, seed=cfg.shuffle_seed)
        else:
            problems = reasoning.builtin_reasoning_eval(cfg.builtin_test_size)
        return problems[:limit] if limit is not None else problems
    if name.startswith("reasoning_gym:"):
        from lowres_reft.data.reasoning_gym import load_reasoning_gym

        return load_reasoning_gym(cfg, split)

    problems = load_table(name, cfg, split, limit)
    if problems is None:
        raise UsageError(
            f"[data] name = {cfg.name!r}: unknown dataset{_suggest(name, list(KNOWN_DATASETS))}"
        )
    return problems


def _suggest(name: str, choices: list[str]) -> str:
    return f"{did_you_mean(name, choices)}; known datasets: {', '.join(choices)}"


