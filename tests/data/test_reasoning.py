"""The builtin reasoning task: multi-step word problems, their reference chains, the held-out split, the reward."""

from __future__ import annotations

import re
from collections import Counter

from lowres_reft.config import DataConfig
from lowres_reft.data.datasets import BUILTIN_REASONING, KNOWN_DATASETS, load_problems
from lowres_reft.data.reasoning import MAX_VALUE, builtin_reasoning, builtin_reasoning_eval
from lowres_reft.data.rewards import extract_answer, math_correct_final
from lowres_reft.tiny.tokenizer import build_tokenizer

_EQ = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _solve(question: str) -> tuple[int, list[tuple[str, int]], int]:
    """An independent reading of a question: (start value, [(op, operand)], number of distractor sentences)."""
    *sentences, ask = re.split(r"(?<=\.) ", question)
    obj, name = re.fullmatch(r"How many (\w+)s does (\w+) have now\?", ask).groups()
    start, steps, distractors = None, [], 0
    for s in sentences:
        if m := re.fullmatch(rf"{name} has (\d+) bags with (\d+) {obj}s each\.", s):
            start = int(m.group(1))
            steps.append(("*", int(m.group(2))))
        elif (m := re.fullmatch(rf"{name} has (\d+) {obj}s\.", s)) and start is None:
            start = int(m.group(1))
        elif m := re.fullmatch(r"(?:He|She) (?:buys|finds|gets) (\d+) more\.", s):
            steps.append(("+", int(m.group(1))))
        elif m := re.fullmatch(r"(?:He|She) (?:gives away|loses|sells) (\d+)\.", s):
            steps.append(("-", int(m.group(1))))
        elif m := re.fullmatch(r"Then (?:he|she) has (\d+) times as many\.", s):
            steps.append(("*", int(m.group(1))))
        elif re.fullmatch(r"(\w+ has \d+ \w+s|\w+ also has \d+ \w+s|\w+ is \d+ years old)\.", s):
            distractors += 1
        else:
            raise AssertionError(f"unparsed sentence {s!r} in {question!r}")
    assert start is not None, question
    return start, steps, distractors


def test_chains_are_correct_carried_arithmetic_with_2_to_4_operations_and_distractors():
    problems = builtin_reasoning(1000, seed=0)
    n_ops, ops = Counter(), set()
    for p in problems:
        start, steps, distractors = _solve(p.question)
        assert 1 <= distractors <= 2
        *chain, final = p.solution.split(". ")
        assert final == f"The answer is {p.answer}."
        # each step quotes the phrase of its sentence, verbatim, then gives its equation
        quotes, eqs = zip(*(step.rstrip(".").split(": ") for step in chain))
        assert all(f" {q}." in p.question or f" {q} " in p.question for q in quotes), p
        eqs = [_EQ.fullmatch(eq).groups() for eq in eqs]
        assert len(eqs) == len(steps) and 2 <= len(eqs) <= 4
        value = start
        for (a, op, b, c), (want_op, operand) in zip(eqs, steps):
            # each equation starts from the previous result (carried), uses the question's operation and operand
            assert (int(a), op, int(b)) == (value, want_op, operand), p
            assert int(c) == _OPS[op](int(a), int(b))
            value = int(c)
            assert 1 <= value <= MAX_VALUE
            ops.add(op)
        assert p.answer == str(value)
        n_ops[len(eqs)] += 1
    assert ops == {"+", "-", "*"} and set(n_ops) == {2, 3, 4}


def test_problems_are_deterministic_distinct_and_the_splits_disjoint():
    train = builtin_reasoning(3000, seed=5)
    assert train == builtin_reasoning(3000, seed=5) and train != builtin_reasoning(3000, seed=6)
    assert len({p.question for p in train}) == 3000
    held_out = builtin_reasoning_eval(300)
    assert held_out == builtin_reasoning_eval(300) and len({p.question for p in held_out}) == 300
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert not {p.question for p in builtin_reasoning(3000, seed=6)} & {p.question for p in held_out}


def test_registered_as_a_builtin_dataset_with_sizes_and_truncation():
    assert BUILTIN_REASONING == "builtin:reasoning" and BUILTIN_REASONING in KNOWN_DATASETS
    cfg = DataConfig(name="builtin:reasoning", builtin_train_size=50, builtin_test_size=20, shuffle_seed=3,
                     max_eval_samples=10)
    assert load_problems(cfg, "train") == builtin_reasoning(50, seed=3)
    assert load_problems(cfg, "eval") == builtin_reasoning_eval(20)[:10]


def test_reference_chains_are_30_to_130_tiny_tokens():
    tok = build_tokenizer()
    lengths = [len(tok(p.solution, add_special_tokens=False)["input_ids"]) + 1  # + end-of-text
               for p in builtin_reasoning(500, seed=1) + builtin_reasoning_eval(100)]
    assert 30 <= min(lengths) and max(lengths) <= 130 and sum(lengths) / len(lengths) <= 100


