"""Training-loop pieces: schedules, data order, non-finite updates, and the optional paths (KL, PPO, accumulation)."""

import math
import weakref
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_SETS
from safetensors.torch import load_file

from lowres_reft.config import load_recipe
from lowres_reft.rl import batch as rl_batch
from lowres_reft.rl import builders as rl_builders
from lowres_reft.rl import loss as L
from lowres_reft.rl import update as rl_update
from lowres_reft.run import loop as trainer
from lowres_reft.run.metrics import read_metrics
from lowres_reft.utils import schedules

ROOT = Path(__file__).resolve().parents[2]
SMALL = TINY_RUN_SETS + ["log.progress=none"]


def _recipe(tmp_path, *extra):
    return load_recipe(ROOT / "recipes" / "tiny-cpu.toml", SMALL + [f"log.output_dir={tmp_path}", *extra])


def test_lr_factor_warmup_and_schedules():
    assert schedules.lr_factor(0, 10, 2, "constant") == 0.5
    assert schedules.lr_factor(1, 10, 2, "constant") == 1.0
    assert schedules.lr_factor(5, 10, 0, "constant") == 1.0
    assert schedules.lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert schedules.lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert schedules.lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert schedules.lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)


def test_prompt_indices_cover_each_epoch_once(tmp_path):
    recipe = _recipe(tmp_path, "rollout.prompts_per_step=3", "train.grad_accum=2")
    n = 12
    seen = [i for step in (1, 2) for a in (0, 1) for i in rl_batch.prompt_indices(step, a, recipe, n)]
    assert sorted(seen) == list(range(n))  # 2 steps x 2 batches x 3 prompts = one epoch, no repeats
    assert rl_batch.prompt_indices(3, 0, recipe, n) == rl_batch.prompt_indices(3, 0, recipe, n)


def test_nonfinite_loss_skips_update_and_keeps_adapters(tmp_path, monkeypatch):
    real = L.policy_objective

    def poisoned(*args, **kwargs):
        objective, clip = real(*args, **kwargs)
        return objective * float("nan"), clip

    monkeypatch.setattr(L, "policy_objective", poisoned)
    run = trainer.train(_recipe(tmp_path, "train.steps=2", "log.run_name=nan", "eval.before_training=false"), log=lambda *a: None)
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["update_skipped"] for r in records] == [True, True]
    assert records[-1]["skipped_updates"] == 2
    adapter = load_file(run / "checkpoint-last" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in adapter.values())
    # LoRA B starts at zero; no update was applied, so it is still exactly zero.
    assert all(float(v.abs().max()) == 0.0 for k, v in adapter.items() if "lora_B" in k)


def test_optional_paths_run_kl_ppo_accum_checkpointing_16bit(tmp_path):
    recipe = _recipe(
        tmp_path, "train.steps=2", "log.run_name=paths", "loss.kl_beta=0.05", "loss.updates_per_batch=2",
        "train.grad_accum=2", "train.gradient_checkpointing=true", "train.micro_batch_size=3", "loss.correction=tis",
        "loss.aggregation=seq_mean", "rollout.top_p=0.9", "model.load_in_4bit=false", "eval.before_training=false",
        "train.lr=0.01", "warmup.steps=2", "warmup.batch_size=4",
    )
    run = trainer.train(recipe, log=lambda *a: None)
    everything = read_metrics(run / "metrics.jsonl")
    assert [r["warmup_step"] for r in everything if r["stage"] == "warmup"] == [1, 2]
    assert [r["label"] for r in everything if r["stage"] == "eval"] == ["after_warmup", "final"]
    records = [r for r in everything if r["stage"] == "rl"]
    assert len(records) == 2
    for r in records:
        assert len(r["skip_sets"]) == 2  # one nested model per accumulated rollout batch
        assert math.isfinite(r["kl"]) and r["kl"] >= 0
        assert not r["update_skipped"]
    assert records[1]["kl"] > 0  # after one update the adapters moved away from the reference
    adapter = load_file(run / "checkpoint-last" / "adapter" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    from lowres_reft.utils.errors import UsageError

    with pytest.raises(UsageError, match="not writable"):
        trainer.train(load_recipe(ROOT / "recipes" / "tiny-cpu.toml", SMALL + [f"log.output_dir={blocker}"]))


def test_prompt_indices_cross_epoch_boundaries(tmp_path):
    # 5 prompts per step over 12 problems: steps straddle epochs (positions 10..14 = 2 of epoch 0, 3 of epoch 1).
    recipe = _recipe(tmp_path, "rollout.prompts_per_step=5")
    n = 12
    seen = [i for step in range(1, 13) for i in rl_batch.prompt_indices(step, 0, recipe, n)]  # 60 = 5 epochs
    for epoch in range(5):
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n)), epoch
    assert seen[:n] != seen[n : 2 * n]  # a fresh permutation each epoch


