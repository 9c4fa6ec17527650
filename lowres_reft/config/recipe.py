"""A recipe: TOML file + `--set` overrides -> a validated `Recipe`, with one-line messages.

A recipe names sections (`[model]`, `[lora]`, ...) whose keys are the fields of the matching dataclass
(`sections`); unknown sections/keys, wrong types and out-of-range values raise `ConfigError` naming the file and
the key (with a "did you mean" for typos), and cross-section rules are checked once the sections are built.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from lowres_reft.config.sections import (
    BehaviorConfig,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    LogConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    TrainConfig,
    WarmupConfig,
    _KeyError,
)
from lowres_reft.config.toml import coerce, read_value, type_name
from lowres_reft.model.builtin import TINY_NAME
from lowres_reft.utils.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # Where the recipe came from (not a TOML key).
    source: str = field(default="<defaults>", compare=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The recipe as TOML-ready nested dicts (None values dropped, tuples as lists, inf kept)."""
        out: dict[str, dict[str, Any]] = {}
        for section in sections():
            values = dataclasses.asdict(getattr(self, section))
            out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if v is not None}
        return out

    @property
    def run_name(self) -> str:
        return self.log.run_name or Path(self.source).stem


def sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Recipe) if f.name != "source"]


def _did_you_mean(name: str, choices: list[str]) -> str:
    return did_you_mean(name, choices) or f" (known: {', '.join(sorted(choices))})"


def _build_section(cls: type, values: dict[str, Any], section: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key [{section}] {key}{_did_you_mean(key, names)}")
        try:
            kwargs[key] = coerce(value, hints[key])
        except TypeError:
            raise ConfigError(f"{source}: [{section}] {key} must be {type_name(hints[key])}, got {value!r}") from None
    for f in dataclasses.fields(cls):
        value = kwargs.get(f.name)
        if isinstance(value, float) and not math.isfinite(value) and not (math.isinf(value) and f.metadata.get("allow_inf")):
            # NaN/inf would pass most range checks silently (every comparison with NaN is False).
            raise ConfigError(f"{source}: [{section}] {f.name} must be a finite number, got {value!r}")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except _KeyError as err:
            raise ConfigError(f"{source}: [{section}] {err.key} {err.problem}") from None
    return obj


def _parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value). The value is read as TOML, else as a bare string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.steps=20")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    section_cls = typing.get_type_hints(Recipe).get(section.strip())
    tp = typing.get_type_hints(section_cls).get(key.strip()) if dataclasses.is_dataclass(section_cls) else None
    # --set log.run_name=nan means the name "nan", not a float
    return section.strip(), key.strip(), read_value(raw.strip(), tp)


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    names = sections()
    hints = typing.get_type_hints(Recipe)
    built: dict[str, Any] = {}
    for section, values in data.items():
        if section not in names:
            raise ConfigError(f"{source}: unknown section [{section}]{_did_you_mean(section, names)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys, got {values!r}")
        built[section] = _build_section(hints[section], values, section, source)
    recipe = Recipe(**built, source=source)
    _validate_recipe(recipe)
    return recipe


def _validate_recipe(recipe: Recipe) -> None:
    src = recipe.source
    for key, ratio in (("[behavior] skip_ratio", recipe.behavior.skip_ratio), ("[warmup] skip_distill_ratio", recipe.warmup.skip_distill_ratio)):
        if recipe.behavior.schedule == "fixed" and ratio > 0:  # the layer list sets what is skipped: no silent conflict
            raise ConfigError(f'{src}: {key} must be 0 (or omitted) when [behavior] schedule = "fixed"; the layers list sets what is skipped')
    if "reasoning_gym" in recipe.reward.functions and not recipe.data.name.startswith("reasoning_gym:"):
        raise ConfigError(f'{src}: [reward] functions: "reasoning_gym" scores with a reasoning-gym task\'s verifier; '
                          'it needs [data] name = "reasoning_gym:<task>"')
    if recipe.lora.init_lora_weights == "orthogonal" and recipe.model.load_in_4bit:
        raise ConfigError(f'{src}: [lora] init_lora_weights = "orthogonal" needs a 16/32-bit base ([model] load_in_4bit = false)')
    if recipe.loss.nested_kl_beta > 0 and recipe.behavior.sets_per_batch > 1:
        raise ConfigError(f"{src}: [loss] nested_kl_beta needs [behavior] sets_per_batch = 1 (one skip set per batch)")
    if recipe.rollout.weights == "merged16" and recipe.lora.use_dora:
        raise ConfigError(f'{src}: [rollout] weights = "merged16" does not support DoRA ([lora] use_dora); use "shared4bit"')
    beh, layers = recipe.behavior, recipe.model.tiny_layers
    if recipe.model.name == TINY_NAME and beh.protect_first + beh.protect_last >= layers:
        raise ConfigError(f"{src}: [behavior] protect_first + protect_last must be < the model's {layers} layers")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply `section.key=value` overrides, validate. Raises ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a directory, not a recipe file (give a .toml file, e.g. recipes/tiny-cpu.toml)")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path}: not a regular file (a pipe or a device); give a .toml recipe file")
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found (try recipes/tiny-cpu.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark some editors write: ignored
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: TOML syntax error: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if not data:
        print(f"note: {path} sets no keys: every default applies (lowres-reft check {path} lists them)", file=sys.stderr)
    for text in overrides:
        section, key, value = _parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{path}: [{section}] must be a table of keys")
        data[section][key] = value
    return recipe_from_dict(data, source=str(path))
