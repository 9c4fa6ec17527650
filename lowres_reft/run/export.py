"""Export a training checkpoint: the LoRA adapter alone, and/or a merged 16-bit model.

A checkpoint directory (`runs/<run>/checkpoint-000010/`, or the `checkpoint-last` symlink) holds
`adapter/` (peft `save_pretrained` output) and `recipe.toml` (the full recipe, which says how the base
model was loaded).

* adapter export: a copy of `adapter/` plus the tokenizer, loadable with
  `PeftModel.from_pretrained(base, adapter_out)`.
* merged export: the LoRA deltas merged into the *dequantized* 4-bit base weights -- the exact weights
  the adapters were trained against, not the original full-precision hub weights -- and saved, never
  re-quantized, in `merged_dtype` (default: the recipe's `[export] merged_dtype`). peft's
  `merge_and_unload()` on a bitsandbytes `Linear4bit` would re-quantize the merged weight to 4 bits, so
  4-bit layers are first replaced by plain `nn.Linear`s holding `dequantize_4bit(weight)` and merged there
  (in float32). The result loads with plain `AutoModelForCausalLM.from_pretrained(merged_out)`.

Both write a README.md model card (front matter for the Hub, base model, steps, final eval with its 95%
interval, the recipe; see modelcard.py).

The builtin tiny model (`model.name = "builtin:tiny"`) is cached under the run's output dir
(`recipe.log.output_dir`). The export resolves that cache dir as the directory that contains the run,
i.e. `checkpoint.resolve().parent.parent` (`runs/` for `runs/<run>/checkpoint-000010`), so it finds the
same tiny model (it is built deterministically if missing).

Outputs are written atomically: into `<out>.tmp-<pid>`, renamed into place at the end; on any failure
the temporary directories are removed and nothing is left at the output paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lowres_reft.run.modelcard import write_model_card
from lowres_reft.utils.errors import UsageError
from lowres_reft.utils.fsutil import nearest_existing, writable_dir

MERGED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TRAIN_HINT = "train first with `lowres-reft run <recipe>`"


def export_checkpoint(
    checkpoint: str | Path,
    adapter_out: str | Path | None = None,
    merged_out: str | Path | None = None,
    merged_dtype: str | None = None,
) -> list[Path]:
    """Export `checkpoint` to `adapter_out` and/or `merged_out`; returns the paths written.

    Everything is validated before anything is written; problems raise a one-line `UsageError`
    (or `ConfigError` for a broken `recipe.toml`). Output directories must not exist or be empty.
    """
    ckpt = _check_checkpoint(Path(checkpoint))
    if adapter_out is None and merged_out is None:
        raise UsageError("export: nothing to do; give an adapter output dir and/or a merged output dir")
    outputs = [Path(p) for p in (adapter_out, merged_out) if p is not None]
    for out in outputs:
        _check_output(out)
    if len(outputs) == 2 and os.path.abspath(outputs[0]) == os.path.abspath(outputs[1]):
        raise UsageError(f"{outputs[0]}: the adapter and the merged model need different output directories")

    from lowres_reft.config import load_recipe

    recipe = load_recipe(ckpt / "recipe.toml")
    dtype_name = merged_dtype or recipe.export.merged_dtype
    if dtype_name not in MERGED_DTYPES:
        raise UsageError(f"export: merged dtype {dtype_name!r} is not one of {', '.join(MERGED_DTYPES)}")

    cache_dir = ckpt.resolve().parent.parent
    jobs = []
    if adapter_out is not None:
        jobs.append((Path(adapter_out), lambda tmp: _write_adapter(ckpt, recipe, cache_dir, tmp)))
    if merged_out is not None:
        dtype = MERGED_DTYPES[dtype_name]
        jobs.append((Path(merged_out), lambda tmp: _write_merged(ckpt, recipe, cache_dir, dtype, tmp)))
    with _quiet():
        return _write_atomically(jobs)


@contextlib.contextmanager
def _quiet():
    """No transformers progress bars (loading / writing shards) while exporting; the CLI does the talking."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------- validation


def _check_checkpoint(ckpt: Path) -> Path:
    if not ckpt.exists():
        raise UsageError(f"{ckpt}: checkpoint not found; {_TRAIN_HINT}")
    if not ckpt.is_dir():
        raise UsageError(f"{ckpt}: not a checkpoint directory; {_TRAIN_HINT}")
    if not (ckpt / "adapter" / "adapter_config.json").is_file():
        raise UsageError(f"{ckpt}: not a checkpoint (no adapter/); {_TRAIN_HINT}")
    if not (ckpt / "recipe.toml").is_file():
        raise UsageError(f"{ckpt}: not a checkpoint (no recipe.toml); {_TRAIN_HINT}")
    from lowres_reft.run.checkpoint import check_checkpoint

    check_checkpoint(ckpt)  # never export a truncated or altered file
    return ckpt


def _check_output(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"{out}: output path exists and is not a directory; choose a new path")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"{out}: output directory exists and is not empty; choose a new path or remove it")
    existing = nearest_existing(out.parent)
    if not writable_dir(existing):  # the temp dir is made beside `out`
        raise UsageError(f"{out}: cannot write there ({existing} is not a writable directory)")


