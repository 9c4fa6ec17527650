"""Live tensor bytes on any device, and their peak: what `torch.cuda.max_memory_allocated` reports on a GPU, for the CPU.

A `TorchDispatchMode` sees every tensor an operator returns; each new storage is counted once (views share it) and
uncounted when the storage is freed (a weak reference's callback), so `peak` is the largest sum of live storages
while the mode was on, plus the `baseline` tensors alive before (weights, quantization state, gradients, optimizer
states) that the caller hands in. Torch's own `MemTracker` is the same idea with per-module attribution, but refuses
frozen parameters and modules called more than once per iteration (every decode step calls every layer), which is
what a LoRA model's rollout is.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self, baseline: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0
        for tensor in baseline:
            self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr() if storage.nbytes() else id(storage)
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and not value.is_meta:
                self._track(value)
        return out


def model_tensors(model: torch.nn.Module, optimizer=None) -> list[torch.Tensor]:
    """The tensors a loaded policy keeps: parameters (4-bit packed included), their quantization state and gradients,
    buffers, and the optimizer's states."""
    out: list[torch.Tensor] = []
    for param in model.parameters():
        out.append(param)
        if param.grad is not None:
            out.append(param.grad)
        state = getattr(param, "quant_state", None)
        while state is not None:
            out += [t for t in (getattr(state, n, None) for n in ("absmax", "code", "offset")) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    out += list(model.buffers())
    if optimizer is not None:
        out += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return out
