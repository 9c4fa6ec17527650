"""Tiny random-init models of every supported decoder family, shared by the architecture, engine and shared-prompt
tests (fp32, CPU, 4 layers). The LM head is scaled up so logits are realistically large (|logit| ~ tens)."""

import torch
import transformers
from torch import nn

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=4)
ARCHS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "mistral": ("MistralConfig", dict(sliding_window=4)),  # shorter than the sequences: the window matters
    "gemma2": ("Gemma2Config", dict(GEMMA, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", dict(GEMMA, layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                                            "full_attention"])),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
}
# Extra families checked only for the hidden -> logits map (their post-head transforms differ).
HEAD_ONLY = {
    "cohere": ("CohereConfig", dict(logit_scale=0.5)),
    "granite": ("GraniteConfig", dict(logits_scaling=4.0)),
}
QUANTIZED = ["llama", "qwen3", "gemma2"]
PROMPT_LENGTHS = (9, 4, 6)
STEPS = 8


def build(arch: str, table=ARCHS) -> nn.Module:
    name, extra = table[arch]
    config = getattr(transformers, name)(**{**COMMON, **extra})
    config._attn_implementation = "eager" if arch.startswith("gemma") else "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # |logits| ~ tens (random init gives ~1)
    return model


def prompts(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, COMMON["vocab_size"], (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
