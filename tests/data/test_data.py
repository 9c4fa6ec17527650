"""Tests of lowres_reft.data.datasets: adapters on local fixture files, builtin arithmetic, errors, prompt formatting.

Everything runs offline (HF_HUB_OFFLINE=1) with the datasets/hub caches redirected to a temporary folder.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets / huggingface_hub are imported (they read it at import)

import dataclasses
import json
import re
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from lowres_reft.config import DataConfig
from lowres_reft.data.datasets import KNOWN_DATASETS, builtin_arithmetic, load_problems
from lowres_reft.data.problems import Problem
from lowres_reft.data.prompts import format_prompt, format_solution
from lowres_reft.utils.errors import UsageError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(autouse=True)
def _offline_hermetic(tmp_path_factory, monkeypatch):
    """Offline even if another test module imported the hub libraries before the env var was set; empty caches."""
    cache = tmp_path_factory.getbasetemp() / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")


def cfg(**kw) -> DataConfig:
    kw.setdefault("max_eval_samples", None)
    return DataConfig(**kw)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ---------------------------------------------------------------------------------------------- adapters


def test_gsm8k_local_file():
    probs = load_problems(cfg(name="gsm8k", path=str(FIXTURES / "gsm8k_style.jsonl")), "train")
    assert len(probs) == 5
    by_answer = {p.answer: p for p in probs}
    assert set(by_answer) == {"36", "1236", "28", "105", "35"}  # "1,236" -> "1236"
    p = by_answer["1236"]
    assert p.question.startswith("Rita saves 250 dollars")
    assert p.solution == (
        "She saves 250*5 = 1250 dollars.\nAfter the bike she has 1250-14 = 1236 dollars.\nThe answer is 1236."
    )
    for p in probs:
        assert "<<" not in p.solution and "####" not in p.solution
        assert p.solution.endswith(f"The answer is {p.answer}.")


def test_svamp_local_file():
    probs = load_problems(cfg(name="svamp", eval_path=str(FIXTURES / "svamp_style.jsonl")), "eval")
    by_answer = {p.answer: p for p in probs}
    assert set(by_answer) == {"8", "14", "24", "0.4"}
    assert by_answer["8"].question == "A shelf has 3.0 red cups and 5.0 blue cups. How many cups are on the shelf?"
    # Body without a trailing period gets one.
    assert by_answer["14"].question == (
        "Leo had 20 stickers. He gave 6 stickers to his sister. How many stickers does Leo have now?"
    )
    assert by_answer["8"].solution == "(3 + 5) = 8. The answer is 8."
    assert by_answer["0.4"].solution == "(2 / 5) = 0.4. The answer is 0.4."


def test_math12k_local_file_and_alias():
    probs = load_problems(cfg(name="math12k", path=str(FIXTURES / "math12k_style.jsonl")), "train")
    assert len(probs) == 4
    half = next(p for p in probs if p.answer == "\\frac{1}{2}")
    assert half.question == "What is $\\frac{1}{4} + \\frac{1}{4}$?"
    assert half.solution.endswith("$\\boxed{\\frac{1}{2}}$.")
    # The hub id works as a name too.
    again = load_problems(cfg(name="hiyouga/math12k", path=str(FIXTURES / "math12k_style.jsonl")), "train")
    assert again == probs


def test_math_without_solution_column(tmp_path):
    rows = [{"problem": "What is $1+1$?", "answer": "2"}, {"problem": "What is $2+2$?", "answer": "4"}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    probs = load_problems(cfg(name="math12k", path=str(tmp_path)), "eval")
    assert {p.answer for p in probs} == {"2", "4"}
    assert all(p.solution is None for p in probs)


def test_math500_is_eval_only(tmp_path):
    row = {"problem": "What is $3^2$?", "answer": "9", "solution": "$3^2 = \\boxed{9}$.", "level": 1}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    probs = load_problems(cfg(name="math500", path=str(tmp_path)), "eval")
    assert probs == [Problem("What is $3^2$?", "9", "$3^2 = \\boxed{9}$.")]
    with pytest.raises(UsageError) as err:
        load_problems(cfg(name="math500", path=str(tmp_path)), "train")
    msg = one_line(err)
    assert "train_split" in msg and "'train'" in msg and "test" in msg and "evaluation" in msg


def test_csv_with_field_overrides():
    c = cfg(name="csv", path=str(FIXTURES / "generic.csv"), question_field="prompt", answer_field="gold",
            solution_field="worked")
    probs = load_problems(c, "train")
    assert len(probs) == 6
    by_answer = {p.answer: p for p in probs}
    assert by_answer["30"] == Problem("What is 6 times 5?", "30", "6*5=30. The answer is 30.")
    assert by_answer["0"].question == "What is 12 minus 12?"  # a 0 answer is kept, not treated as empty
    # Without solution_field there are no solutions.
    c2 = dataclasses.replace(c, solution_field=None)
    assert all(p.solution is None for p in load_problems(c2, "train"))


def test_parquet_directory_splits_and_defaults(tmp_path):
    train = [{"question": f"q{i}?", "answer": i} for i in range(10)]
    test = [{"question": f"t{i}?", "answer": float(i) + 0.5} for i in range(3)]
    datasets.Dataset.from_list(train).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_list(test).to_parquet(str(tmp_path / "test.parquet"))
    c = cfg(name="parquet", path=str(tmp_path))
    tr = load_problems(c, "train")
    ev = load_problems(c, "eval")
    assert sorted(p.question for p in tr) == sorted(f"q{i}?" for i in range(10))
    assert {p.answer for p in ev} == {"0.5", "1.5", "2.5"}
    assert all(p.solution is None for p in tr + ev)
    # A single file serves any split.
    single = load_problems(cfg(name="parquet", path=str(tmp_path / "test.parquet")), "train")
    assert len(single) == 3
    with pytest.raises(UsageError) as err:
        load_problems(dataclasses.replace(c, eval_split="validation"), "eval")
    msg = one_line(err)
    assert "eval_split" in msg and "validation" in msg and "test" in msg and "train" in msg


def test_jsonl_directory(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "a?", "answer": "1"}\n{"question": "b?", "answer": "2"}\n')
    probs = load_problems(cfg(name="jsonl", path=str(tmp_path)), "train")
    assert sorted(p.answer for p in probs) == ["1", "2"]


def test_hub_layout_directory_prefers_config(tmp_path):
    """A gsm8k hub-layout folder: main/ and socratic/ configs with sharded parquet files."""
    def write(sub: str, split: str, n: int, tag: str) -> None:
        (tmp_path / sub).mkdir(exist_ok=True)
        rows = [{"question": f"{tag} {split} {i}?", "answer": f"step <<1+1=2>>2\n#### {i}"} for i in range(n)]
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / sub / f"{split}-00000-of-00001.parquet"))

    write("main", "train", 4, "main")
    write("main", "test", 2, "main")
    write("socratic", "train", 3, "socratic")
    probs = load_problems(cfg(name="gsm8k", path=str(tmp_path)), "train")
    assert len(probs) == 4 and all(p.question.startswith("main train") for p in probs)
    assert all(p.solution == f"step 2\nThe answer is {p.answer}." for p in probs)
    assert len(load_problems(cfg(name="gsm8k", path=str(tmp_path)), "eval")) == 2


def test_save_to_disk_directory(tmp_path):
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"question": "x?", "answer": "a\n#### 7"}]),
        "test": datasets.Dataset.from_list([{"question": "y?", "answer": "b\n#### 8"}]),
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    c = cfg(name="gsm8k", path=str(tmp_path / "saved"))
    assert load_problems(c, "train") == [Problem("x?", "7", "a\nThe answer is 7.")]
    assert load_problems(c, "eval") == [Problem("y?", "8", "b\nThe answer is 8.")]


def test_field_override_on_hub_schema(tmp_path):
    rows = [{"text": "How many?", "label": "#### 3"}]
    (tmp_path / "my.jsonl").write_text(json.dumps(rows[0]) + "\n")
    probs = load_problems(cfg(name="gsm8k", path=str(tmp_path / "my.jsonl"), question_field="text",
                              answer_field="label"), "train")
    assert probs == [Problem("How many?", "3", "The answer is 3.")]


def test_empty_rows_are_skipped(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        '{"question": "a?", "answer": "1"}\n{"question": "", "answer": "2"}\n{"question": "c?", "answer": null}\n'
    )
    probs = load_problems(cfg(name="jsonl", path=str(tmp_path / "d.jsonl")), "train")
    assert probs == [Problem("a?", "1", None)]


# ---------------------------------------------------------------------------------- shuffling, truncation


def test_shuffle_is_deterministic_and_truncates(tmp_path):
    rows = [{"question": f"question {i}?", "answer": str(i)} for i in range(50)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    base = cfg(name="jsonl", path=str(tmp_path / "d.jsonl"))
    full = load_problems(base, "train")
    assert len(full) == 50 and sorted(int(p.answer) for p in full) == list(range(50))
    assert [p.answer for p in full] != [str(i) for i in range(50)]  # shuffled
    assert load_problems(base, "train") == full  # deterministic
    other = load_problems(dataclasses.replace(base, shuffle_seed=1), "train")
    assert other != full and sorted(other, key=lambda p: int(p.answer)) == sorted(full, key=lambda p: int(p.answer))
    # Truncation keeps a prefix of the shuffled order.
    assert load_problems(dataclasses.replace(base, max_train_samples=7), "train") == full[:7]
    evals = dataclasses.replace(base, eval_path=base.path, max_eval_samples=5)  # one file is never both splits
    assert load_problems(evals, "eval") == full[:5]
    assert len(load_problems(dataclasses.replace(base, max_train_samples=500), "train")) == 50


# ------------------------------------------------------------------------------------- builtin arithmetic

_PATTERNS = [
    (re.compile(r"^\w+ has (\d+) \w+\. \w+ gets (\d+) more\. How many \w+ does \w+ have now\?$"), "+"),
    (re.compile(r"^\w+ has (\d+) \w+ and \w+ has (\d+) \w+\. How many \w+ do they have in all\?$"), "+"),
    (re.compile(r"^\w+ has (\d+) \w+\. \w+ gives away (\d+)\. How many \w+ does \w+ have left\?$"), "-"),
    (re.compile(r"^\w+ has (\d+) bags with (\d+) \w+ each\. How many \w+ does \w+ have\?$"), "*"),
]


def _solve(question: str) -> tuple[int, str, int, int]:
    for pattern, op in _PATTERNS:
        m = pattern.match(question)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            return {"+": a + b, "-": a - b, "*": a * b}[op], op, a, b
    raise AssertionError(f"unparsed question: {question!r}")


def test_builtin_arithmetic_determinism_and_correctness():
    probs = builtin_arithmetic(500, seed=3)
    assert probs == builtin_arithmetic(500, seed=3)
    assert probs != builtin_arithmetic(500, seed=4)
    assert len({p.question for p in probs}) == 500
    ops = set()
    for p in probs:
        value, op, a, b = _solve(p.question)
        ops.add(op)
        assert p.answer == str(value) and value >= 0
        assert 0 <= a <= 20 and 0 <= b <= 20
        assert len(p.question) <= 90 and p.question.isascii()
        assert p.solution == f"{a}{op}{b}={value}."
    assert ops == {"+", "-", "*"}


def test_builtin_splits_are_disjoint_and_follow_config():
    c = cfg(name="builtin:arithmetic", builtin_train_size=3000, builtin_test_size=300, shuffle_seed=5)
    train, test = load_problems(c, "train"), load_problems(c, "eval")
    assert train == builtin_arithmetic(3000, seed=5)
    assert len(train) == 3000 and len(test) == 300
    assert not {p.question for p in train} & {p.question for p in test}
    for p in test:
        assert p.answer == str(_solve(p.question)[0])
    # The eval set does not depend on the shuffle seed; other train seeds stay disjoint from it.
    c2 = dataclasses.replace(c, shuffle_seed=6)
    assert load_problems(c2, "eval") == test
    assert not {p.question for p in load_problems(c2, "train")} & {p.question for p in test}
    # Truncation.
    assert load_problems(dataclasses.replace(c, max_train_samples=10), "train") == train[:10]
    assert load_problems(dataclasses.replace(c, max_eval_samples=10), "eval") == test[:10]


# ------------------------------------------------------------------------------------------------- errors


def test_missing_field_names_field_and_key():
    with pytest.raises(UsageError) as err:
        load_problems(cfg(name="csv", path=str(FIXTURES / "generic.csv"), question_field="prompt"), "train")
    msg = one_line(err)
    assert "'answer'" in msg and "prompt, gold, worked" in msg and "answer_field" in msg
    with pytest.raises(UsageError) as err:
        load_problems(cfg(name="gsm8k", path=str(FIXTURES / "math12k_style.jsonl")), "train")
    msg = one_line(err)
    assert "'question'" in msg and "problem" in msg and "question_field" in msg
    with pytest.raises(UsageError) as err:
        load_problems(cfg(name="math12k", path=str(FIXTURES / "math12k_style.jsonl"), solution_field="work"),
                      "train")
    assert "solution_field" in one_line(err)


def test_missing_path():
    with pytest.raises(UsageError) as err:
        load_problems(cfg(name="jsonl", path="/nonexistent/problems.jsonl"), "train")
    msg = one_line(err)
    assert "/nonexistent/problems.jsonl" in msg and "no such file" in msg
    with pytest.raises(UsageError) as err:
        load_problems(cfg(name="jsonl"), "train")
    assert "[data] path" in one_line(err)


def test_unknown_dataset_name():
    with pytest.raises(UsageError) as err:
        load_problems(cfg(name="gsm8", path=str(FIXTURES / "gsm8k_style.jsonl")), "train")
    msg = one_line(err)
    assert "gsm8" in msg and "gsm8k" in msg and all(name in msg for name in KNOWN_DATASETS)


def test_unreadable_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text("this is not json\n")
    with pytest.raises(UsageError) as err:
        load_problems(cfg(name="jsonl", path=str(tmp_path / "bad.jsonl")), "train")
    assert "bad.jsonl" in one_line(err)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(UsageError) as err:
        load_problems(cfg(name="gsm8k", path=str(tmp_path / "data.txt")), "train")
    assert "extension" in one_line(err)


def test_offline_hub_fails_fast_with_hint():
    start = time.monotonic()
    with pytest.raises(UsageError) as err:
        load_problems(cfg(name="gsm8k"), "train")
    assert time.monotonic() - start < 15
    msg = one_line(err)
    assert "gsm8k" in msg and "network" in msg and '[data] path = "..."' in msg and "local copy" in msg


# ------------------------------------------------------------------------------------------------ prompts

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _char_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def test_format_prompt_with_chat_template():
    tok = _char_tokenizer(CHAT_TEMPLATE)
    c = cfg(system_prompt="Be brief.")
    text = format_prompt(tok, "What is 2+2?", c)
    assert text == "<|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>"
    assert format_solution("4", tok, c) == "4"
    # An empty system prompt leaves the system message out.
    assert format_prompt(tok, "Q?", cfg(system_prompt="")) == "<|user|>Q?<|end|><|assistant|>"
    # Chat template switched off -> plain template.
    plain_cfg = cfg(use_chat_template=False)
    assert format_prompt(tok, "What is 2+2?", plain_cfg) == "Question: What is 2+2?\nAnswer:"
    assert format_solution("4", tok, plain_cfg) == " 4"


THINKING_TEMPLATE = CHAT_TEMPLATE + "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"


def test_format_prompt_passes_enable_thinking_to_the_template():
    tok = _char_tokenizer(THINKING_TEMPLATE)
    assert format_prompt(tok, "Q?", cfg(system_prompt="", enable_thinking=False)) == "<|user|>Q?<|end|><|assistant|><think></think>"
    assert format_prompt(tok, "Q?", cfg(system_prompt="", enable_thinking=True)) == "<|user|>Q?<|end|><|assistant|>"
    assert format_prompt(tok, "Q?", cfg(system_prompt="")) == "<|user|>Q?<|end|><|assistant|>"


def test_format_prompt_template_without_system_role():
    tok = _char_tokenizer(NO_SYSTEM_TEMPLATE)
    text = format_prompt(tok, "Q?", cfg(system_prompt="Be brief."))
    assert text == "<|user|>Be brief.\n\nQ?<|end|><|assistant|>"


def test_format_prompt_plain_without_template():
    tok = _char_tokenizer(None)
    c = cfg()
    q = "Tom has 3 apples. He gets 4 more. How many apples does he have now?"
    prompt = format_prompt(tok, q, c)
    assert prompt == f"Question: {q}\nAnswer:"
    assert c.system_prompt not in prompt
    assert prompt + format_solution("3+4=7. The answer is 7.", tok, c) == (
        f"Question: {q}\nAnswer: 3+4=7. The answer is 7."
    )
    assert format_solution("x") == " x"
