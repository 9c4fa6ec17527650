"""`lowres-reft bench rollout|step` on the CPU with tiny shapes: JSON schema, layer bookkeeping, pure formulas.

No timing thresholds: CI machines are noisy; only structure, signs and deterministic byte counts are checked.
"""

import json
import math

import pytest
import torch

from lowres_reft.bench.roofline import (
    decode_weight_bytes,
    ideal_speedup,
    kv_bytes_per_step,
    peak_bandwidth,
    split_layer_time,
)
from lowres_reft.cli import main
from lowres_reft.model.nested import num_skipped
from lowres_reft.model.shapes import infer_shape

TINY_ARGS = ["--model-config", "tiny", "--random-weights", "--threads", "1"]

TOP_LEVEL = {
    "schema_version": int, "command": str, "device": dict, "torch": str, "transformers": str,
    "bitsandbytes": (str, type(None)), "peft": (str, type(None)), "python": str, "timestamp": str,
    "config": dict, "summary": dict, "results": list,
}
DEVICE = {"type": str, "name": str, "total_memory_bytes": (int, type(None)), "peak_bandwidth_Bps": (float, type(None)),
          "cuda": (str, type(None)), "cpu_count": int, "torch_threads": int}
NUM = (int, float)
OPT_NUM = (int, float, type(None))
ROLLOUT_ROW = {
    "kind": str, "engine": str, "weights": str, "skip_ratio": OPT_NUM, "layers_total": int, "layers_skipped": int, "layers_kept": int, "skip": list,
    "seconds": NUM, "seconds_repeats": list, "prefill_seconds": NUM, "decode_step_seconds": OPT_NUM, "tokens": int,
    "tokens_per_s": NUM, "slot_tokens": int, "slot_tokens_per_s": NUM, "log_rho_abs_mean": OPT_NUM,
    "log_rho_abs_max": OPT_NUM, "speedup_vs_r0": OPT_NUM, "ideal_speedup": OPT_NUM, "fraction_of_ideal": OPT_NUM,
    "weight_bytes_per_step": int, "weight_bytes_breakdown": dict, "kv_bytes_per_step_mean": int,
    "achieved_weight_bandwidth_Bps": OPT_NUM, "roofline_fraction": OPT_NUM, "peak_gpu_mem_bytes": (int, type(None)),
    "max_rss_bytes": int,
}
ROLLOUT_SUMMARY = {"t_other_s": NUM, "t_layers_s": NUM, "t_other_share": NUM, "ours_r0_speedup_vs_generate": OPT_NUM,
                   "groups": list, "model_bytes": dict, "peak_gpu_mem_bytes": (int, type(None)), "max_rss_bytes": int}
STEP_ROW = {
    "step": int, "skip_sets": list, "layers_total": int, "layers_kept": list, "sequences": int, "rollout_tokens": int,
    "rollout_seconds": NUM, "rollout_tokens_per_s": NUM, "logprob_backward_seconds": NUM, "optimizer_seconds": NUM,
    "step_seconds": NUM, "peak_gpu_mem_rollout_bytes": (int, type(None)),
    "peak_gpu_mem_logprob_backward_bytes": (int, type(None)), "peak_gpu_mem_optimizer_bytes": (int, type(None)),
    "peak_gpu_mem_bytes": (int, type(None)), "max_rss_bytes": int, "loss": NUM, "grad_norm": NUM, "update_skipped": bool,
    "backward_only_shared_seconds": (float, type(None)), "backward_only_plain_seconds": (float, type(None)),
}
STEP_SUMMARY = {
    "median_rollout_seconds": NUM, "median_logprob_backward_seconds": NUM, "median_optimizer_seconds": NUM,
    "median_step_seconds": NUM, "median_rollout_tokens_per_s": NUM, "peak_gpu_mem_rollout_bytes": (int, type(None)),
    "peak_gpu_mem_logprob_backward_bytes": (int, type(None)), "peak_gpu_mem_optimizer_bytes": (int, type(None)),
    "peak_gpu_mem_bytes": (int, type(None)), "allocated_after_load_bytes": (int, type(None)), "model_bytes": dict,
    "max_rss_bytes": int, "median_rollout_share": NUM,
}


