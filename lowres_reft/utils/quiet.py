"""bitsandbytes' optional CPU kernel from the Hub: never fetched by us, and no third-party lines about it.

What happens without us (bitsandbytes 0.50, kernels 0.19, read in their code and seen on this project's machines):
on a CPU with avx512_bf16, `import bitsandbytes` (which `import peft` triggers) calls
`kernels.get_kernel("kernels-community/quantization-bitsandbytes", version=1)`. With `kernels` installed (transformers
5.25 requires it) and the Hub reachable, that checks the publisher on the Hub, downloads a compiled kernel into the
Hugging Face cache and loads it into the process: native code fetched from the Hub at import time. When it fails,
bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community: <why>" (why: "No module named
'kernels'", the Hub is offline and the kernel is not cached, the publisher check or the download failed, ...) and
`kernels` may log lines of its own ("Skipping publisher trust check ... offline mode").

lowres-reft never uses that kernel: it serves only bitsandbytes' repacked-weight inference path on such CPUs, which we
switch off on every 4-bit layer (`model.disable_cpu_bf16_repack`: it changes the weights in place and breaks
training). So `install()`, run when `lowres_reft` is imported, makes the `kernels` module unimportable while the
`bitsandbytes` package itself is being imported (only then: `kernels` stays usable by everything else, and is put
back as it was): bitsandbytes falls back to its built-in CPU kernels, nothing is fetched, nothing runs from the Hub.
Environment variables are no way to get this: `HF_HUB_OFFLINE=1` stops the download but loads a kernel already in
the cache, and has effects far beyond it.

The messages, matched by the logger that emits them, never by their wording (which changes between releases):
- the warnings bitsandbytes' CPU backend logs while that guarded import runs are the fallback we caused: dropped;
- when bitsandbytes was imported before `lowres_reft` (so unguarded), its CPU backend's first warning mentioning a
  kernel becomes one short note (`BNB_KERNELS_NOTE`), later ones are dropped; its errors always show;
- warnings from the `kernels` package's loggers are dropped (lowres-reft loads no Hub kernels; errors still show).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

BNB_PACKAGE = "bitsandbytes"
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_PACKAGE = "kernels"
BNB_KERNELS_NOTE = ("note: bitsandbytes uses its built-in CPU 4-bit kernels (its optional kernel from the Hugging "
                    "Face Hub is not loaded); nothing to fix")
_MISSING = object()


class _Guard:
    """Whether the guarded `import bitsandbytes` is running (what bitsandbytes logs then is the fallback we caused)."""

    active = False


class _GuardedLoader(importlib.abc.Loader):
    """Runs the real loader of the `bitsandbytes` package with `kernels` unimportable, then puts `kernels` back."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        saved = sys.modules.get(KERNELS_PACKAGE, _MISSING)
        sys.modules[KERNELS_PACKAGE] = None  # `from kernels import ...` raises ImportError
        _Guard.active = True
        try:
            self.loader.exec_module(module)
        finally:
            _Guard.active = False
            if saved is _MISSING:
                sys.modules.pop(KERNELS_PACKAGE, None)
            else:
                sys.modules[KERNELS_PACKAGE] = saved


class _GuardBnbImport(importlib.abc.MetaPathFinder):
    """Finds the `bitsandbytes` package as the path finder would, with its loader wrapped in `_GuardedLoader`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != BNB_PACKAGE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _GuardedLoader(spec.loader)
        return spec


class _BnbKernelMessages(logging.Filter):
    """On bitsandbytes' CPU backend logger: drop what it logs during the guarded import; otherwise turn its first
    kernel warning into `BNB_KERNELS_NOTE` and drop later ones."""

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:  # errors always show
            return True
        if _Guard.active:
            return False
        if record.levelno < logging.WARNING or "kernel" not in record.getMessage().lower():
            return True
        if self.said:
            return False
        self.said = True
        record.msg, record.args = BNB_KERNELS_NOTE, ()
        return True


def install() -> None:
    """Install the import guard and the log filters; must run before bitsandbytes is imported. Idempotent."""
    if not any(isinstance(finder, _GuardBnbImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _GuardBnbImport())
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _BnbKernelMessages) for f in logger.filters):
        logger.addFilter(_BnbKernelMessages())
    kernels_logger = logging.getLogger(KERNELS_PACKAGE)  # its children (kernels._internals.*) inherit the level
    if kernels_logger.level == logging.NOTSET:
        kernels_logger.setLevel(logging.ERROR)
