"""The memory plan: the peak bytes of each phase of a run, itemized, from the recipe and the model's shape.

Phases (what is alive at the phase's peak):
- rollout: sampling from the nested model (no gradients): the weights, the LoRA parameters and the optimizer's states
  (alive from the first step on), the merged 16-bit copy of the kept layers (`[rollout] weights = "merged16"`), the
  KV cache of one rollout micro-batch at prompt + max_new_tokens over the kept layers, and the larger of the prefill
  temporaries (one layer's MLP activations over the prompt; a dequantized 4-bit weight; with unmerged adapters, the
  float32 sum of an adapter's output and the 16-bit base output, peft's order of work) and the per-token sampling
  temporaries over the vocabulary (logits, float32 log-softmax, the float64 CDF of inverse-CDF sampling);
- logprob: the update's forward + backward over one micro-batch of `[train] micro_batch_size` rows: the adapters'
  gradients, the activations the backward keeps (each layer's input with gradient checkpointing, every layer's
  saved tensors without), then the larger of one layer's recomputed activations with their gradients and the LM
  head over one `[loss] logprob_chunk` of tokens (logits, float32 log-softmax and its gradient);
- optimizer: the step (AdamW: two float32 states per adapter parameter; paged 8-bit AdamW: two bytes + block
  statistics) and its temporaries;
- eval: greedy generation with the full model, `[eval] batch_size` rows at prompt + `[eval] max_new_tokens`;
- export: merging the adapters (the merged linears in float32 before the cast to `[export] merged_dtype`).

The activation terms count the tensors PyTorch keeps for the backward of a Llama/Qwen-style layer (attention and
SwiGLU MLP, with peft's LoRA branches, whose input is cast to the adapters' float32 when the compute dtype is 16-bit).
They were checked against live-tensor measurements (`lowres-reft bench memory`; BENCHMARKS.md), which is what
`[train] micro_batch_size = "auto"` and the start-of-run check rely on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lowres_reft.model.nested import num_skipped
from lowres_reft.model.shapes import LINEARS, ModelShape

if TYPE_CHECKING:
    from lowres_reft.config import Recipe

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # "auto": bf16/fp16 on a GPU
BLOCK = 64  # bitsandbytes 4-bit blocksize


@dataclass
class Phase:
    name: str
    items: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.items.values())


@dataclass
class Plan:
    phases: list[Phase]
    settings: dict

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


def quantized_bytes(params: int, double_quant: bool) -> int:
    """4-bit NF4 storage of `params` weights (one tensor): packed nibbles + the blockwise absmax (uint8 + a float32 per
    256 blocks with double quantization, else float32 per block) + the quantization code tables."""
    blocks = math.ceil(params / BLOCK)
    # + the 16-entry NF4 code table (float32); double quantization adds its 256-entry code table and an offset
    state = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 if double_quant else 4 * blocks
    return params // 2 + state + 4 * 16


def lora_params(shape: ModelShape, recipe: Recipe) -> tuple[int, list[str]]:
    """(adapter parameters, the targeted linears): r * (in + out) per targeted decoder linear, every layer."""
    targets = recipe.lora.target_modules
    names = list(LINEARS) if targets == "all-linear" or targets == ("all-linear",) else [t for t in targets if t in LINEARS]
    linears = shape.linears()
    return shape.layers * sum(recipe.lora.r * sum(linears[n]) for n in names), names


def weight_items(shape: ModelShape, recipe: Recipe, c: int) -> dict[str, int]:
    """The model as loaded: decoder linears (4-bit or 16-bit), embeddings and head, norms and biases, LoRA."""
    lin = shape.linear_params()
    items = {}
    if recipe.model.load_in_4bit:
        per_tensor = [quantized_bytes(a * b, recipe.model.double_quant) for a, b in shape.linears().values()]
        items["4-bit decoder weights + quant state"] = shape.layers * sum(per_tensor)
    else:
        items["decoder weights"] = shape.layers * lin * c
    items["embeddings" + ("" if shape.tied else " + LM head")] = shape.vocab * shape.hidden * c * (1 if shape.tied else 2)
    bias = (shape.q_out + 2 * shape.kv_out) if shape.attn_bias else 0
    items["norms + biases"] = (shape.layers * (2 * shape.hidden + bias) + shape.hidden) * c
    items["LoRA parameters (float32)"] = lora_params(shape, recipe)[0] * 4
    return items


def optimizer_state_bytes(adapter: int, recipe: Recipe, on_gpu: bool) -> int:
    if recipe.train.optimizer == "paged_adamw_8bit" and on_gpu:
        return 2 * adapter + 2 * 4 * math.ceil(adapter / 256)
    return 2 * 4 * adapter


def layer_activation_bytes(shape: ModelShape, recipe: Recipe, tokens: int, c: int) -> int:
    """What one layer's forward keeps for its backward over `tokens` tokens: the two norms' inputs, q/k/v, the
    attention output and its logsumexp, the SwiGLU MLP's gate, up, activation and product; each LoRA target's A
    output (and its input cast to float32 when the compute dtype is 16-bit)."""
    h, i = shape.hidden, shape.intermediate
    kept = c * (2 * h + 3 * shape.q_out + 2 * shape.kv_out + 4 * i) + 4 * 2 + 4 * shape.heads
    _, targets = lora_params(shape, recipe)
    linears = shape.linears()
    if c != 4:  # peft casts each target's input to the adapters' float32 (q, k, v share one input but cast it thrice)
        kept += 4 * sum(linears[n][0] for n in targets)
    kept += 4 * recipe.lora.r * len(targets)
    return tokens * kept


def plan_memory(shape: ModelShape, recipe: Recipe, prompt_tokens: int | None = None, on_gpu: bool = True,
                rollout_micro_batch: int | None = None, train_micro_batch: int | None = None) -> Plan:
    """The plan for `recipe` on a model of `shape`; `prompt_tokens` defaults to `[data] max_prompt_tokens`, the
    micro-batches to the recipe's (0 = the whole rollout batch)."""
    c = DTYPE_BYTES[recipe.model.dtype] if on_gpu or recipe.model.dtype != "auto" else 4
    ro, tr, beh = recipe.rollout, recipe.train, recipe.behavior
    prompt = prompt_tokens if prompt_tokens is not None else recipe.data.max_prompt_tokens
    new = ro.max_new_tokens if shape.max_positions is None else min(ro.max_new_tokens, shape.max_positions - prompt)
    rows = ro.prompts_per_step * ro.group_size
    # An "auto" micro-batch not given here is planned at its smallest, 1 (`resolve_auto` sizes it phase by phase).
    rollout_rows = min(rows, rollout_micro_batch if rollout_micro_batch is not None else
                       1 if ro.micro_batch == "auto" else (ro.micro_batch or rows))
    micro = min(rows, train_micro_batch if train_micro_batch is not None else
                1 if tr.micro_batch_size == "auto" else tr.micro_batch_size)
    weights = weight_items(shape, recipe, c)
    adapter = lora_params(shape, recipe)[0]
    grads = 4 * adapter
    states = optimizer_state_bytes(adapter, recipe, on_gpu)
    lin = shape.linear_params()
    largest = max(a * b for a, b in shape.linears().values())
    dequant = largest * c if recipe.model.load_in_4bit else 0
    if beh.schedule == "fixed":
        kept = shape.layers - len(beh.layers)
    else:  # the adaptive schedule keeps the most layers at its smallest ratio
        kept = shape.layers - num_skipped(shape.layers, beh.min_ratio if beh.schedule == "adaptive" else beh.skip_ratio)
    kv_per_token = 2 * shape.kv_out * c
    widest_target = max(shape.linears()[n][1] for n in lora_params(shape, recipe)[1])  # output width

    def generation(name: str, batch: int, new_tokens: int, layers: int, sampled: bool) -> Phase:
        phase = Phase(name, dict(weights))
        phase.items["optimizer states"] = states
        if ro.weights == "merged16":
            bias = (shape.q_out + 2 * shape.kv_out) if shape.attn_bias else 0
            phase.items[f"merged 16-bit copy of {layers} layers"] = layers * (lin + bias) * c
        phase.items[f"KV cache ({batch} x {prompt + new_tokens} tokens, {layers} layers)"] = \
            batch * (prompt + new_tokens) * layers * kv_per_token
        prefill = batch * prompt * (2 * shape.intermediate + 2 * shape.hidden) * c
        if ro.weights != "merged16":  # over the 4-bit weights: a dequantized weight, and with a 16-bit compute dtype
            prefill += dequant  # peft adds the unmerged adapters' float32 output to the base output in float32
            prefill += batch * prompt * 8 * widest_target if c != 4 else 0  # (two float32 tensors of its width)
        per_token = batch * shape.vocab * (c + (4 + 4 + 8 + 8 if sampled else 0))
        phase.items["prefill temporaries" if prefill >= per_token else "sampling temporaries (vocabulary)"] = max(prefill, per_token)
        return phase

    rollout = generation("rollout", rollout_rows, new, kept, sampled=True)
    logprob = Phase("logprob", dict(weights))
    logprob.items["optimizer states"] = states
    logprob.items["adapter gradients"] = grads
    if tr.shared_prompt_forward:  # each distinct prompt runs once, without checkpointing; completions on top of it
        prompts_in_micro = math.ceil(micro / ro.group_size)
        logprob.items[f"prompt forward, every layer's activations ({prompts_in_micro} x {prompt} tokens)"] = \
            shape.layers * layer_activation_bytes(shape, recipe, prompts_in_micro * prompt, c)
        tokens = micro * new
    else:
        tokens = micro * (prompt + new)
    layer_act = layer_activation_bytes(shape, recipe, tokens, c)
    if tr.gradient_checkpointing:
        logprob.items[f"saved layer inputs ({tokens} tokens)"] = shape.layers * tokens * shape.hidden * c
        recompute = 2 * layer_act + dequant
    else:
        logprob.items[f"saved activations ({tokens} tokens, {shape.layers} layers)"] = shape.layers * layer_act
        recompute = layer_act + dequant
    logprob.items["final hidden states"] = tokens * shape.hidden * c
    head_tokens = min(micro * new, recipe.loss.logprob_chunk)  # the head runs on completion positions only
    head = head_tokens * shape.vocab * 4 * 4  # float32 logits, log-softmax, and the two gradients of its backward
    if head >= recompute:
        logprob.items[f"LM head backward over {head_tokens} tokens (float32 logits, log-softmax, gradients)"] = head
    else:
        logprob.items["one layer's recompute + gradients"] = recompute
    optimizer = Phase("optimizer", dict(weights))
    optimizer.items["optimizer states"] = states
    optimizer.items["adapter gradients"] = grads
    if on_gpu:  # the multi-tensor (foreach) update that PyTorch uses for CUDA tensors allocates float32 temporaries
        optimizer.items["step temporaries"] = 4 * adapter
    evaluation = generation("eval", recipe.eval.batch_size, recipe.eval.max_new_tokens, shape.layers, sampled=False)
    export = Phase("export", {"merged linears (float32, before the cast)": shape.layers * lin * 4,
                              "embeddings + norms": weights["norms + biases"] + next(v for k, v in weights.items() if k.startswith("embeddings")),
                              "LoRA parameters (float32)": adapter * 4})
    settings = {"prompt_tokens": prompt, "max_new_tokens": new, "rollout_micro_batch": rollout_rows,
                "train_micro_batch": micro, "kept_layers": kept, "dtype_bytes": c, "update_tokens": tokens}
    return Plan([rollout, logprob, optimizer, evaluation, export], settings)


