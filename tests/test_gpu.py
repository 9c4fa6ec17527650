"""GPU checks (`pytest -m gpu`; skipped without CUDA): the tiny model in bf16 + 4-bit NF4 on the GPU.

Run by scripts/gpu-check.sh with the bench commands; thresholds here are numerical tolerances, never timings.
"""

import pytest
import torch
from conftest import randomize_lora, tiny_model_cfg

from lowres_reft.config import LoraConfig
from lowres_reft.model.logprobs import completion_logp
from lowres_reft.rollout.engine import ENGINES, make_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = ["Tom has 3 apples. He gets 4 more.", "Q: 2+2", "Ann has 9 pens.", "12+30="]


@pytest.fixture
def gpu_policy(tiny_cache):
    from lowres_reft.model.loader import load_policy

    policy = load_policy(tiny_model_cfg(device="cuda", dtype="bfloat16", load_in_4bit=True),
                         LoraConfig(r=4, alpha=8, dropout=0.0), cache_dir=tiny_cache)
    randomize_lora(policy.model, 0, scale=0.05)
    return policy


def _prompts(policy, copies: int = 4):
    return [policy.tokenizer(t)["input_ids"] for t in PROMPTS for _ in range(copies)]


def _engine(policy, name="loop", weights="shared4bit", **settings):
    tok = policy.tokenizer
    values = dict(max_new_tokens=16, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, temperature=1.0,
                  generator=torch.Generator(device="cuda").manual_seed(0))
    values.update(settings)
    return make_engine(name, policy.model, weights=weights, **values)


def test_skip_and_truncated_bf16_4bit(gpu_policy):
    tok = gpu_policy.tokenizer
    eos = list(range(3, 60))  # many stop tokens: rows end at different steps, some run to the limit
    batch = _engine(gpu_policy, eos_ids=eos).generate(_prompts(gpu_policy), skip=(1, 2))
    assert batch.skip == (1, 2) and batch.completion_ids.is_cuda
    for ids, mask, trunc in zip(batch.completion_ids, batch.completion_mask, batch.truncated):
        n = int(mask.sum())
        assert torch.all(mask[:n] == 1) and torch.all(mask[n:] == 0)
        assert torch.all(ids[n:] == tok.pad_token_id)
        assert bool(trunc) == (int(ids[n - 1]) not in eos)
    assert torch.isfinite(batch.behavior_logp).all()


@pytest.mark.parametrize("weights", ["shared4bit", "merged16"])
def test_logp_at_skip_0_within_bf16_tolerance(gpu_policy, weights):
    batch = _engine(gpu_policy, weights=weights).generate(_prompts(gpu_policy))
    with torch.no_grad():
        logp = completion_logp(gpu_policy.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                               batch.completion_mask, temperature=1.0)
    mask = batch.completion_mask.bool()
    gap = (logp[mask] - batch.behavior_logp[mask]).abs()
    print(f"{weights}: |log rho| mean {float(gap.mean()):.2e} max {float(gap.max()):.2e}")
    assert float(gap.mean()) < 0.02 and float(gap.max()) < 0.5


def test_shared_prompt_forward_within_bf16_tolerance(gpu_policy):
    """The update's shared prompt forward vs the per-row one on GPU (bf16 + 4-bit): log-probs and adapter gradients."""
    from lowres_reft.rl.shared_prompt import shared_prompt_logp

    batch = _engine(gpu_policy).generate(_prompts(gpu_policy))  # 4 copies of each prompt, rows side by side
    model, mask = gpu_policy.model, batch.completion_mask.bool()
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, 1.0)
    model.train()
    grads = []
    for fn in (completion_logp, shared_prompt_logp):
        logp = fn(model, *args)
        logp[mask].sum().backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad]))
        model.zero_grad(set_to_none=True)
        if fn is completion_logp:
            plain = logp.detach()
    gap = (logp.detach()[mask] - plain[mask]).abs()
    rel = float((grads[1] - grads[0]).norm() / grads[0].norm())
    print(f"shared vs per-row: |logp gap| mean {float(gap.mean()):.2e} max {float(gap.max()):.2e}; grad rel {rel:.2e}")
    assert float(gap.mean()) < 0.02 and float(gap.max()) < 0.5 and rel < 0.05


@pytest.mark.skipif("static" not in ENGINES, reason="no static engine registered")
def test_static_engine_token_exact_greedy(gpu_policy):
    ref = _engine(gpu_policy, greedy=True).generate(_prompts(gpu_policy))
    static = _engine(gpu_policy, "static", greedy=True).generate(_prompts(gpu_policy))
    assert torch.equal(static.completion_ids, ref.completion_ids)
    assert torch.equal(static.completion_mask, ref.completion_mask)


@pytest.mark.parametrize("weights", ["shared4bit", "merged16"])
def test_no_memory_growth_over_5_steps(gpu_policy, weights):
    """rollout -> log-probs -> backward -> paged 8-bit AdamW, 5 times: allocated memory after step 2 == after 5."""
    import bitsandbytes as bnb

    model = gpu_policy.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    after = []
    for step in range(5):
        batch = _engine(gpu_policy, weights=weights).generate(_prompts(gpu_policy), skip=(1,) if step % 2 else ())
        model.train()
        logp = completion_logp(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                               batch.completion_mask, temperature=1.0)
        loss = -(logp * batch.completion_mask).sum() / batch.completion_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del batch, logp, loss
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[-1] <= after[1] + (1 << 20), after


def test_paged_adamw_8bit_step(gpu_policy):
    import bitsandbytes as bnb

    params = [p for p in gpu_policy.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