def _check_types(obj: dict, spec: dict, where: str) -> None:
    missing = set(spec) - set(obj)
    assert not missing, f"{where}: missing keys {sorted(missing)}"
    for key, types in spec.items():
        value = obj[key]
        assert isinstance(value, types) and (types is bool or not isinstance(value, bool)), \
            f"{where}.{key}: {value!r} is not {types}"


def _check_envelope(report: dict, command: str) -> None:
    _check_types(report, TOP_LEVEL, "report")
    # bench rollout's report is schema 2 (engine/weights groups, useful vs slot tokens); the others stay at 1.
    assert report["schema_version"] == (2 if command == "bench rollout" else 1) and report["command"] == command
    _check_types(report["device"], DEVICE, "device")
    assert report["device"]["type"] == "cpu" and report["device"]["peak_bandwidth_Bps"] is None
    assert report["timestamp"].endswith("Z")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- pure functions ---------------------------------------------------------------------------------------


def test_split_layer_time_and_ideal_speedup():
    # t_full = t_other + 4 * t_layer, t_one = t_other + t_layer with t_other = 2, t_layer = 2.
    t_other, t_layers = split_layer_time(10.0, 4.0, 4)
    assert t_other == pytest.approx(2.0) and t_layers == pytest.approx(8.0)
    assert ideal_speedup(10.0, 2.0, 8.0, 4, 0) == pytest.approx(1.0)
    assert ideal_speedup(10.0, 2.0, 8.0, 4, 2) == pytest.approx(10.0 / 6.0)
    assert ideal_speedup(10.0, 2.0, 8.0, 4, 3) == pytest.approx(10.0 / 4.0)  # = t_full / t_one by construction
    assert ideal_speedup(10.0, 0.0, 10.0, 28, 7) == pytest.approx(28 / 21)  # no overhead: L / (L - k)
    assert ideal_speedup(1.0, -2.0, 3.0, 3, 2) is None  # noise made the denominator non-positive
    with pytest.raises(ValueError):
        split_layer_time(1.0, 1.0, 1)


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H100 NVL", None),
    ("NVIDIA H200", 4.8e12), ("NVIDIA A100-SXM4-80GB", 2.0e12), ("NVIDIA A100 80GB PCIe", 2.0e12),
    ("NVIDIA A100-SXM4-40GB", None), ("NVIDIA GeForce RTX 4090", 1.008e12), ("NVIDIA GeForce RTX 3090", 0.936e12),
    ("NVIDIA GeForce RTX 3090 Ti", None), ("Tesla T4", None), ("", None), (None, None),
])
def test_peak_bandwidth_table(name, expected):
    assert peak_bandwidth(name) == expected


def test_infer_shape():
    assert infer_shape("Qwen/Qwen2.5-1.5B-Instruct") == "qwen2.5-1.5b"
    assert infer_shape("Qwen/Qwen2.5-Math-7B") is None
    assert infer_shape("/models/qwen2.5-7b-instruct") == "qwen2.5-7b"
    assert infer_shape("Qwen/Qwen2.5-0.5B") == "qwen2.5-0.5b"
    assert infer_shape("meta-llama/Llama-3.2-1B") is None


def test_kv_bytes_hand_count():
    from lowres_reft.bench.common import shape_config

    config = shape_config("tiny")  # hidden 64, 2 heads -> head_dim 32, 1 KV head
    # 2 (K and V) * 3 layers * 1 head * 32 dims * 4 bytes = 768 bytes per token; mean keys per decode step 8 + 8/2.
    assert kv_bytes_per_step(config, 3, 4, 8, 8, 4) == 768 * 4 * 12


