"""Prompt and completion texts of a problem, and tokenized prompts.

`format_prompt` uses the tokenizer's chat template (system message ``[data] system_prompt`` + the
question, generation prompt added) when ``use_chat_template`` is on and the tokenizer has one; otherwise the
plain template ``"Question: {question}\\nAnswer:"`` with no system prompt (meant for tiny models trained from
scratch). `format_solution` gives the matching completion text for supervised warm-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lowres_reft.config import DataConfig
    from lowres_reft.data.problems import Problem


PLAIN_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def uses_chat_template(tokenizer: Any, cfg: DataConfig) -> bool:
    """Whether `format_prompt` applies the tokenizer's chat template (else the plain Question/Answer one)."""
    return bool(cfg.use_chat_template and getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, question: str, cfg: DataConfig) -> str:
    """The prompt text for `question`.

    Chat template (when `cfg.use_chat_template` and the tokenizer has one): system message `cfg.system_prompt`
    (left out when empty) + the question as the user message, with the generation prompt. A template that
    rejects the system role gets the system prompt prepended to the user message instead.
    Otherwise: "Question: {question}\\nAnswer:" (no system prompt).
    """
    if not uses_chat_template(tokenizer, cfg):
        return PLAIN_PROMPT_TEMPLATE.format(question=question)
    user = {"role": "user", "content": question}
    if not cfg.system_prompt:
        return _apply_template(tokenizer, [user], cfg)
    try:
        return _apply_template(tokenizer, [{"role": "system", "content": cfg.system_prompt}, user], cfg)
    except Exception as err:  # noqa: BLE001 - templates raise arbitrary errors (jinja raise_exception)
        if "system" not in str(err).lower():
            raise
        return _apply_template(tokenizer, [{"role": "user", "content": f"{cfg.system_prompt}\n\n{question}"}], cfg)


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], cfg: DataConfig) -> str:
    # Extra template variables only when asked for: templates that do not know them ignore them anyway.
    extra = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    if not isinstance(text, str):  # pragma: no cover - defensive
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def format_solution(solution: str, tokenizer: Any = None, cfg: DataConfig | None = None) -> str:
    """The completion text that follows `format_prompt(...)` in supervised warm-up (end-of-text not included).

    Plain template: " " + solution (so prompt + completion reads "Answer: 3+4=7.").
    Chat template (tokenizer and cfg given and the template in use): the solution as the assistant's content.
    """
    if tokenizer is not None and cfg is not None and uses_chat_template(tokenizer, cfg):
        return solution
    return " " + solution


def encode_prompts(tokenizer, problems: list[Problem], recipe) -> list[list[int]]:
    """Formatted, tokenized prompts; over-long prompts keep their end (where the question is asked)."""
    limit = recipe.data.max_prompt_tokens
    out = []
    for problem in problems:
        ids = tokenizer(format_prompt(tokenizer, problem.question, recipe.data), add_special_tokens=False)["input_ids"]
        out.append(ids[-limit:])
    return out
