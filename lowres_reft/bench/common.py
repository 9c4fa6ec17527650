"""What `bench rollout` and `bench step` share: model shapes and random-weight models, timing and peak memory,
environment capture, the JSON report and the table formatting.

Random weights (`--random-weights`, no download): the model is created in bf16 on the target device (never fp32
on the host), saved to a directory (safetensors, plus the builtin character tokenizer) and loaded back through
`model.load_policy`, i.e. the same 4-bit NF4 (or 16-bit with `--no-4bit`) + LoRA path as training.

Peak memory: `torch.cuda.max_memory_allocated` (reset before every measured call) on CUDA, `null` on CPU;
`max_rss_bytes` is the process's maximum resident set size so far (monotone, whole process, also on CUDA).

Heavy imports (torch, transformers) stay inside the functions: the CLI imports this module for `--help`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lowres_reft.bench.roofline import peak_bandwidth
from lowres_reft.model.shapes import MODEL_SHAPES
from lowres_reft.utils.errors import UsageError
from lowres_reft.utils.machine import cpu_name

SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Arguments


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_warmup(warmup: int) -> None:
    if warmup < 0:
        raise UsageError("--warmup must be >= 0")


def set_threads(threads: int | None) -> None:
    """torch's CPU thread count from --threads (None: leave torch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# Random-weight models


def shape_config(shape: str, layers: int | None = None):
    """The Qwen2 config of a built-in shape (`layers` decoder layers instead of the shape's, when given)."""
    from transformers import Qwen2Config

    values = dict(MODEL_SHAPES[shape])
    if layers is not None:
        values["num_hidden_layers"] = layers
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


def build_random_model(shape: str, target: Path, device, seed: int = 0, layers: int | None = None) -> Path:
    """Save a random-weights model of `shape` (bf16, initialized on `device`) + the builtin tokenizer to `target`."""
    import gc
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from lowres_reft.tiny.tokenizer import build_tokenizer
    from lowres_reft.utils.fsutil import publish_dir

    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):  # parameters are created (and initialized) there, in bf16: no fp32 host copy
        model = AutoModelForCausalLM.from_config(shape_config(shape, layers), dtype=torch.bfloat16)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    build_tokenizer().save_pretrained(tmp)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return publish_dir(tmp, target)


class ModelDir:
    """The directory to load: a random-weights build (temp dir unless --cache-dir) or the given name/path."""

    def __init__(self, shape: str | None, name: str | None, cache_dir: str | None, device, seed: int,
                 layers: int | None = None) -> None:
        self.shape, self.name, self.cache_dir, self.device, self.seed = shape, name, cache_dir, device, seed
        self.layers, self._tmp = layers, None

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
        layers = "" if self.layers is None else f"-L{self.layers}"
        return str(build_random_model(self.shape, root / f"random-{self.shape}{layers}-seed{self.seed}", self.device,
                                      self.seed, self.layers))

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


# ----------------------------------------------------------------------------------------------------------
# Timing and memory


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_allocated(device) -> int | None:
    """Peak GPU bytes allocated since the last `reset_peak`, or None on the CPU."""
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def allocated(device) -> int | None:
    """GPU bytes allocated now, or None on the CPU."""
    import torch

    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def max_rss_bytes() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


def timed(fn: Callable[..., Any], device, *args: Any) -> tuple[float, int | None, Any]:
    """(seconds, peak GPU bytes or None, result) of fn(*args), synchronized on CUDA."""
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - start, peak_allocated(device), out


def max_or_none(a: int | None, b: int | None) -> int | None:
    """The larger of two optional peaks (None where there is no GPU)."""
    values = [v for v in (a, b) if v is not None]
    return max(values) if values else None


def median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


# ----------------------------------------------------------------------------------------------------------
# Report: environment, JSON, table cells


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
        dev = {"type": "cpu", "name": cpu_name(), "total_memory_bytes": None, "peak_bandwidth_Bps": None,
               "cuda": None, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    return {"device": dev, "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bnb_version, "peft": peft_version, "python": platform.python_version()}


def make_report(command: str, device, config: dict, summary: dict, results: list[dict],
                schema_version: int = SCHEMA_VERSION) -> dict:
    """The JSON report (`schema_version` 1 unless the command's own is given, see BENCHMARKS.md): environment, run
    config, summary, result rows."""
    env = environment(device)
    return {
        "schema_version": schema_version,
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


def write_json(report: dict, path: str | None) -> None:
    """Write the report to `path` (nothing when None) atomically: a temp file renamed into place."""

    from lowres_reft.run.metrics import json_safe
    from lowres_reft.utils.fsutil import atomic_write_text

    if not path:
        return
    out = Path(path)
    atomic_write_text(out, dumps(json_safe(report)) + "\n")
    print(f"wrote {out}")


def fmt_bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}G"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