def test_only_the_stated_final_answer_earns_the_reward():
    p = next(p for p in builtin_reasoning(200, seed=2) if p.solution.count("=") >= 3)
    assert extract_answer(p.solution, require_final=True) == p.answer
    assert math_correct_final(" " + p.solution, p.answer) == 1.0
    chain = p.solution.rsplit(" The answer", 1)[0]  # the right chain, the final answer never stated
    assert math_correct_final(chain, p.answer) == 0.0
    # the chain's last result is the answer, but only a stated "The answer is N." counts
    assert _EQ.findall(chain)[-1][3] == p.answer and extract_answer(chain) == p.answer


def test_greedy_eval_honours_require_final_answer(monkeypatch):
    """A chain cut off by max_new_tokens whose last number happens to be the answer is not a solved problem."""
    import torch

    from lowres_reft.data.problems import Problem
    from lowres_reft.run import evaluation as ev
    from lowres_reft.run.evaluation import Evaluator

    tok = build_tokenizer()
    texts = [" 3+4=7. 7*2=14", " 3+4=7. 7*2=14. The answer is 14."]

    class Batch:
        completion_ids = torch.tensor([tok(t)["input_ids"] + [0] * (40 - len(t)) for t in texts])
        completion_mask = torch.tensor([[1] * len(t) + [0] * (40 - len(t)) for t in texts])

    class Engine:  # stands in for a greedy engine: returns the two texts above
        def generate(self, prompts, skip=()):
            return Batch

    problems = [Problem("q1", "14", None), Problem("q2", "14", None)]
    args = (Engine(), tok, problems, [[5], [5]], 2)
    assert ev.evaluate(*args).accuracy == 1.0  # the last number counts by default
    assert ev.evaluate(*args, require_final=True).accuracy == 0.5
    # the trainer's evaluator passes the recipe's [reward] require_final_answer
    seen = {}
    monkeypatch.setattr("lowres_reft.run.evaluation.evaluate",
                        lambda *a, **k: seen.update(k) or ev.EvalResult(0.0, 0, []))
    monkeypatch.setattr("lowres_reft.run.evaluation.make_engine", lambda *a, **k: Engine())
    from types import SimpleNamespace

    recipe = SimpleNamespace(eval=SimpleNamespace(max_new_tokens=40, batch_size=2),
                             reward=SimpleNamespace(require_final_answer=True),
                             rollout=SimpleNamespace(engine="loop", weights="shared4bit"))
    policy = SimpleNamespace(model=None, tokenizer=tok)
    ctx = SimpleNamespace(rank=0, world=1, is_main=False, enabled=False)
    Evaluator(policy, recipe, problems, [[5], [5]], [1], None, [], None, ctx)(0, "x", print)
    assert seen.get("require_final") is True


def test_reasoning_recipe_loads_and_runs_two_steps_with_layerdrop_zero(tmp_path):
    """The reasoning recipe end to end on a random-init base (tiny sizes), also with tiny_layerdrop = 0."""
    import json
    from pathlib import Path

    from lowres_reft.cli import main

    root = Path(__file__).resolve().parents[2]
    sets = ["model.tiny_pretrain_steps=0", "model.tiny_layerdrop=0", "model.tiny_layers=6", "warmup.steps=1",
            "train.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8",
            "eval.max_new_tokens=8", "data.max_eval_samples=2", "data.builtin_train_size=16",
            "data.builtin_test_size=4", "lora.r=2", f"log.output_dir={tmp_path}", "log.run_name=r", "log.progress=none",
            "warmup.skip_distill_steps=2"]
    assert main(["run", str(root / "recipes" / "tiny-reasoning.toml"), *[a for s in sets for a in ("--set", s)]]) == 0
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "rl"] == [1, 2]
    assert all(len(r["skip_set"]) == 1 for r in records if r["stage"] == "rl")  # r = 0.16 of 6 layers: 1
    assert sum(1 for r in records if r["stage"] == "warmup" and r["skip_distill"]) == 2


def test_pretraining_pieces_are_training_pool_chains_half_with_the_answer_sentence():
    import random

    from lowres_reft.data.problems import in_eval_pool
    from lowres_reft.data.reasoning import pretraining_piece

    rng = random.Random(0)
    pieces = [pretraining_piece(rng) for _ in range(400)]
    assert all(q.endswith("\n") and not in_eval_pool(q[:-1]) for q, _ in pieces)
    with_answer = [chain for _, chain in pieces if " The answer is " in chain]
    assert 0.4 < len(with_answer) / len(pieces) < 0.6  # the phrase is a trained target, the format not always
    for chain in with_answer:  # the stated answer is the chain's last result
        last_result = chain.rsplit(" The answer is ", 1)[0].rstrip(".").rsplit("=", 1)[1]
        assert chain.endswith(f" The answer is {last_result}.")
