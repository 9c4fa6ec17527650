"""bitsandbytes' optional CPU kernel from the Hub: the import guard (nothing fetched) and the log filters, fed every
message wording seen so far plus invented future ones (the filters match loggers, never wordings)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from lowres_reft.utils import quiet

# What bitsandbytes' CPU backend has logged (0.48-0.50), with the reasons seen from kernels / the hub client, and
# wordings a later release might use instead.
BNB_WORDINGS = [
    ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install "
     "kernels` and the kernels >= 0.11.1", ("No module named 'kernels'",)),
    ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install "
     "kernels` and the kernels >= 0.11.1", ("Version 1 of 'kernels-community/quantization-bitsandbytes' is not "
                                             "available in the local cache and Hugging Face Hub is in offline mode.",)),
    ("Failed to load CPU gemm_4bit_forward from kernels-community: %s", (
        "Kernel repository 'kernels-community/quantization-bitsandbytes' could not verify publisher trust status.",)),
    ("Failed to load CPU gemm_4bit_forward from kernels-community: %s", ("401 Client Error: Unauthorized for url",)),
    ("Failed to load CPU gemm_4bit_forward from kernels-community: %s", ("Download refused: connection reset",)),
    ("Could not load the optimized CPU kernel (%s); using the default implementation.", ("timeout",)),
    ("Optional Hub kernel unavailable: %s", ("HTTPError 503",)),
]
KERNELS_WORDINGS = [
    "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in "
    "offline mode.",
    "Kernel repository 'kernels-community/quantization-bitsandbytes' could not verify publisher trust status.",
    "Some future warning about fetching a kernel",
]


def _through_logging(logger_name: str, level: int, msg: str, args: tuple, filt=None) -> list[str]:
    """The lines a handler on the root logger prints when `logger_name` logs the record (filters included)."""
    printed: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            printed.append(record.getMessage())

    handler, root = Collect(), logging.getLogger()
    root.addHandler(handler)
    logger = logging.getLogger(logger_name)
    if filt is not None:  # a fresh filter (the installed one remembers having spoken)
        saved = logger.filters[:]
        logger.filters = [f for f in logger.filters if not isinstance(f, quiet._BnbKernelMessages)] + [filt]
    try:
        logger.log(level, msg, *args)
    finally:
        root.removeHandler(handler)
        if filt is not None:
            logger.filters = saved
    return printed


def test_installed_on_import():
    assert any(isinstance(f, quiet._GuardBnbImport) for f in sys.meta_path)
    assert any(isinstance(f, quiet._BnbKernelMessages) for f in logging.getLogger(quiet.BNB_CPU_LOGGER).filters)


@pytest.mark.parametrize("msg,args", BNB_WORDINGS)
def test_every_bnb_wording_becomes_one_note_then_nothing(msg, args):
    filt = quiet._BnbKernelMessages()
    assert _through_logging(quiet.BNB_CPU_LOGGER, logging.WARNING, msg, args, filt) == [quiet.BNB_KERNELS_NOTE]
    assert _through_logging(quiet.BNB_CPU_LOGGER, logging.WARNING, msg, args, filt) == []


@pytest.mark.parametrize("msg,args", BNB_WORDINGS)
def test_every_bnb_wording_is_dropped_during_the_guarded_import(msg, args, monkeypatch):
    monkeypatch.setattr(quiet._Guard, "active", True)
    assert _through_logging(quiet.BNB_CPU_LOGGER, logging.WARNING, msg, args, quiet._BnbKernelMessages()) == []


def test_other_bnb_cpu_lines_pass_unchanged():
    filt = quiet._BnbKernelMessages()
    assert _through_logging(quiet.BNB_CPU_LOGGER, logging.WARNING, "blocksize %d is odd", (7,), filt) == ["blocksize 7 is odd"]
    assert _through_logging(quiet.BNB_CPU_LOGGER, logging.ERROR, "kernel crashed: %s", ("x",), filt) == ["kernel crashed: x"]


@pytest.mark.parametrize("msg", KERNELS_WORDINGS)
@pytest.mark.parametrize("logger_name", ["kernels", "kernels._internals.hf_hub", "kernels.some.future.module"])
def test_kernels_package_warnings_dropped_errors_kept(msg, logger_name):
    assert _through_logging(logger_name, logging.WARNING, msg, ()) == []
    assert _through_logging(logger_name, logging.ERROR, msg, ()) == [msg]


GUARD_PROBE = textwrap.dedent("""
    import sys, types
    calls = []
    fake = types.ModuleType("kernels")  # stands for the real package: records what bitsandbytes asks of it
    fake.get_kernel = lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(RuntimeError("probe"))
    sys.modules["kernels"] = fake
    if sys.argv[1] == "guarded":
        import lowres_reft
    import bitsandbytes
    from bitsandbytes.functional import has_avx512bf16
    assert sys.modules["kernels"] is fake, "kernels not put back"
    print(len(calls), bool(has_avx512bf16()))
""")


def _probe(mode: str) -> tuple[int, bool, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", GUARD_PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls, avx512bf16 = proc.stdout.split()
    return int(calls), avx512bf16 == "True", proc.stderr


def test_import_guard_stops_the_hub_kernel_fetch():
    """With lowres_reft imported first, bitsandbytes never reaches `kernels.get_kernel`, `kernels` is put back, and
    nothing about it is printed; without it, on a CPU with avx512_bf16, bitsandbytes does call it (the control)."""
    calls, _, stderr = _probe("guarded")
    assert calls == 0 and "kernel" not in stderr.lower(), stderr
    calls, avx512bf16, _ = _probe("plain")
    assert calls == (1 if avx512bf16 else 0)


def test_guard_puts_back_a_missing_kernels_module():
    code = ("import sys, lowres_reft; sys.modules.pop('kernels', None); import bitsandbytes; "
            "print('kernels' in sys.modules and sys.modules['kernels'] is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
