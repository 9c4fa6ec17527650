"""lowres-reft: Nested-ReFT (layer-skipped off-policy rollouts + corrected GRPO) on 4-bit LoRA models."""

from lowres_reft.utils import quiet as _quiet

__version__ = "0.1.0"

_quiet.install()  # before anything imports bitsandbytes
