"""The recipe's sections: one frozen, typed dataclass per TOML table (`[model]`, `[lora]`, ...), with every default.

Every default lives here and only here. Each section's `validate()` checks its own values (ranges, and names
against the components' registries: rollout engines, weight modes, loss corrections and aggregations), raising
`_KeyError`, which `recipe._build_section` turns into a `ConfigError` naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Sane bounds: an Adam learning rate above 1 only diverges; below MIN_TEMPERATURE logits / T overflow float32;
# seeds must fit torch's 64-bit generator after the per-process offset.
MAX_LR = 1.0
MIN_TEMPERATURE = 1e-3
MAX_SEED = 2**63
# A run directory's name: file systems allow 255 bytes, and the run adds suffixes to it (".tmp-<pid>" and the like).
MAX_NAME_BYTES = 200

DEFAULT_SYSTEM_PROMPT = "Solve the math problem. Reason step by step, then give the final answer as \\boxed{ANSWER}."


class _KeyError(Exception):
    """Raised inside a section's validate(); re-raised with the file and section as ConfigError."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key, self.problem = key, problem


def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise _KeyError(key, problem)


def _require_choice(value: str, key: str, choices) -> None:
    """`value` must name one of `choices` (a registry's keys, or a tuple of names)."""
    _require(value in choices, key, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    # Hub name, local directory, or "builtin:tiny" (a tiny Qwen2 model built locally, no download).
    name: str = "Qwen/Qwen2.5-1.5B-Instruct"
    revision: str | None = None
    # Compute/storage dtype of the non-quantized parts and of the 4-bit matmuls.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "bfloat16"
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # Storage dtype of the packed 4-bit weights; FSDP-QLoRA needs a float storage (e.g. "bfloat16") to shard them.
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    trust_remote_code: bool = False
    # "auto": CUDA when available, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Attention kernel handed to transformers ("sdpa" everywhere, "eager" for debugging).
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # LM head matmul in float32 in rollout and update alike (no bf16 rounding of logits between behavior and
    # recomputed log-probs); a transient float32 copy of the head's weight per call, no persistent one.
    lm_head_fp32: bool = False
    # Sizes of the builtin tiny model (only used with name = "builtin:tiny").
    tiny_layers: int = 6
    tiny_hidden: int = 128
    # Pretraining steps of the builtin tiny model on generated arithmetic text (0 = random init); see tiny.py.
    tiny_pretrain_steps: int = 0
    # LayerDrop rate of that pretraining: each middle layer is skipped with this probability in each step, so the
    # base tolerates the nested rollouts' skipped layers; 0 = never (like a real checkpoint). Part of the cache key.
    tiny_layerdrop: float = 0.3
    # Text of that pretraining: "arithmetic" (equations, phrases, scenes), "reasoning" (also chains of carried
    # equations) or "problems" (also builtin:reasoning's training-pool word problems); see tiny_corpus.pretrain_settings.
    tiny_corpus: Literal["arithmetic", "reasoning", "problems"] = "arithmetic"
    # Attention heads of the tiny model, each with its own key/value head (0 = the original shape); more, narrower
    # heads help a tiny base copy numbers out of prose (builtin:reasoning). Part of the cache directory's name.
    tiny_heads: int = 0

    def validate(self) -> None:
        _require(self.tiny_layers >= 2, "tiny_layers", "must be >= 2")
        _require(self.tiny_hidden >= 32 and self.tiny_hidden % 32 == 0, "tiny_hidden", "must be a multiple of 32")
        _require(self.tiny_pretrain_steps >= 0, "tiny_pretrain_steps", "must be >= 0")
        _require(0.0 <= self.tiny_layerdrop < 1.0, "tiny_layerdrop", "must be in [0, 1)")
        _require(self.tiny_heads >= 0 and (self.tiny_heads == 0 or self.tiny_hidden % (2 * self.tiny_heads) == 0),
                 "tiny_heads", "must be 0 or divide tiny_hidden into heads of an even size")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear" (peft's): every linear layer of the decoder but the LM head, as QLoRA does, on any architecture
    # (e.g. Phi-3's fused qkv_proj/gate_up_proj); or a list of module names, each of which must match a module.
    target_modules: tuple[str, ...] | Literal["all-linear"] = "all-linear"
    # Rank-stabilized LoRA: scale the update by alpha / sqrt(r) instead of alpha / r (steadier across ranks).
    use_rslora: bool = False
    # DoRA: a learned magnitude per output feature on top of the LoRA direction (slower steps, works on 4-bit).
    use_dora: bool = False
    # Modules trained in full and saved with the adapter (e.g. ["lm_head"]); empty = adapters only.
    modules_to_save: tuple[str, ...] = ()
    # "default": A random (Kaiming), B = 0; "gaussian": A ~ N(0, 1/r), B = 0; "orthogonal": A, B from orthogonal
    # halves of a random basis, BA = 0 (even r, 16/32-bit base: peft casts A, B to the base's dtype). All start at 0.
    init_lora_weights: Literal["default", "gaussian", "orthogonal"] = "default"

    def validate(self) -> None:
        _require(self.r >= 1, "r", "must be >= 1")
        _require(self.alpha > 0, "alpha", "must be > 0")
        _require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _require(len(self.target_modules) > 0, "target_modules", "must name at least one module")
        _require(all(name.strip() for name in self.modules_to_save), "modules_to_save", "must not hold empty names")
        _require(self.init_lora_weights != "orthogonal" or self.r % 2 == 0, "init_lora_weights",
                 '= "orthogonal" needs an even r')


@dataclass(frozen=True)
class DataConfig:
    # "builtin:arithmetic", "builtin:reasoning" (generated locally), "gsm8k", "svamp", "math12k", "math500", "jsonl", "parquet", "csv".
    name: str = "gsm8k"
    # Local file or directory; when set it is loaded instead of the hub dataset. A directory holds one file per split
    # (train.jsonl, test.jsonl, ...); a single file is the train split only, and then `eval_path` must name the eval one
    # (one file as both would measure accuracy on training problems).
    path: str | None = None
    # Local file or directory for the eval split (default: the eval split of `path` or of the hub dataset).
    eval_path: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    question_field: str | None = None
    answer_field: str | None = None
    solution_field: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = 200
    shuffle_seed: int = 0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Use the tokenizer's chat template when it has one; a plain "Question/Answer" template otherwise.
    use_chat_template: bool = True
    # Handed to the chat template as `enable_thinking` when set (Qwen3: false = answer without a <think> block).
    enable_thinking: bool | None = None
    max_prompt_tokens: int = 512
    # Size of the generated data sets (train, test): builtin:arithmetic, builtin:reasoning and reasoning_gym:<task>.
    builtin_train_size: int = 2000
    builtin_test_size: int = 200
    # Options of a reasoning_gym:<task> generator, e.g. { min_terms = 2, max_terms = 3 } (see reasoning_gym_data.py).
    task_config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _require(self.path is None or self.path.strip() != "", "path", 'must not be empty (omit it to use the named dataset; "." for the current directory)')
        _require(self.eval_path is None or self.eval_path.strip() != "", "eval_path", "must not be empty (omit it)")
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            _require(value is None or value >= 1, key, "must be >= 1 (or omitted for all)")
        _require(self.max_prompt_tokens >= 8, "max_prompt_tokens", "must be >= 8")
        _require(self.builtin_train_size >= 1, "builtin_train_size", "must be >= 1")
        _require(self.builtin_test_size >= 1, "builtin_test_size", "must be >= 1")


@dataclass(frozen=True)
class WarmupConfig:
    """Supervised warm-up of the adapters on reference solutions before RL (the original ReFT's first stage)."""

    # Optimizer steps of supervised fine-tuning (0 = no warm-up stage).
    steps: int = 0
    lr: float = 1e-4
    batch_size: int = 16
    max_tokens: int = 512  # longer examples are cut (the loss is on the solution tokens only)
    # Then steps of skip distillation (0 = none; warmup.py), skipping that ratio of layers (0 = [behavior]'s ratio).
    skip_distill_steps: int = 0
    skip_distill_ratio: float = 0.0

    def validate(self) -> None:
        _require(self.steps >= 0, "steps", "must be >= 0")
        _require(0.0 < self.lr <= MAX_LR, "lr", f"must be in (0, {MAX_LR:g}]")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.max_tokens >= 8, "max_tokens", "must be >= 8")
        _require(self.skip_distill_steps >= 0, "skip_distill_steps", "must be >= 0")
        _require(0.0 <= self.skip_distill_ratio < 1.0, "skip_distill_ratio", "must be in [0, 1)")


