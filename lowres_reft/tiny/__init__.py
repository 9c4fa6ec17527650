"""tiny: the builtin tiny base (`[model] name = "builtin:tiny"`), made locally so that the whole pipeline runs on a
laptop CPU with no downloads.

  builder.py   the model config, the pretraining loop and the cache (`ensure_tiny_model`, `tiny_dir_name`)
  corpus.py    the pretraining text and settings per corpus (`pretrain_settings`, `pretrain_batch`)
  tokenizer.py its tokenizers: one token per character, or word tokens for the "problems" corpus
  shipped.py   the pretrained bases shipped in `bases/` (the demo recipes'), checked against their manifest

May import: `model` (the layer stack and `skip_layers`, for LayerDrop; `TINY_NAME`), `data` (the builtin tasks'
problems, for the corpus), `utils`. Nothing imports the builder but `cli` (`lowres-reft build-base`), `bench` and the
loader's registry (`model.builtin.BUILTIN_MODELS` names `resolve_model_dir` below, imported when a recipe asks for
the tiny model).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowres_reft.config import ModelConfig


def resolve_model_dir(cfg: ModelConfig, cache_dir: Path) -> Path:
    """The directory of the tiny model `cfg` asks for: shipped in the package, cached under `<cache_dir>/_builtin`,
    or built (and pretrained) there now."""
    from lowres_reft.tiny.builder import ensure_tiny_model

    return ensure_tiny_model(Path(cache_dir) / "_builtin", cfg.tiny_layers, cfg.tiny_hidden,
                             pretrain_steps=cfg.tiny_pretrain_steps, layer_drop=cfg.tiny_layerdrop, corpus=cfg.tiny_corpus,
                             heads=cfg.tiny_heads)