def largest_fitting(shape: ModelShape, recipe: Recipe, budget: int, phase: str, prompt_tokens: int | None = None,
                    on_gpu: bool = True) -> int:
    """The largest micro-batch (rollout rows for "rollout", update rows for "logprob") whose phase fits `budget`
    bytes; 0 when even one row does not fit."""
    rows = recipe.rollout.prompts_per_step * recipe.rollout.group_size
    best = 0
    for size in range(1, rows + 1):
        kwargs = {"rollout_micro_batch": size} if phase == "rollout" else {"train_micro_batch": size}
        if plan_memory(shape, recipe, prompt_tokens, on_gpu, **kwargs).phase(phase).total <= budget:
            best = size
        else:
            break
    return best


def fmt_gib(value: int) -> str:
    return f"{value / GiB:.2f} GiB"


# ---------------------------------------------------------------------------------------------------------- use

MARGIN = 0.10  # of the GPU's memory kept free: the CUDA context, the caching allocator's fragmentation
CPU_MICRO_BATCHES = {"rollout": 0, "train": 8}  # what "auto" means on a CPU (no device memory to fit): 0 = whole batch
LOWER = {  # what to lower when a phase does not fit
    "rollout": "[rollout] micro_batch (sequences generated at once) or max_new_tokens",
    "logprob": "[train] micro_batch_size, or set [train] gradient_checkpointing = true",
    "optimizer": "the model: a smaller one, or [lora] r",
    "eval": "[eval] batch_size or [eval] max_new_tokens",
    "export": 'nothing here: merge on the CPU ([model] device = "cpu" in the checkpoint\'s recipe)',
}


