"""Pure benchmark math: the ideal layer-proportional speedup, GPU peak bandwidth, bytes read per decode step.

Ideal layer-proportional speedup. The calibration item of `bench rollout` runs our loop with all decoder layers
skipped except layer 0 (time t_1). With t_0 the r = 0 time and L layers, a two-point linear fit gives the
per-layer time t_layer = (t_0 - t_1) / (L - 1), t_layers = L * t_layer and t_other = t_0 - t_layers
(= t_1 - t_layer): everything that does not scale with the number of decoder layers (embedding, final norm,
LM head, log-softmax + sampling, the loop's Python and mask/cache bookkeeping, prefill included). Then
    ideal(r) = t_0 / (t_other + t_layers * (L - k) / L),   k = num_skipped(L, r),
`speedup_vs_r0` = t_0 / t_r and `fraction_of_ideal` = speedup_vs_r0 / ideal(r).

Decode roofline. Bytes of weights read per decode step (`decode_weight_bytes`): every parameter of the kept
decoder layers as stored (4-bit packed uint8 weights, the quant state: absmax, code, offset and the nested
absmax/code of double quantization; biases, norms and LoRA A/B in their dtype), the LM head weight (read whole
each step, tied or not), the final norm, and only the `batch` gathered rows of the input embedding. That is a
lower bound on the traffic (bitsandbytes dequantizes to a 16-bit temporary for batch > 1, the KV cache is read
too: `kv_bytes_per_step`, reported separately). `roofline_fraction` = bytes / step time / the GPU's peak
bandwidth (`peak_bandwidth`; None on CPU or an unknown GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

# Peak DRAM bandwidth (bytes/s) of known GPUs, matched on torch.cuda.get_device_name().
GPU_BANDWIDTH = {
    "H100 SXM": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H200": 4.8e12,
    "A100 80GB": 2.0e12,
    "RTX 4090": 1.008e12,
    "RTX 3090": 0.936e12,
}


def split_layer_time(t_full: float, t_one: float, num_layers: int) -> tuple[float, float]:
    """(t_other, t_layers) from the time with all L layers (t_full) and with one layer kept (t_one)."""
    if num_layers < 2:
        raise ValueError("need at least 2 layers to separate layer time from the rest")
    per_layer = (t_full - t_one) / (num_layers - 1)
    t_layers = per_layer * num_layers
    return t_full - t_layers, t_layers


def ideal_speedup(t_full: float, t_other: float, t_layers: float, num_layers: int, skipped: int) -> float | None:
    """t_full / (t_other + t_layers * (L - k) / L): the speedup if time scaled exactly with the kept layers."""
    denom = t_other + t_layers * (num_layers - skipped) / num_layers
    if not denom > 0:
        return None
    return t_full / denom


def peak_bandwidth(device_name: str | None) -> float | None:
    """Peak memory bandwidth (B/s) of a GPU from its torch name, or None when unknown (or CPU)."""
    if not device_name:
        return None
    name = device_name.upper().replace("-", " ")
    if "H200" in name:
        return GPU_BANDWIDTH["H200"]
    if "H100" in name:
        if "PCIE" in name:
            return GPU_BANDWIDTH["H100 PCIe"]
        if "NVL" in name:
            return None  # H100 NVL (3.9e12) is not in the table
        return GPU_BANDWIDTH["H100 SXM"]  # "NVIDIA H100 80GB HBM3" is the SXM part
    if "A100" in name and "80GB" in name:
        return GPU_BANDWIDTH["A100 80GB"]
    if "RTX 4090" in name:
        return GPU_BANDWIDTH["RTX 4090"]
    if "RTX 3090" in name and "TI" not in name.split("RTX 3090", 1)[1]:
        return GPU_BANDWIDTH["RTX 3090"]
    return None


def tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState's tensors (absmax, code, offset), nested state included."""
    import torch

    total = 0
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if torch.is_tensor(value):
            total += tensor_bytes(value)
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += quant_state_bytes(nested)
    return total


def stored_bytes(module, seen: set[int] | None = None) -> int:
    """Bytes of a module's parameters as stored (+ 4-bit quant states); a tensor in `seen` is not counted again."""
    seen = set() if seen is None else seen
    total = 0
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += tensor_bytes(param)
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += quant_state_bytes(state)
    return total


def decode_weight_bytes(model, skip: Sequence[int], batch: int) -> dict[str, int]:
    """Bytes of weights one decode step reads with the decoder layers in `skip` bypassed (see module doc)."""
    from lowres_reft.model.layers import LayerStack

    stack = LayerStack(model)
    skip_set = set(skip)
    seen: set[int] = set()
    layers = sum(stored_bytes(layer, seen) for i, layer in enumerate(stack.layers) if i not in skip_set)
    head = stored_bytes(stack.lm_head, seen)
    norm = stored_bytes(stack.norm, seen)
    emb = stack.embed_tokens.weight
    rows = batch * emb.shape[-1] * emb.element_size()
    return {"layers": layers, "lm_head": head, "final_norm": norm, "embedding_rows": rows,
            "total": layers + head + norm + rows}


def kv_bytes_per_step(config, kept_layers: int, batch: int, prompt_len: int, new_tokens: int, element_size: int) -> int:
    """Mean bytes of KV cache read per decode step: decode step i (1..n-1) attends to prompt_len + i keys/values."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * kept_layers * config.num_key_value_heads * head_dim * element_size
    return int(per_token * batch * (prompt_len + new_tokens / 2))


def model_bytes(model) -> dict[str, int]:
    """Parameter bytes of the loaded policy: 4-bit (packed + quant state), other frozen, trainable (LoRA)."""
    quant, frozen, trainable, seen = 0, 0, 0, set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        state = getattr(param, "quant_state", None)
        if state is not None:
            quant += tensor_bytes(param) + quant_state_bytes(state)
        elif param.requires_grad:
            trainable += tensor_bytes(param)
        else:
            frozen += tensor_bytes(param)
    return {"quantized_bytes": quant, "frozen_other_bytes": frozen, "trainable_bytes": trainable,
            "total_bytes": quant + frozen + trainable}
