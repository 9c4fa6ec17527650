"""The shared prompt forward: a prompt's G completions read one prompt forward, with the plain recompute's
log-probs and gradients (every supported architecture, with and without gradient checkpointing)."""

import arch_models
import pytest
import torch

from lowres_reft.config import LossConfig
from lowres_reft.model.layers import decoder_stack
from lowres_reft.model.logprobs import completion_logp
from lowres_reft.rl import batch as rl_batch
from lowres_reft.rl import builders as rl_builders
from lowres_reft.rl import loss as L
from lowres_reft.rl import shared_prompt
from lowres_reft.rl import update as rl_update
from lowres_reft.rl.microbatch import by_prompt
from lowres_reft.rl.shared_prompt import distinct_prompts, shared_prompt_logp, supports_shared_prompt
from lowres_reft.rollout.engine import RolloutBatch

PROMPTS = [[5, 9, 3], [7, 4, 4, 8, 2, 6, 11], [12, 3, 3, 5, 9]]  # 3 prompts of different lengths
COMPLETION_LENS = [[4, 1, 9, 6], [3, 12, 2, 7], [8, 5, 5, 1]]  # G = 4 completions of each
SLIDING = {"mistral", "gemma2", "gemma3"}


def grouped_batch(vocab: int, seed: int = 0) -> rl_batch.ScoredBatch:
    """3 prompts x 4 completions, group-contiguous, prompts left-padded and completions right-padded past the widest."""
    gen = torch.Generator().manual_seed(seed)
    rows = [(p, t) for p, ts in zip(PROMPTS, COMPLETION_LENS) for t in ts]
    n, P, T = len(rows), max(map(len, PROMPTS)) + 1, max(t for _, t in rows) + 2
    prompt_ids, prompt_mask = torch.zeros(n, P, dtype=torch.long), torch.zeros(n, P, dtype=torch.long)
    completion_ids, completion_mask = torch.zeros(n, T, dtype=torch.long), torch.zeros(n, T)
    for i, (p, t) in enumerate(rows):
        prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = torch.tensor(p), 1
        completion_ids[i, :t] = torch.randint(1, vocab, (t,), generator=gen)
        completion_mask[i, :t] = 1
    behavior = torch.where(completion_mask != 0, -torch.rand(n, T, generator=gen) * 3 - 2, 0.0)
    rollout = RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, behavior,
                           torch.zeros(n, dtype=torch.bool), (), 1.0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    return rl_batch.ScoredBatch(rollout, rewards, L.group_advantages(rewards, 4), [False] * n)


def test_distinct_prompts_in_order_of_first_appearance():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [0, 0, 6], [7, 8, 9], [0, 7, 6]])
    mask = (ids != 0).long()
    ids[3, 0] = 4  # a different pad id under the mask changes nothing
    first, index = distinct_prompts(ids, mask)
    assert first.tolist() == [0, 1, 3, 5] and index.tolist() == [0, 1, 0, 2, 1, 3]


