"""Supervised warm-up: only solution tokens carry loss; a few steps lower it."""

import torch

from lowres_reft.config import Recipe, TrainConfig, WarmupConfig
from lowres_reft.data.problems import Problem
from lowres_reft.rl.warmup import build_sft_batch, run_warmup, sft_loss


def test_loss_mask_covers_only_completion_tokens():
    batch = build_sft_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]  # prompts and padding: no loss
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4] and batch.attention_mask[1].tolist() == [1, 1, 1, 1, 0]


def test_sft_loss_equals_manual_cross_entropy_on_solution_tokens(tiny_policy):
    policy = tiny_policy()
    model = policy.model
    prompts, completions = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    batch = build_sft_batch(prompts, completions, pad_id=0)
    model.eval()
    with torch.no_grad():
        got = sft_loss(model, batch, chunk=3)
        terms = []
        for p, c in zip(prompts, completions):
            ids = torch.tensor([p + c])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            terms += [-logp[len(p) - 1 + j, tok] for j, tok in enumerate(c)]
        expected = torch.stack(terms).mean()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


class _Sink:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def test_short_warmup_lowers_the_loss(tiny_policy):
    policy = tiny_policy()
    problems = [Problem(question=f"{a}+{a}?", answer=str(2 * a), solution=f"{a}+{a}={2 * a}. The answer is {2 * a}.")
                for a in range(1, 9)]
    recipe = Recipe(warmup=WarmupConfig(steps=12, lr=3e-2, batch_size=8), train=TrainConfig(micro_batch_size=3))
    sink = _Sink()
    run_warmup(policy, recipe, problems, sink, log=lambda *a: None)
    losses = [r["loss"] for r in sink.records]
    assert len(losses) == 12 and all(r["stage"] == "warmup" and r["step"] == 0 for r in sink.records)
    assert losses[-1] < losses[0] - 0.2 and losses[-1] < min(losses[:3]), losses  # LoRA on a random tiny base: slow, but down
    assert all(p.grad is None for p in policy.model.parameters())


# ---------------------------------------------------------------- more: cutting, positions, data, state


def test_fit_example_cuts_the_prompt_start_first_then_the_completion_end():
    from lowres_reft.rl.warmup import fit_example

    assert fit_example([1, 2, 3], [4, 5], 10) == ([1, 2, 3], [4, 5])
    assert fit_example([1, 2, 3], [4, 5], 4) == ([2, 3], [4, 5])
    assert fit_example([1, 2, 3], [4, 5, 6, 7], 3) == ([3], [4, 5])  # one prompt token always stays
    batch = build_sft_batch([[1, 2, 3]], [[4, 5]], pad_id=0, max_tokens=4)
    assert batch.input_ids.tolist() == [[2, 3, 4, 5]] and batch.loss_mask.tolist() == [[0, 0, 1, 1]]


def test_sft_log_probs_equal_the_rl_loss_log_probs(tiny_policy):
    """Right-padded SFT rows and the RL loss's left-padded prompts give the same per-token log-probs: the
    position ids (index among the row's real tokens) agree with the sampling loop's."""
    from lowres_reft.model.logprobs import completion_logp
    from lowres_reft.rl.warmup import sft_token_logp
    from lowres_reft.rollout.engine import left_pad

    policy = tiny_policy()
    model = policy.model
    model.eval()
    prompts, completions = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], [[20, 21, 1], [22, 1], [23, 24, 25, 26, 1]]
    with torch.no_grad():
        got = sft_token_logp(model, build_sft_batch(prompts, completions, pad_id=0), chunk=4)
        prompt_ids, prompt_mask = left_pad(prompts, 0, torch.device("cpu"))
        width = max(map(len, completions))
        comp = torch.tensor([c + [0] * (width - len(c)) for c in completions])
        mask = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in completions])
        ref = completion_logp(model, prompt_ids, prompt_mask, comp, mask, 1.0)[mask.bool()]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _recipe(**warmup):
    return Recipe(warmup=WarmupConfig(**{"steps": 2, "lr": 1e-3, "batch_size": 4, **warmup}),
                  train=TrainConfig(micro_batch_size=4))