# ------------------------------------------------------------------------------------------- writing


def _write_atomically(jobs) -> list[Path]:
    """Run each `fill(tmp_dir)` into `<out>.tmp-<pid>`, then rename all into place (all or nothing)."""
    temps: list[Path] = []
    placed: list[Path] = []
    try:
        for out, fill in jobs:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            temps.append(tmp)
            tmp.mkdir()
            fill(tmp)
        for (out, _), tmp in zip(jobs, temps):
            _check_output(out)  # nobody wrote there meanwhile
            if out.is_dir():
                out.rmdir()  # empty: replace it
            tmp.rename(out)
            placed.append(out)
    except BaseException as err:
        for path in temps + placed:
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(err, OSError):  # read-only or full file system: one line, nothing left behind
            where = err.filename or (temps[-1] if temps else jobs[0][0])
            raise UsageError(f"export: cannot write {where} ({err.strerror or type(err).__name__}); nothing was written") from None
        raise
    return [out for out, _ in jobs]


def _load_tokenizer(recipe, cache_dir: Path):
    from lowres_reft.model.loader import load_tokenizer, model_path

    return load_tokenizer(model_path(recipe.model, cache_dir), recipe.model)


def _write_adapter(ckpt: Path, recipe, cache_dir: Path, tmp: Path) -> None:
    for item in (ckpt / "adapter").iterdir():
        if item.is_dir():
            shutil.copytree(item, tmp / item.name)
        else:
            shutil.copy2(item, tmp / item.name)
    _load_tokenizer(recipe, cache_dir).save_pretrained(tmp)
    write_model_card(tmp, ckpt, recipe, "adapter")


def _write_merged(ckpt: Path, recipe, cache_dir: Path, dtype: torch.dtype, tmp: Path) -> None:
    from lowres_reft.model.loader import load_policy

    model_cfg = recipe.model
    if model_cfg.device == "cuda" and not torch.cuda.is_available():
        model_cfg = dataclasses.replace(model_cfg, device="cpu")  # merging works on the CPU too
    policy = load_policy(model_cfg, recipe.lora, cache_dir, adapter_dir=ckpt / "adapter")
    peft_model = policy.model
    peft_model.eval()
    with torch.no_grad():
        merged = merge_dequantized(peft_model)
        merged = merged.to(dtype)
    merged.config.dtype = dtype
    merged.save_pretrained(tmp, safe_serialization=True)
    policy.tokenizer.save_pretrained(tmp)
    write_model_card(tmp, ckpt, recipe, "merged", merged_dtype=str(dtype).removeprefix("torch."))


# ------------------------------------------------------------------------------------------- merging


def _dequantized_weight(weight) -> torch.Tensor:
    """The float weight a bnb 4-bit layer computes with (in its compute/storage dtype)."""
    import bitsandbytes.functional as F

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # undo bnb's CPU repacking (see model.py)
        data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
        weight.data, weight.quant_state = data, state
    return F.dequantize_4bit(data, state)


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return linear


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def merge_dequantized(peft_model) -> nn.Module:
    """Merge a (possibly 4-bit) PeftModel's active LoRA adapters; returns the plain transformers model.

    4-bit bitsandbytes layers are dequantized to `nn.Linear` (LoRA-wrapped ones get W + delta in
    float32, the same arithmetic as peft's merge minus the re-quantization); the remaining LoRA layers
    (a 16/32-bit base) go through peft's ordinary `merge_and_unload()`. The quantization settings are
    removed from the model and its config. Call under `torch.no_grad()`.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    for name, module in list(peft_model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        weight = _dequantized_weight(base.weight).float()
        bias = base.bias.float() if base.bias is not None else None
        for adapter in module.active_adapters:
            if adapter not in module.lora_A or adapter in module.merged_adapters:
                continue
            variant = getattr(module, "lora_variant", {}).get(adapter)
            if variant is None:
                weight = weight + module.get_delta_weight(adapter).float()
            else:  # e.g. DoRA: peft's own merge arithmetic on the dequantized weight
                weight = variant.merge_safe(module, adapter, weight).float()
            if getattr(module, "lora_bias", {}).get(adapter):
                bias = bias + module.lora_B[adapter].bias.float()
        _set_submodule(peft_model, name, _plain_linear(weight, bias))

    model = peft_model.merge_and_unload()

    # 4-bit layers that had no adapter (not in target_modules): plain dequantization.
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            bias = module.bias.float() if module.bias is not None else None
            _set_submodule(model, name, _plain_linear(_dequantized_weight(module.weight).float(), bias))

    _drop_quantization(model)
    return model


def _drop_quantization(model: nn.Module) -> None:
    """Forget that the model was loaded quantized, so it can be cast and saved as an ordinary model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit", "_weight_conversions"):
        if attr in vars(model):
            delattr(model, attr)
    if "is_quantized" in vars(model):
        model.is_quantized = False
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
