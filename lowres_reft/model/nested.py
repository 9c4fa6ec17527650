"""The nested behavior policy: the target model with a subset of its decoder layers skipped.

Definitions (Nested-ReFT): decoder layers are 0..L-1; the valid (skippable) layers are all but the first
`protect_first` and the last `protect_last`. Each rollout batch draws `round(r * L)` of them uniformly
without replacement (schedule "random"; with layout "contiguous", a run of consecutive valid layers with a uniform
start), or uses an explicit list (schedule "fixed"). With a `ranking` (the valid layers, least influential first:
`model.influence`), the k = round(r * L) layers are drawn uniformly from the pool of the round(pool * k) first
ones of the ranking (at least k): a new random set per batch still, among the layers that matter least.

Mechanism: `skip_layers(model, skip)` temporarily replaces the stack's `layers` ModuleList by one holding
only the kept layers (the same module objects: weights, 4-bit storage and LoRA adapters are shared, nothing
is copied), sets `config.num_hidden_layers`/`config.layer_types` to match, and renumbers the kept
attention modules' `layer_idx` to 0..K-1. A skipped layer is never called, so it costs no compute, and a
KV cache built inside the context has exactly K layers: cached decoding (whose sequence length is read
from cache layer 0) stays correct for any skip set, including layer 0. Everything is restored on exit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lowres_reft.model.layers import LayerStack


def valid_layers(num_layers: int, protect_first: int, protect_last: int) -> list[int]:
    return list(range(protect_first, num_layers - protect_last))


def num_skipped(num_layers: int, skip_ratio: float) -> int:
    # Python's round() is banker's rounding; the definition is round-half-up.
    return int(skip_ratio * num_layers + 0.5)


class SkipSchedule:
    """Draws the skip set for each rollout batch; seeded and checkpointable."""

    def __init__(
        self,
        num_layers: int,
        skip_ratio: float,
        protect_first: int = 1,
        protect_last: int = 1,
        schedule: str = "random",
        layers: Sequence[int] = (),
        seed: int = 0,
        layout: str = "scattered",
        ranking: Sequence[int] | None = None,
        pool: float = 1.5,
    ) -> None:
        self.num_layers = num_layers
        self.skip_ratio = skip_ratio
        self.schedule = schedule
        self.layout = layout
        self.valid = valid_layers(num_layers, protect_first, protect_last)
        if ranking is not None and sorted(ranking) != self.valid:
            raise ValueError(f"the influence ranking must order exactly the valid layers {self.valid}, got {list(ranking)}")
        self.ranking, self.pool = (list(ranking) if ranking is not None else None), pool
        if not self.valid and (skip_ratio > 0 or layers):
            raise ValueError(f"protect_first + protect_last leave no skippable layer out of the model's {num_layers}")
        if schedule == "fixed":
            bad = [i for i in layers if i not in self.valid]
            if bad:
                raise ValueError(f"layers {bad} are not skippable (valid: {self.valid[0]}..{self.valid[-1]})")
            self.fixed = tuple(sorted(layers))
        self.rng = random.Random(seed)

    def set_ratio(self, skip_ratio: float) -> None:
        self.skip_ratio = skip_ratio

    def check_ratio(self, skip_ratio: float) -> None:
        count = num_skipped(self.num_layers, skip_ratio)
        if count > len(self.valid):
            raise ValueError(
                f"skip ratio {skip_ratio} asks for {count} of {self.num_layers} layers but only {len(self.valid)} are "
                "skippable (lower it, or protect_first/protect_last)"
            )

    def draw(self) -> tuple[int, ...]:
        if self.schedule == "fixed":
            return self.fixed
        self.check_ratio(self.skip_ratio)
        count = num_skipped(self.num_layers, self.skip_ratio)
        if self.layout == "contiguous":  # a run of `count` consecutive valid layers, its start uniform
            start = self.rng.randrange(len(self.valid) - count + 1)
            return tuple(self.valid[start : start + count])
        return tuple(sorted(self.rng.sample(self.candidates(count), count)))

    def candidates(self, count: int) -> list[int]:
        """The layers a set of `count` is drawn from: every valid layer, or the ranking's pool."""
        if self.ranking is None:
            return self.valid
        return self.ranking[: min(len(self.ranking), max(count, int(self.pool * count + 0.5)))]

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "skip_ratio": self.skip_ratio}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.skip_ratio = state.get("skip_ratio", self.skip_ratio)


def adapt_skip_ratio(ratio: float, ess: float, target_ess: float, rate: float, min_ratio: float, max_ratio: float) -> float:
    """Adaptive schedule (beyond the paper): skip more layers while the sequence-weight ESS is above target
    (rollouts are still close enough to on-policy), fewer when it falls below; clamped to [min_ratio, max_ratio]."""
    if ess != ess:  # NaN (no tokens): keep the ratio
        return ratio
    step = rate if ess > target_ess else -rate
    return min(max_ratio, max(min_ratio, ratio + step))


@contextmanager
def skip_layers(model: nn.Module, skip: Sequence[int]) -> Iterator[nn.Module]:
    """Run `model` with the decoder layers in `skip` bypassed (hidden state passes through unchanged)."""
    with LayerStack(model).kept(skip):
        yield model
