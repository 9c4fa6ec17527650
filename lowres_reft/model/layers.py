"""Where a causal LM keeps its decoder layers: the one place that knows the layout.

Every module that reaches into the decoder stack (layer skipping, the sampling loop, the log-prob recompute,
warm-up, the roofline byte count, the tiny model's LayerDrop) goes through `LayerStack`, so supporting a model whose
layers live elsewhere touches this file only. Today's layout (Llama/Qwen/Mistral/Gemma/Phi-3 in transformers):
`CausalLM.model` is the stack, with `.layers` (a ModuleList), `.embed_tokens`, `.norm` and `.config`; the LM head is
`CausalLM.lm_head`; a peft wrapper is unwrapped first.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lowres_reft.utils.errors import UsageError


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers causal LM (`...ForCausalLM`) inside a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers (`.layers`) and the config, e.g. `Qwen2Model`."""
    inner = unwrap(model)
    stack = getattr(inner, "model", inner)
    if not isinstance(getattr(stack, "layers", None), nn.ModuleList):
        raise UsageError(f"{type(inner).__name__}: unsupported architecture (no model.layers decoder stack to skip layers in)")
    return stack


def cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.2x renamed `past_key_values` to `cache`; use whichever the decoder stack takes."""
    params = inspect.signature(decoder_stack(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class LayerStack:
    """A view of `model`'s decoder stack: its layers, their count and types, and the modules around them."""

    def __init__(self, model: nn.Module) -> None:
        self.causal_lm = unwrap(model)
        self.module = decoder_stack(model)

    @property
    def layers(self) -> nn.ModuleList:
        return self.module.layers

    @property
    def count(self) -> int:
        return len(self.module.layers)

    @property
    def config(self):
        return self.module.config

    @property
    def layer_types(self) -> list[str] | None:
        """Per-layer attention kinds (e.g. "sliding_attention") where the config lists them, else None."""
        return getattr(self.config, "layer_types", None)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.module.embed_tokens

    @property
    def norm(self) -> nn.Module:
        return self.module.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.lm_head

    @contextmanager
    def kept(self, skip: Sequence[int]) -> Iterator[None]:
        """Inside: the stack holds only the layers not in `skip` (the same module objects, nothing copied), with
        `config.num_hidden_layers`/`layer_types` and the attention modules' `layer_idx` renumbered to 0..K-1, so a
        KV cache built inside has exactly K layers. Everything is restored on exit."""
        skip_set = set(skip)
        if not skip_set:
            yield
            return
        layers, config = self.layers, self.config
        num_layers = len(layers)
        assert all(0 <= i < num_layers for i in skip_set), f"skip set {sorted(skip_set)} out of range 0..{num_layers - 1}"
        assert len(skip_set) < num_layers, "cannot skip every layer"
        kept = [i for i in range(num_layers) if i not in skip_set]
        saved_types = self.layer_types
        saved_count = config.num_hidden_layers
        renumbered = [(module, module.layer_idx) for old_idx in kept for module in _indexed(layers[old_idx])]
        try:
            self.module.layers = nn.ModuleList([layers[i] for i in kept])
            config.num_hidden_layers = len(kept)
            if saved_types is not None:
                config.layer_types = [saved_types[i] for i in kept]
            for new_idx, old_idx in enumerate(kept):
                for module in _indexed(layers[old_idx]):
                    module.layer_idx = new_idx
            yield
        finally:
            self.module.layers = layers
            config.num_hidden_layers = saved_count
            if saved_types is not None:
                config.layer_types = saved_types
            for module, old_idx in renumbered:
                module.layer_idx = old_idx


def _indexed(layer: nn.Module) -> list[nn.Module]:
    """The submodules of a decoder layer that carry a `layer_idx` (attention: its KV cache slot)."""
    return [module for module in layer.modules() if isinstance(getattr(module, "layer_idx", None), int)]