@dataclass(frozen=True)
class BehaviorConfig:
    # Fraction r of the decoder layers skipped by the behavior policy; round(r * L) layers per rollout batch.
    skip_ratio: float = 0.25
    # "random": a new uniform subset of the valid layers per rollout batch (the paper); "fixed": `layers`; "adaptive":
    # random subsets whose ratio moves in [min_ratio, max_ratio] by adapt_rate per step to keep the ESS near target_ess.
    schedule: Literal["random", "fixed", "adaptive"] = "random"
    # Random subsets: "scattered" (any of the valid layers) or "contiguous" (a run of consecutive valid layers).
    layout: Literal["scattered", "contiguous"] = "scattered"
    # Skip sets per rollout batch: its prompts are split into this many runs, each sampled by a nested model of its
    # own (an ensemble of behavior policies inside one batch; one sampling pass per set).
    sets_per_batch: int = 1
    # Which valid layers the random sets come from: "uniform" (any, the paper) or "influence" (the round(influence_pool
    # x k) valid layers of least block influence, 1 - cos(layer input, output), measured on the base model (adapters
    # off) at the start of the run over the first `influence_texts` training problems; k layers drawn per batch).
    skip_layers: Literal["uniform", "influence"] = "uniform"
    influence_pool: float = 1.5
    influence_texts: int = 64
    layers: tuple[int, ...] = ()
    protect_first: int = 1
    protect_last: int = 1
    min_ratio: float = 0.0
    max_ratio: float = 0.5
    target_ess: float = 0.7
    adapt_rate: float = 0.05

    def validate(self) -> None:
        _require(0.0 <= self.skip_ratio < 1.0, "skip_ratio", "must be in [0, 1)")
        _require(self.protect_first >= 0, "protect_first", "must be >= 0")
        _require(self.protect_last >= 0, "protect_last", "must be >= 0")
        _require(self.schedule != "fixed" or len(self.layers) > 0, "layers", 'must list layer indices when schedule = "fixed"')
        _require(len(set(self.layers)) == len(self.layers), "layers", "must not repeat a layer")
        _require(0.0 <= self.min_ratio <= self.max_ratio < 1.0, "min_ratio", "and max_ratio must satisfy 0 <= min_ratio <= max_ratio < 1")
        _require(0.0 < self.target_ess <= 1.0, "target_ess", "must be in (0, 1]")
        _require(self.adapt_rate > 0.0, "adapt_rate", "must be > 0")
        _require(self.sets_per_batch >= 1, "sets_per_batch", "must be >= 1")
        _require(self.influence_pool >= 1.0, "influence_pool", "must be >= 1 (the pool holds at least the layers skipped)")
        _require(self.influence_texts >= 1, "influence_texts", "must be >= 1")
        if self.skip_layers == "influence":
            _require(self.schedule != "fixed", "skip_layers", '= "influence" draws random sets; it cannot go with schedule = "fixed"')
            _require(self.layout == "scattered", "skip_layers", '= "influence" needs layout = "scattered" (its pool need not be contiguous)')


@dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    # Sequences generated at once (0 = the whole step's prompts_per_step * group_size; "auto" = the most that the
    # memory plan fits into the GPU, the whole batch on a CPU; `lowres-reft plan`).
    micro_batch: int | Literal["auto"] = 0
    # The sampling engine (lowres_reft.rollout.engine.ENGINES), used for rollouts and evaluation: "loop" = the plain
    # decode loop with a dynamic KV cache (the reference); "static" = preallocated KV cache and buffers, one CUDA
    # graph replayed per token on CUDA (eager elsewhere); "static_eager" = "static" without CUDA graphs.
    engine: str = "loop"
    # What the engine decodes through (lowres_reft.model.rollout_weights): "shared4bit" (4-bit base + LoRA) or "merged16".
    weights: str = "shared4bit"

    def validate(self) -> None:
        _require(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        _require(self.group_size >= 2, "group_size", "must be >= 2 (group advantages need at least two completions)")
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _require(self.temperature >= MIN_TEMPERATURE, "temperature",
                 f"must be >= {MIN_TEMPERATURE:g} (training samples; greedy is for eval; below that logits / T overflow)")
        _require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _require(self.micro_batch == "auto" or self.micro_batch >= 0, "micro_batch", 'must be >= 0 or "auto"')
        from lowres_reft.model.rollout_weights import WEIGHT_MODES
        from lowres_reft.rollout.engine import ENGINES

        _require_choice(self.engine, "engine", ENGINES)
        _require_choice(self.weights, "weights", WEIGHT_MODES)


@dataclass(frozen=True)
class LossConfig:
    # A name in the correction registry (lowres_reft.rl.loss.CORRECTIONS): none, tis, seq_is, retrace.
    correction: str = "retrace"
    # Cap on importance ratios (tis, seq_is, retrace); inf = uncapped (the one float key where inf is allowed).
    is_cap: float = field(default=2.0, metadata={"allow_inf": True})
    retrace_lambda: float = 1.0
    # "std": A = (R - mean) / (std + eps) (GRPO); "none": A = R - mean (Dr. GRPO).
    advantage_scale: str = "std"
    advantage_eps: float = 1e-4
    aggregation: str = "token_mean"  # token_mean, seq_mean or dr_grpo (lowres_reft.rl.loss.AGGREGATIONS)
    kl_beta: float = 0.0
    # Skip distillation during RL: beta x KL(full model || nested model with the batch's skip set) per completion token
    # of each rollout batch (the full model as it is, without gradient, is the teacher), added to the loss.
    nested_kl_beta: float = 0.0
    # PPO clipping against the first update's log-probs (only matters with updates_per_batch > 1).
    clip_eps: float = 0.2
    clip_eps_high: float = 0.2
    updates_per_batch: int = 1
    # Tokens per chunk when computing log-probs, so (tokens x vocab) float32 logits never exist at once.
    logprob_chunk: int = 1024

    def validate(self) -> None:
        from lowres_reft.rl import loss

        _require_choice(self.correction, "correction", loss.CORRECTIONS)
        _require_choice(self.advantage_scale, "advantage_scale", loss.ADVANTAGE_SCALES)
        _require_choice(self.aggregation, "aggregation", loss.AGGREGATIONS)
        _require(self.is_cap > 0.0, "is_cap", "must be > 0 (use inf for no cap)")
        _require(0.0 <= self.retrace_lambda <= 1.0, "retrace_lambda", "must be in [0, 1]")
        _require(self.advantage_eps >= 0.0, "advantage_eps", "must be >= 0")
        _require(self.kl_beta >= 0.0, "kl_beta", "must be >= 0")
        _require(self.nested_kl_beta >= 0.0, "nested_kl_beta", "must be >= 0")
        _require(0.0 <= self.clip_eps < 1.0, "clip_eps", "must be in [0, 1)")
        _require(self.clip_eps_high >= 0.0, "clip_eps_high", "must be >= 0")
        _require(self.updates_per_batch >= 1, "updates_per_batch", "must be >= 1")
        _require(self.logprob_chunk >= 1, "logprob_chunk", "must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    lr: float = 1e-5
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    # "adamw": torch AdamW; "paged_adamw_8bit": bitsandbytes PagedAdamW8bit (CUDA only, falls back to adamw).
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"
    weight_decay: float = 0.0
    # Sequences per forward/backward pass ("auto" = the most that the memory plan fits into the GPU, 8 on a CPU).
    micro_batch_size: int | Literal["auto"] = 8
    # Forward each distinct prompt of a micro-batch once, shared by its completions (same log-probs, fewer FLOPs;
    # models with sliding-window attention use the plain per-row forward).
    shared_prompt_forward: bool = True
    # Rollout batches (each with its own skip set) accumulated into one optimizer step.
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = True

    def validate(self) -> None:
        _require(self.steps >= 1, "steps", "must be >= 1")
        _require(0.0 < self.lr <= MAX_LR, "lr", f"must be in (0, {MAX_LR:g}]")
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _require(self.weight_decay >= 0.0, "weight_decay", "must be >= 0")
        _require(self.micro_batch_size == "auto" or self.micro_batch_size >= 1, "micro_batch_size", 'must be >= 1 or "auto"')
        _require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        _require(self.max_grad_norm > 0.0, "max_grad_norm", "must be > 0")
        _require(0 <= self.seed < MAX_SEED, "seed", "must be in [0, 2^63)")


@dataclass(frozen=True)
class EvalConfig:
    # Evaluate every N steps (0 = only before and after training).
    every: int = 0
    max_new_tokens: int = 256
    batch_size: int = 32
    before_training: bool = True

    def validate(self) -> None:
        _require(self.every >= 0, "every", "must be >= 0")
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    # Save every N steps (0 = only at the end); always saved at the end and on Ctrl-C.
    every: int = 50
    # "latest": continue from the run's last checkpoint when one exists (same as --resume).
    resume: Literal["never", "latest"] = "never"
    # Checkpoints kept on disk (older ones are deleted); checkpoint-last always points at the newest.
    keep_last: int = 3

    def validate(self) -> None:
        _require(self.every >= 0, "every", "must be >= 0")
        _require(self.keep_last >= 1, "keep_last", "must be >= 1")


@dataclass(frozen=True)
class LogConfig:
    # Outputs go to <output_dir>/<run_name>/.
    output_dir: str = "runs"
    run_name: str = ""
    # "auto": a progress bar on a terminal, plain lines otherwise.
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    # Experiment trackers, named as accelerate names them: "tensorboard", "wandb", "mlflow", "trackio", "comet_ml",
    # "aim", "clearml", "dvclive", "swanlab" (see lowres_reft/tracking.py). metrics.jsonl is always written.
    trackers: tuple[str, ...] = ()
    # Project / experiment name handed to the hosted trackers (the run name names the run).
    project: str = "lowres-reft"

    def validate(self) -> None:
        _require("/" not in self.run_name and "\\" not in self.run_name and self.run_name not in (".", ".."), "run_name",
                 "must be a plain name, not a path")
        _require(not any(ord(ch) < 32 or ord(ch) == 127 for ch in self.run_name), "run_name",
                 "must not contain control characters")
        _require(len(self.run_name.encode("utf-8")) <= MAX_NAME_BYTES, "run_name",
                 f"is {len(self.run_name.encode('utf-8'))} bytes long; use at most {MAX_NAME_BYTES} (a directory name)")


@dataclass(frozen=True)
class ExportConfig:
    # dtype of the merged model written by `lowres-reft export --merged`.
    merged_dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"


@dataclass(frozen=True)
class RewardConfig:
    # Names from the reward registry (lowres_reft.data.rewards), summed.
    functions: tuple[str, ...] = ("math_correct",)
    format_weight: float = 0.1  # weight of the optional "format" reward ("format" in functions)
    # Credit only an explicitly stated final answer (`\\boxed{}`, `#### N`, "the answer is N"), not the last number
    # of the text; lenient by default (custom or unformatted data), on in the real-data recipes (see their comments).
    require_final_answer: bool = False
    # Seconds one reward call may take; past it the completion scores 0 and metrics count a reward_timeout
    # (the call is abandoned in its worker thread). 0 = wait forever.
    timeout_s: float = 10.0

    def validate(self) -> None:
        _require(len(self.functions) > 0, "functions", "must name at least one reward function")
        _require(self.timeout_s >= 0.0, "timeout_s", "must be >= 0 (0 = no timeout)")