def recipe_shape(recipe: Recipe, model_config: str | None = None, cache_dir: str | None = None) -> tuple[ModelShape, str]:
    """The shape of the recipe's model and where it was read: a built-in shape, a local or cached config, or the
    builtin tiny model's (shipped, cached, or its config as it would be built)."""
    from lowres_reft.model.builtin import TINY_NAME
    from lowres_reft.model.shapes import infer_shape, known_shape
    from lowres_reft.utils.errors import UsageError

    if model_config is not None:
        return known_shape(model_config), f"built-in shape {model_config}"
    cfg = recipe.model
    if cfg.name == TINY_NAME:
        return _tiny_shape(recipe, cache_dir), "the builtin tiny model's config"
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        return ModelShape.from_config(config), f"{cfg.name}'s config"
    except Exception:  # noqa: BLE001 - offline, not cached, gated, not found: fall back to a known shape
        known = infer_shape(cfg.name)
        if known is None:
            raise UsageError(f"memory plan: cannot read {cfg.name}'s config (offline, or not downloaded); give a "
                             "built-in shape with --model-config") from None
        return known_shape(known), f"built-in shape {known} ({cfg.name}'s config is not available offline)"


def _tiny_shape(recipe: Recipe, cache_dir: str | None) -> ModelShape:
    import json
    from pathlib import Path

    from lowres_reft.tiny.builder import tiny_config, tiny_dir_name
    from lowres_reft.tiny.shipped import SHIPPED_DIR

    m = recipe.model
    name = tiny_dir_name(m.tiny_layers, m.tiny_hidden, m.tiny_pretrain_steps, 0, m.tiny_layerdrop, m.tiny_corpus, m.tiny_heads)
    for where in (SHIPPED_DIR, Path(cache_dir or recipe.log.output_dir) / "_builtin"):
        if (where / name / "config.json").is_file():
            return ModelShape.from_config(json.loads((where / name / "config.json").read_text()))
    return ModelShape.from_config(tiny_config(m.tiny_layers, m.tiny_hidden, 1024, m.tiny_heads))  # vocabulary estimated


