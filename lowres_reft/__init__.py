"""lowres-reft: Nested-ReFT (layer-skipped off-policy rollouts + corrected GRPO) on 4-bit LoRA models."""

__version__ = "0.1.0"
