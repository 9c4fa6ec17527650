"""Sampling loop: behavior log-probs match the training forward, chunked log-probs, bnb CPU repack trap."""

import pytest
import torch

from lowres_reft.model.logprobs import chunked_logp, completion_logp
from lowres_reft.rollout.engine import left_pad, nucleus_logprobs, sample

PROMPTS = ["Tom has 3 apples. He gets 4 more.", "Q: 2+2", "Ann has 9 pens."]


def _prompts(tok):
    return [tok(t)["input_ids"] for t in PROMPTS for _ in range(2)]


@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_on_policy_ratio_is_one(tiny_policy, load_in_4bit):
    """skip_ratio 0: the training forward's log-probs equal the recorded behavior log-probs."""
    policy = tiny_policy(load_in_4bit=load_in_4bit)
    tok = policy.tokenizer
    gen = torch.Generator().manual_seed(0)
    batch = sample(policy.model, _prompts(tok), max_new_tokens=16, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                   temperature=0.7, generator=gen)
    assert batch.num_tokens > 0
    policy.model.train()
    logp = completion_logp(policy.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                           batch.completion_mask, temperature=0.7, chunk=7)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(logp[mask], batch.behavior_logp[mask], rtol=0, atol=2e-4)
    ratio = torch.exp(logp[mask] - batch.behavior_logp[mask])
    assert float((ratio - 1).abs().max()) < 1e-3
    # With layers skipped the recorded behavior log-probs differ from the target's (the test can fail).
    nested = sample(policy.model, _prompts(tok), max_new_tokens=16, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                    temperature=0.7, generator=torch.Generator().manual_seed(0), skip=(1, 2))
    target = completion_logp(policy.model, nested.prompt_ids, nested.prompt_mask, nested.completion_ids,
                             nested.completion_mask, temperature=0.7)
    m = nested.completion_mask.bool()
    assert float((target[m] - nested.behavior_logp[m]).abs().max()) > 1e-2


def test_completion_mask_and_eos(tiny_policy):
    policy = tiny_policy()
    tok = policy.tokenizer
    # Make every character an EOS candidate except spaces: rows stop at different lengths.
    eos = list(range(3, 98))
    batch = sample(policy.model, _prompts(tok), max_new_tokens=12, eos_ids=eos, pad_id=tok.pad_token_id,
                   generator=torch.Generator().manual_seed(1))
    for ids, mask, trunc in zip(batch.completion_ids, batch.completion_mask, batch.truncated):
        n = int(mask.sum())
        assert torch.all(mask[:n] == 1) and torch.all(mask[n:] == 0)  # contiguous prefix
        assert torch.all(ids[n:] == tok.pad_token_id)
        assert bool(trunc) == (int(ids[n - 1]) not in eos)
    assert (batch.behavior_logp[batch.completion_mask == 0] == 0).all()
    assert (batch.behavior_logp[batch.completion_mask == 1] < 0).all()


def test_greedy_matches_model_generate(tiny_policy):
    policy = tiny_policy()
    tok = policy.tokenizer
    prompts = _prompts(tok)
    ours = sample(policy.model, prompts, max_new_tokens=10, eos_ids=[-1], pad_id=tok.pad_token_id, greedy=True)
    ids, mask = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        ref = policy.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                                    do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(ours.completion_ids, ref[:, ids.shape[1]:])


def test_nucleus_logprobs_is_the_sampled_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]], dtype=torch.float64)
    p = torch.softmax(logits / 0.5, -1)[0]
    sorted_p, order = p.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < 0.9
    expected = torch.zeros_like(p)
    expected[order[keep]] = sorted_p[keep] / sorted_p[keep].sum()
    got = nucleus_logprobs(logits, 0.5, 0.9).exp()[0].double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert (got == 0).sum() >= 1
    torch.testing.assert_close(nucleus_logprobs(logits, 1.0, 1.0).exp()[0].double(), torch.softmax(logits, -1)[0], rtol=1e-6, atol=1e-7)


def test_chunked_logp_equals_unchunked_values_and_grads():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    full = torch.log_softmax(head(hidden).float() / 0.8, -1).gather(-1, targets[..., None]).squeeze(-1)
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    for chunk in (1, 5, 21, 1000):
        got = chunked_logp(head, hidden, targets, 0.8, chunk)
        torch.testing.assert_close(got, full)
        (g,) = torch.autograd.grad(got.sum(), hidden)
        torch.testing.assert_close(g, g_full)


def test_bnb_cpu_repack_trap_generate_then_train(tiny_policy):
    """Generate (no-grad eval forwards), then train: must not fail, and eval == train logits."""
    import bitsandbytes as bnb

    policy = tiny_policy()
    layers = [m for m in policy.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    tok = policy.tokenizer
    prompts = _prompts(tok)
    ids, mask = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    policy.model.eval()
    with torch.no_grad():
        before = policy.model(input_ids=ids, attention_mask=mask).logits
    sample(policy.model, prompts, max_new_tokens=8, eos_ids=[-1], pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    policy.model.train()
    out = policy.model(input_ids=ids, attention_mask=mask).logits
    out[mask.bool()].logsumexp(-1).mean().backward()
    grads = [p.grad for p in policy.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.detach(), before, rtol=1e-5, atol=1e-5)