def resolve_auto(recipe: Recipe, shape: ModelShape, budget: int | None, prompt_tokens: int | None = None,
                 margin: float = MARGIN) -> tuple[Recipe, list[str]]:
    """`recipe` with `"auto"` micro-batches replaced: the largest whose phase fits `budget` bytes less the margin
    (`budget` None, i.e. a CPU: `CPU_MICRO_BATCHES`), and a note on each choice."""
    import dataclasses

    from lowres_reft.utils.errors import UsageError

    ro, tr, notes = recipe.rollout, recipe.train, []
    usable = None if budget is None else int(budget * (1 - margin))
    if ro.micro_batch == "auto":
        size = CPU_MICRO_BATCHES["rollout"] if usable is None else largest_fitting(shape, recipe, usable, "rollout", prompt_tokens)
        if usable is not None and size == 0:
            raise UsageError(f'[rollout] micro_batch = "auto": not even one sequence fits {fmt_gib(usable)} (the memory plan: '
                             f"lowres-reft plan {recipe.source}); lower [rollout] max_new_tokens or use a smaller model")
        rows = ro.prompts_per_step * ro.group_size
        notes.append(f'[rollout] micro_batch = "auto" -> {size or rows}' + (" (CPU default: the whole batch)" if usable is None else ""))
        recipe = dataclasses.replace(recipe, rollout=dataclasses.replace(ro, micro_batch=0 if size >= rows else size))
    if tr.micro_batch_size == "auto":
        size = CPU_MICRO_BATCHES["train"] if usable is None else largest_fitting(shape, recipe, usable, "logprob", prompt_tokens)
        if usable is not None and size == 0:
            raise UsageError(f'[train] micro_batch_size = "auto": not even one sequence fits {fmt_gib(usable)} (the memory '
                             f"plan: lowres-reft plan {recipe.source}); set [train] gradient_checkpointing = true or "
                             "use a smaller model")
        notes.append(f'[train] micro_batch_size = "auto" -> {size}' + (" (CPU default)" if usable is None else ""))
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(tr, micro_batch_size=size))
    return recipe, notes


def check_fits(recipe: Recipe, shape: ModelShape, budget: int, prompt_tokens: int | None = None,
               margin: float = MARGIN) -> Plan:
    """The plan, or a one-line UsageError naming the first phase over `budget` less the margin and what to lower."""
    from lowres_reft.utils.errors import UsageError

    plan = plan_memory(shape, recipe, prompt_tokens)
    usable = int(budget * (1 - margin))
    for phase in plan.phases[:-1]:  # export runs apart from training
        if phase.total > usable:
            raise UsageError(f"memory plan: the {phase.name} phase needs {fmt_gib(phase.total)} but the GPU has "
                             f"{fmt_gib(budget)} ({fmt_gib(usable)} with a {margin:.0%} margin); lower {LOWER[phase.name]} "
                             f"(lowres-reft plan {recipe.source} shows every term)")
    return plan


