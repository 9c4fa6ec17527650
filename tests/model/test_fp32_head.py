"""[model] lm_head_fp32: the LM head matmul in float32, used alike by the sampler and the update."""

import math

import pytest
import torch
from conftest import randomize_lora, tiny_model_cfg

from lowres_reft.config import LoraConfig
from lowres_reft.model.layers import unwrap
from lowres_reft.model.loader import load_policy
from lowres_reft.model.logprobs import completion_logp, head_logits, set_lm_head_fp32
from lowres_reft.rollout.engine import sample
from lowres_reft.utils.errors import UsageError

PROMPTS = ["Tom has 3 apples. He gets 4 more.", "Q: 2+2", "Ann has 9 pens."]


def _policy(cache, **model):
    policy = load_policy(tiny_model_cfg(**model), LoraConfig(r=4, alpha=8, dropout=0.0), cache_dir=cache)
    randomize_lora(policy.model, 0)
    return policy


def _rollout_and_recompute(policy, skip=()):
    tok = policy.tokenizer
    prompts = [tok(t)["input_ids"] for t in PROMPTS for _ in range(2)]
    batch = sample(policy.model, prompts, max_new_tokens=12, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                   generator=torch.Generator().manual_seed(0), skip=skip)
    policy.model.train()
    logp = completion_logp(policy.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                           batch.completion_mask, 1.0, chunk=5)
    return batch, logp


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_fp32_head_computes_float32_logits_in_sampler_and_update(tiny_cache, load_in_4bit):
    """bf16 model: with the option the head's matmul is float32 (no call of the bf16 lm_head module), in sampling
    and in the recompute alike; the tied (embedding-shared) weight is left as it was."""
    policy = _policy(tiny_cache, dtype="bfloat16", load_in_4bit=load_in_4bit)
    causal_lm = unwrap(policy.model)
    assert causal_lm.config.tie_word_embeddings
    head = causal_lm.lm_head
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(out.dtype))
    hidden = torch.randn(5, causal_lm.config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert head_logits(policy.model, hidden).dtype == torch.bfloat16
    _rollout_and_recompute(policy)
    assert calls and set(calls) == {torch.bfloat16}

    set_lm_head_fp32(policy.model, True)
    logits = head_logits(policy.model, hidden)
    assert logits.dtype == torch.float32
    want = hidden.double() @ head.weight.double().T  # the products of bf16 values, summed without rounding
    torch.testing.assert_close(logits.double(), want, rtol=0, atol=1e-5)
    bf16_error = float((head(hidden).double() - want).abs().max())
    assert bf16_error > 1e-4  # the bf16 head's rounding, which the option removes (the test can fail)
    calls.clear()
    batch, logp = _rollout_and_recompute(policy)
    assert calls == []  # neither the sampler nor the recompute ran the bf16 head
    assert head.weight.dtype == torch.bfloat16 and head.weight is causal_lm.get_input_embeddings().weight
    m = batch.completion_mask.bool()
    logp = logp.detach()
    assert torch.isfinite(logp[m]).all() and float((logp[m] - batch.behavior_logp[m]).abs().max()) < 0.1


def test_fp32_head_is_exact_on_a_float32_model(tiny_cache):
    """On a float32 model the option changes nothing: same logits, same log-probs and gradients."""
    policy = _policy(tiny_cache)
    hidden = torch.randn(7, unwrap(policy.model).config.hidden_size, generator=torch.Generator().manual_seed(1))
    results = []
    for enabled in (False, True):
        set_lm_head_fp32(policy.model, enabled)
        batch, logp = _rollout_and_recompute(policy)
        m = batch.completion_mask.bool()
        logp[m].sum().backward()
        grads = [p.grad.clone() for p in policy.model.parameters() if p.requires_grad]
        policy.model.zero_grad(set_to_none=True)
        results.append((head_logits(policy.model, hidden), batch.completion_ids, batch.behavior_logp, logp.detach(), grads))
    off, on = results
    for a, b in zip(off[:4], on[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(off[4], on[4]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fp32_head_refuses_a_wrapped_head(tiny_cache):
    """A head trained through modules_to_save has its own forward: a one-line error, not a silently bypassed head."""
    with pytest.raises(UsageError, match="lm_head_fp32 needs a plain linear LM head"):
        load_policy(tiny_model_cfg(lm_head_fp32=True), LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=("lm_head",)),
                    cache_dir=tiny_cache)
    policy = load_policy(tiny_model_cfg(lm_head_fp32=True), LoraConfig(r=4, alpha=8, dropout=0.0), cache_dir=tiny_cache)
    assert head_logits(policy.model, torch.zeros(1, unwrap(policy.model).config.hidden_size)).dtype == torch.float32


def test_recipe_key_reaches_the_training_run(tmp_path, monkeypatch):
    """`model.lm_head_fp32 = true` in a recipe: the run's rollouts and update use the float32 head (one bf16 step)."""
    from pathlib import Path

    from conftest import TINY_RUN_SETS

    from lowres_reft.config import load_recipe
    from lowres_reft.rl import update as rl_update
    from lowres_reft.run import loop as trainer
    from lowres_reft.run.metrics import read_metrics

    root = Path(__file__).resolve().parents[2]
    sets = TINY_RUN_SETS + ["log.progress=none", f"log.output_dir={tmp_path}", "train.steps=1", "eval.before_training=false",
                            "model.dtype=bfloat16", "model.lm_head_fp32=true"]
    dtypes, real = [], rl_update.update_logp

    def spy(model, *args, **kwargs):
        dtypes.append(head_logits(model, torch.zeros(1, unwrap(model).config.hidden_size, dtype=torch.bfloat16)).dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(rl_update, "update_logp", spy)
    run = trainer.train(load_recipe(root / "recipes" / "tiny-cpu.toml", sets), log=lambda *a: None)
    assert dtypes and set(dtypes) == {torch.float32}
    record = [r for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "rl"][0]
    assert math.isfinite(record["loss"]) and not record["update_skipped"]
