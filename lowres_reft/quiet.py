"""Third-party log lines that alarm users without telling them anything they can act on, reworded or dropped.

bitsandbytes' CPU backend, on CPUs with avx512_bf16, tries at import time to fetch an optional fused 4-bit matmul
from the Hub through the `kernels` package and logs "Failed to load CPU gemm_4bit_forward from kernels-community:
No module named 'kernels' ..." when it is not installed. It then uses its own built-in CPU kernels, which compute
the same products (the fused one only speeds up bfloat16 on such CPUs). We say that once, in our words.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTE = ("note: bitsandbytes uses its built-in CPU 4-bit kernels (an optional faster bfloat16 kernel needs "
                    "the `kernels` package); nothing to fix")


class _RewordBnbKernels(logging.Filter):
    """Turns bitsandbytes' "Failed to load CPU gemm_4bit_forward" warning into one short note (first time only)."""

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" not in str(record.msg):
            return True
        if self.said:
            return False
        self.said = True
        record.msg, record.args = BNB_KERNELS_NOTE, ()
        return True


def install() -> None:
    """Install the filters; must run before bitsandbytes is imported (it logs at import time). Idempotent."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _RewordBnbKernels) for f in logger.filters):
        logger.addFilter(_RewordBnbKernels())
