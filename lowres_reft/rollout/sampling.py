"""Per-token sampling pieces shared by the engines (`rollout.LoopEngine`, `static_engine`): the distribution
sampled from (and recorded as the behavior policy), inverse-CDF draws from uniforms drawn up front, and the
bookkeeping of one decode whose batch shrinks as rows finish."""

from __future__ import annotations

import torch
from torch import Tensor


def nucleus_logprobs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """(N, V) logits -> (N, V) float32 log-probs of the distribution actually sampled from."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
    mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


def draw_tokens(logp: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling: (L, V) log-probs and (L,) uniforms in [0, 1) -> (L,) token ids.

    Token i is drawn when cdf[i-1] <= u * cdf[V-1] < cdf[i], so a token of probability 0 (outside the nucleus) is
    never drawn. The cdf is summed in float64: over a 150k vocabulary float32 rounding would shift the sampled
    distribution away from the recorded behavior log-probs.
    """
    cdf = logp.double().exp().cumsum(-1)  # (L, V)
    total = cdf[:, -1:]
    # u * total can round up to total; keep the target strictly below it (the last token with mass is drawn).
    target = torch.minimum(u.double()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logp.shape[-1] - 1)


def draw_uniforms(rows: int, steps: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(steps, rows) uniforms, drawn once per decode for every row and step up front: which numbers a row gets does
    not depend on when other rows finish, on batch compaction or on the engine, and the generator advances by
    the same amount whenever the decode stops."""
    return torch.rand((steps, rows), generator=generator, device=device)


class DecodeState:
    """One decode's outputs in the original row order, and which rows are still in the decode batch.

    `rows` (B,) maps the decode batch (which shrinks as rows finish and are compacted away) to the original rows;
    an engine feeds `record` the (B, V) logits of its batch each step and applies `compact`'s index to its cache.
    """

    def __init__(self, n: int, steps: int, pad_id: int, eos_ids: Tensor, device: torch.device) -> None:
        self.pad_id, self.eos_ids = pad_id, eos_ids
        self.tokens = torch.full((n, steps), pad_id, dtype=torch.long, device=device)
        self.logps = torch.zeros((n, steps), dtype=torch.float32, device=device)
        self.mask = torch.zeros((n, steps), dtype=torch.float32, device=device)
        self.finished = torch.zeros(n, dtype=torch.bool, device=device)
        self.rows = torch.arange(n, device=device)

    def record(self, step: int, logits: Tensor, uniforms: Tensor | None, temperature: float, top_p: float) -> Tensor:
        """(B, V) logits of the batch's rows (uniforms: (N,) of all rows, None = greedy) -> (B,) next input ids."""
        if uniforms is None:
            token = logits.argmax(dim=-1)
            token_logp = torch.zeros(token.shape, device=token.device)
        else:
            logp_all = nucleus_logprobs(logits, temperature, top_p)  # (B, V) float32
            token = draw_tokens(logp_all, uniforms[self.rows])
            token_logp = logp_all.gather(-1, token[:, None]).squeeze(-1)
        live = ~self.finished[self.rows]
        token = torch.where(live, token, torch.full_like(token, self.pad_id))
        self.tokens[self.rows, step] = token
        self.logps[self.rows, step] = torch.where(live, token_logp, torch.zeros_like(token_logp))
        self.mask[self.rows, step] = live.float()
        self.finished[self.rows] = self.finished[self.rows] | (live & torch.isin(token, self.eos_ids))
        return token

    def done(self) -> bool:
        return bool(self.finished.all())

    def live_count(self) -> int:
        return int((~self.finished[self.rows]).sum())

    def compact(self) -> Tensor:
        """Drop the finished rows from the batch: returns the (B',) batch indices kept, for the engine's buffers."""
        keep = (~self.finished[self.rows]).nonzero().squeeze(-1)
        self.rows = self.rows[keep]
        return keep

    def outputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.tokens, self.logps, self.mask, ~self.finished


def new_token_budget(limit: int | None, prompt_len: int, max_new_tokens: int) -> int:
    """Buffers sized by the real bound: no completion can run past the context window `limit` (prompt + new tokens)."""
    return max_new_tokens if limit is None else max(1, min(max_new_tokens, limit - prompt_len))
