"""Export: adapter copy and merged (dequantized-4-bit + LoRA) 16/32-bit model."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora, tiny_model_cfg

from lowres_reft.config import ExportConfig, LoraConfig, Recipe
from lowres_reft.config.toml import recipe_to_toml
from lowres_reft.run.checkpoint import write_manifest
from lowres_reft.run.export import export_checkpoint
from lowres_reft.utils.errors import UsageError

LORA = dict(r=4, alpha=8, dropout=0.0)


def _batch(vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(2, vocab_size, (2, 10), generator=gen)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def make_checkpoint(runs: Path, run: str, load_in_4bit: bool = True, target_modules=None, seed: int = 0):
    """A fake trainer checkpoint under `runs/<run>/` (runs holds the tiny model cache); returns
    (checkpoint dir, input ids, logits with adapters, logits with adapters disabled)."""
    from lowres_reft.model.loader import load_policy

    lora = LoraConfig(**LORA, **({"target_modules": tuple(target_modules)} if target_modules else {}))
    model_cfg = tiny_model_cfg(load_in_4bit=load_in_4bit)
    policy = load_policy(model_cfg, lora, cache_dir=runs)
    randomize_lora(policy.model, seed)
    ckpt = runs / run / "checkpoint-000001"
    ckpt.mkdir(parents=True)
    policy.model.save_pretrained(ckpt / "adapter")
    recipe = Recipe(model=model_cfg, lora=lora, export=ExportConfig(merged_dtype="float32"))
    (ckpt / "recipe.toml").write_text(recipe_to_toml(recipe), encoding="utf-8")
    (ckpt / "trainer_state.json").write_text("{}", encoding="utf-8")  # other trainer files: ignored
    write_manifest(ckpt, 1)
    os.symlink("checkpoint-000001", runs / run / "checkpoint-last")
    ids = _batch(policy.model.config.vocab_size)
    with_adapter = _logits(policy.model, ids)
    with policy.model.disable_adapter():
        without = _logits(policy.model, ids)
    return ckpt, ids, with_adapter, without


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    """A runs/ dir of our own whose tiny-model cache (runs/_builtin) is the session's tiny model."""
    root = tmp_path_factory.mktemp("runs")
    (root / "_builtin").symlink_to(tiny_cache / "_builtin", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def ckpt4(runs):
    return make_checkpoint(runs, "run-4bit")


def _load_merged(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


def test_merged_float32_matches_adapter_logits(ckpt4, tmp_path):
    ckpt, ids, with_adapter, without = ckpt4
    out = tmp_path / "merged"
    written = export_checkpoint(ckpt, merged_out=out)  # dtype from the recipe's [export]: float32
    assert written == [out]
    assert _siblings(out) == ["merged"]  # no temp dir left behind

    merged = _load_merged(out)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    got = _logits(merged, ids)
    torch.testing.assert_close(got, with_adapter, atol=1e-4, rtol=0)
    # the merge is really there: without the adapters the logits are clearly different
    assert (got - without).abs().max() > 100 * 1e-4


def test_merged_uses_dequantized_base_not_original_weights(ckpt4, runs, tmp_path):
    """The full-precision tiny model + the same adapter gives other logits than the 4-bit-trained export."""
    from lowres_reft.model.loader import load_policy

    ckpt, ids, with_adapter, _ = ckpt4
    out = tmp_path / "merged"
    export_checkpoint(ckpt, merged_out=out)
    fp = load_policy(tiny_model_cfg(load_in_4bit=False), LoraConfig(**LORA), cache_dir=runs, adapter_dir=ckpt / "adapter")
    fp_logits = _logits(fp.model, ids)
    got = _logits(_load_merged(out), ids)
    assert (got - fp_logits).abs().max() > 10 * (got - with_adapter).abs().max()


def test_merged_is_a_plain_model(ckpt4, tmp_path):
    from transformers import AutoTokenizer

    ckpt, *_ = ckpt4
    out = tmp_path / "merged"
    export_checkpoint(ckpt, merged_out=out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert not any("quant" in key for key in config)
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert not (out / "adapter_config.json").exists()

    merged = _load_merged(out)
    assert getattr(merged.config, "quantization_config", None) is None
    assert not any("bitsandbytes" in type(m).__module__ or "peft" in type(m).__module__ for m in merged.modules())
    assert not any("lora" in name for name, _ in merged.named_parameters())

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("1+2=3").input_ids) == "1+2=3"


def test_merged_bfloat16(ckpt4, tmp_path):
    ckpt, ids, with_adapter, without = ckpt4
    out = tmp_path / "merged-bf16"
    export_checkpoint(ckpt, merged_out=out, merged_dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = _load_merged(out)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    got = _logits(merged.float(), ids)  # bf16 weights, float32 arithmetic: only the weight rounding differs
    err = (got - with_adapter).abs().max()
    assert err < 0.05
    assert err < (with_adapter - without).abs().max() / 5


def test_adapter_export_loads_on_fresh_4bit_base(ckpt4, runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from lowres_reft.model.loader import load_base_model, model_path

    ckpt, ids, with_adapter, _ = ckpt4
    out = tmp_path / "nested" / "adapter"  # parent dirs are created
    assert export_checkpoint(ckpt, adapter_out=out) == [out]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"

    cfg = tiny_model_cfg()
    base = load_base_model(cfg, model_path(cfg, runs), torch.device("cpu"))
    model = PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(_logits(model, ids), with_adapter, atol=1e-6, rtol=0)


def test_both_outputs_via_checkpoint_last_symlink_into_empty_dir(ckpt4, tmp_path, capfd):
    ckpt, ids, with_adapter, _ = ckpt4
    adapter_out, merged_out = tmp_path / "a", tmp_path / "m"
    merged_out.mkdir()  # an existing empty dir is fine
    capfd.readouterr()
    written = export_checkpoint(ckpt.parent / "checkpoint-last", adapter_out=str(adapter_out), merged_out=str(merged_out))
    assert capfd.readouterr() == ("", "")  # prints nothing (no progress bars either); the CLI prints
    assert written == [adapter_out, merged_out]
    assert (adapter_out / "adapter_model.safetensors").is_file()
    torch.testing.assert_close(_logits(_load_merged(merged_out), ids), with_adapter, atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "m"]


def test_subset_targets_and_untargeted_4bit_layers_dequantized(runs, tmp_path):
    ckpt, ids, with_adapter, without = make_checkpoint(runs, "run-qv", target_modules=("q_proj", "v_proj"), seed=3)
    out = tmp_path / "merged"
    export_checkpoint(ckpt, merged_out=out)
    got = _logits(_load_merged(out), ids)
    torch.testing.assert_close(got, with_adapter, atol=1e-4, rtol=0)
    assert (got - without).abs().max() > 100 * 1e-4


def test_merged_from_16bit_base(runs, tmp_path):
    ckpt, ids, with_adapter, without = make_checkpoint(runs, "run-fp", load_in_4bit=False, seed=5)
    out = tmp_path / "merged"
    export_checkpoint(ckpt, merged_out=out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    got = _logits(_load_merged(out), ids)
    torch.testing.assert_close(got, with_adapter, atol=1e-4, rtol=0)
    assert (got - without).abs().max() > 100 * 1e-4


# ---------------------------------------------------------------------------------------------- errors


def test_missing_checkpoint(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="checkpoint not found.*train first"):
        export_checkpoint(tmp_path / "runs" / "x" / "checkpoint-last", merged_out=out)
    assert not out.exists()


def test_dir_without_adapter(tmp_path):
    ckpt = tmp_path / "runs" / "x" / "checkpoint-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "recipe.toml").write_text("", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"not a checkpoint \(no adapter/\)") as err:
        export_checkpoint(ckpt, adapter_out=out)
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_dir_without_recipe(ckpt4, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UsageError, match="no recipe.toml"):
        export_checkpoint(ckpt, adapter_out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_output_requested(ckpt4):
    with pytest.raises(UsageError, match="nothing to do"):
        export_checkpoint(ckpt4[0])


def test_existing_nonempty_output_is_never_overwritten(ckpt4, tmp_path):
    ckpt = ckpt4[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    free = tmp_path / "free"
    for kwargs in (dict(merged_out=out), dict(adapter_out=out), dict(adapter_out=free, merged_out=out)):
        with pytest.raises(UsageError, match="not empty"):
            export_checkpoint(ckpt, **kwargs)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert not free.exists()  # validated before anything was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_is_a_file(ckpt4, tmp_path):
    out = tmp_path / "out"
    out.write_text("x", encoding="utf-8")
    with pytest.raises(UsageError, match="not a directory"):
        export_checkpoint(ckpt4[0], adapter_out=out)
    assert out.read_text() == "x"


def test_bad_merged_dtype(ckpt4, tmp_path):
    with pytest.raises(UsageError, match="merged dtype"):
        export_checkpoint(ckpt4[0], merged_out=tmp_path / "m", merged_dtype="int8")
    assert not (tmp_path / "m").exists()


def test_failure_leaves_nothing_behind(ckpt4, tmp_path, monkeypatch):
    import lowres_reft.run.export as export

    def broken(ckpt, recipe, cache_dir, dtype, tmp):
        (tmp / "config.json").write_text("{}", encoding="utf-8")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_write_merged", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(ckpt4[0], adapter_out=tmp_path / "a", merged_out=tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("err", [OSError(28, "No space left on device"), PermissionError(13, "Permission denied")])
def test_full_or_read_only_file_system_is_one_line_and_leaves_nothing(ckpt4, tmp_path, monkeypatch, capsys, err):
    import lowres_reft.run.export as export
    from lowres_reft.cli import main

    def failing(ckpt, recipe, cache_dir, dtype, tmp):
        (tmp / "config.json").write_text("{}", encoding="utf-8")
        raise err

    monkeypatch.setattr(export, "_write_merged", failing)
    code = main(["export", str(ckpt4[0]), "--adapter", str(tmp_path / "a"), "--merged", str(tmp_path / "m")])
    message = capsys.readouterr().err
    assert code == 2 and err.strerror in message and len(message.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_parent_is_refused_before_loading(ckpt4, tmp_path, monkeypatch):
    import lowres_reft.run.export as export

    monkeypatch.setattr(export.os, "access", lambda path, mode: Path(path) != tmp_path)  # a read-only tmp_path
    with pytest.raises(UsageError, match="is not a writable directory"):
        export_checkpoint(ckpt4[0], merged_out=tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
