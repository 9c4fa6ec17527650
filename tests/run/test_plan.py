"""The memory plan: hand-counted terms, the plan against live-tensor measurement on a real shape, `lowres-reft plan`,
"auto" micro-batches, and a run refused at its start when the plan does not fit."""

from pathlib import Path

import pytest
from conftest import TINY_RUN_SETS, as_set_args

from lowres_reft.cli import main
from lowres_reft.config import load_recipe
from lowres_reft.model.shapes import known_shape
from lowres_reft.run import plan as P
from lowres_reft.utils.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
QWEN = str(ROOT / "recipes" / "qwen-1.5b-gsm8k.toml")


def test_quantized_bytes_hand_counted():
    # 6400 weights: 3200 bytes of nibbles; 100 blocks of 64: 100 uint8 absmax + 1 float32 per 256 blocks
    # + the float32 code tables: 16 entries (NF4), and 256 entries + an offset for the nested absmax
    assert P.quantized_bytes(6400, double_quant=True) == 3200 + 100 + 4 + 4 * 16 + 4 * 256 + 4
    assert P.quantized_bytes(6400, double_quant=False) == 3200 + 400 + 4 * 16


def test_lora_parameters_of_the_1_5b_recipe():
    """r = 16 on the seven projections of 28 layers: the trainable count the H100 bench step reported."""
    shape, recipe = known_shape("qwen2.5-1.5b"), load_recipe(QWEN)
    assert P.lora_params(shape, recipe)[0] == 18_464_768
    only_q = load_recipe(QWEN, ['lora.target_modules=["q_proj"]'])
    assert P.lora_params(shape, only_q)[0] == 28 * 16 * (1536 + 1536)


def test_unmerged_adapters_add_peft_float32_sum_to_the_prefill():
    """Rollouts over the 4-bit weights with the adapters unmerged: peft adds each adapter's float32 output to the
    16-bit base output in float32, two float32 tensors of the widest target's width (the MLP's 8960 on 1.5B) per
    prompt token (measured: without this term the plan was 0.72x the live bytes at 32 x 128 prompt tokens)."""
    shape = known_shape("qwen2.5-1.5b")
    sets = ["rollout.micro_batch=32", "data.max_prompt_tokens=128", "model.dtype=bfloat16"]
    merged = P.plan_memory(shape, load_recipe(QWEN, sets + ['rollout.weights="merged16"']), prompt_tokens=128)
    shared = P.plan_memory(shape, load_recipe(QWEN, sets + ['rollout.weights="shared4bit"']), prompt_tokens=128)
    prefill = {name: next(p for p in plan.phases if p.name == "rollout").items["prefill temporaries"]
               for name, plan in (("merged", merged), ("shared", shared))}
    dequant = 1536 * 8960 * 2  # the largest linear, dequantized to bf16 (4-bit weights only)
    assert prefill["shared"] - prefill["merged"] == 32 * 128 * 8 * 8960 + dequant


def test_plan_weights_equal_a_loaded_models_bytes(tiny_policy):
    """The plan's weight terms against the bytes of the tiny model as loaded (4-bit packed + quant state, others)."""
    from lowres_reft.bench.roofline import model_bytes
    from lowres_reft.model.layers import unwrap
    from lowres_reft.model.shapes import ModelShape

    policy = tiny_policy()
    recipe = load_recipe("recipes/tiny-cpu.toml", TINY_RUN_SETS + ["model.dtype=float32"])
    shape = ModelShape.from_config(unwrap(policy.model).config)
    items = P.weight_items(shape, recipe, 4)
    measured = model_bytes(policy.model)
    assert items["LoRA parameters (float32)"] == measured["trainable_bytes"]
    quant = items["4-bit decoder weights + quant state"]
    assert quant == measured["quantized_bytes"]


