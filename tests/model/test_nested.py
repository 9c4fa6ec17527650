"""The nested behavior policy equals a physically truncated model, shares weights, and skips compute."""

import json

import pytest
import torch
from conftest import tiny_model_cfg
from safetensors.torch import load_file, save_file

from lowres_reft.config import LoraConfig
from lowres_reft.model.layers import decoder_stack
from lowres_reft.model.loader import load_policy
from lowres_reft.model.nested import SkipSchedule, num_skipped, skip_layers, valid_layers
from lowres_reft.rollout.engine import left_pad, sample

PROMPTS = ["Tom has 3 apples.", "Q: 2+2", "Ann gives away 5 of her 9 pens. How many?"]


def _encode(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def _truncated_policy(tiny_cache, full_policy, kept, tmp_path):
    """A physically truncated model: the checkpoint's kept layers renumbered, loaded from disk, same LoRA."""
    src = tiny_cache / "_builtin" / "tiny-qwen2-L4-H64"
    state = load_file(src / "model.safetensors")
    out = {}
    for key, value in state.items():
        if key.startswith("model.layers."):
            idx = int(key.split(".")[2])
            if idx not in kept:
                continue
            key = key.replace(f"model.layers.{idx}.", f"model.layers.{kept.index(idx)}.", 1)
        out[key] = value
    dst = tmp_path / "truncated"
    dst.mkdir()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = len(kept)
    config.pop("layer_types", None)
    (dst / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    trunc = load_policy(tiny_model_cfg(name=str(dst)), LoraConfig(r=4, alpha=8, dropout=0.0), cache_dir=tmp_path)
    full_lora = {n: p for n, p in full_policy.model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, param in trunc.model.named_parameters():
            if "lora_" in name:
                parts = name.split(".")
                at = parts.index("layers")
                parts[at + 1] = str(kept[int(parts[at + 1])])
                param.copy_(full_lora[".".join(parts)])
    return trunc


def _greedy_uncached(model, prompts, pad_id, steps):
    """Reference decoding: the whole sequence re-run every step, no KV cache."""
    ids, mask = left_pad(prompts, pad_id, torch.device("cpu"))
    out = []
    with torch.no_grad():
        for _ in range(steps):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
            tok = logits.argmax(-1)
            out.append(tok)
            ids = torch.cat([ids, tok[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("skip", [(1, 2), (0,), (0, 3), (2,)])
def test_nested_generation_equals_truncated_model(tiny_policy, tiny_cache, tmp_path, skip):
    policy = tiny_policy()
    tok = policy.tokenizer
    prompts = _encode(tok, PROMPTS)
    kept = [i for i in range(4) if i not in skip]
    trunc = _truncated_policy(tiny_cache, policy, kept, tmp_path)
    steps = 12
    kwargs = dict(max_new_tokens=steps, eos_ids=[-1], pad_id=tok.pad_token_id, greedy=True)
    nested_cached = sample(policy.model, prompts, skip=skip, **kwargs).completion_ids
    trunc_cached = sample(trunc.model, prompts, **kwargs).completion_ids
    with skip_layers(policy.model, skip):
        nested_uncached = _greedy_uncached(policy.model, prompts, tok.pad_token_id, steps)
    trunc_uncached = _greedy_uncached(trunc.model, prompts, tok.pad_token_id, steps)
    assert torch.equal(nested_cached, trunc_cached)
    assert torch.equal(nested_cached, nested_uncached)
    assert torch.equal(trunc_cached, trunc_uncached)
    # Same logits, not just the same argmax.
    ids, mask = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad(), skip_layers(policy.model, skip):
        a = policy.model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        b = trunc.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-4, atol=1e-4)
    # And skipping something changes the output (the test can fail).
    full = sample(policy.model, prompts, **kwargs).completion_ids
    with torch.no_grad():
        c = policy.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(a, c)
    del full


def test_skipped_layer_forward_never_called_and_state_restored(tiny_policy):
    policy = tiny_policy()
    stack = decoder_stack(policy.model)
    layers_before = list(stack.layers)
    idx_before = [l.self_attn.layer_idx for l in stack.layers]
    calls = {i: 0 for i in range(4)}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, kw, i=i: calls.__setitem__(i, calls[i] + 1), with_kwargs=True)
        for i, layer in enumerate(stack.layers)
    ]
    # Also count calls on a leaf inside a skipped layer (its MLP would run if the layer were only masked).
    mlp_calls = []
    hooks.append(stack.layers[2].mlp.register_forward_hook(lambda *a: mlp_calls.append(1)))
    prompts = _encode(policy.tokenizer, PROMPTS)
    sample(policy.model, prompts, max_new_tokens=5, eos_ids=[-1], pad_id=0, skip=(0, 2), greedy=True)
    for h in hooks:
        h.remove()
    assert calls[0] == 0 and calls[2] == 0 and not mlp_calls
    assert calls[1] == 5 and calls[3] == 5
    assert list(stack.layers) == layers_before
    assert [l.self_attn.layer_idx for l in stack.layers] == idx_before
    assert stack.config.num_hidden_layers == 4 and len(stack.config.layer_types) == 4


def test_weights_shared_no_extra_parameter_memory(tiny_policy):
    policy = tiny_policy()
    model = policy.model
    ptrs_full = {p.data_ptr() for p in model.parameters()}
    with skip_layers(model, (1, 2)):
        ptrs_nested = {p.data_ptr() for p in model.parameters()}
        bytes_nested = sum(p.numel() * p.element_size() for p in model.parameters())
    # The nested model's parameters are a subset of the target's storage: nothing was allocated.
    assert ptrs_nested < ptrs_full
    assert bytes_nested < sum(p.numel() * p.element_size() for p in model.parameters())


def test_skip_schedule_definitions():
    assert valid_layers(8, 1, 1) == [1, 2, 3, 4, 5, 6]
    assert num_skipped(28, 0.25) == 7 and num_skipped(4, 0.125) == 1 and num_skipped(4, 0.0) == 0
    sched = SkipSchedule(28, 0.25, seed=3)
    draws = [sched.draw() for _ in range(50)]
    assert all(len(d) == 7 and len(set(d)) == 7 and min(d) >= 1 and max(d) <= 26 for d in draws)
    assert len(set(draws)) > 40  # a new subset per batch
    again = SkipSchedule(28, 0.25, seed=3)
    assert [again.draw() for _ in range(50)] == draws  # seeded, reproducible
    # Resuming from a saved state continues the same sequence.
    a = SkipSchedule(28, 0.25, seed=1)
    a.draw()
    state = json.loads(json.dumps(a.state_dict()))
    b = SkipSchedule(28, 0.25, seed=99)
    b.load_state_dict(state)
    assert a.draw() == b.draw()
    assert SkipSchedule(28, 0.0).draw() == ()
    assert SkipSchedule(6, 0.0, schedule="fixed", layers=[3, 1]).draw() == (1, 3)
    with pytest.raises(ValueError):
        SkipSchedule(6, 0.0, schedule="fixed", layers=[0])
    with pytest.raises(ValueError):
        SkipSchedule(4, 0.9, protect_first=1, protect_last=1).draw()
