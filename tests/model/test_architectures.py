"""Architecture matrix: layer skipping, cached sampling and log-probs are exact on every supported decoder family.

Tiny random-init models built from transformers config classes (fp32, CPU, 4 layers, left-padded batches).
The LM head is scaled up so logits are realistically large (|logit| ~ tens): there a forgotten post-head
transform (Gemma's soft-capping) moves log-probs by nats, not by rounding noise.
"""

import copy

import pytest
import torch
import transformers
from arch_models import ARCHS, COMMON, HEAD_ONLY, QUANTIZED, STEPS, build, prompts
from conftest import randomize_lora
from torch import nn

from lowres_reft.config import LoraConfig, ModelConfig
from lowres_reft.model.layers import decoder_stack
from lowres_reft.model.loader import add_lora, load_base_model
from lowres_reft.model.logprobs import completion_logp, head_logits
from lowres_reft.model.nested import skip_layers
from lowres_reft.rollout.engine import left_pad, sample
from lowres_reft.utils.errors import UsageError

SKIP = (0, 2)  # includes layer 0, whose cache layer the sequence length is read from
def truncated(model: nn.Module, kept: list[int]) -> nn.Module:
    """A physically smaller model: a config with len(kept) layers (and their layer_types), the kept layers'
    weights renumbered 0..K-1, every other weight copied."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    small = transformers.AutoModelForCausalLM.from_config(config).eval()
    small.load_state_dict(_renumbered(model.state_dict(), kept), strict=True)
    return small


def _renumbered(state: dict, kept: list[int]) -> dict:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if "layers" in parts:
            at = parts.index("layers")
            idx = int(parts[at + 1])
            if idx not in kept:
                continue
            parts[at + 1] = str(kept.index(idx))
        out[".".join(parts)] = value
    return out


def real_token_logits(model: nn.Module, ids, mask) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[mask.bool()]


GREEDY = dict(max_new_tokens=STEPS, eos_ids=[COMMON["eos_token_id"]], pad_id=0, greedy=True)


def assert_same_greedy(ours: torch.Tensor, reference_model: nn.Module) -> None:
    """Our cached greedy completions == `reference_model.generate()`'s, token for token (EOS, then padding)."""
    ids, mask = left_pad(prompts(), 0, torch.device("cpu"))
    with torch.no_grad():
        ref = reference_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                                       pad_token_id=0, eos_token_id=COMMON["eos_token_id"])[:, ids.shape[1]:]
    assert torch.equal(ours, nn.functional.pad(ref, (0, STEPS - ref.shape[1]), value=0))


def check_skip_equals_truncated(model, small, atol=1e-5):
    """(a) logits under skip_layers == the truncated model's; (b) cached sampling == its generate()."""
    ids, mask = left_pad(prompts(), 0, torch.device("cpu"))
    with skip_layers(model, SKIP):
        nested = real_token_logits(model, ids, mask)
    torch.testing.assert_close(nested, real_token_logits(small, ids, mask), rtol=0, atol=atol)
    assert not torch.allclose(nested, real_token_logits(model, ids, mask), atol=1e-2)  # the skip did something
    assert_same_greedy(sample(model, prompts(), skip=SKIP, **GREEDY).completion_ids, small)


def check_behavior_equals_recomputed(model, atol=5e-5):
    """(c) behavior log-probs recorded while sampling == the training recompute, at skip 0 and with a skip set.

    float32 rounding only (the cached decode and the full recompute sum in different orders): the largest gap over
    every architecture, measured 2026-12-06 under ATEN_CPU_CAPABILITY = default / avx2 / avx512 x 1 / 2 threads, was
    0.94e-5 to 1.08e-5 (avx2: 1.08e-5, olmo2); atol 5e-5 leaves a margin for other CPUs."""
    for skip in ((), SKIP):
        batch = sample(model, prompts(1), max_new_tokens=STEPS, eos_ids=[2], pad_id=0, temperature=0.9, skip=skip,
                       generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), skip_layers(model, skip):
            logp = completion_logp(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                   batch.completion_mask, temperature=0.9, chunk=5)
        m = batch.completion_mask.bool()
        assert m.sum() >= 6
        torch.testing.assert_close(logp[m], batch.behavior_logp[m], rtol=0, atol=atol)