def test_plan_within_15_percent_of_measured_peaks(tmp_path, capsys):
    """The 0.5B shape (4 of its 24 layers, so it stays quick on a CPU), bf16 + 4-bit NF4 + LoRA r=16: every phase's
    plan within +-15% of the live tensor bytes measured while it runs (BENCHMARKS.md has full shapes and sizes)."""
    import json

    out = tmp_path / "memory.json"
    sets = ["model.device=cpu", "train.optimizer=adamw", "rollout.max_new_tokens=16", "rollout.prompts_per_step=2",
            "rollout.group_size=4", "train.micro_batch_size=4", "eval.batch_size=8", "eval.max_new_tokens=16"]
    code = main(["bench", "memory", "--recipe", QWEN, "--model-config", "qwen2.5-0.5b", "--random-weights", "--layers", "4",
                 "--prompt-len", "32", "--cache-dir", str(tmp_path / "models"), "--json", str(out), *as_set_args(sets)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())["results"]
    assert [r["phase"] for r in rows] == ["rollout", "logprob", "optimizer", "eval"]
    for row in rows:
        assert 0.85 <= row["plan_over_measured"] <= 1.15, row


def test_plan_command_offline_table_and_total(capsys):
    assert main(["plan", QWEN, "--model-config", "qwen2.5-1.5b"]) == 0
    out = capsys.readouterr().out
    for phase in ("rollout", "logprob", "optimizer", "eval", "export"):
        assert f"\n{phase} " in out
    assert "KV cache (64 x 1024 tokens, 21 layers)" in out and "merged 16-bit copy of 21 layers" in out
    assert "total (the peak" in out and "\nfits" in out and "largest that fit:" in out


def test_plan_command_says_what_does_not_fit(capsys):
    assert main(["plan", QWEN, "--model-config", "qwen2.5-1.5b", "--gpu-memory", "6GiB"]) == 0
    out = capsys.readouterr().out
    assert "does not fit: rollout needs" in out and "[rollout] micro_batch" in out
    assert "does not fit: eval needs" in out and "[eval] batch_size" in out


@pytest.mark.parametrize("text,size", [("24GiB", 24 << 30), ("16 GB", 16 * 10**9), ("12000MiB", 12000 << 20), ("8G", 8 << 30)])
def test_gpu_memory_sizes(text, size):
    from lowres_reft.cli.plan import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["lots", "-3GiB", "0GiB", "12 parsecs"])
def test_bad_gpu_memory_is_one_line_exit_2(bad, capsys):
    assert main(["plan", QWEN, "--model-config", "qwen2.5-1.5b", f"--gpu-memory={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu-memory" in err[0]


def test_auto_micro_batches():
    shape = known_shape("qwen2.5-1.5b")
    recipe = load_recipe(QWEN, ["rollout.micro_batch=auto", "train.micro_batch_size=auto"])
    cpu, notes = P.resolve_auto(recipe, shape, None)
    assert (cpu.rollout.micro_batch, cpu.train.micro_batch_size) == (0, 8) and len(notes) == 2
    budget = 12 << 30
    gpu, _ = P.resolve_auto(recipe, shape, budget)
    usable = int(budget * (1 - P.MARGIN))
    plan = P.plan_memory(shape, gpu)
    assert plan.phase("rollout").total <= usable and plan.phase("logprob").total <= usable
    bigger = P.plan_memory(shape, gpu, train_micro_batch=gpu.train.micro_batch_size + 1)
    assert bigger.phase("logprob").total > usable  # the largest that fits
    with pytest.raises(UsageError, match="not even one sequence fits"):
        P.resolve_auto(recipe, shape, 1 << 30)


def test_run_refused_at_start_when_the_plan_does_not_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(P, "device_budget", lambda device: 1 << 20)  # a 1 MiB "GPU"
    sets = TINY_RUN_SETS + [f"log.output_dir={tmp_path}", "log.run_name=r"]
    assert main(["run", "recipes/tiny-cpu.toml", *as_set_args(sets)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: memory plan: the ") and "lower" in err[0]
    assert not (tmp_path / "r").exists()


def test_check_prints_the_plans_total(capsys):
    assert main(["check", QWEN]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("# memory plan: peak ") and "GiB" in last and "24 GiB GPU (fits)" in last