def test_by_prompt_keeps_a_prompts_rows_together():
    r = grouped_batch(50).rollout
    for size in (4, 8, 5, 3, 12):
        parts = by_prompt(r, size)
        rows = torch.cat([mb.rows for mb in parts]).tolist()
        assert sorted(rows) == list(range(12)) and all(len(mb.rows) <= size for mb in parts)
        for mb in parts:
            groups = sorted({row // 4 for row in mb.rows.tolist()})
            whole = [g for g in groups if sum(row // 4 == g for row in rows) == sum(row // 4 == g for row in mb.rows.tolist())]
            if size >= 4:  # every group fits: none is cut
                assert whole == groups, size
            assert mb.prompt_ids.shape[1] == max(len(PROMPTS[g]) for g in groups)
    # Prompts in order of their longest row: prompt 0 (3 + 9), prompt 2 (5 + 8), prompt 1 (7 + 12).
    assert [int(mb.rows[0]) // 4 for mb in by_prompt(r, 4)] == [0, 2, 1]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_update_equals_the_plain_update(tiny_policy, checkpointing, monkeypatch):
    """Loss, log-probs and every adapter gradient of `accumulate_gradients` (4-bit + LoRA, float32), shared prompt
    forward vs the plain per-row recompute, for micro-batches holding whole prompts and cut ones, KL term included."""
    policy = tiny_policy()
    if checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = grouped_batch(policy.model.get_base_model().config.vocab_size)
    cfg = LossConfig(correction="retrace", is_cap=1.5, kl_beta=0.05)
    params = rl_builders.trainable(policy)

    def run(micro, share):
        res = rl_update.accumulate_gradients(policy, batch, cfg, 1.0, micro, 16, 1.0, None, share_prompt=share)
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return res, grads

    plain = []
    monkeypatch.setattr(shared_prompt, "completion_logp", lambda *a: plain.append(1) or completion_logp(*a))
    for micro in (8, 12, 3):
        want, want_grads = run(micro, False)
        plain.clear()
        got, got_grads = run(micro, True)
        # Whole prompts per micro-batch: the shared path ran throughout; cut ones (micro 3 < G 4): where it repeats.
        singles = sum(len(set((mb.rows // 4).tolist())) == len(mb.rows) for mb in by_prompt(batch.rollout, micro))
        assert len(plain) == 2 * singles and (singles == 0) == (micro >= 4), micro  # x2: the KL's reference pass
        assert abs(got["loss"] - want["loss"]) <= 1e-5, micro
        torch.testing.assert_close(got["logp"], want["logp"], atol=2e-5, rtol=0)
        assert any(float(g.abs().max()) > 1e-4 for g in want_grads)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", arch_models.ARCHS)
def test_shared_logp_and_gradients_equal_plain_on_each_architecture(arch):
    # float64 up to the float32 log-softmax of both paths (the MoE's grouped matmul has no float64 kernel)
    dtype, rel = (torch.float32, 5e-4) if arch == "qwen3_moe" else (torch.float64, 1e-6)
    model = arch_models.build(arch).to(dtype).train()
    r = grouped_batch(arch_models.COMMON["vocab_size"]).rollout
    args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 1.0)
    if arch in SLIDING:
        assert not supports_shared_prompt(model) and shared_prompt_logp(model, *args) is None
        return
    assert supports_shared_prompt(model)
    embed = decoder_stack(model).embed_tokens.weight
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mask = r.completion_mask != 0
        want = completion_logp(model, *args)
        want[mask].sum().backward()
        want_grad, embed.grad = embed.grad.clone(), None
        got = shared_prompt_logp(model, *args)
        assert got is not None
        torch.testing.assert_close(got[mask], want[mask], atol=1e-5 if dtype == torch.float64 else 1e-3, rtol=0)
        got[mask].sum().backward()
        # Prompt tokens' embedding rows get gradient only through the prompt forward: it reached them, summed over G.
        prompt_rows = sorted({t for p in PROMPTS for t in p})
        assert float(want_grad[prompt_rows].abs().max()) > 0
        torch.testing.assert_close(embed.grad, want_grad, atol=rel * float(want_grad.abs().max()), rtol=0)
        embed.grad = None


def test_no_repeated_prompt_uses_the_plain_forward():
    model = arch_models.build("qwen2")
    r = grouped_batch(arch_models.COMMON["vocab_size"]).rollout
    rows = torch.tensor([0, 4, 8])  # one completion of each prompt
    assert shared_prompt_logp(model, r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows],
                              r.completion_mask[rows], 1.0) is None


def test_a_model_whose_layers_ignore_the_prefix_falls_back_once_and_for_good(monkeypatch):
    """If a transformers version drops the given cache inside its layers, the shared forward gives None (the caller
    recomputes per row), and later calls do not run the two wasted forwards again."""
    model = arch_models.build("qwen2")
    r = grouped_batch(arch_models.COMMON["vocab_size"]).rollout
    args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 1.0)
    real, calls = shared_prompt._prefix_cache, []

    def unread(keys, values):  # the prefix is used but its reads are not counted: the guard sees an unread cache
        cache = real(keys, values)
        calls.append(1)
        for layer in cache.layers:
            layer.update = lambda k, v, *a, layer=layer, **kw: (torch.cat([layer.keys, k], -2),
                                                                 torch.cat([layer.values, v], -2))
        return cache

    monkeypatch.setattr(shared_prompt, "_prefix_cache", unread)
    assert supports_shared_prompt(model) and shared_prompt_logp(model, *args) is None and calls == [1]
    assert not supports_shared_prompt(model) and shared_prompt_logp(model, *args) is None and calls == [1]
