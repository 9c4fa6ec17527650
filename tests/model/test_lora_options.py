"""peft options in [lora]: rsLoRA, DoRA, modules_to_save, init_lora_weights; validated, trained, exported."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_SETS, randomize_lora, tiny_model_cfg

from lowres_reft.config import ExportConfig, LoraConfig, Recipe, load_recipe, recipe_from_dict
from lowres_reft.config.toml import recipe_to_toml
from lowres_reft.run.checkpoint import write_manifest
from lowres_reft.run.export import export_checkpoint
from lowres_reft.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BASE = dict(r=4, alpha=8, dropout=0.0)
# (id, [lora] options, 4-bit base)
CASES = [
    ("rslora", dict(use_rslora=True), True),
    ("dora", dict(use_dora=True), True),
    ("modules_to_save", dict(modules_to_save=("lm_head",)), True),
    ("gaussian", dict(init_lora_weights="gaussian"), True),
    ("orthogonal", dict(init_lora_weights="orthogonal"), False),
]


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    (root / "_builtin").symlink_to(tiny_cache / "_builtin", target_is_directory=True)
    return root


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _perturb_saved_modules(model, seed: int = 1) -> int:
    """The trainable full copies (modules_to_save) start equal to the base: move them so the test sees them."""
    gen, count = torch.Generator().manual_seed(seed), 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
                count += 1
    return count


@pytest.mark.parametrize("case, options, load_in_4bit", CASES, ids=[c[0] for c in CASES])
def test_option_starts_as_base_and_exports_adapter_and_merged(runs, tmp_path, case, options, load_in_4bit):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowres_reft.model.loader import load_base_model, load_policy, model_path

    lora, model_cfg = LoraConfig(**BASE, **options), tiny_model_cfg(load_in_4bit=load_in_4bit)
    policy = load_policy(model_cfg, lora, cache_dir=runs)
    ids = torch.randint(2, policy.model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with policy.model.disable_adapter():
        base_logits = _logits(policy.model, ids)
    # Every init choice leaves the model unchanged before training (B = 0, BA = 0, DoRA magnitude = |W|).
    torch.testing.assert_close(_logits(policy.model, ids), base_logits, atol=1e-5, rtol=0)
    randomize_lora(policy.model, seed=3)
    if "modules_to_save" in options:
        assert _perturb_saved_modules(policy.model) > 0
    trained = _logits(policy.model, ids)
    assert (trained - base_logits).abs().max() > 1e-3

    ckpt = runs / case / "checkpoint-000001"
    ckpt.mkdir(parents=True)
    policy.model.save_pretrained(ckpt / "adapter")
    recipe = Recipe(model=model_cfg, lora=lora, export=ExportConfig(merged_dtype="float32"))
    (ckpt / "recipe.toml").write_text(recipe_to_toml(recipe), encoding="utf-8")
    write_manifest(ckpt, 1)  # export verifies a checkpoint's checksums first

    adapter_out, merged_out = tmp_path / "adapter", tmp_path / "merged"
    export_checkpoint(ckpt, adapter_out=adapter_out, merged_out=merged_out)
    saved = json.loads((adapter_out / "adapter_config.json").read_text())
    assert saved["use_rslora"] == lora.use_rslora and saved["use_dora"] == lora.use_dora
    assert (saved["modules_to_save"] or []) == list(lora.modules_to_save)

    fresh = PeftModel.from_pretrained(load_base_model(model_cfg, model_path(model_cfg, runs), torch.device("cpu")),
                                      str(adapter_out))
    torch.testing.assert_close(_logits(fresh, ids), trained, atol=1e-5, rtol=0)
    merged = AutoModelForCausalLM.from_pretrained(merged_out)
    assert not any("lora" in name or "modules_to_save" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), trained, atol=1e-4, rtol=0)


def test_rslora_scales_by_alpha_over_sqrt_r(runs):
    from peft.tuners.lora import LoraLayer

    from lowres_reft.model.loader import load_policy

    for use_rslora, expected in ((False, 8 / 4), (True, 8 / 4**0.5)):
        policy = load_policy(tiny_model_cfg(), LoraConfig(**BASE, use_rslora=use_rslora), cache_dir=runs)
        scalings = {m.scaling["default"] for m in policy.model.modules() if isinstance(m, LoraLayer)}
        assert scalings == {expected}


def test_options_train_a_step_with_layer_skipping(tmp_path):
    """DoRA + rsLoRA + a fully trained lm_head through the real loop (gradient checkpointing, nested rollouts)."""
    from safetensors.torch import load_file

    from lowres_reft.run import loop as trainer

    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.toml", TINY_RUN_SETS + [
        "log.progress=none", f"log.output_dir={tmp_path}", "train.steps=1", "eval.before_training=false",
        "lora.use_dora=true", "lora.use_rslora=true", 'lora.modules_to_save=["lm_head"]', "lora.init_lora_weights=gaussian",
        "train.gradient_checkpointing=true", "train.lr=0.01"])
    run = trainer.train(recipe, log=lambda *a: None)
    weights = load_file(run / "checkpoint-last" / "adapter" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in weights)
    assert any("lm_head" in k for k in weights)


@pytest.mark.parametrize("lora, message", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights must be one of 'default', 'gaussian', 'orthogonal'"),
    ({"init_lora_weights": "orthogonal", "r": 3}, 'init_lora_weights = "orthogonal" needs an even r'),
    ({"modules_to_save": ["lm_head", " "]}, "modules_to_save must not hold empty names"),
    ({"use_dora": "yes"}, "use_dora must be true or false"),
])
def test_bad_lora_options_are_one_line_errors(lora, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        recipe_from_dict({"lora": lora})


def test_orthogonal_init_needs_a_16bit_base():
    with pytest.raises(ConfigError, match="needs a 16/32-bit base"):
        recipe_from_dict({"lora": {"init_lora_weights": "orthogonal"}, "model": {"load_in_4bit": True}})
    recipe_from_dict({"lora": {"init_lora_weights": "orthogonal"}, "model": {"load_in_4bit": False}})
