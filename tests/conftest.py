import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from lowres_reft.config import LoraConfig, ModelConfig
from lowres_reft.tiny import TINY_NAME


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache dir holding the builtin tiny model (built once per test session)."""
    from lowres_reft.tiny import ensure_tiny_model

    root = tmp_path_factory.mktemp("tiny-cache")
    ensure_tiny_model(root / "_builtin", layers=4, hidden=64)
    return root


def tiny_model_cfg(**overrides) -> ModelConfig:
    values = dict(name=TINY_NAME, dtype="float32", device="cpu", tiny_layers=4, tiny_hidden=64)
    values.update(overrides)
    return ModelConfig(**values)


def randomize_lora(model, seed: int = 0, scale: float = 0.2) -> None:
    """LoRA B starts at zero (adapter = no-op); give it random values so tests see the adapters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


@pytest.fixture
def tiny_policy(tiny_cache):
    from lowres_reft.model import load_policy

    def make(load_in_4bit: bool = True, seed: int = 0, **lora):
        policy = load_policy(tiny_model_cfg(load_in_4bit=load_in_4bit), LoraConfig(r=4, alpha=8, dropout=0.0, **lora), cache_dir=tiny_cache)
        randomize_lora(policy.model, seed)
        return policy

    return make
