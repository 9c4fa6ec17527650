"""TRL-style local data sets: the question is a `prompt` string or a `messages` list of {role, content}.

Used by data.py for local jsonl/parquet/csv files when no `question` column (and no `[data] question_field`) is
there: the `prompt` column, else the `messages` column, whose last user message is the question (system and
assistant turns are dropped: the recipe's `[data] system_prompt` and the chat template apply as for any data).
The answer column is `[data] answer_field` (default "answer").
"""

from __future__ import annotations

from typing import Any

# Question columns of TRL's prompt-only formats, in the order they are looked for.
QUESTION_COLUMNS = ("prompt", "messages")


def question_column(columns: list[str]) -> str | None:
    """The TRL-style question column among `columns`, or None."""
    return next((c for c in QUESTION_COLUMNS if c in columns), None)


def question_text(value: Any) -> Any:
    """A `messages` cell (list of {role, content}) -> the last user message's text; any other value as is."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user"]
        return users[-1] if users else None
    return value
