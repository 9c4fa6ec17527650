"""`[rollout] weights = "merged16"`: kept layers decoded through merged 16-bit copies, the model restored after."""

import gc
import weakref

import pytest
import torch
from torch import nn

from lowres_reft.model.layers import LayerStack
from lowres_reft.model.logprobs import completion_logp
from lowres_reft.model.rollout_weights import merged_linear, merged_weights
from lowres_reft.rollout.engine import make_engine
from lowres_reft.utils.errors import UsageError

PROMPTS = ["Tom has 3 apples. He gets 4 more.", "Q: 2+2", "Ann has 9 pens."]


def _prompts(tok):
    return [tok(t)["input_ids"] for t in PROMPTS for _ in range(2)]


def _engine(policy, weights, **settings):
    tok = policy.tokenizer
    values = dict(max_new_tokens=12, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, temperature=0.7,
                  generator=torch.Generator().manual_seed(0))
    values.update(settings)
    return make_engine("loop", policy.model, weights=weights, **values)


def _logits(policy):
    ids = torch.tensor([policy.tokenizer("Q: 7+5")["input_ids"]])
    policy.model.eval()
    with torch.no_grad():
        return policy.model(input_ids=ids).logits


def _projections(policy, layer: int) -> list[nn.Module]:
    layer_module = LayerStack(policy.model).layers[layer]
    return [layer_module.self_attn.q_proj, layer_module.mlp.down_proj]


@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_merged_linear_equals_the_lora_module(tiny_policy, load_in_4bit):
    """The merged nn.Linear computes base(x) + scale * B A x (float64-free check: float32 model, tight tolerance)."""
    policy = tiny_policy(load_in_4bit=load_in_4bit)
    policy.model.eval()
    for module in _projections(policy, 1):
        x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(0))
        base_before = module.base_layer.weight.detach().clone()
        merged = merged_linear(module, torch.float32)
        assert torch.equal(module.base_layer.weight, base_before)  # the delta is added to a copy, never in place
        assert type(merged) is nn.Linear and not merged.weight.requires_grad
        with torch.no_grad():
            torch.testing.assert_close(merged(x), module(x), rtol=0, atol=1e-5)
            # The adapter matters here (the check could fail): the base alone differs.
            assert float((module.base_layer(x) - module(x)).abs().max()) > 1e-3


def test_merged16_logp_matches_the_4bit_recompute_at_skip_0(tiny_policy):
    """Behavior log-probs under merged16 vs the training recompute through the 4-bit path: |log rho| ~ 0 at skip 0
    (float32 on the CPU: only summation order differs), and greedy tokens equal those of the shared 4-bit path."""
    policy = tiny_policy()
    batch = _engine(policy, "merged16").generate(_prompts(policy.tokenizer))
    assert batch.num_tokens > 0
    policy.model.train()
    logp = completion_logp(policy.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                           batch.completion_mask, temperature=0.7)
    mask = batch.completion_mask.bool()
    log_rho = (logp[mask] - batch.behavior_logp[mask]).abs()
    assert float(log_rho.max()) < 1e-3, (float(log_rho.mean()), float(log_rho.max()))
    shared = _engine(policy, "shared4bit", greedy=True).generate(_prompts(policy.tokenizer))
    merged = _engine(policy, "merged16", greedy=True).generate(_prompts(policy.tokenizer))
    assert torch.equal(shared.completion_ids, merged.completion_ids)


def test_only_kept_layers_are_materialized_and_everything_is_restored(tiny_policy):
    policy = tiny_policy()
    before = _logits(policy)
    originals = {i: _projections(policy, i) for i in range(4)}
    with merged_weights(policy.model, skip=(1, 2)) as materialized:
        for i in (0, 3):
            assert all(type(m) is nn.Linear for m in _projections(policy, i))
        for i in (1, 2):
            assert _projections(policy, i) == originals[i]  # skipped layers stay as they are
        # 2 kept layers x 7 projections (q, k, v, o: 64x64 / 64x32 shapes; gate, up, down) in float32.
        assert materialized == 2 * sum(m.weight.numel() for m in LayerStack(policy.model).layers[0].modules()
                                       if type(m) is nn.Linear) * 4
        copy_ref = weakref.ref(_projections(policy, 0)[0])
    for i in range(4):
        assert _projections(policy, i) == originals[i]
    assert torch.equal(_logits(policy), before)  # bit-identical
    gc.collect()
    assert copy_ref() is None  # no reference to the 16-bit copy is kept


def test_restored_after_an_exception(tiny_policy):
    policy = tiny_policy()
    before = _logits(policy)
    originals = _projections(policy, 1)
    with pytest.raises(RuntimeError, match="boom"):
        with merged_weights(policy.model, skip=()):
            assert type(_projections(policy, 1)[0]) is nn.Linear
            raise RuntimeError("boom")
    assert _projections(policy, 1) == originals
    assert torch.equal(_logits(policy), before)


def test_engine_with_skip_restores_and_times_the_merge(tiny_policy):
    policy = tiny_policy()
    before = _logits(policy)
    batch = _engine(policy, "merged16").generate(_prompts(policy.tokenizer), skip=(2,))
    assert batch.skip == (2,) and batch.seconds > 0 and batch.num_tokens > 0
    assert torch.equal(_logits(policy), before)


def test_dora_is_refused(tiny_policy, tmp_path):
    from lowres_reft.config import load_recipe
    from lowres_reft.utils.errors import ConfigError

    policy = tiny_policy(use_dora=True)
    with pytest.raises(UsageError, match="does not support DoRA"):
        _engine(policy, "merged16").generate(_prompts(policy.tokenizer))
    assert type(_projections(policy, 1)[0]) is not nn.Linear  # nothing left swapped in
    recipe = tmp_path / "r.toml"
    recipe.write_text('[lora]\nuse_dora = true\n[rollout]\nweights = "merged16"\n')
    with pytest.raises(ConfigError, match="does not support DoRA"):
        load_recipe(recipe)
    recipe.write_text('[rollout]\nweights = "merged"\n')
    with pytest.raises(ConfigError, match="weights must be one of 'shared4bit', 'merged16'"):
        load_recipe(recipe)
