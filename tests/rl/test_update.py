"""The update's micro-batches: formed by length, trimmed to their used columns, and exactly the old update."""

import torch

from lowres_reft.config import LossConfig
from lowres_reft.model.logprobs import completion_logp
from lowres_reft.rl import batch as rl_batch
from lowres_reft.rl import builders as rl_builders
from lowres_reft.rl import loss as L
from lowres_reft.rl import update as rl_update
from lowres_reft.rl.loss import AGGREGATIONS, CORRECTIONS
from lowres_reft.rl.microbatch import by_length
from lowres_reft.rollout.engine import RolloutBatch

PROMPT_LENS = [3, 9, 4, 2, 12, 5, 3, 7, 2, 6]
COMPLETION_LENS = [2, 30, 5, 3, 26, 1, 4, 8, 2, 17]  # some rows much longer than the rest


def mixed_batch(vocab: int, width_pad: int = 5, seed: int = 0) -> rl_batch.ScoredBatch:
    """Rows of mixed prompt (left-padded) and completion (right-padded) lengths, padded past the widest row too
    (as a batch padded to the global width of all processes is)."""
    gen = torch.Generator().manual_seed(seed)
    n, P, T = len(PROMPT_LENS), max(PROMPT_LENS) + 2, max(COMPLETION_LENS) + width_pad
    prompt_ids, prompt_mask = torch.zeros(n, P, dtype=torch.long), torch.zeros(n, P, dtype=torch.long)
    completion_ids, completion_mask = torch.zeros(n, T, dtype=torch.long), torch.zeros(n, T)
    for i, (p, t) in enumerate(zip(PROMPT_LENS, COMPLETION_LENS)):
        prompt_ids[i, P - p :] = torch.randint(1, vocab, (p,), generator=gen)
        prompt_mask[i, P - p :] = 1
        completion_ids[i, :t] = torch.randint(1, vocab, (t,), generator=gen)
        completion_mask[i, :t] = 1
    behavior = torch.where(completion_mask != 0, -torch.rand(n, T, generator=gen) * 3 - 2, 0.0)
    rollout = RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, behavior,
                           torch.zeros(n, dtype=torch.bool), (), 1.0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0] * 2)
    return rl_batch.ScoredBatch(rollout, rewards, L.group_advantages(rewards, 5), [False] * n)


def reference_update(policy, batch, cfg: LossConfig, micro: int, max_new: int, old_logp) -> tuple[float, torch.Tensor]:
    """The update before length grouping: row-order slices, each padded to the whole batch's width."""
    r, mask = batch.rollout, batch.rollout.completion_mask
    totals = dict(total_tokens=int(mask.sum()), total_seqs=mask.shape[0], max_new_tokens=max_new)
    loss, logps = 0.0, []
    for lo in range(0, mask.shape[0], micro):
        sl = slice(lo, lo + micro)
        logp = completion_logp(policy.model, r.prompt_ids[sl], r.prompt_mask[sl], r.completion_ids[sl], mask[sl], 1.0)
        corr = L.correction_weights(logp.detach(), r.behavior_logp[sl], mask[sl], cfg.correction, cfg.is_cap,
                                            cfg.retrace_lambda)
        old = None if old_logp is None else old_logp[sl]
        objective, _ = L.policy_objective(logp, corr.weights, batch.advantages[sl], mask[sl], old, cfg.clip_eps,
                                                  cfg.clip_eps_high)
        micro_loss = -L.aggregate(objective, mask[sl], cfg.aggregation, **totals)
        if cfg.kl_beta > 0:
            with torch.no_grad(), policy.model.disable_adapter():
                ref = completion_logp(policy.model, r.prompt_ids[sl], r.prompt_mask[sl], r.completion_ids[sl], mask[sl], 1.0)
            micro_loss = micro_loss + cfg.kl_beta * L.aggregate(L.kl_k3(logp, ref), mask[sl], cfg.aggregation,
                                                                        **totals)
        micro_loss.backward()
        loss += float(micro_loss.detach())
        logps.append(logp.detach())
    return loss, torch.cat(logps)


def _grads(policy) -> list[torch.Tensor]:
    params = rl_builders.trainable(policy)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def test_micro_batches_group_by_length_and_keep_only_used_columns(tiny_policy):
    policy = tiny_policy()
    batch = mixed_batch(policy.model.get_base_model().config.vocab_size)
    r = batch.rollout
    parts = by_length(r, 4)
    assert [len(mb.rows) for mb in parts] == [4, 4, 2]
    assert sorted(torch.cat([mb.rows for mb in parts]).tolist()) == list(range(10))  # every row exactly once
    lengths = [PROMPT_LENS[i] + COMPLETION_LENS[i] for i in torch.cat([mb.rows for mb in parts]).tolist()]
    assert lengths == sorted(lengths)
    for mb in parts:
        rows = mb.rows.tolist()
        assert mb.prompt_ids.shape[1] == max(PROMPT_LENS[i] for i in rows)
        assert mb.completion_ids.shape[1] == max(COMPLETION_LENS[i] for i in rows)
        # Only padding was dropped: the kept columns hold every real token of these rows.
        assert int(mb.prompt_mask.sum()) == int(r.prompt_mask[mb.rows].sum())
        assert int(mb.completion_mask.sum()) == int(r.completion_mask[mb.rows].sum())
        assert torch.equal(mb.prompt_ids, r.prompt_ids[mb.rows, -mb.prompt_ids.shape[1] :])
        assert torch.equal(mb.take(r.completion_ids), mb.completion_ids)
    # The short rows' micro-batch is far narrower than the batch: that is the saving.
    assert parts[0].completion_ids.shape[1] + parts[0].prompt_ids.shape[1] < (r.completion_ids.shape[1] + r.prompt_ids.shape[1]) / 3