def test_warmup_without_solutions_is_a_clear_error(tiny_policy):
    import pytest

    from lowres_reft.utils.errors import UsageError

    problems = [Problem(question="1+1?", answer="2", solution=None)]
    with pytest.raises(UsageError, match=r"\[warmup\] needs reference solutions; dataset gsm8k has none"):
        run_warmup(tiny_policy(), _recipe(), problems, _Sink(), log=lambda *a: None)


def test_warmup_skips_unsolved_problems_restores_the_mode_and_logs_each_step(tiny_policy):
    policy = tiny_policy()
    problems = [Problem(question=f"{a}+1?", answer=str(a + 1), solution=f"{a}+1={a + 1}." if a % 2 else None)
                for a in range(10)]
    lines, sink = [], _Sink()
    policy.model.eval()
    run_warmup(policy, _recipe(steps=3), problems, sink, log=lines.append)
    assert not policy.model.training  # left in the mode it was found in
    assert "on 5 reference solutions" in lines[0]
    assert [r["warmup_step"] for r in sink.records] == [1, 2, 3]
    assert all({"loss", "lr", "grad_norm", "tokens"} <= r.keys() and r["lr"] == 1e-3 for r in sink.records)
    policy.model.train()
    run_warmup(policy, _recipe(steps=1), problems, _Sink(), log=lambda *a: None)
    assert policy.model.training
    run_warmup(policy, _recipe(steps=0), [], _Sink(), log=lambda *a: None)  # no warm-up: nothing is checked


def test_warmup_order_is_seeded_epochs_over_the_examples():
    from lowres_reft.rl.warmup import batch_indices

    first = [i for step in range(5) for i in batch_indices(step, 4, 20, seed=3)]
    assert sorted(first) == list(range(20))  # one epoch = every example once
    assert first == [i for step in range(5) for i in batch_indices(step, 4, 20, seed=3)]
    assert first != [i for step in range(5) for i in batch_indices(step, 4, 20, seed=4)]


# ---------------------------------------------------------------- skip distillation


def test_skip_distill_kl_equals_a_float64_reference_and_is_zero_without_a_skip(tiny_policy):
    from lowres_reft.model.nested import skip_layers
    from lowres_reft.rl.warmup import skip_distill_kl

    model = tiny_policy().model
    model.eval()
    prompts, completions = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    batch = build_sft_batch(prompts, completions, pad_id=0)
    with torch.no_grad():
        got = skip_distill_kl(model, batch, [1], chunk=2)
        terms = []
        for p, c in zip(prompts, completions):
            ids = torch.tensor([p + c])
            full = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            with skip_layers(model, [1]):
                nested = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for j in range(len(c)):
                t = len(p) - 1 + j
                terms.append((full[t].exp() * (full[t] - nested[t])).sum())
        torch.testing.assert_close(got.double(), torch.stack(terms).sum(), rtol=1e-4, atol=1e-5)
        assert got > 1e-4  # skipping a layer of a random model changes its predictions
        assert abs(float(skip_distill_kl(model, batch, []))) < 1e-5


