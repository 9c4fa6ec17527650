"""Micro-batches of the update, formed by length and trimmed to their own used columns.

A rollout batch is padded to its widest row (and, across processes, to the global widest); slicing it in row
order makes every micro-batch pay for that width. Sorting rows by real length (prompt + completion tokens) puts
rows of similar length together, and trimming each micro-batch to its own longest prompt (the rightmost columns:
prompts are left-padded) and longest completion (the leftmost columns: completions are right-padded) drops only
padding. Positions are the index among a row's real tokens, so the kept tokens see exactly the same positions and
attention as before, and with the whole batch's normalizers the loss and gradients are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowres_reft.rl.shared_prompt import distinct_prompts
from lowres_reft.rollout.engine import RolloutBatch


@dataclass(frozen=True)
class MicroBatch:
    rows: Tensor  # (b,) long: the rollout rows it holds, in the rollout's row numbering
    prompt_ids: Tensor  # (b, p) long, left-padded, p = its longest real prompt
    prompt_mask: Tensor  # (b, p)
    completion_ids: Tensor  # (b, t) long, right-padded, t = its longest real completion
    completion_mask: Tensor  # (b, t)

    @property
    def width(self) -> int:
        return self.completion_ids.shape[1]

    def take(self, per_token: Tensor) -> Tensor:
        """This micro-batch's rows and completion columns of a rollout-shaped (N, T) tensor -> (b, t)."""
        return per_token[self.rows, : self.width]


def real_lengths(batch: RolloutBatch) -> Tensor:
    """(N,) long: real prompt tokens + real completion tokens of each row."""
    return (batch.prompt_mask != 0).sum(1) + (batch.completion_mask != 0).sum(1)


def by_length(batch: RolloutBatch, size: int) -> list[MicroBatch]:
    """Micro-batches of `size` rows in order of real length (ties keep row order), each trimmed to its used columns."""
    order = torch.sort(real_lengths(batch), stable=True).indices
    return [_trimmed(batch, rows) for rows in order.split(size)]


def _trimmed(batch: RolloutBatch, rows: Tensor) -> MicroBatch:
    prompt_mask, completion_mask = batch.prompt_mask[rows], batch.completion_mask[rows]
    # At least one column each: the forward needs a token before the first completion token to predict it from.
    p = max(1, int((prompt_mask != 0).sum(1).max()))
    t = max(1, int((completion_mask != 0).sum(1).max()))
    first = prompt_mask.shape[1] - p
    return MicroBatch(rows=rows, prompt_ids=batch.prompt_ids[rows, first:], prompt_mask=prompt_mask[:, first:],
                      completion_ids=batch.completion_ids[rows, :t], completion_mask=completion_mask[:, :t])


def by_prompt(batch: RolloutBatch, size: int) -> list[MicroBatch]:
    """Micro-batches of at most `size` rows that keep a prompt's rows together, so its forward can be shared
    (`shared_prompt`): prompts in order of their longest row, each prompt's rows in row order; a prompt with more
    than `size` rows is cut into pieces of `size`, and pieces are packed into a micro-batch while they fit."""
    _, index = distinct_prompts(batch.prompt_ids, batch.prompt_mask)
    lengths = real_lengths(batch)
    groups = [torch.nonzero(index == k).flatten() for k in range(int(index.max()) + 1)]
    groups.sort(key=lambda rows: int(lengths[rows].max()))  # stable: ties keep first-appearance order
    micro: list[list[Tensor]] = [[]]
    for rows in groups:
        for piece in rows.split(size):
            if sum(len(p) for p in micro[-1]) + len(piece) > size:
                micro.append([])
            micro[-1].append(piece)
    return [_trimmed(batch, torch.cat(pieces)) for pieces in micro if pieces]
