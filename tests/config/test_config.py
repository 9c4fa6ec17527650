"""Recipe parsing: defaults, overrides, round trip, and one-line errors."""

import math

import pytest

from lowres_reft.config import Recipe, load_recipe, recipe_from_dict
from lowres_reft.config.toml import recipe_to_toml
from lowres_reft.utils.errors import ConfigError


def test_defaults_round_trip_through_toml():
    import tomllib

    recipe = Recipe()
    assert recipe_from_dict(tomllib.loads(recipe_to_toml(recipe))) == recipe


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[train]\nsteps = 3\n")
    recipe = load_recipe(path, ["train.steps=7", "loss.is_cap=inf", "log.run_name=nan", "lora.target_modules=['q_proj']",
                                "data.path=/tmp/x.jsonl", "behavior.skip_ratio=0.5", "model.trust_remote_code=false"])
    assert recipe.train.steps == 7 and math.isinf(recipe.loss.is_cap)
    assert recipe.log.run_name == "nan" and recipe.lora.target_modules == ("q_proj",)
    assert recipe.data.path == "/tmp/x.jsonl" and recipe.behavior.skip_ratio == 0.5
    assert recipe.run_name == "nan"
    assert load_recipe(path).run_name == "r"  # defaults to the file name


def test_trust_remote_code_defaults_false():
    assert Recipe().model.trust_remote_code is False


@pytest.mark.parametrize(
    "data,message",
    [
        ({"lora": {"r": 0}}, "[lora] r must be >= 1"),
        ({"lora": {"target_modules": "q_proj"}}, "must be a list of strings or one of 'all-linear'"),
        ({"loss": {"is_cap": 0}}, "is_cap must be > 0"),
        ({"loss": {"nested_kl_beta": -1.0}}, "nested_kl_beta must be >= 0"),
        ({"loss": {"nested_kl_beta": 0.1}, "behavior": {"sets_per_batch": 2}}, "nested_kl_beta needs [behavior] sets_per_batch = 1"),
        ({"loss": {"aggregation": "mean"}}, "aggregation must be one of"),
        ({"train": {"lr": True}}, "lr must be a number"),
        ({"behavior": {"schedule": "fixed"}}, "layers"),
        ({"behavior": {"schedule": "fixed", "layers": [1], "skip_ratio": 0.25}}, "skip_ratio must be 0"),
        ({"behavior": {"schedule": "fixed", "layers": [1], "skip_ratio": 0}, "warmup": {"skip_distill_ratio": 0.25}},
         "[warmup] skip_distill_ratio must be 0 (or omitted) when [behavior] schedule = \"fixed\""),
        ({"rollout": {"top_p": 0}}, "top_p must be in (0, 1]"),
        ({"log": {"run_name": "a/b"}}, "plain name"),
        ({"train": 3}, "must be a table"),
    ],
)
def test_invalid_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data, source="x.toml")
    assert message in str(err.value) and str(err.value).startswith("x.toml: ")
    assert "\n" not in str(err.value)


def test_override_syntax_error(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_recipe(path, ["steps=3"])
    with pytest.raises(ConfigError, match='did you mean "rollout"'):
        load_recipe(path, ["rolout.group_size=3"])
