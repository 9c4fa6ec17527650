"""Block influence against a float64 reference, the ranking, skip sets drawn from the influence pool, the recipe keys,
and a run whose rollouts skip only pool layers."""

from collections import Counter

import pytest
import torch
from arch_models import build, prompts
from conftest import TINY_RUN_SETS, as_set_args, randomize_lora

from lowres_reft.config import load_recipe
from lowres_reft.model.influence import block_influence, least_influential
from lowres_reft.model.nested import SkipSchedule, num_skipped
from lowres_reft.rl.builders import build_skip_schedule, layer_ranking, ranking_texts
from lowres_reft.utils.errors import ConfigError


def _reference(model, ids, mask):
    """1 - cos(layer input, layer output) per layer from output_hidden_states, float64 (every layer but the last,
    whose output transformers hands back after the final norm)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True).hidden_states
    keep = mask.bool()
    out = []
    for layer in range(len(states) - 2):
        a, b = states[layer][keep].double(), states[layer + 1][keep].double()
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        out.append(float((1 - cos).sum()))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_block_influence_matches_a_float64_reference(arch):
    from lowres_reft.rollout.engine import left_pad

    model = build(arch)
    ids, mask = left_pad(prompts(0), 0, torch.device("cpu"))
    sums, tokens = block_influence(model, ids, mask)
    assert tokens == int(mask.sum()) and sums.dtype == torch.float64 and sums.shape == (4,)
    assert torch.allclose(sums[:-1], torch.tensor(_reference(model, ids, mask), dtype=torch.float64), rtol=1e-6, atol=1e-9)
    assert 0 <= float(sums[-1]) / tokens <= 2


def test_least_influential_orders_valid_layers_ties_by_index():
    assert least_influential([0.9, 0.3, 0.1, 0.3, 0.5], [1, 2, 3]) == [2, 1, 3]
    assert least_influential([0.0, 0.2, 0.2, 0.1], [1, 2, 3]) == [3, 1, 2]


def test_skip_sets_come_from_the_pool_and_stay_random():
    ranking = [7, 3, 9, 1, 5, 2, 8, 4, 6, 10]  # the valid layers 1..10 of 12, least influential first
    sched = SkipSchedule(12, 0.25, seed=0, ranking=ranking, pool=1.5)  # k = 3, pool = the first round(4.5) = 5
    draws = [sched.draw() for _ in range(300)]
    assert all(len(d) == num_skipped(12, 0.25) == 3 and set(d) <= {7, 3, 9, 1, 5} for d in draws)
    assert len(set(draws)) == 10  # every 3-subset of the 5-layer pool: a new random set per batch
    seen = Counter(layer for d in draws for layer in d)
    assert min(seen.values()) > 300 * 3 / 5 / 2  # roughly uniform over the pool
    sched.set_ratio(0.5)  # the adaptive schedule changes k: the pool follows (k = 6, pool = 9)
    assert all(set(d) <= set(ranking[:9]) for d in (sched.draw() for _ in range(50)))
    assert SkipSchedule(12, 0.25, ranking=ranking, pool=1.0).candidates(3) == [7, 3, 9]
    with pytest.raises(ValueError, match="exactly the valid layers"):
        SkipSchedule(12, 0.25, ranking=[0, 1, 2])


def test_recipe_keys_are_validated(tmp_path):
    recipe = "recipes/tiny-cpu.toml"
    assert load_recipe(recipe, ["behavior.skip_layers=influence"]).behavior.skip_layers == "influence"
    for sets, match in ((["behavior.skip_layers=influence", "behavior.schedule=fixed", "behavior.layers=[1]"], "fixed"),
                        (["behavior.skip_layers=influence", "behavior.layout=contiguous"], "scattered"),
                        (["behavior.influence_pool=0.5"], "influence_pool"),
                        (["behavior.influence_texts=0"], "influence_texts"),
                        (["behavior.skip_layers=by_magic"], "skip_layers")):
        with pytest.raises(ConfigError, match=match):
            load_recipe(recipe, sets)


def test_layer_ranking_is_measured_on_the_base_model(tiny_policy):
    from lowres_reft.data.datasets import load_problems

    recipe = load_recipe("recipes/tiny-cpu.toml", TINY_RUN_SETS + ["behavior.skip_layers=influence",
                                                                 "behavior.influence_texts=8"])
    policy = tiny_policy()
    texts = ranking_texts(policy.tokenizer, load_problems(recipe.data, "train"), recipe)
    assert len(texts) == 8
    ranking, scores = layer_ranking(policy, recipe, texts)
    assert sorted(ranking) == [1, 2] and len(scores) == 4
    randomize_lora(policy.model, seed=5, scale=1.0)  # trained adapters must not move the ranking: adapters are off
    assert layer_ranking(policy, recipe, texts) == (ranking, scores)
    assert layer_ranking(policy, load_recipe("recipes/tiny-cpu.toml", TINY_RUN_SETS), texts) is None
    schedule = build_skip_schedule(4, recipe, 0, ranking)
    assert schedule.ranking == ranking


def test_influence_run_skips_pool_layers_only(tmp_path, capsys):
    from lowres_reft.cli import main
    from lowres_reft.run.metrics import read_metrics

    sets = TINY_RUN_SETS + ["model.tiny_layers=6", "behavior.skip_layers=influence", "behavior.influence_pool=1.0",
                            "behavior.skip_ratio=0.34", "train.steps=3", f"log.output_dir={tmp_path}", "log.run_name=r",
                            "warmup.steps=1", "warmup.skip_distill_steps=2", "warmup.batch_size=2"]
    assert main(["run", "recipes/tiny-cpu.toml", *as_set_args(sets)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("block influence per layer"))
    ranking = [int(x) for x in line.rsplit("[", 1)[1].rstrip("]").split(",")]
    pool = set(ranking[:2])  # k = round(0.34 * 6) = 2, pool 1.0 x 2: the two least influential layers, every time
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    rl = [r for r in records if r["stage"] == "rl"]
    distill = [r for r in records if r["stage"] == "warmup" and r.get("skip_distill")]
    assert len(rl) == 3 and len(distill) == 2
    assert all(set(r["skip_set"]) == pool for r in rl) and all(set(r["skip_distill"]) == pool for r in distill)
