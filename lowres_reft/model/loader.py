"""Load the target policy: tokenizer + (4-bit NF4) base model + LoRA adapters. Only adapters train.

The reference policy (for the optional KL term) is the same model with adapters disabled
(`with model.disable_adapter():`), so no second copy exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowres_reft.model.builtin import builtin_model_dir
from lowres_reft.model.layers import LayerStack
from lowres_reft.model.logprobs import set_lm_head_fp32
from lowres_reft.utils.errors import UsageError, first_line

if TYPE_CHECKING:
    from lowres_reft.config import LoraConfig, ModelConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Policy:
    model: nn.Module  # a peft PeftModel
    tokenizer: object
    device: torch.device
    trainable_params: int
    total_params: int

    @property
    def num_layers(self) -> int:
        return LayerStack(self.model).count


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError('[model] device = "cuda" but no CUDA GPU is visible; use device = "auto" or "cpu"')
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_path(cfg: ModelConfig, cache_dir: str | Path) -> str:
    """The name/path handed to from_pretrained (a builtin model's directory, made when asked for: `model.builtin`)."""
    check_model_name(cfg)
    builtin = builtin_model_dir(cfg, cache_dir)
    return cfg.name if builtin is None else str(builtin)


def check_model_name(cfg: ModelConfig) -> None:
    """Fail fast (before anything is written or downloaded) on a local model path that does not exist."""
    looks_local = cfg.name.startswith((".", "/", "~")) or cfg.name.count("/") > 1
    if looks_local and not Path(cfg.name).expanduser().exists():
        raise UsageError(f"[model] name: local model path {cfg.name!r} does not exist")


def load_tokenizer(name_or_path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = _hub_call(
        lambda: AutoTokenizer.from_pretrained(name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code),
        name_or_path,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _hub_call(fn, name: str):
    """Run a from_pretrained call, turning "not found / no network" into a one-line UsageError."""
    try:
        return fn()
    except (OSError, ValueError) as err:
        first = first_line(err) or type(err).__name__
        if "attention implementation" in first:  # e.g. Gemma 2 has no SDPA path: not a download problem
            raise UsageError(f"cannot load model {name!r} ({first[:200]}); set [model] attn_implementation = \"eager\"") from None
        if Path(name).expanduser().is_dir():  # a local directory: the network is not the problem
            raise UsageError(f"{name}: not a loadable model directory ({first[:160]})") from None
        raise UsageError(
            f"cannot load model {name!r} ({first[:160]}); it needs network access to the hub or a local copy: "
            f'set [model] name = "/path/to/model"'
        ) from None


def disable_cpu_bf16_repack(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on avx512_bf16 CPUs.

    bnb (CPU backend) converts the packed weight layout during no-grad eval forwards; afterwards
    training forwards fail and eval logits differ from train logits. Returns the number of layers fixed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_base_model(cfg: ModelConfig, name_or_path: str, device: torch.device):
    """The frozen base model, 4-bit NF4 when `cfg.load_in_4bit`, else in `cfg.dtype`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = resolve_dtype(cfg, device)
    kwargs: dict = dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=dtype,
        attn_implementation=cfg.attn_implementation,
        device_map={"": device.index if device.type == "cuda" else "cpu"},
    )
    if cfg.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("[model] load_in_4bit = true needs bitsandbytes (pip install bitsandbytes), or set load_in_4bit = false") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8 if cfg.quant_storage == "uint8" else _DTYPES[cfg.quant_storage],
        )
    model = _hub_call(lambda: AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs), name_or_path)
    disable_cpu_bf16_repack(model)
    return model


def load_policy(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    cache_dir: str | Path = "runs",
    adapter_dir: str | Path | None = None,
    gradient_checkpointing: bool = False,
    seed: int = 0,
) -> Policy:
    """Tokenizer + frozen base + LoRA (fresh from `lora_cfg`, or loaded from `adapter_dir`). Adapter params require
    grad. With neither (`lora_cfg` None, no `adapter_dir`): the plain model, nothing trains (`lowres-reft eval`)."""
    from peft import PeftModel

    device = resolve_device(model_cfg)
    name_or_path = model_path(model_cfg, cache_dir)
    tokenizer = load_tokenizer(name_or_path, model_cfg)
    base = load_base_model(model_cfg, name_or_path, device)
    # Not peft's prepare_model_for_kbit_training: it upcasts every non-quantized tensor (embeddings, norms, LM head)
    # to float32, which makes the residual stream, activations and KV cache float32 too (2x memory and bandwidth).
    # The base stays in the compute dtype; only the LoRA adapters (float32, peft's default) train.
    for param in base.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    elif lora_cfg is not None:
        model = add_lora(base, lora_cfg, seed)
    else:
        model = base
    disable_cpu_bf16_repack(model)
    set_lm_head_fp32(model, model_cfg.lm_head_fp32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_stored_numel(p) for p in model.parameters())
    return Policy(model=model, tokenizer=tokenizer, device=device, trainable_params=trainable, total_params=total)


def add_lora(base: nn.Module, lora_cfg: LoraConfig, seed: int = 0) -> nn.Module:
    """Wrap `base` in fresh LoRA adapters (a peft PeftModel); a listed target that matches no module is a UsageError."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_cfg.target_modules
    if targets != "all-linear":
        check_lora_targets(base, targets)
        targets = list(targets)
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        use_rslora=lora_cfg.use_rslora,
        use_dora=lora_cfg.use_dora,
        modules_to_save=list(lora_cfg.modules_to_save) or None,
        init_lora_weights=True if lora_cfg.init_lora_weights == "default" else lora_cfg.init_lora_weights,
    )
    torch.manual_seed(seed)  # LoRA A init depends only on the seed, not on what ran before
    return get_peft_model(base, peft_cfg)


def check_lora_targets(base: nn.Module, targets: tuple[str, ...]) -> None:
    """Every name in `targets` must be the last part(s) of some module's name (peft's rule), else adapters would
    silently miss layers (e.g. Qwen's q_proj/gate_proj on Phi-3, whose projections are fused qkv_proj/gate_up_proj)."""
    names = [name for name, _ in base.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"})
        raise UsageError(f"[lora] target_modules {missing} match no module of {type(base).__name__} "
                         f"(its linear layers: {', '.join(linear)}); or use target_modules = \"all-linear\"")


def _stored_numel(param: torch.Tensor) -> int:
    """Logical parameter count (a packed 4-bit weight stores two values per uint8)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return param.numel()


def eos_token_ids(policy: Policy) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and the generation config's."""
    ids = {policy.tokenizer.eos_token_id}
    configured = getattr(getattr(policy.model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)