def test_skip_distillation_after_the_warmup_lowers_the_nested_models_divergence(tiny_policy, monkeypatch):
    from lowres_reft.config import BehaviorConfig
    from lowres_reft.rl import warmup
    from lowres_reft.rl.warmup import skip_distill_kl

    policy = tiny_policy()
    problems = [Problem(question=f"{a}+{a}?", answer=str(2 * a), solution=f"{a}+{a}={2 * a}. The answer is {2 * a}.")
                for a in range(1, 9)]
    recipe = Recipe(warmup=WarmupConfig(steps=1, lr=3e-2, batch_size=8, skip_distill_steps=10),
                    behavior=BehaviorConfig(skip_ratio=0.5, schedule="fixed", layers=(1,)),
                    train=TrainConfig(micro_batch_size=4))
    from lowres_reft.rl.warmup import warmup_examples

    prompts, completions = warmup_examples(policy.tokenizer, problems, recipe)
    batch = build_sft_batch(prompts, completions, pad_id=0)
    with torch.no_grad():
        before = float(skip_distill_kl(policy.model, batch, [1]))
    sink, lines = _Sink(), []
    snapshots = []
    real_kl = warmup.skip_distill_kl
    monkeypatch.setattr(warmup, "skip_distill_kl", lambda *a, teacher=None, **k: snapshots.append(teacher) or real_kl(*a, teacher=teacher, **k))
    run_warmup(policy, recipe, problems, sink, log=lines.append)
    teacher = snapshots[0]
    assert all(t is teacher for t in snapshots)  # one teacher: the full model after the supervised step
    with torch.no_grad():
        after = float(skip_distill_kl(policy.model, batch, [1]))
        # the anchor: the full model stays near where the supervised step left it (the teacher)
        drift = float(skip_distill_kl(policy.model, batch, [], teacher=teacher)) / 2  # KL(teacher || full), twice
    assert [r["skip_distill"] for r in sink.records] == [None] + [[1]] * 10
    assert "then 10 steps of skip distillation" in lines[0]
    assert after < 0.5 * before and drift < 0.5 * before, (before, after, drift)
    # nothing to skip (r = 0): no distillation steps at all
    sink = _Sink()
    run_warmup(policy, Recipe(warmup=WarmupConfig(steps=1, lr=1e-3, batch_size=8, skip_distill_steps=5),
                              behavior=BehaviorConfig(skip_ratio=0.0)), problems, sink, log=lambda *a: None)
    assert len(sink.records) == 1


def test_skip_distill_ratio_gives_distillation_its_own_ratio_with_the_behaviors_draws(tiny_policy):
    """`[warmup] skip_distill_ratio` > 0: distillation skips that ratio even when the behavior skips nothing (r = 0,
    the README's control), drawing the same sets as a behavior of that ratio would; 0 = the behavior's ratio."""
    from lowres_reft.config import BehaviorConfig
    from lowres_reft.rl.warmup import distill_schedule

    model = tiny_policy().model
    beh = dict(protect_first=0, protect_last=0)
    own = Recipe(warmup=WarmupConfig(skip_distill_steps=4, skip_distill_ratio=0.5), behavior=BehaviorConfig(skip_ratio=0.0, **beh))
    same = Recipe(warmup=WarmupConfig(skip_distill_steps=4), behavior=BehaviorConfig(skip_ratio=0.5, **beh))
    a, b = distill_schedule(own, model), distill_schedule(same, model)
    seq_a, seq_b = [sorted(a.draw()) for _ in range(8)], [sorted(b.draw()) for _ in range(8)]
    assert seq_a == seq_b and len({tuple(s) for s in seq_a}) > 1, seq_a
    assert all(len(s) == len(seq_a[0]) > 0 for s in seq_a)
    assert distill_schedule(Recipe(warmup=WarmupConfig(skip_distill_steps=4), behavior=BehaviorConfig(skip_ratio=0.0, **beh)), model) is None
    adaptive = Recipe(warmup=WarmupConfig(skip_distill_steps=4, skip_distill_ratio=0.5),
                      behavior=BehaviorConfig(schedule="adaptive", skip_ratio=0.0, min_ratio=0.0, max_ratio=0.2, **beh))
    assert [len(distill_schedule(adaptive, model).draw()) for _ in range(3)] == [len(seq_a[0])] * 3  # not max_ratio's


def test_skip_distill_ratio_out_of_range_is_a_config_error(tmp_path):
    import pytest

    from lowres_reft.config import load_recipe
    from lowres_reft.utils.errors import ConfigError

    path = tmp_path / "r.toml"
    path.write_text("[warmup]\nskip_distill_ratio = 1.0\n")
    with pytest.raises(ConfigError, match=r"\[warmup\] skip_distill_ratio must be in \[0, 1\)"):
        load_recipe(path)
