"""Skip-set shapes beyond the paper's uniform subset: contiguous runs of layers, and several skip sets per rollout
batch (an ensemble of behavior policies inside one batch)."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_SETS

from lowres_reft.config import load_recipe
from lowres_reft.model.nested import SkipSchedule, num_skipped
from lowres_reft.rl import batch as rl_batch
from lowres_reft.rollout.engine import RolloutBatch, merge_rollouts
from lowres_reft.run import loop as trainer
from lowres_reft.run.metrics import read_metrics
from lowres_reft.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_contiguous_layout_draws_runs_of_consecutive_valid_layers():
    sched = SkipSchedule(12, 0.25, seed=0, layout="contiguous")  # 3 of the valid layers 1..10
    draws = [sched.draw() for _ in range(400)]
    assert all(len(d) == num_skipped(12, 0.25) == 3 and list(d) == list(range(d[0], d[0] + 3)) for d in draws)
    starts = Counter(d[0] for d in draws)
    assert sorted(starts) == list(range(1, 9))  # every start 1..8 (the run ends by layer 10), roughly uniform
    assert min(starts.values()) > 400 / 8 / 2
    # The scattered layout (default) is the same sequence as before the option existed: uniform subsets.
    scattered = SkipSchedule(12, 0.25, seed=0)
    assert any(list(d) != list(range(d[0], d[0] + 3)) for d in (scattered.draw() for _ in range(20)))
    assert SkipSchedule(12, 0.0, layout="contiguous").draw() == ()


def test_prompt_runs_cut_consecutive_near_equal_runs():
    assert rl_batch.prompt_runs(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert rl_batch.prompt_runs([9, 4], 1) == [[9, 4]]
    assert rl_batch.prompt_runs([5, 6], 4) == [[5], [6]]  # more sets than prompts: empty runs dropped


def _part(prompt_lens, completion_lens, skip, value):
    n, P, T = len(prompt_lens), max(prompt_lens), max(completion_lens)
    ids, mask = torch.zeros(n, P, dtype=torch.long), torch.zeros(n, P, dtype=torch.long)
    cids, cmask = torch.zeros(n, T, dtype=torch.long), torch.zeros(n, T)
    for i, (p, t) in enumerate(zip(prompt_lens, completion_lens)):
        ids[i, P - p:], mask[i, P - p:] = value, 1
        cids[i, :t], cmask[i, :t] = value + 1, 1
    return RolloutBatch(ids, mask, cids, cmask, torch.where(cmask != 0, -float(value), 0.0),
                        torch.tensor([t == T for t in completion_lens]), skip, 0.5)


def test_merge_rollouts_pads_each_part_and_keeps_row_order():
    a, b = _part([2, 3], [4, 1], (1,), 5), _part([5], [2], (2,), 7)
    m = merge_rollouts([a, b], pad_id=0)
    assert m.prompt_ids.shape == (3, 5) and m.completion_ids.shape == (3, 4)
    for part, rows in ((a, [0, 1]), (b, [2])):
        for name, left in (("prompt_ids", True), ("prompt_mask", True), ("completion_ids", False),
                           ("completion_mask", False), ("behavior_logp", False)):
            got, want = getattr(m, name)[rows], getattr(part, name)
            pad = got.shape[1] - want.shape[1]
            assert torch.equal(got[:, pad:] if left else got[:, :want.shape[1]], want), name
            assert not (got[:, :pad] if left else got[:, want.shape[1]:]).any(), name  # padding is masked zeros
    assert m.truncated.tolist() == [True, False, True] and m.seconds == 1.0
    assert m.skip == (1,) and m.skip_sets == ((1,), (2,))
    assert merge_rollouts([a], pad_id=0) is a


def test_a_run_with_several_skip_sets_per_batch(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.toml", TINY_RUN_SETS + [
        "log.progress=none", f"log.output_dir={tmp_path}", "train.steps=3", "eval.before_training=false",
        "behavior.sets_per_batch=2", "behavior.layout=contiguous", "rollout.prompts_per_step=3", "model.tiny_layers=6",
        "behavior.skip_ratio=0.34"])
    run = trainer.train(recipe, log=lambda *a: None)
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["stage"] == "rl"]
    assert len(records) == 3
    for r in records:  # two sets per batch, or one when both draws were equal (then one sampling pass)
        assert len(r["skip_sets"]) in (1, 2) and r["skip_set"] == r["skip_sets"][0]
        assert len(r["skip_sets"]) == 1 or r["skip_sets"][0] != r["skip_sets"][1]
        assert all(len(s) == 2 and s[1] == s[0] + 1 for s in r["skip_sets"])  # contiguous pairs of layers
        assert r["rollout_tokens"] > 0 and not r["update_skipped"]
    assert any(len(r["skip_sets"]) == 2 for r in records)


def test_equal_skip_sets_sample_in_one_pass(tmp_path, monkeypatch):
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.toml", TINY_RUN_SETS + [
        "log.progress=none", f"log.output_dir={tmp_path}", "train.steps=1", "eval.before_training=false",
        "behavior.sets_per_batch=3", "behavior.skip_ratio=0"])
    calls, real = [], rl_batch.rollout_rows
    monkeypatch.setattr(rl_batch, "rollout_rows", lambda e, r, prompts, skip: calls.append(len(prompts)) or real(e, r, prompts, skip))
    trainer.train(recipe, log=lambda *a: None)
    assert calls == [recipe.rollout.prompts_per_step]  # r = 0: three empty sets, one pass over all prompts


def test_sets_per_batch_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match=r"\[behavior\] sets_per_batch must be >= 1"):
        load_recipe(ROOT / "recipes" / "tiny-cpu.toml", ["behavior.sets_per_batch=0"])
