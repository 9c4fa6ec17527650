"""`lowres-reft layers`: which decoder layers matter, measured on a recipe's model over held-out problems.

Per layer l, on the recipe's model (the base, adapters off; with `after_warmup`, after the recipe's supervised
warm-up steps, the model RL starts from):
- block influence: mean over tokens of 1 - cos(h_in, h_out) (`model.influence`), over `texts` held-out problems,
  prompt + reference solution;
- with layer l alone skipped (a nested model of one layer), teacher-forced on the same texts: the mean per completion
  token of KL(full || nested) (`rl.warmup.skip_distill_kl`, the distillation's own KL);
- sampled: `prompts` held-out prompts x `samples` completions from the nested model at the recipe's temperature,
  their behavior log-probs against the full model's recompute: the ESS of the sequence weights (`rl.loss.sequence_ess`,
  the training metric) and the mean |log rho| per token.
Layers that may not be skipped (`protect_first`, `protect_last`) get the block influence only. The report also gives
the Spearman rank correlation of block influence with the KL (does the cheap measure order the layers as the costly
one does?).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LayerReport:
    layer: int
    influence: float
    skippable: bool
    kl: float | None = None  # mean per completion token, KL(full || layer skipped)
    ess: float | None = None
    mean_abs_log_rho: float | None = None


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else float("nan")


def measure_layers(recipe, texts: int = 64, prompts: int = 16, samples: int = 4, after_warmup: bool = False,
                   log=print) -> list[LayerReport]:
    import torch

    from lowres_reft.data.datasets import load_problems
    from lowres_reft.data.prompts import encode_prompts
    from lowres_reft.model.influence import block_influence
    from lowres_reft.model.loader import eos_token_ids, load_policy
    from lowres_reft.model.logprobs import completion_logp
    from lowres_reft.model.nested import valid_layers
    from lowres_reft.rl.builders import ranking_texts
    from lowres_reft.rl.loss import sequence_ess
    from lowres_reft.rl.warmup import build_sft_batch, run_warmup, skip_distill_kl
    from lowres_reft.rollout.engine import left_pad, make_engine
    from lowres_reft.run.metrics import NullLog
    from lowres_reft.run.plan import fit_memory

    torch.manual_seed(recipe.train.seed)
    policy = load_policy(recipe.model, recipe.lora, recipe.log.output_dir, seed=recipe.train.seed)
    recipe, _ = fit_memory(recipe, policy, [], log)  # "auto" micro-batches
    model, tok = policy.model, policy.tokenizer
    if after_warmup and recipe.warmup.steps > 0:
        import dataclasses

        supervised = dataclasses.replace(recipe, warmup=dataclasses.replace(recipe.warmup, skip_distill_steps=0))
        run_warmup(policy, supervised, load_problems(recipe.data, "train"), NullLog(), log)
    held_out = load_problems(recipe.data, "eval")
    model.eval()
    count = policy.num_layers
    valid = valid_layers(count, recipe.behavior.protect_first, recipe.behavior.protect_last)
    adapters = torch.no_grad() if after_warmup else model.disable_adapter()
    reports: list[LayerReport] = []
    with adapters, torch.no_grad():
        # block influence, and the texts' (prompt, completion) split for the teacher-forced KL
        token_texts = ranking_texts(tok, held_out, _with_texts(recipe, texts))
        sums, tokens = None, 0
        for lo in range(0, len(token_texts), 16):
            ids, mask = left_pad(token_texts[lo : lo + 16], tok.pad_token_id, policy.device)
            part, n = block_influence(model, ids, mask)
            sums, tokens = (part if sums is None else sums + part), tokens + n
        influence = (sums / max(tokens, 1)).tolist()
        pairs = _prompt_completion_pairs(tok, held_out[:texts], recipe)
        sft = build_sft_batch([p for p, _ in pairs], [c for _, c in pairs], tok.pad_token_id)
        chosen = held_out[:prompts]
        prompt_ids = [p for p in encode_prompts(tok, chosen, recipe) for _ in range(samples)]
        engine = make_engine(recipe.rollout.engine, model, max_new_tokens=recipe.rollout.max_new_tokens,
                             eos_ids=eos_token_ids(policy), pad_id=tok.pad_token_id, temperature=recipe.rollout.temperature,
                             top_p=recipe.rollout.top_p, generator=torch.Generator(device=policy.device).manual_seed(0))
        for layer in range(count):
            report = LayerReport(layer, influence[layer], layer in valid)
            if report.skippable:
                report.kl = float(skip_distill_kl(model, sft, [layer])) / max(1, sft.num_targets)
                batch = engine.generate(prompt_ids, (layer,))
                full = completion_logp(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                       batch.completion_mask, temperature=recipe.rollout.temperature)
                log_rho = full - batch.behavior_logp
                mask = batch.completion_mask
                report.ess = sequence_ess(log_rho, mask)
                report.mean_abs_log_rho = float((log_rho.abs() * mask).sum() / mask.sum().clamp(min=1))
                log(f"layer {layer:2d}: block influence {report.influence:.4f}, KL {report.kl:.4f}, ESS {report.ess:.3f}")
            reports.append(report)
    return reports


def _with_texts(recipe, texts: int):
    import dataclasses

    return dataclasses.replace(recipe, behavior=dataclasses.replace(recipe.behavior, influence_texts=texts))


def _prompt_completion_pairs(tok, problems, recipe) -> list[tuple[list[int], list[int]]]:
    from lowres_reft.data.prompts import format_prompt, format_solution

    pairs = []
    for problem in problems:
        if not problem.solution:
            continue
        prompt = tok(format_prompt(tok, problem.question, recipe.data), add_special_tokens=False)["input_ids"]
        completion = tok(format_solution(problem.solution, tok, recipe.data), add_special_tokens=False)["input_ids"]
        pairs.append((prompt[-recipe.data.max_prompt_tokens:], completion + [tok.eos_token_id]))
    if not pairs:
        from lowres_reft.utils.errors import UsageError

        raise UsageError(f"layers: the held-out problems of {recipe.data.name} have no reference solutions to measure on")
    return pairs


def summary(reports: list[LayerReport]) -> dict:
    skippable = [r for r in reports if r.skippable]
    return {"layers": len(reports), "skippable": [r.layer for r in skippable],
            "spearman_influence_kl": spearman([r.influence for r in skippable], [r.kl for r in skippable])
            if len(skippable) > 1 else None,
            "least_influential_first": [r.layer for r in sorted(skippable, key=lambda r: (r.influence, r.layer))]}


def table(reports: list[LayerReport]) -> str:
    lines = ["| layer | block influence | KL(full || skipped) per token | ESS | mean abs log rho |", "|---|---|---|---|---|"]
    for r in reports:
        if r.skippable:
            lines.append(f"| {r.layer} | {r.influence:.4f} | {r.kl:.4f} | {r.ess:.3f} | {r.mean_abs_log_rho:.3f} |")
        else:
            lines.append(f"| {r.layer} (protected) | {r.influence:.4f} | - | - | - |")
    return "\n".join(lines)


def write_json(reports: list[LayerReport], meta: dict, path: Path) -> None:
    from dataclasses import asdict

    from lowres_reft.utils.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps({**meta, "summary": summary(reports), "layers": [asdict(r) for r in reports]},
                                       indent=1) + "\n")


def plot(reports: list[LayerReport], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r.layer for r in reports]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    series = (("block influence (1 - cos)", [r.influence for r in reports]),
              ("KL(full || layer skipped) per token", [r.kl or 0.0 for r in reports]),
              ("ESS with the layer skipped", [r.ess if r.ess is not None else 0.0 for r in reports]))
    for ax, (name, values) in zip(axes, series):
        colors = ["tab:blue" if r.skippable else "tab:gray" for r in reports]
        ax.bar(layers, values, color=colors)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("layer (gray: protected)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