def device_budget(device) -> int | None:
    """The GPU's total memory in bytes; None on a CPU (no plan check there)."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def describe(recipe: Recipe, shape: ModelShape, source: str, budget: int, prompt_tokens: int | None = None,
             notes: list[str] = (), margin: float = MARGIN) -> str:
    """The plan as `lowres-reft plan` prints it: settings, every phase's items and total, the verdict, what fits."""
    plan = plan_memory(shape, recipe, prompt_tokens)
    s = plan.settings
    usable = int(budget * (1 - margin))
    lines = [f"memory plan: {recipe.source}, {recipe.model.name} ({source}); {shape.layers} layers x {shape.hidden}, "
             f"vocabulary {shape.vocab}; {'4-bit NF4' if recipe.model.load_in_4bit else recipe.model.dtype} + LoRA r={recipe.lora.r}",
             f"  prompt {s['prompt_tokens']} + {s['max_new_tokens']} new tokens; rollout micro-batch {s['rollout_micro_batch']}, "
             f"update micro-batch {s['train_micro_batch']} ({s['update_tokens']} tokens); {s['kept_layers']} of "
             f"{shape.layers} layers kept in rollouts; {s['dtype_bytes']}-byte compute dtype", *[f"  {n}" for n in notes], ""]
    for phase in plan.phases:
        lines.append(f"{phase.name:<10} {fmt_gib(phase.total):>10}")
        lines += [f"    {fmt_gib(v):>10}  {k}" for k, v in phase.items.items()]
    peak = max(plan.phases[:-1], key=lambda p: p.total)
    lines.append("")
    lines.append(f"total (the peak, {peak.name}): {fmt_gib(peak.total)} of {fmt_gib(budget)} "
                 f"({fmt_gib(usable)} usable with a {margin:.0%} margin)")
    over = [p for p in plan.phases[:-1] if p.total > usable]
    if over:
        lines += [f"does not fit: {p.name} needs {fmt_gib(p.total)}; lower {LOWER[p.name]}" for p in over]
    else:
        lines.append("fits")
    rows = recipe.rollout.prompts_per_step * recipe.rollout.group_size
    rollout_fit = largest_fitting(shape, recipe, usable, "rollout", prompt_tokens)
    train_fit = largest_fitting(shape, recipe, usable, "logprob", prompt_tokens)
    lines.append(f"largest that fit: [rollout] micro_batch = {rollout_fit}" + (" (the whole batch)" if rollout_fit == rows else "")
                 + f", [train] micro_batch_size = {train_fit}" + (f" (of {rows})" if train_fit == rows else ""))
    if recipe.model.attn_implementation == "eager":
        lines.append("note: eager attention keeps (batch x heads x tokens x tokens) score matrices that this plan does not "
                     "count (it assumes SDPA's memory-efficient kernels): leave a larger margin")
    if plan.phase("export").total > usable:
        lines.append(f"export: merging needs {fmt_gib(plan.phase('export').total)}: merge on the CPU")
    return "\n".join(lines)


def fit_memory(recipe: Recipe, policy, prompts: list[list[int]], log=print) -> tuple[Recipe, str]:
    """At the start of a run, before anything is written: `"auto"` micro-batches resolved, the plan checked against
    the GPU (a one-line `UsageError` when a phase does not fit), and the rollout phase's figure for an out-of-memory
    message. Planned for the longest prompt of `prompts`."""
    from lowres_reft.model.layers import unwrap

    shape = ModelShape.from_config(unwrap(policy.model).config)
    budget = device_budget(policy.device)
    longest = max((len(p) for p in prompts), default=None)
    recipe, notes = resolve_auto(recipe, shape, budget, longest)
    for note in notes:
        log(note)
    if budget is None:
        plan = plan_memory(shape, recipe, longest, on_gpu=False)
        return recipe, f"the memory plan puts the rollout phase at {fmt_gib(plan.phase('rollout').total)}"
    plan = check_fits(recipe, shape, budget, longest)
    return recipe, (f"the memory plan puts the rollout phase at {fmt_gib(plan.phase('rollout').total)} of the GPU's "
                    f"{fmt_gib(budget)}")
