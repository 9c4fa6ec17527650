"""`bench rollout`'s timed calls: one rollout by an engine (weights mode, skip set) or by `model.generate`.

Each call returns (useful tokens, slot tokens): useful = up to and including each row's EOS, slot = rows x decode
steps run (see `bench.rollout`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


class Rollouts:
    """Builds the timed calls: one rollout of at most n new tokens per sequence, returning (useful, slot) tokens."""

    def __init__(self, args: argparse.Namespace, setup) -> None:
        from lowres_reft.rollout.engine import left_pad

        self.args, self.model, self.device = args, setup.model, setup.device
        self.prompts, self.eos_ids = setup.prompts, setup.eos_ids
        self.pad_id = setup.policy.tokenizer.pad_token_id
        self.eos_id = setup.policy.tokenizer.eos_token_id
        self.ids, self.mask = left_pad(self.prompts, self.pad_id, setup.device)

    def call(self, item: tuple, n: int) -> Callable[[], tuple[int, int]]:
        kind, _, skip, engine, weights = item
        return self._generate(n) if kind == "generate" else self._ours(engine, weights, skip, n)

    def engine(self, engine: str, weights: str, n: int):
        import torch

        from lowres_reft.rollout.engine import make_engine

        g = torch.Generator(device=self.device).manual_seed(self.args.seed)
        return make_engine(engine, self.model, weights=weights, max_new_tokens=n, eos_ids=self.eos_ids,
                           pad_id=self.pad_id, temperature=self.args.temperature, generator=g, greedy=self.args.greedy)

    def _ours(self, engine: str, weights: str, skip: tuple[int, ...], n: int) -> Callable[[], tuple[int, int]]:
        def call() -> tuple[int, int]:
            batch = self.engine(engine, weights, n).generate(self.prompts, skip)
            return batch.num_tokens, batch.completion_ids.numel()
        return call

    def _generate(self, n: int) -> Callable[[], tuple[int, int]]:
        import torch

        args, model, ids, mask = self.args, self.model, self.ids, self.mask
        # No EOS: exactly n tokens (min_new_tokens); with the stop set: the same set as our engines.
        stop = dict(eos_token_id=self.eos_ids) if args.eos_mean else dict(eos_token_id=self.eos_id, min_new_tokens=n)

        def call() -> tuple[int, int]:
            torch.manual_seed(args.seed)
            kwargs = dict(do_sample=False) if args.greedy else dict(do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=self.pad_id,
                                         use_cache=True, **stop, **kwargs)
            finally:
                model.train(was_training)
            new = out[:, ids.shape[1]:]
            return useful_tokens(new, self.eos_ids if args.eos_mean else []), int(new.numel())
        return call


def useful_tokens(completions, eos_ids: list[int]) -> int:
    """Tokens up to and including each row's first EOS (all of the row when it has none): (N, T) -> count."""
    import torch

    if not eos_ids:
        return int(completions.numel())
    hit = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    steps = completions.shape[1]
    first = torch.where(hit.any(dim=1), hit.int().argmax(dim=1) + 1, torch.full_like(hit[:, 0], steps, dtype=torch.long))
    return int(first.sum())