def _compare(policy, batch, cfg: LossConfig, micro: int, old_logp=None) -> torch.Tensor:
    mask = batch.rollout.completion_mask
    max_new = mask.shape[1]
    ref_loss, ref_logp = reference_update(policy, batch, cfg, micro, max_new, old_logp)
    ref_grads = _grads(policy)
    res = rl_update.accumulate_gradients(policy, batch, cfg, 1.0, micro, max_new, 1.0, old_logp)
    grads = _grads(policy)
    label = f"{cfg.correction}/{cfg.aggregation}/kl={cfg.kl_beta}/ppo={old_logp is not None}"
    assert abs(res["loss"] - ref_loss) <= 1e-6, label
    assert res["logp"].shape == mask.shape, label
    assert torch.equal(res["logp"][mask == 0], torch.zeros(int((mask == 0).sum()))), label
    torch.testing.assert_close(res["logp"][mask != 0], ref_logp[mask != 0], atol=1e-6, rtol=0, msg=label)
    assert len(grads) == len(ref_grads) > 0
    assert any(float(g.abs().max()) > 1e-4 for g in ref_grads), label  # the comparison is not of zeros
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=label)
    return res["logp"]


def test_length_grouped_update_equals_the_row_order_update(tiny_policy):
    """Loss, per-token log-probs and every adapter gradient within 1e-6 of the old update (float32, 4-bit + LoRA),
    for every correction and aggregation, with the KL term, and on the PPO path (updates_per_batch > 1)."""
    policy = tiny_policy()
    batch = mixed_batch(policy.model.get_base_model().config.vocab_size)
    for correction in CORRECTIONS:
        for aggregation in AGGREGATIONS:
            _compare(policy, batch, LossConfig(correction=correction, aggregation=aggregation, is_cap=1.5), micro=4)
    cfg = LossConfig(correction="retrace", aggregation="seq_mean", kl_beta=0.1, updates_per_batch=2)
    first = _compare(policy, batch, cfg, micro=3)
    # A later update of the same batch: PPO ratios against the first update's log-probs, some of them clipped.
    gen = torch.Generator().manual_seed(1)
    old = first + torch.where(batch.rollout.completion_mask != 0, torch.randn(first.shape, generator=gen) * 0.3, 0.0)
    _compare(policy, batch, cfg, micro=3, old_logp=old)
    _compare(policy, batch, LossConfig(correction="tis", aggregation="dr_grpo", updates_per_batch=2), micro=4, old_logp=old)


def test_nested_kl_term_is_the_distillation_kl_of_each_micro_batch(tiny_policy):
    """[loss] nested_kl_beta: the update's loss grows by beta x KL(full || nested with the batch's skip set) per
    completion token, the warm-up's distillation KL on the rollout rows; its gradient reaches the adapters."""
    import dataclasses

    from lowres_reft.rl.warmup import build_sft_batch, skip_distill_kl

    policy = tiny_policy(load_in_4bit=False)
    vocab = policy.model.get_base_model().config.vocab_size
    batch = mixed_batch(vocab)
    batch = dataclasses.replace(batch, rollout=dataclasses.replace(batch.rollout, skip=(1,)))
    cfg = LossConfig(correction="none")
    base = rl_update.accumulate_gradients(policy, batch, cfg, 1.0, 4, 40, 1.0, None)
    _grads(policy)
    with_kl = rl_update.accumulate_gradients(policy, batch, dataclasses.replace(cfg, nested_kl_beta=0.5), 1.0, 4, 40,
                                             1.0, None)
    _grads(policy)
    r = batch.rollout
    rows = [(r.prompt_ids[i][r.prompt_mask[i].bool()].tolist(), r.completion_ids[i][r.completion_mask[i].bool()].tolist())
            for i in range(len(r.prompt_ids))]
    total = int(r.completion_mask.sum())
    with torch.no_grad():  # the same KL, from the warm-up's own right-padded batch of the same rows
        expected = float(skip_distill_kl(policy.model, build_sft_batch([p for p, _ in rows], [c for _, c in rows], 0),
                                         [1])) / total
    assert with_kl["nested_kl"] > 0 and abs(with_kl["nested_kl"] - expected) < 1e-4 * max(1.0, expected)
    assert abs(with_kl["loss"] - (base["loss"] + 0.5 * with_kl["nested_kl"])) < 1e-4
    nothing_skipped = dataclasses.replace(batch, rollout=dataclasses.replace(batch.rollout, skip=()))
    assert rl_update.accumulate_gradients(policy, nothing_skipped, dataclasses.replace(cfg, nested_kl_beta=0.5), 1.0, 4,
                                          40, 1.0, None)["nested_kl"] == 0.0
