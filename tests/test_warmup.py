"""Supervised warm-up: only solution tokens carry loss; a few steps lower it."""

import torch

from lowres_reft.config import Recipe, TrainConfig, WarmupConfig
from lowres_reft.data import Problem
from lowres_reft.warmup import build_sft_batch, run_warmup, sft_loss


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