# ---------------------------------------------------------------- update phase: mode and memory


def _fake_batch(policy, rows: int = 4, prompt_len: int = 6, completion_len: int = 24, seed: int = 0):
    from lowres_reft.rollout.engine import RolloutBatch

    gen = torch.Generator().manual_seed(seed)
    vocab = policy.model.get_base_model().config.vocab_size
    mask = torch.ones(rows, completion_len)
    rollout = RolloutBatch(
        prompt_ids=torch.randint(1, vocab, (rows, prompt_len), generator=gen), prompt_mask=torch.ones(rows, prompt_len, dtype=torch.long),
        completion_ids=torch.randint(1, vocab, (rows, completion_len), generator=gen), completion_mask=mask,
        behavior_logp=-torch.rand(rows, completion_len, generator=gen) * 3, truncated=torch.zeros(rows, dtype=torch.bool),
        skip=(), seconds=1.0,
    )
    rewards = torch.tensor([1.0, 0.0] * (rows // 2))
    return rl_batch.ScoredBatch(rollout, rewards, L.group_advantages(rewards, 2), [False] * rows)


def _saved_bytes_of_update(policy, batch, micro: int) -> int:
    """Bytes autograd saves for backward (outside checkpointed regions) during accumulate_gradients."""
    from lowres_reft.config import LossConfig

    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t.detach()  # not `t`: a saved output would tie a reference cycle through its grad_fn

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rl_update.accumulate_gradients(policy, batch, LossConfig(), 1.0, micro, batch.rollout.completion_ids.shape[1], 1.0, None)
    return total


def test_gradient_checkpointing_is_in_effect_after_model_eval(tiny_cache):
    from conftest import tiny_model_cfg

    from lowres_reft.config import LoraConfig
    from lowres_reft.model.loader import load_policy

    saved = {}
    for checkpointing in (False, True):
        policy = load_policy(tiny_model_cfg(load_in_4bit=True), LoraConfig(r=4, alpha=8, dropout=0.0), cache_dir=tiny_cache,
                             gradient_checkpointing=checkpointing)
        policy.model.eval()  # e.g. an evaluation just before the update
        saved[checkpointing] = _saved_bytes_of_update(policy, _fake_batch(policy), micro=4)
    # Without checkpointing every layer keeps its activations; with it only the layer inputs are saved.
    assert saved[True] < saved[False] / 2, saved


def test_nonfinite_micro_batch_frees_its_graph_before_the_next(tiny_policy, monkeypatch):
    from lowres_reft.config import LossConfig

    policy = tiny_policy()
    real_objective, real_logp = L.policy_objective, rl_update.update_logp

    def poisoned(*args, **kwargs):
        objective, clip = real_objective(*args, **kwargs)
        return objective * float("nan"), clip

    class Held:  # what autograd keeps for backward, tracked through a weak set
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor):
            self.tensor = tensor

    held, alive_at_forward = weakref.WeakSet(), []

    def pack(t):
        h = Held(t.detach())  # detached: holding `t` itself would tie a reference cycle through its grad_fn
        held.add(h)
        return h

    def counting_logp(*args, **kwargs):
        alive_at_forward.append(len(held))  # saved tensors of earlier micro-batches still alive
        return real_logp(*args, **kwargs)

    monkeypatch.setattr(L, "policy_objective", poisoned)
    monkeypatch.setattr(rl_update, "update_logp", counting_logp)
    batch = _fake_batch(policy, rows=6)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.tensor):
        result = rl_update.accumulate_gradients(policy, batch, LossConfig(), 1.0, 2, 24, 1.0, None)
    assert not result["finite"]
    assert alive_at_forward == [0, 0, 0]
    assert all(p.grad is None for p in rl_builders.trainable(policy))


