"""`lowres-reft bench rollout|step`: throughput and memory of nested rollouts and of a full training step.

Both subcommands can build the model from a built-in shape with random weights (`--random-weights`, no
download): the model is created in bf16 on the target device (never fp32 on the host), saved to a directory
(safetensors, plus the builtin character tokenizer) and loaded back through `model.load_policy`, i.e. the same
4-bit NF4 (or 16-bit with `--no-4bit`) + LoRA path as training.

`bench rollout` (per skip ratio r: our sampling loop, `rollout.sample`, with `num_skipped(L, r)` random valid
layers skipped; `model.generate` on the same model at r = 0 as the baseline; every run produces exactly
`--new-tokens` tokens per sequence: `eos_ids=[-1]` for ours, `min_new_tokens = max_new_tokens` for generate).
One repeat measures, in this order: ours r_0, generate, ours r_1, ..., ours r_n, calibration; each item is a
full rollout and a prefill-only rollout (`max_new_tokens = 1`). `--warmup` untimed repeats come first. Ratios
are computed per repeat (numerator and denominator from the same repeat) and the median over repeats reported.

  Ideal layer-proportional speedup. The calibration item runs our loop with all decoder layers skipped except
  layer 0 (time t_1). With t_0 the r = 0 time and L layers, a two-point linear fit gives the per-layer time
  t_layer = (t_0 - t_1) / (L - 1), t_layers = L * t_layer and t_other = t_0 - t_layers (= t_1 - t_layer):
  everything that does not scale with the number of decoder layers (embedding, final norm, LM head,
  log-softmax + sampling, the loop's Python and mask/cache bookkeeping, prefill included). Then
      ideal(r) = t_0 / (t_other + t_layers * (L - k) / L),   k = num_skipped(L, r),
  `speedup_vs_r0` = t_0 / t_r and `fraction_of_ideal` = speedup_vs_r0 / ideal(r).

  Decode roofline. Per-step decode time = (t_full - t_prefill) / (new_tokens - 1), where t_prefill is the
  prefill-only run (prompt forward + 1 sampled token). Bytes of weights read per decode step
  (`decode_weight_bytes`): every parameter of the kept decoder layers as stored (4-bit packed uint8 weights, the
  quant state: absmax, code, offset and the nested absmax/code of double quantization; biases, norms and LoRA
  A/B in their dtype), the LM head weight (read whole each step, tied or not), the final norm, and only the
  `batch` gathered rows of the input embedding. That is a lower bound on the traffic (bitsandbytes dequantizes
  to a 16-bit temporary for batch > 1, the KV cache is read too: reported separately as
  `kv_bytes_per_step_mean`). `roofline_fraction` = bytes / step time / the GPU's peak bandwidth (`null` on CPU
  or an unknown GPU).

`bench step`: a full training step with a recipe's sizes: rollouts (prompts_per_step x group_size sequences of
exactly max_new_tokens, random prompt tokens, nested model with the recipe's skip schedule), random rewards
(uniform, so group advantages are non-zero), then `trainer.apply_updates` (the trainer's own update: log-probs,
loss, backward, clip, optimizer step, LR scheduler; `updates_per_batch` times). Phases: rollout; optimizer =
`optimizer.step()` only, timed with the optimizer's step pre/post hooks; logprob_backward = the rest of
`apply_updates` (log-probs, loss, backward, grad clipping, zero_grad, scheduler). Time and peak memory per phase.

Peak memory: `torch.cuda.max_memory_allocated` (reset before every measured call) on CUDA, `null` on CPU;
`max_rss_bytes` is the process's maximum resident set size so far (monotone, whole process, also on CUDA).
JSON: see BENCHMARKS.md (`schema_version` 1).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lowres_reft.errors import UsageError

SCHEMA_VERSION = 1

# Qwen2.5 shapes (attention has q/k/v biases, RMSNorm eps 1e-6, rope theta 1e6), and a tiny one for CPU/CI.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1024, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(num_hidden_layers=28, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(num_hidden_layers=36, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}

# Peak DRAM bandwidth (bytes/s) of known GPUs, matched on torch.cuda.get_device_name().
GPU_BANDWIDTH = {
    "H100 SXM": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H200": 4.8e12,
    "A100 80GB": 2.0e12,
    "RTX 4090": 1.008e12,
    "RTX 3090": 0.936e12,
}


# ----------------------------------------------------------------------------------------------------------
# Pure functions (unit-tested)


def split_layer_time(t_full: float, t_one: float, num_layers: int) -> tuple[float, float]:
    """(t_other, t_layers) from the time with all L layers (t_full) and with one layer kept (t_one)."""
    if num_layers < 2:
        raise ValueError("need at least 2 layers to separate layer time from the rest")
    per_layer = (t_full - t_one) / (num_layers - 1)
    t_layers = per_layer * num_layers
    return t_full - t_layers, t_layers


def ideal_speedup(t_full: float, t_other: float, t_layers: float, num_layers: int, skipped: int) -> float | None:
    """t_full / (t_other + t_layers * (L - k) / L): the speedup if time scaled exactly with the kept layers."""
    denom = t_other + t_layers * (num_layers - skipped) / num_layers
    if not denom > 0:
        return None
    return t_full / denom


def peak_bandwidth(device_name: str | None) -> float | None:
    """Peak memory bandwidth (B/s) of a GPU from its torch name, or None when unknown (or CPU)."""
    if not device_name:
        return None
    name = device_name.upper().replace("-", " ")
    if "H200" in name:
        return GPU_BANDWIDTH["H200"]
    if "H100" in name:
        if "PCIE" in name:
            return GPU_BANDWIDTH["H100 PCIe"]
        if "NVL" in name:
            return None  # H100 NVL (3.9e12) is not in the table
        return GPU_BANDWIDTH["H100 SXM"]  # "NVIDIA H100 80GB HBM3" is the SXM part
    if "A100" in name and "80GB" in name:
        return GPU_BANDWIDTH["A100 80GB"]
    if "RTX 4090" in name:
        return GPU_BANDWIDTH["RTX 4090"]
    if "RTX 3090" in name and "TI" not in name.split("RTX 3090", 1)[1]:
        return GPU_BANDWIDTH["RTX 3090"]
    return None


def tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState's tensors (absmax, code, offset), nested state included."""
    import torch

    total = 0
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if torch.is_tensor(value):
            total += tensor_bytes(value)
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += quant_state_bytes(nested)
    return total


