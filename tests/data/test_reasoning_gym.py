"""reasoning-gym tasks as data with their own verifiers as reward, and TRL-style local data sets."""

import json
import pickle
from pathlib import Path

import pytest
from conftest import TINY_RUN_SETS

from lowres_reft.config import DataConfig, load_recipe, recipe_from_dict
from lowres_reft.config.toml import recipe_to_toml
from lowres_reft.data.datasets import load_problems
from lowres_reft.data.reasoning_gym import TaskAnswer, completion_answer
from lowres_reft.data.rewards import get_reward_fn, score
from lowres_reft.utils.errors import ConfigError, UsageError

ROOT = Path(__file__).resolve().parents[2]


def _cfg(task="basic_arithmetic", **kw):
    values = dict(name=f"reasoning_gym:{task}", builtin_train_size=40, builtin_test_size=10)
    values.update(kw)
    return DataConfig(**values)


def test_basic_arithmetic_splits_are_disjoint_deterministic_and_configurable():
    cfg = _cfg(task_config={"min_terms": 2, "max_terms": 2})
    train, held_out = load_problems(cfg, "train"), load_problems(cfg, "eval")
    assert len(train) == 40 and len(held_out) == 10
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert [p.question for p in load_problems(cfg, "train")] == [p.question for p in train]
    assert all(isinstance(p.answer, TaskAnswer) and p.answer.task == "basic_arithmetic" for p in train)
    assert {p.answer.entry["metadata"]["num_terms"] for p in train} == {2}
    other_seed = load_problems(_cfg(task_config={"min_terms": 2, "max_terms": 2}, shuffle_seed=5), "train")
    assert [p.question for p in other_seed] != [p.question for p in train]
    assert [p.question for p in load_problems(_cfg(shuffle_seed=5), "eval")] == [p.question for p in load_problems(_cfg(), "eval")]
    assert len(load_problems(_cfg(max_train_samples=7), "train")) == 7


@pytest.mark.parametrize("task", ["basic_arithmetic", "gsm_symbolic"])
def test_task_verifier_is_the_reward(task):
    (problem,) = load_problems(_cfg(task, builtin_train_size=1, builtin_test_size=1), "eval")
    gold = problem.answer
    reward = get_reward_fn("reasoning_gym")
    assert reward(f"I think so. <answer>{gold}</answer>", gold) == 1.0
    assert reward(f"so the answer is \\boxed{{{gold}}}", gold) == 1.0
    # The last tag counts; a wrong answer scores what the task says (gsm_symbolic gives 0.01 for a well-formed one).
    assert reward(f"<answer>{gold}</answer> no wait <answer>{int(gold) + 1}</answer>", gold) < 0.1
    assert reward("no idea", gold) == 0.0
    rewards, correct, _ = score([f"<answer>{gold}</answer>", "<answer>nonsense</answer>"], [gold, gold], ("reasoning_gym",))
    assert rewards[0] == 1.0 and rewards[1] < 0.1 and correct == [True, False]


def test_reward_without_a_task_entry_is_zero_and_answers_pickle():
    assert get_reward_fn("reasoning_gym")("<answer>4</answer>", "4") == 0.0
    gold = TaskAnswer("4", "basic_arithmetic", {"question": "2+2", "answer": "4", "metadata": {}})
    again = pickle.loads(pickle.dumps(gold))
    assert again == "4" and again.task == "basic_arithmetic" and again.entry == gold.entry
    assert json.dumps({"gold": gold}) == '{"gold": "4"}'
    assert completion_answer("x <ANSWER> 12 </ANSWER>") == "12" and completion_answer("it is 7") == "7"


def test_bad_task_and_task_config_are_one_line_errors():
    with pytest.raises(UsageError, match="unknown reasoning-gym task 'basic_arithmetik' \\(did you mean basic_arithmetic"):
        load_problems(_cfg("basic_arithmetik"), "train")
    with pytest.raises(UsageError, match="task_config for reasoning-gym task 'basic_arithmetic'"):
        load_problems(_cfg(task_config={"min_terms": 5, "max_terms": 2}), "train")
    with pytest.raises(ConfigError, match='needs \\[data\\] name = "reasoning_gym:<task>"'):
        recipe_from_dict({"reward": {"functions": ["reasoning_gym"]}})


def test_task_config_round_trips_through_toml(tmp_path):
    recipe = recipe_from_dict({"data": {"name": "reasoning_gym:basic_arithmetic", "task_config": {"max_terms": 3, "op": "x"}}})
    path = tmp_path / "r.toml"
    path.write_text(recipe_to_toml(recipe))
    assert load_recipe(path).data.task_config == {"max_terms": 3, "op": "x"}
    with pytest.raises(ConfigError, match="task_config must be a table"):
        recipe_from_dict({"data": {"task_config": 3}})


def test_training_step_on_a_reasoning_gym_task(tmp_path):
    from lowres_reft.run import loop as trainer
    from lowres_reft.run.metrics import read_metrics

    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.toml", TINY_RUN_SETS + [
        "log.progress=none", f"log.output_dir={tmp_path}", "train.steps=1", "data.name=reasoning_gym:basic_arithmetic",
        'reward.functions=["reasoning_gym"]', "data.task_config={max_terms = 2}"])
    run = trainer.train(recipe, log=lambda *a: None)
    (rl,) = [r for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "rl"]
    assert rl["rollout_tokens"] > 0
    history = json.loads((run / "eval.json").read_text())["history"]
    assert [h["n"] for h in history] == [4, 4]


def test_every_recipe_for_reasoning_gym_loads_its_data():
    for path in sorted((ROOT / "recipes").glob("*-rg-*.toml")):
        recipe = load_recipe(path)
        assert recipe.reward.functions == ("reasoning_gym",)
        assert len(load_problems(recipe.data, "eval")) == recipe.data.builtin_test_size


@pytest.mark.parametrize("column, cell", [
    ("prompt", "What is 2+3?"),
    ("messages", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2+3?"}]),
])
def test_trl_style_local_datasets(tmp_path, column, cell):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({column: cell, "answer": a}) + "\n" for a in ("5", "5")))
    problems = load_problems(DataConfig(name="jsonl", path=str(path)), "train")
    assert [(p.question, p.answer) for p in problems] == [("What is 2+3?", "5")] * 2