def test_recipes_choose_require_final_answer(tmp_path, monkeypatch):
    # Real data (the system prompt asks for \\boxed{}): strict. The demo's solutions ("3+4=7.") state no marker: lenient.
    for name in ("qwen-0.5b-svamp", "qwen-1.5b-gsm8k", "qwen-1.5b-math12k", "qwen-7b-gsm8k"):
        assert load_recipe(ROOT / "recipes" / f"{name}.toml").reward.require_final_answer, name
    assert not load_recipe(ROOT / "recipes" / "tiny-cpu.toml").reward.require_final_answer
    # The trainer hands the option to the reward.
    seen, real = [], rl_batch.score
    monkeypatch.setattr(rl_batch, "score", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    trainer.train(_recipe(tmp_path, "train.steps=1", "eval.before_training=false", "reward.require_final_answer=true"),
                  log=lambda *a: None)
    assert seen == [True]


def test_a_registered_engine_does_all_the_sampling(tmp_path, monkeypatch):
    """The sampling seam: an engine registered in rollout.ENGINES and named by [rollout] engine serves the training
    rollouts (nested, sampled) and the evals (full model, greedy); an unknown name is a one-line ConfigError."""
    from lowres_reft.rollout import engine as rollout
    from lowres_reft.utils.errors import ConfigError

    calls = []

    class CountingEngine(rollout.LoopEngine):
        def generate(self, prompts, skip=()):
            calls.append((len(prompts), tuple(skip), self.greedy))
            return super().generate(prompts, skip)

    monkeypatch.setitem(rollout.ENGINES, "counting", CountingEngine)
    trainer.train(_recipe(tmp_path, "log.run_name=engine", "train.steps=2", "rollout.engine=counting",
                          "eval.before_training=false", "behavior.skip_ratio=0.25"), log=lambda *a: None)
    rollouts = [c for c in calls if not c[2]]
    evals = [c for c in calls if c[2]]
    assert len(rollouts) == 2 and all(skip for _, skip, _ in rollouts)  # one nested rollout batch per step
    assert evals and all(skip == () for _, skip, _ in evals)  # the final eval: full model, greedy
    with pytest.raises(ConfigError, match="engine must be one of 'loop'"):
        _recipe(tmp_path, "rollout.engine=staitc")


def test_merged16_rollout_weights_serve_the_training_rollouts(tmp_path, monkeypatch):
    """[rollout] weights = "merged16": each rollout batch materializes its kept layers (skip set known), the
    final greedy eval the full model; the run trains and the model is restored between rollouts."""
    from lowres_reft.model import rollout_weights

    seen = []
    real = rollout_weights.merged_weights

    def counting(model, skip):
        seen.append(tuple(skip))
        return real(model, skip)

    monkeypatch.setattr(rollout_weights, "merged_weights", counting)
    trainer.train(_recipe(tmp_path, "log.run_name=merged", "train.steps=2", "rollout.weights=merged16",
                          "eval.before_training=false", "behavior.skip_ratio=0.25"), log=lambda *a: None)
    assert len(seen) >= 3 and all(seen[:2]) and seen[-1] == ()  # 2 nested rollout batches, then the eval