def stored_bytes(module, seen: set[int] | None = None) -> int:
    """Bytes of a module's parameters as stored (+ 4-bit quant states); a tensor in `seen` is not counted again."""
    seen = set() if seen is None else seen
    total = 0
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += tensor_bytes(param)
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += quant_state_bytes(state)
    return total


def decode_weight_bytes(model, skip: Sequence[int], batch: int) -> dict[str, int]:
    """Bytes of weights one decode step reads with the decoder layers in `skip` bypassed (see module doc)."""
    from lowres_reft.model import decoder_stack

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    stack = decoder_stack(model)
    skip_set = set(skip)
    seen: set[int] = set()
    layers = sum(stored_bytes(layer, seen) for i, layer in enumerate(stack.layers) if i not in skip_set)
    head = stored_bytes(inner.lm_head, seen)
    norm = stored_bytes(stack.norm, seen)
    emb = stack.embed_tokens.weight
    rows = batch * emb.shape[-1] * emb.element_size()
    return {"layers": layers, "lm_head": head, "final_norm": norm, "embedding_rows": rows,
            "total": layers + head + norm + rows}


def kv_bytes_per_step(config, kept_layers: int, batch: int, prompt_len: int, new_tokens: int, element_size: int) -> int:
    """Mean bytes of KV cache read per decode step: decode step i (1..n-1) attends to prompt_len + i keys/values."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * kept_layers * config.num_key_value_heads * head_dim * element_size
    return int(per_token * batch * (prompt_len + new_tokens / 2))


def median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def infer_shape(model_name: str) -> str | None:
    """The built-in shape matching a hub name like "Qwen/Qwen2.5-1.5B-Instruct", or None."""
    import re

    match = re.search(r"qwen2\.5-(0\.5|1\.5|3|7)b", model_name.lower())
    return f"qwen2.5-{match.group(1)}b" if match else None


# ----------------------------------------------------------------------------------------------------------
# CLI


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="measure rollout throughput and training-step time/memory")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    shapes = ", ".join(MODEL_SHAPES)

    rollout = sub.add_parser("rollout", help="tokens/s of nested rollouts per skip ratio vs model.generate")
    rollout.add_argument("--model-config", choices=list(MODEL_SHAPES), help=f"built-in shape ({shapes})")
    rollout.add_argument("--model", help="load this model (hub name or local path) instead of a built-in shape")
    rollout.add_argument("--random-weights", action="store_true", help="random weights for --model-config (no download)")
    rollout.add_argument("--batch", type=int, default=64, help="sequences per rollout (default 64)")
    rollout.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default 128)")
    rollout.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence, exactly (default 256)")
    rollout.add_argument("--skip-ratios", default="0,0.1,0.25,0.5", help="comma-separated skip ratios (0 is always measured)")
    rollout.add_argument("--repeats", type=int, default=3, help="measured repeats; medians are reported (default 3)")
    rollout.add_argument("--warmup", type=int, default=1, help="untimed repeats first (default 1)")
    rollout.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", help="16-bit base instead of 4-bit NF4")
    rollout.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                         help="compute dtype (auto: bf16/fp16 on CUDA, float32 on CPU)")
    rollout.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    rollout.add_argument("--lora-r", type=int, default=16, help="LoRA rank on all decoder projections (default 16)")
    rollout.add_argument("--greedy", action="store_true", help="greedy decoding (default: temperature sampling)")
    rollout.add_argument("--temperature", type=float, default=1.0)
    rollout.add_argument("--no-generate", dest="baseline", action="store_false", help="skip the model.generate baseline")
    rollout.add_argument("--protect-first", type=int, default=1)
    rollout.add_argument("--protect-last", type=int, default=1)
    rollout.add_argument("--seed", type=int, default=0)
    rollout.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    rollout.add_argument("--cache-dir", help="keep the random-weights model here for reuse (default: a temp dir, deleted)")
    rollout.add_argument("--json", dest="json_out", help="write the report here")

    step = sub.add_parser("step", help="time and peak memory of full training steps, by phase")
    step.add_argument("--recipe", default="recipes/qwen-1.5b-gsm8k.toml", help="recipe giving the sizes")
    step.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a recipe key (repeatable)")
    step.add_argument("--model-config", choices=list(MODEL_SHAPES), help="built-in shape (default: from the recipe's model name)")
    step.add_argument("--random-weights", action="store_true", help="random weights of the built-in shape (no download)")
    step.add_argument("--steps", type=int, default=3, help="measured steps (default 3)")
    step.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    step.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens per prompt (default 128)")
    step.add_argument("--seed", type=int, default=0)
    step.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    step.add_argument("--cache-dir", help="keep the random-weights model here for reuse (default: a temp dir, deleted)")
    step.add_argument("--json", dest="json_out", help="write the report here")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.bench_command == "rollout":
        return _run_rollout(args)
    return _run_step(args)


# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def shape_config(shape: str):
    from transformers import Qwen2Config

    values = dict(MODEL_SHAPES[shape])
    big = shape != "tiny"
    return Qwen2Config(
        **values,
        max_position_embeddings=32768 if big else 4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=1,  # the builtin character tokenizer's ids (saved next to the weights)
        pad_token_id=0,
    )


def build_random_model(shape: str, target: Path, device, seed: int = 0) -> Path:
    """Save a random-weights model of `shape` (bf16, initialized on `device`) + the builtin tokenizer to `target`."""
    import gc
    import os
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from lowres_reft.tiny import build_tokenizer

    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):  # parameters are created (and initialized) there, in bf16: no fp32 host copy
        model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=torch.bfloat16)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    build_tokenizer().save_pretrained(tmp)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _allocated(device) -> int | None:
    import torch

    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def max_rss_bytes() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


def timed(fn: Callable[..., Any], device, *args: Any) -> tuple[float, int | None, Any]:
    """(seconds, peak GPU bytes or None, result) of fn(*args), synchronized on CUDA."""
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - start, _peak(device), out


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict[str, Any]:
    import os
    import platform

    import torch
    import transformers

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        dev = {"type": "cuda", "name": name, "total_memory_bytes": int(props.total_memory),
               "peak_bandwidth_Bps": peak_bandwidth(name), "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads()}
    else:
        dev = {"type": "cpu", "name": _cpu_name(), "total_memory_bytes": None, "peak_bandwidth_Bps": None,
               "cuda": None, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    return {"device": dev, "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bnb_version, "peft": peft_version, "python": platform.python_version()}


def _report(command: str, device, config: dict, summary: dict, results: list[dict]) -> dict:
    env = environment(device)
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "device": env.pop("device"),
        **env,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "summary": summary,
        "results": results,
    }


def dumps(obj: Any, level: int = 0) -> str:
    """JSON with one key per line, but lists of scalars (and dicts of scalars) kept on one line."""
    import json

    pad, inner = " " * level, " " * (level + 1)
    scalar = (str, int, float, bool, type(None))
    if isinstance(obj, dict) and obj and not all(isinstance(v, scalar) for v in obj.values()):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and not all(isinstance(v, scalar) for v in obj):
        return "[\n" + ",\n".join(inner + dumps(v, level + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def _write_json(report: dict, path: str | None) -> None:
    import os

    from lowres_reft.metrics import json_safe

    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(dumps(json_safe(report)) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


class _ModelDir:
    """The directory to load: a random-weights build (temp dir unless --cache-dir) or the given name/path."""

    def __init__(self, shape: str | None, name: str | None, cache_dir: str | None, device, seed: int) -> None:
        self.shape, self.name, self.cache_dir, self.device, self.seed = shape, name, cache_dir, device, seed
        self._tmp = None

    def __enter__(self) -> str:
        import tempfile

        if self.shape is None:
            return self.name
        if self.cache_dir:
            root = Path(self.cache_dir)
            root.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="lowres-reft-bench-")
            root = Path(self._tmp.name)
        return str(build_random_model(self.shape, root / f"random-{self.shape}-seed{self.seed}", self.device, self.seed))

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _fmt_bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}G"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _model_bytes(model) -> dict[str, int]:
    """Parameter bytes of the loaded policy: 4-bit (packed + quant state), other frozen, trainable (LoRA)."""
    quant, frozen, trainable, seen = 0, 0, 0, set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        state = getattr(param, "quant_state", None)
        if state is not None:
            quant += tensor_bytes(param) + quant_state_bytes(state)
        elif param.requires_grad:
            trainable += tensor_bytes(param)
        else:
            frozen += tensor_bytes(param)
    return {"quantized_bytes": quant, "frozen_other_bytes": frozen, "trainable_bytes": trainable,
            "total_bytes": quant + frozen + trainable}


# ----------------------------------------------------------------------------------------------------------
# bench rollout


def _parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--skip-ratios {text!r}: expected comma-separated numbers, e.g. 0,0.1,0.25,0.5") from None
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad:
        raise UsageError(f"--skip-ratios: {bad} not in [0, 1)")
    return sorted(set([0.0] + ratios))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _run_rollout(args: argparse.Namespace) -> int:
    ratios = _parse_ratios(args.skip_ratios)
    _check_positive(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                    lora_r=args.lora_r)
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    if args.temperature <= 0 and not args.greedy:
        raise UsageError("--temperature must be > 0 (or use --greedy)")
    if (args.model_config is None) == (args.model is None):
        raise UsageError("bench rollout: give --model-config SHAPE --random-weights, or --model NAME_OR_PATH")
    if args.model_config is not None and not args.random_weights:
        raise UsageError("--model-config builds a model from a shape and needs --random-weights (or use --model PATH)")

    import torch

    from lowres_reft.config import LoraConfig, ModelConfig
    from lowres_reft.model import load_policy, resolve_device, resolve_dtype
    from lowres_reft.nested import SkipSchedule
    from lowres_reft.rollout import sample

    base_cfg = ModelConfig(dtype=args.dtype, load_in_4bit=args.load_in_4bit, device=args.device)
    device = resolve_device(base_cfg)
    dtype = resolve_dtype(base_cfg, device)
    lora = LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    with _ModelDir(args.model_config, args.model, args.cache_dir, device, args.seed) as name:
        cfg = ModelConfig(name=name, dtype=args.dtype, load_in_4bit=args.load_in_4bit, device=args.device)
        policy = load_policy(cfg, lora, seed=args.seed)
    model, num_layers = policy.model, policy.num_layers
    if num_layers < 2:
        raise UsageError("bench rollout needs a model with at least 2 decoder layers")
    config = model.get_base_model().config
    pad_id = policy.tokenizer.pad_token_id
    eos_id = policy.tokenizer.eos_token_id
    skips: dict[float, tuple[int, ...]] = {}
    for r in ratios:
        try:
            skips[r] = SkipSchedule(num_layers, r, args.protect_first, args.protect_last, seed=args.seed).draw()
        except ValueError as err:
            raise UsageError(f"--skip-ratios {r}: {err}") from None
    calib_skip = tuple(range(1, num_layers))  # keep layer 0 only
    gen = torch.Generator().manual_seed(args.seed)
    prompt_tokens = torch.randint(2, config.vocab_size, (args.batch, args.prompt_len), generator=gen)
    prompts = prompt_tokens.tolist()

    def ours(skip: tuple[int, ...], n: int):
        def call():
            g = torch.Generator(device=device).manual_seed(args.seed)
            out = sample(model, prompts, max_new_tokens=n, eos_ids=[-1], pad_id=pad_id, temperature=args.temperature,
                         skip=skip, generator=g, greedy=args.greedy)
            return out.num_tokens
        return call

    ids = prompt_tokens.to(device)
    mask = torch.ones_like(ids)

    def generate(n: int):
        def call():
            torch.manual_seed(args.seed)
            kwargs = dict(do_sample=False) if args.greedy else dict(do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                         pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True, **kwargs)
            finally:
                model.train(was_training)
            return int(out.shape[0] * (out.shape[1] - ids.shape[1]))
        return call

    items: list[tuple[str, float | None, tuple[int, ...]]] = [("ours", 0.0, skips[0.0])]
    if args.baseline:
        items.append(("generate", 0.0, ()))
    items += [("ours", r, skips[r]) for r in ratios if r > 0]
    items.append(("calibration", None, calib_skip))
    n = args.new_tokens
    times: dict[int, list[float]] = {i: [] for i in range(len(items))}
    prefill: dict[int, list[float]] = {i: [] for i in range(len(items))}
    peaks: dict[int, list[int | None]] = {i: [] for i in range(len(items))}
    tokens: dict[int, int] = {}
    print(f"bench rollout: {num_layers} layers, batch {args.batch}, prompt {args.prompt_len}, new tokens {n}, "
          f"ratios {ratios}, {args.warmup} warm-up + {args.repeats} repeats on {device}", flush=True)
    for rep in range(args.warmup + args.repeats):
        for i, (kind, r, skip) in enumerate(items):
            full = generate(n) if kind == "generate" else ours(skip, n)
            first = generate(1) if kind == "generate" else ours(skip, 1)
            seconds, peak, count = timed(full, device)
            pre_seconds, pre_peak, _ = timed(first, device)
            if rep >= args.warmup:
                times[i].append(seconds)
                prefill[i].append(pre_seconds)
                peaks[i].append(_max_opt(peak, pre_peak))
                tokens[i] = count
        label = "warm-up" if rep < args.warmup else f"repeat {rep - args.warmup + 1}/{args.repeats}"
        print(f"  {label} done", flush=True)
    # Per-repeat derived quantities, then medians.
    i0 = 0
    i_cal = len(items) - 1
    splits = [split_layer_time(times[i0][k], times[i_cal][k], num_layers) for k in range(args.repeats)]
    bandwidth = peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    elt = torch.finfo(dtype).bits // 8
    results = []
    for i, (kind, r, skip) in enumerate(items):
        k = len(skip)
        step_times = [(t - p) / (n - 1) if n > 1 else None for t, p in zip(times[i], prefill[i])]
        step_s = median(step_times)
        speedups = ideals = fracs = None
        if kind == "ours":
            speedups = [times[i0][j] / times[i][j] for j in range(args.repeats)]
            ideals = [ideal_speedup(times[i0][j], *splits[j], num_layers, k) for j in range(args.repeats)]
            fracs = [s / d if d else None for s, d in zip(speedups, ideals)]
        wbytes = decode_weight_bytes(model, skip, args.batch)
        achieved = wbytes["total"] / step_s if step_s else None
        seconds = median(times[i])
        results.append({
            "kind": kind,
            "skip_ratio": r,
            "layers_total": num_layers,
            "layers_skipped": k,
            "layers_kept": num_layers - k,
            "skip": list(skip),
            "seconds": seconds,
            "seconds_repeats": times[i],
            "prefill_seconds": median(prefill[i]),
            "decode_step_seconds": step_s,
            "tokens": tokens[i],
            "tokens_per_s": tokens[i] / seconds,
            "speedup_vs_r0": median(speedups) if speedups else None,
            "ideal_speedup": median(ideals) if ideals else None,
            "fraction_of_ideal": median(fracs) if fracs else None,
            "weight_bytes_per_step": wbytes["total"],
            "weight_bytes_breakdown": wbytes,
            "kv_bytes_per_step_mean": kv_bytes_per_step(config, num_layers - k, args.batch, args.prompt_len, n, elt),
            "achieved_weight_bandwidth_Bps": achieved,
            "roofline_fraction": achieved / bandwidth if achieved and bandwidth else None,
            "peak_gpu_mem_bytes": max(peaks[i]) if device.type == "cuda" else None,
            "max_rss_bytes": max_rss_bytes(),
        })
    t_other = median([s[0] for s in splits])
    t_layers = median([s[1] for s in splits])
    summary = {
        "t_other_s": t_other,
        "t_layers_s": t_layers,
        "t_other_share": median([s[0] / times[i0][j] for j, s in enumerate(splits)]),
        "ours_r0_speedup_vs_generate": (median([times[1][j] / times[i0][j] for j in range(args.repeats)])
                                        if args.baseline else None),
        "model_bytes": _model_bytes(model),
        "peak_gpu_mem_bytes": max((row["peak_gpu_mem_bytes"] for row in results), default=None) if device.type == "cuda" else None,
        "max_rss_bytes": max_rss_bytes(),
    }
    run_config = {
        "model_config": args.model_config, "model": args.model, "random_weights": bool(args.random_weights),
        "num_layers": num_layers, "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size, "tie_word_embeddings": bool(config.tie_word_embeddings),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": n, "skip_ratios": ratios,
        "repeats": args.repeats, "warmup": args.warmup, "load_in_4bit": bool(args.load_in_4bit), "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "lora_r": args.lora_r, "greedy": bool(args.greedy),
        "temperature": None if args.greedy else args.temperature, "baseline_generate": bool(args.baseline),
        "protect_first": args.protect_first, "protect_last": args.protect_last, "seed": args.seed,
        "trainable_params": policy.trainable_params, "total_params": policy.total_params,
    }
    report = _report("bench rollout", device, run_config, summary, results)
    print(_rollout_table(report))
    _write_json(report, args.json_out)
    return 0


def _rollout_table(report: dict) -> str:
    head = (f"{'kind':<11} {'r':>5} {'kept':>5} {'seconds':>9} {'tok/s':>10} {'speedup':>8} {'ideal':>7} {'frac':>6} "
            f"{'step ms':>8} {'W GB/step':>9} {'GB/s':>8} {'roofline':>8} {'peak mem':>9}")
    lines = [head, "-" * len(head)]
    for row in report["results"]:
        lines.append(
            f"{row['kind']:<11} {_fmt(row['skip_ratio'], '.2f'):>5} {row['layers_kept']:>5} {row['seconds']:>9.3f} "
            f"{row['tokens_per_s']:>10.1f} {_fmt(row['speedup_vs_r0'], '.3f'):>8} {_fmt(row['ideal_speedup'], '.3f'):>7} "
            f"{_fmt(row['fraction_of_ideal'], '.3f'):>6} "
            f"{_fmt(row['decode_step_seconds'] and row['decode_step_seconds'] * 1e3, '.2f'):>8} "
            f"{row['weight_bytes_per_step'] / 1e9:>9.4f} "
            f"{_fmt(row['achieved_weight_bandwidth_Bps'] and row['achieved_weight_bandwidth_Bps'] / 1e9, '.1f'):>8} "
            f"{_fmt(row['roofline_fraction'], '.3f'):>8} {_fmt_bytes(row['peak_gpu_mem_bytes']):>9}")
    s = report["summary"]
    lines.append(f"t_other {s['t_other_s']:.4f}s ({100 * s['t_other_share']:.1f}% of r=0), t_layers {s['t_layers_s']:.4f}s; "
                 f"ours r=0 vs generate: {_fmt(s['ours_r0_speedup_vs_generate'], '.3f')} (time ratio generate/ours); "
                 f"max RSS {_fmt_bytes(s['max_rss_bytes'])}; device {report['device']['name']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# bench step


def _run_step(args: argparse.Namespace) -> int:
    _check_positive(steps=args.steps, prompt_len=args.prompt_len)
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")

    import dataclasses

    import torch

    from lowres_reft import loss as loss_fn
    from lowres_reft.config import load_recipe
    from lowres_reft.distributed import Dist
    from lowres_reft.model import load_policy, resolve_device
    from lowres_reft.tiny import TINY_NAME
    from lowres_reft.trainer import (ScoredBatch, apply_updates, build_lr_scheduler, build_optimizer, build_skip_schedule,
                                     global_totals, rollout_rows)

    recipe = load_recipe(args.recipe, args.overrides)
    shape = args.model_config
    if shape is None and args.random_weights and recipe.model.name != TINY_NAME:
        shape = infer_shape(recipe.model.name)
        if shape is None:
            raise UsageError(f"bench step: no built-in shape for model {recipe.model.name!r}; give --model-config "
                             f"({', '.join(MODEL_SHAPES)})")
    if shape is not None and not args.random_weights:
        raise UsageError("--model-config builds a model from a shape and needs --random-weights")
    device = resolve_device(recipe.model)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lowres-reft-bench-") as scratch, \
            _ModelDir(shape, recipe.model.name, args.cache_dir, device, args.seed) as name:
        if shape is not None:
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name=name))
        policy = load_policy(recipe.model, recipe.lora, cache_dir=args.cache_dir or scratch,
                             gradient_checkpointing=recipe.train.gradient_checkpointing, seed=recipe.train.seed)
    model, num_layers = policy.model, policy.num_layers
    allocated_after_load = _allocated(device)
    ro, tr, beh = recipe.rollout, recipe.train, recipe.behavior
    schedule = build_skip_schedule(num_layers, recipe, tr.seed)
    start_ratio = schedule.skip_ratio
    optimizer = build_optimizer(policy, recipe)
    scheduler = build_lr_scheduler(optimizer, recipe, (args.warmup + args.steps) * recipe.loss.updates_per_batch)
    generator = torch.Generator(device=device).manual_seed(tr.seed)
    cpu_gen = torch.Generator().manual_seed(args.seed)
    vocab = model.get_base_model().config.vocab_size
    n_seq = ro.prompts_per_step * ro.group_size
    print(f"bench step: {recipe.source}, {num_layers} layers, {tr.grad_accum} x {ro.prompts_per_step} prompts x "
          f"{ro.group_size} completions x {ro.max_new_tokens} tokens, skip ratio {start_ratio}, micro-batch "
          f"{tr.micro_batch_size}, {args.warmup} warm-up + {args.steps} steps on {device}", flush=True)

    def rollout_phase() -> list:
        batches = []
        for _ in range(tr.grad_accum):
            prompts = torch.randint(2, vocab, (ro.prompts_per_step, args.prompt_len), generator=cpu_gen).tolist()
            rollout = rollout_rows(policy, recipe, prompts, schedule.draw(), generator, eos_ids=[-1])  # full length
            rewards = torch.rand(n_seq, generator=cpu_gen).to(rollout.completion_ids.device)
            advantages = loss_fn.group_advantages(rewards, ro.group_size, recipe.loss.advantage_scale,
                                                  recipe.loss.advantage_eps)
            batches.append(ScoredBatch(rollout, rewards, advantages, [False] * n_seq))
        return batches

    class OptimizerClock:
        """Times `optimizer.step()` (and its peak memory) inside `trainer.apply_updates` via the optimizer's step hooks."""

        def __init__(self) -> None:
            self.seconds, self.peak_before, self.peak, self._start = 0.0, None, None, 0.0
            optimizer.register_step_pre_hook(self.pre)
            optimizer.register_step_post_hook(self.post)

        def reset(self) -> None:
            self.seconds, self.peak_before, self.peak = 0.0, None, None

        def pre(self, *_) -> None:
            _sync(device)
            self.peak_before = _max_opt(self.peak_before, _peak(device))  # the backward phase's peak so far
            _reset_peak(device)
            self._start = time.perf_counter()

        def post(self, *_) -> None:
            _sync(device)
            self.seconds += time.perf_counter() - self._start
            self.peak = _max_opt(self.peak, _peak(device))
            _reset_peak(device)

    clock = OptimizerClock()
    state = {"skipped_updates": 0}
    single = Dist()

    def update_phase(batches: list) -> tuple:
        totals = [global_totals(b, recipe, single) for b in batches]
        return apply_updates(policy, recipe, batches, totals, optimizer, scheduler, state, single)

    results = []
    for index in range(args.warmup + args.steps):
        t_rollout, peak_rollout, batches = timed(rollout_phase, device)
        clock.reset()
        t_update, peak_rest, (outs, grad_norm, stepped) = timed(update_phase, device, batches)
        t_opt, peak_opt = clock.seconds, clock.peak
        t_backward = t_update - t_opt
        peak_backward = _max_opt(clock.peak_before, peak_rest)
        loss_value = sum(r["loss"] for r in outs) / len(outs)
        tokens = sum(b.rollout.num_tokens for b in batches)
        if index < args.warmup:
            continue
        peaks = [p for p in (peak_rollout, peak_backward, peak_opt) if p is not None]
        results.append({
            "step": index - args.warmup + 1,
            "skip_sets": [list(b.rollout.skip) for b in batches],
            "layers_total": num_layers,
            "layers_kept": [num_layers - len(b.rollout.skip) for b in batches],
            "sequences": n_seq * len(batches),
            "rollout_tokens": tokens,
            "rollout_seconds": t_rollout,
            "rollout_tokens_per_s": tokens / t_rollout,
            "logprob_backward_seconds": t_backward,
            "optimizer_seconds": t_opt,
            "step_seconds": t_rollout + t_backward + t_opt,
            "peak_gpu_mem_rollout_bytes": peak_rollout,
            "peak_gpu_mem_logprob_backward_bytes": peak_backward,
            "peak_gpu_mem_optimizer_bytes": peak_opt,
            "peak_gpu_mem_bytes": max(peaks) if peaks else None,
            "max_rss_bytes": max_rss_bytes(),
            "loss": loss_value,
            "grad_norm": grad_norm,
            "update_skipped": not stepped,
        })
    phases = ("rollout_seconds", "logprob_backward_seconds", "optimizer_seconds", "step_seconds")
    summary = {f"median_{key}": median([row[key] for row in results]) for key in phases}
    summary["median_rollout_tokens_per_s"] = median([row["rollout_tokens_per_s"] for row in results])
    for key in ("peak_gpu_mem_rollout_bytes", "peak_gpu_mem_logprob_backward_bytes", "peak_gpu_mem_optimizer_bytes",
                "peak_gpu_mem_bytes"):
        summary[key] = max(row[key] for row in results) if device.type == "cuda" else None
    summary["allocated_after_load_bytes"] = allocated_after_load
    summary["model_bytes"] = _model_bytes(model)
    summary["max_rss_bytes"] = max_rss_bytes()
    run_config = {
        "recipe": recipe.source, "overrides": list(args.overrides), "model_config": shape,
        "model": None if shape else recipe.model.name, "random_weights": bool(args.random_weights or shape),
        "num_layers": num_layers, "load_in_4bit": recipe.model.load_in_4bit, "dtype": recipe.model.dtype,
        "device": str(device), "prompts_per_step": ro.prompts_per_step, "group_size": ro.group_size,
        "max_new_tokens": ro.max_new_tokens, "prompt_len": args.prompt_len, "rollout_micro_batch": ro.micro_batch,
        "skip_ratio": start_ratio, "schedule": beh.schedule, "grad_accum": tr.grad_accum,
        "micro_batch_size": tr.micro_batch_size, "gradient_checkpointing": tr.gradient_checkpointing,
        "optimizer": tr.optimizer, "optimizer_class": type(optimizer).__name__, "updates_per_batch": recipe.loss.updates_per_batch,
        "correction": recipe.loss.correction, "kl_beta": recipe.loss.kl_beta, "lora_r": recipe.lora.r,
        "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
        "trainable_params": policy.trainable_params, "total_params": policy.total_params,
    }
    report = _report("bench step", device, run_config, summary, results)
    print(_step_table(report))
    _write_json(report, args.json_out)
    return 0


