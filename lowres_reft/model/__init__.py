"""model: the target policy and its nested views. Loading (4-bit NF4 + LoRA), where the decoder layers live,
skipping them, the log-prob path, and the merged rollout weights.

  loader.py          the one loader: tokenizer + (4-bit) base + LoRA, or a plain model (`load_policy`)
  builtin.py         builtin model names (`builtin:tiny`) -> the function that makes them, imported on demand
  layers.py          where a model keeps its decoder layers (`LayerStack`): the one file to touch for a new layout
  nested.py          skip-set schedules and `skip_layers` (the nested behavior policy, no copy, no compute)
  logprobs.py        hidden states -> logits -> per-token log-probs (one path for sampling and training)
  rollout_weights.py what the engines decode through: the shared 4-bit weights or a merged 16-bit copy

May import: `utils`. Independent of `data`; config's sections for type checking only. The builtin tiny base is
found through `builtin.BUILTIN_MODELS` (a "module:function" name), never by importing its builder.
"""
