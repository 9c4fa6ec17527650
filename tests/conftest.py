import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from lowres_reft.config import LoraConfig, ModelConfig
from lowres_reft.model.builtin import TINY_NAME


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache dir holding the builtin tiny model (built once per test session)."""
    from lowres_reft.tiny.builder import ensure_tiny_model

    root = tmp_path_factory.mktemp("tiny-cache")
    ensure_tiny_model(root / "_builtin", layers=4, hidden=64)
    return root


# `--set` overrides that shrink recipes/tiny-cpu.toml to a few seconds per step (no warm-up, tiny model, short texts).
TINY_RUN_SETS = [
    "model.tiny_layers=4", "model.tiny_hidden=64", "rollout.prompts_per_step=2", "rollout.group_size=4",
    "rollout.max_new_tokens=8", "eval.max_new_tokens=8", "data.max_eval_samples=4", "data.builtin_train_size=64",
    "data.builtin_test_size=8", "lora.r=4", "warmup.steps=0", "model.tiny_pretrain_steps=0",
]


def start_cli_then_signal(args: list[str], cwd, at_line: str, sig: int, timeout: float, stderr=None):
    """Start `python -m lowres_reft *args` (stdout piped, unbuffered), read its output until a line starts with
    `at_line`, send it `sig` and return the process (the rest of stdout unread)."""
    import subprocess
    import sys
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lowres_reft", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL if stderr is None else stderr, text=True, env=env, cwd=cwd)
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith(at_line):
            proc.send_signal(sig)
            return proc
        assert time.time() < deadline
    raise AssertionError(f"the run ended before printing a line starting with {at_line!r}")


def as_set_args(overrides) -> list[str]:
    """["a.b=1", ...] -> ["--set", "a.b=1", ...]"""
    return [arg for item in overrides for arg in ("--set", item)]


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
    from lowres_reft.model.loader import load_policy

    def make(load_in_4bit: bool = True, seed: int = 0, **lora):
        policy = load_policy(tiny_model_cfg(load_in_4bit=load_in_4bit), LoraConfig(r=4, alpha=8, dropout=0.0, **lora), cache_dir=tiny_cache)
        randomize_lora(policy.model, seed)
        return policy

    return make


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need CUDA: skipped where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