def _max_opt(a: int | None, b: int | None) -> int | None:
    values = [v for v in (a, b) if v is not None]
    return max(values) if values else None


def _step_table(report: dict) -> str:
    head = (f"{'step':>4} {'rollout s':>10} {'tok/s':>9} {'logp+bwd s':>11} {'optim s':>8} {'total s':>8} "
            f"{'mem roll':>9} {'mem bwd':>9} {'mem opt':>9} {'loss':>9} {'kept':>8}")
    lines = [head, "-" * len(head)]
    for row in report["results"]:
        lines.append(
            f"{row['step']:>4} {row['rollout_seconds']:>10.3f} {row['rollout_tokens_per_s']:>9.1f} "
            f"{row['logprob_backward_seconds']:>11.3f} {row['optimizer_seconds']:>8.3f} {row['step_seconds']:>8.3f} "
            f"{_fmt_bytes(row['peak_gpu_mem_rollout_bytes']):>9} {_fmt_bytes(row['peak_gpu_mem_logprob_backward_bytes']):>9} "
            f"{_fmt_bytes(row['peak_gpu_mem_optimizer_bytes']):>9} {_fmt(row['loss'], '.4f'):>9} "
            f"{','.join(str(k) for k in row['layers_kept']):>8}")
    s = report["summary"]
    lines.append(f"median step {s['median_step_seconds']:.3f}s (rollout {s['median_rollout_seconds']:.3f}s, "
                 f"logprob+backward {s['median_logprob_backward_seconds']:.3f}s, optimizer {s['median_optimizer_seconds']:.3f}s); "
                 f"peak GPU memory {_fmt_bytes(s['peak_gpu_mem_bytes'])}; max RSS {_fmt_bytes(s['max_rss_bytes'])}; "
                 f"device {report['device']['name']}")
    return "\n".join(lines)
