"""Model shapes: the sizes that decide memory and speed, read from a transformers config, and the shapes of the
Qwen2.5 models this tool is for (`MODEL_SHAPES`: bench builds random-weight models from them, the memory plan reads
them offline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Qwen2.5 shapes (attention has q/k/v biases, RMSNorm eps 1e-6, rope theta 1e6), and a tiny one for CPU/CI.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1024, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(num_hidden_layers=28, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(num_hidden_layers=36, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


# The decoder linears of a Llama/Qwen-style layer, (in, out) as functions of the shape.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attn_bias: bool  # q/k/v projections with biases (Qwen2)
    max_positions: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object (or a dict of its fields); a multimodal config's text part is used."""
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        text = get("text_config")
        if text is not None and get("hidden_size") is None:
            return cls.from_config(text)
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        model_type = get("model_type", "") or ""
        return cls(layers=get("num_hidden_layers"), hidden=hidden, intermediate=get("intermediate_size"), heads=heads,
                   kv_heads=get("num_key_value_heads") or heads, head_dim=get("head_dim") or hidden // heads,
                   vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings", False)),
                   attn_bias=bool(get("attention_bias", model_type.startswith("qwen2"))),
                   max_positions=get("max_position_embeddings"))

    @property
    def q_out(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each decoder linear of one layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_out), "k_proj": (h, self.kv_out), "v_proj": (h, self.kv_out), "o_proj": (self.q_out, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        """Weights of one layer's decoder linears."""
        return sum(a * b for a, b in self.linears().values())


# Other models of the recipes, as their published config.json files give them: for the memory plan offline (bench
# builds random-weight models of MODEL_SHAPES only, which are all Qwen2-architecture).
OTHER_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-1.7b": dict(model_type="qwen3", num_hidden_layers=28, hidden_size=2048, intermediate_size=6144,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, attention_bias=False, max_position_embeddings=40960),
    "llama-3.2-3b": dict(model_type="llama", num_hidden_layers=28, hidden_size=3072, intermediate_size=8192,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=True, attention_bias=False, max_position_embeddings=131072),
    "gemma-2-2b": dict(model_type="gemma2", num_hidden_layers=26, hidden_size=2304, intermediate_size=9216,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                       tie_word_embeddings=True, attention_bias=False, max_position_embeddings=8192),
}
KNOWN_SHAPES = [*MODEL_SHAPES, *OTHER_SHAPES]


def known_shape(name: str) -> ModelShape:
    """A shape of `MODEL_SHAPES` (Qwen2-architecture: q/k/v biases) or `OTHER_SHAPES` by name."""
    if name in OTHER_SHAPES:
        return ModelShape.from_config(OTHER_SHAPES[name])
    return ModelShape.from_config(dict(MODEL_SHAPES[name], model_type="qwen2", max_position_embeddings=32768))


def infer_shape(model_name: str) -> str | None:
    """The known shape matching a hub name like "Qwen/Qwen2.5-1.5B-Instruct", or None."""
    import re

    name = model_name.lower()
    match = re.search(r"qwen2\.5-(0\.5|1\.5|3|7)b", name)
    if match:
        return f"qwen2.5-{match.group(1)}b"
    for shape, pattern in (("qwen3-1.7b", "qwen3-1.7b"), ("llama-3.2-3b", "llama-3.2-3b"), ("gemma-2-2b", "gemma-2-2b")):
        if pattern in name:
            return shape
    return None