# Tiny test model (conftest): 4 layers, hidden 64, intermediate 128, 2 heads (head_dim 32), 1 KV head,
# vocab 128, tied embeddings, float32, LoRA r=4 on all 7 projections.
LINEARS = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # q k v o gate up down (out, in)
BIASES = 64 + 32 + 32  # q, k, v
LORA = sum(4 * (o + i) * 4 for o, i in LINEARS)  # A (r x in) + B (out x r), float32
NORMS = 2 * 64 * 4


def _nf4_linear_bytes(n: int) -> int:
    # packed 4-bit (n/2 uint8) + absmax per 64-block (uint8, double quant) + NF4 code (16 fp32) + offset (fp32)
    # + nested absmax per 256 absmax values (fp32) + nested code (256 fp32).
    return n // 2 + n // 64 + 16 * 4 + 4 + math.ceil(n / 64 / 256) * 4 + 256 * 4


def test_decode_weight_bytes_hand_count_4bit(tiny_policy):
    policy = tiny_policy(load_in_4bit=True)
    assert policy.model.get_base_model().config.vocab_size == 128
    per_layer = sum(_nf4_linear_bytes(o * i) for o, i in LINEARS) + BIASES * 4 + LORA + NORMS
    assert per_layer == 44088  # written out once by hand too
    got = decode_weight_bytes(policy.model, skip=(1, 2), batch=3)
    assert got["layers"] == 2 * per_layer
    assert got["lm_head"] == 128 * 64 * 4  # the tied (fp32) embedding matrix, read whole by the LM head
    assert got["final_norm"] == 64 * 4
    assert got["embedding_rows"] == 3 * 64 * 4
    assert got["total"] == 2 * per_layer + 128 * 64 * 4 + 64 * 4 + 3 * 64 * 4
    assert decode_weight_bytes(policy.model, skip=(), batch=3)["layers"] == 4 * per_layer


def test_decode_weight_bytes_hand_count_16bit(tiny_policy):
    policy = tiny_policy(load_in_4bit=False)
    per_layer = 4 * (sum(o * i for o, i in LINEARS) + BIASES) + LORA + NORMS
    got = decode_weight_bytes(policy.model, skip=(2,), batch=1)
    assert got["layers"] == 3 * per_layer
    assert got["total"] == 3 * per_layer + 128 * 64 * 4 + 64 * 4 + 64 * 4


# --- the subcommands ----------------------------------------------------------------------------------------


