"""config: the recipe. TOML tables -> typed, frozen dataclasses with every default, validated with one-line errors.

  sections.py  one dataclass per TOML table ([model], [lora], ...), every default, each section's own checks
  recipe.py    `Recipe`, `load_recipe` (TOML file + `--set` overrides), cross-section rules
  toml.py      typing TOML values and writing a recipe back as TOML

May import: `utils`, and the registries of `model`, `rollout` and `rl` (rollout engines, weight modes, loss
corrections and aggregations: a recipe's names are checked against them, never against a second list). The packages
below config receive their sections as arguments and import config for type checking only; `run`, `bench`,
`research` and `cli` import it for real.
"""

from lowres_reft.config.recipe import Recipe, load_recipe, recipe_from_dict, sections
from lowres_reft.config.sections import (
    DEFAULT_SYSTEM_PROMPT,
    MAX_LR,
    MAX_SEED,
    MIN_TEMPERATURE,
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
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "MAX_LR", "MAX_SEED", "MIN_TEMPERATURE", "BehaviorConfig", "CheckpointConfig", "DataConfig",
    "EvalConfig", "ExportConfig", "LogConfig", "LoraConfig", "LossConfig", "ModelConfig", "Recipe", "RewardConfig",
    "RolloutConfig", "TrainConfig", "WarmupConfig", "load_recipe", "recipe_from_dict", "sections",
]