@pytest.mark.parametrize("arch", list(ARCHS) + list(HEAD_ONLY))
def test_head_logits_equal_model_logits(arch):
    """The one hidden -> logits map applies exactly what the model's forward applies after its decoder stack."""
    model = build(arch, ARCHS if arch in ARCHS else HEAD_ONLY)
    ids, mask = left_pad(prompts(), 0, torch.device("cpu"))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = decoder_stack(model)(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        ours = head_logits(model, hidden)[mask.bool()]
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert ours.abs().max() > 5.0  # realistic logit sizes, where a missing transform shows


@pytest.mark.parametrize("arch", ["gemma2", "granite"])
def test_unknown_logit_transform_is_refused(arch, monkeypatch):
    """An architecture whose post-head transform head_logits does not know is a one-line error at load time."""
    import lowres_reft.model.logprobs as logprobs

    model = build(arch, ARCHS if arch in ARCHS else HEAD_ONLY)
    logprobs.check_head_logits(model)
    monkeypatch.setattr(logprobs, "_post_head", lambda causal_lm: None)  # as if the transform were unknown
    with pytest.raises(UsageError) as err:
        logprobs.check_head_logits(model)
    assert type(model).__name__ in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_skip_layers_equals_truncated_model(arch):
    model = build(arch)
    small = truncated(model, [i for i in range(4) if i not in SKIP])
    check_skip_equals_truncated(model, small)
    # With no skip the sampler equals the full model's own generate().
    assert_same_greedy(sample(model, prompts(), **GREEDY).completion_ids, model)


@pytest.mark.parametrize("arch", ARCHS)
def test_behavior_logp_equals_recomputed(arch):
    check_behavior_equals_recomputed(build(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_full_model_restored_after_skip_also_on_error(arch):
    model = build(arch)
    stack = decoder_stack(model)
    ids, mask = left_pad(prompts(), 0, torch.device("cpu"))
    before = real_token_logits(model, ids, mask)

    def state():  # layer objects, each layer's layer_idx values, layer count, layer types
        return (list(stack.layers), [[m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
                                     for layer in stack.layers], stack.config.num_hidden_layers,
                copy.copy(getattr(stack.config, "layer_types", None)))

    full = state()
    with skip_layers(model, SKIP):
        assert len(stack.layers) == 2 and state() != full
    assert state() == full
    with pytest.raises(RuntimeError, match="inside"):
        with skip_layers(model, SKIP):
            sample(model, prompts(), max_new_tokens=2, eos_ids=[-1], pad_id=0, greedy=True)
            raise RuntimeError("inside the context")
    assert state() == full and full[2] == 4
    assert torch.equal(real_token_logits(model, ids, mask), before)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    """Saved tiny checkpoints (full and truncated) per architecture, loaded back in 4-bit NF4."""
    root = tmp_path_factory.mktemp("arch-4bit")

    def make(arch: str):
        full_dir, small_dir = root / arch, root / f"{arch}-truncated"
        if not full_dir.exists():
            model = build(arch)
            model.save_pretrained(full_dir)
            truncated(model, [i for i in range(4) if i not in SKIP]).save_pretrained(small_dir)
        return full_dir, small_dir

    return make


def _nf4_lora(path, lora_from=None, kept=None):
    # Gemma 2 has no SDPA kernel in transformers (attention logit soft-capping): eager, as its recipe sets.
    cfg = ModelConfig(name=str(path), dtype="float32", device="cpu", load_in_4bit=True,
                      attn_implementation="eager" if "gemma" in path.name else "sdpa")
    model = add_lora(load_base_model(cfg, str(path), torch.device("cpu")), LoraConfig(r=4, alpha=8, dropout=0.0))
    if lora_from is None:
        randomize_lora(model)
    else:  # the same adapters as the full model's kept layers
        source = dict(lora_from.named_parameters())
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    parts = name.split(".")
                    at = parts.index("layers")
                    parts[at + 1] = str(kept[int(parts[at + 1])])
                    param.copy_(source[".".join(parts)])
    return model.eval()


@pytest.mark.parametrize("arch", QUANTIZED)
def test_nf4_lora_skip_sampling_and_logp(arch, quantized_dir):
    import bitsandbytes as bnb

    full_dir, small_dir = quantized_dir(arch)
    kept = [i for i in range(4) if i not in SKIP]
    model = _nf4_lora(full_dir)
    small = _nf4_lora(small_dir, lora_from=model, kept=kept)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    check_skip_equals_truncated(model, small)
    # bitsandbytes' 4-bit matmul rounds differently for a one-token decoding step than for the whole sequence at
    # once, so sampled vs recomputed agree to ~1e-4 here (exact in fp32 above; a missed transform is nats off).
    check_behavior_equals_recomputed(model, atol=2e-4)


def test_unsupported_attention_kernel_is_a_one_line_error(quantized_dir):
    full_dir, _ = quantized_dir("gemma2")
    cfg = ModelConfig(name=str(full_dir), dtype="float32", device="cpu", load_in_4bit=False, attn_implementation="sdpa")
    with pytest.raises(UsageError) as err:
        load_base_model(cfg, str(full_dir), torch.device("cpu"))
    assert 'attn_implementation = "eager"' in str(err.value) and "network" not in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_lora_adapts_every_projection(arch):
    model = add_lora(build(arch), LoraConfig(r=4, alpha=8, dropout=0.0))
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    layer_linear = {name.rsplit(".", 1)[-1] for name, m in decoder_stack(build(arch)).layers.named_modules()
                    if isinstance(m, nn.Linear)}
    assert layer_linear <= adapted and "lm_head" not in adapted  # (MoE: also the experts and router)
    if arch == "qwen2":  # the same seven projections as the former default list
        assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    if arch == "phi3":
        assert {"qkv_proj", "gate_up_proj"} <= adapted


def test_lora_target_list_matching_nothing_is_a_usage_error():
    qwen_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    with pytest.raises(UsageError) as err:
        add_lora(build("phi3"), LoraConfig(target_modules=qwen_names))
    message = str(err.value)
    assert "q_proj" in message and "Phi3ForCausalLM" in message and "qkv_proj" in message and "\n" not in message
    add_lora(build("phi3"), LoraConfig(target_modules=("qkv_proj", "o_proj")))  # names that exist are fine


def test_model_without_decoder_stack_is_a_one_line_error():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UsageError) as err:
        sample(model, [[3, 4]], max_new_tokens=2, eos_ids=[-1], pad_id=0, skip=(1,), greedy=True)
    assert "GPT2LMHeadModel" in str(err.value) and "\n" not in str(err.value)


def test_recompute_forward_builds_no_kv_cache():
    model = build("qwen2")
    seen = []
    decoder_stack(model).register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("use_cache")), with_kwargs=True)
    batch = sample(model, prompts(), max_new_tokens=3, eos_ids=[-1], pad_id=0, greedy=True)
    seen.clear()
    completion_logp(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, 1.0)
    assert seen == [False]