def test_bench_rollout_cpu_tiny(tmp_path, capsys, one_thread):
    out = tmp_path / "rollout.json"
    code = main(["bench", "rollout", *TINY_ARGS, "--batch", "4", "--prompt-len", "8", "--new-tokens", "8",
                 "--skip-ratios", "0.25,0.5", "--repeats", "3", "--warmup", "0", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "kind" in captured.out and "calibration" in captured.out and "t_other" in captured.out
    report = json.loads(out.read_text())
    _check_envelope(report, "bench rollout")
    _check_types(report["summary"], ROLLOUT_SUMMARY, "summary")
    cfg = report["config"]
    assert cfg["skip_ratios"] == [0.0, 0.25, 0.5] and cfg["num_layers"] == 6 and cfg["repeats"] == 3
    rows = report["results"]
    for row in rows:
        _check_types(row, ROLLOUT_ROW, f"results[{row['kind']}]")
        assert len(row["seconds_repeats"]) == 3 and row["seconds"] > 0 and row["tokens_per_s"] > 0
        assert row["tokens"] == row["slot_tokens"] == 4 * 8  # exactly --new-tokens per sequence
        assert row["layers_kept"] + row["layers_skipped"] == row["layers_total"] == 6
        assert len(row["skip"]) == row["layers_skipped"] and len(set(row["skip"])) == len(row["skip"])
        assert row["peak_gpu_mem_bytes"] is None and row["roofline_fraction"] is None and row["max_rss_bytes"] > 0
        assert row["weight_bytes_per_step"] == row["weight_bytes_breakdown"]["total"] > 0
    assert [r["kind"] for r in rows] == ["ours", "generate", "ours", "ours", "calibration"]
    ours = {r["skip_ratio"]: r for r in rows if r["kind"] == "ours"}
    base = ours[0.0]
    assert base["layers_kept"] == 6 and base["skip"] == []
    assert base["speedup_vs_r0"] == pytest.approx(1.0) and base["ideal_speedup"] == pytest.approx(1.0)
    for r in (0.25, 0.5):
        row = ours[r]
        assert row["layers_skipped"] == num_skipped(6, r) > 0 and row["layers_kept"] < base["layers_kept"]
        assert all(1 <= i <= 4 for i in row["skip"])  # protect_first = protect_last = 1
        for key in ("speedup_vs_r0", "ideal_speedup", "fraction_of_ideal"):
            assert row[key] is not None and row[key] > 0 and math.isfinite(row[key]), (r, key, row[key])
        # Fewer layers kept -> fewer weight and KV-cache bytes per decode step (deterministic).
        assert row["weight_bytes_per_step"] < base["weight_bytes_per_step"]
        assert row["kv_bytes_per_step_mean"] < base["kv_bytes_per_step_mean"]
    assert ours[0.5]["layers_kept"] < ours[0.25]["layers_kept"]
    calib = rows[-1]
    assert calib["layers_kept"] == 1 and calib["skip"] == [1, 2, 3, 4, 5] and calib["ideal_speedup"] is None
    assert report["summary"]["ours_r0_speedup_vs_generate"] > 0


def test_bench_step_cpu_tiny(tmp_path, capsys, one_thread):
    out = tmp_path / "step.json"
    sets = ["rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8", "train.micro_batch_size=2"]
    code = main(["bench", "step", "--recipe", "recipes/tiny-cpu.toml", *TINY_ARGS, "--steps", "2", "--warmup", "0",
                 "--prompt-len", "8", "--json", str(out), "--plain-forward-too", *[a for s in sets for a in ("--set", s)]])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "median step" in captured.out
    report = json.loads(out.read_text())
    _check_envelope(report, "bench step")
    _check_types(report["summary"], STEP_SUMMARY, "summary")
    cfg = report["config"]
    assert cfg["model_config"] == "tiny" and cfg["prompts_per_step"] == 2 and cfg["group_size"] == 2
    assert cfg["micro_batch_size"] == 2 and cfg["skip_ratio"] == 0.25
    assert len(report["results"]) == 2
    for row in report["results"]:
        _check_types(row, STEP_ROW, f"results[{row['step']}]")
        assert row["sequences"] == 4 and row["rollout_tokens"] == 4 * 8
        assert row["layers_kept"] == [6 - num_skipped(6, 0.25)]
        assert row["rollout_seconds"] > 0 and row["logprob_backward_seconds"] > 0 and row["optimizer_seconds"] > 0
        assert row["step_seconds"] == pytest.approx(row["rollout_seconds"] + row["logprob_backward_seconds"] + row["optimizer_seconds"])
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0  # random rewards -> non-zero advantages
        assert row["update_skipped"] is False
        assert row["peak_gpu_mem_bytes"] is None
        assert row["backward_only_shared_seconds"] > 0 and row["backward_only_plain_seconds"] > 0
    assert report["summary"]["model_bytes"]["trainable_bytes"] > 0
    assert 0 < report["summary"]["median_rollout_share"] < 1 and report["summary"]["median_plain_over_shared"] > 0
    assert "per-row prompt forward / shared prompt forward" in captured.out and cfg["shared_prompt_forward"] is True


@pytest.mark.parametrize("argv, needle", [
    (["bench", "rollout", "--model-config", "tiny", "--random-weights", "--skip-ratios", "0,1.5"], "[0, 1)"),
    (["bench", "rollout", "--model-config", "tiny", "--random-weights", "--skip-ratios", "a,b"], "comma-separated"),
    (["bench", "rollout", "--model-config", "tiny"], "--random-weights"),
    (["bench", "rollout", "--random-weights"], "--model-config"),
    (["bench", "rollout", "--model-config", "tiny", "--random-weights", "--batch", "0"], "--batch"),
    (["bench", "rollout", "--model-config", "tiny", "--random-weights", "--weights", "merged"], "--weights"),
    (["bench", "rollout", "--model-config", "tiny", "--random-weights", "--engines", "loop,fast"], "--engines"),
    (["bench", "rollout", "--model-config", "tiny", "--random-weights", "--prompt-len", "8", "--prompt-len-spread", "8"],
     "--prompt-len-spread"),
    (["bench", "step", "--recipe", "recipes/tiny-cpu.toml", "--model-config", "tiny"], "--random-weights"),
    (["bench", "step", "--recipe", "missing.toml", "--random-weights"], "missing.toml"),
])
def test_bench_usage_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_bench_rollout_eos_spread_and_groups(tmp_path, capsys, one_thread):
    """Variable prompt lengths, completions ending at EOS (useful < slot tokens), engines x weights side by side, and
    |log rho| at skip 0 per group (merged16 in float32 on the CPU: ~0)."""
    out = tmp_path / "rollout.json"
    code = main(["bench", "rollout", *TINY_ARGS, "--batch", "8", "--prompt-len", "10", "--prompt-len-spread", "6",
                 "--new-tokens", "16", "--eos-mean", "4", "--skip-ratios", "0.25", "--repeats", "1", "--warmup", "0",
                 "--weights", "shared4bit,merged16", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    report = json.loads(out.read_text())
    cfg, rows = report["config"], report["results"]
    assert len(set(cfg["prompt_lens"])) > 1 and min(cfg["prompt_lens"]) >= 4 and max(cfg["prompt_lens"]) <= 10
    assert cfg["eos_ids_count"] == round(1024 / 4) and cfg["weights"] == ["shared4bit", "merged16"]
    assert [(r["kind"], r["weights"]) for r in rows] == [
        ("ours", "shared4bit"), ("generate", "shared4bit"), ("ours", "shared4bit"), ("calibration", "shared4bit"),
        ("ours", "merged16"), ("ours", "merged16"), ("calibration", "merged16")]
    for row in rows:
        _check_types(row, ROLLOUT_ROW, f"results[{row['kind']}]")
        assert 0 < row["tokens"] <= row["slot_tokens"] <= 8 * 16 and row["slot_tokens"] % 8 == 0
    # With a stop set of V/4 tokens, some rows end early: fewer useful than slot tokens somewhere.
    assert any(row["tokens"] < row["slot_tokens"] for row in rows)
    groups = report["summary"]["groups"]
    assert [(g["engine"], g["weights"]) for g in groups] == [("loop", "shared4bit"), ("loop", "merged16")]
    for g in groups:
        assert 0 <= g["log_rho_abs_mean"] <= g["log_rho_abs_max"] < 1e-3 and g["r0_speedup_vs_generate"] > 0
    # The merged copies are counted at 32 bits (CPU float32): more weight bytes per step than the 4-bit base.
    by = {(r["kind"], r["weights"], r["skip_ratio"]): r for r in rows}
    assert by[("ours", "merged16", 0.0)]["weight_bytes_per_step"] > by[("ours", "shared4bit", 0.0)]["weight_bytes_per_step"]


def test_useful_tokens_counts_up_to_the_first_eos():
    from lowres_reft.bench.rollout_calls import useful_tokens

    completions = torch.tensor([[5, 7, 9, 2], [9, 5, 5, 5], [3, 3, 3, 3]])
    assert useful_tokens(completions, [9]) == 3 + 1 + 4
    assert useful_tokens(completions, [9, 3]) == 3 + 1 + 1
    assert useful_tokens(completions, []) == 12
