"""Stopping a run cleanly: the first Ctrl-C / SIGTERM finishes the step and saves a checkpoint, a second aborts;
a metrics file that cannot be written stops the run the same way."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from lowres_reft.utils.errors import UsageError

if TYPE_CHECKING:
    from lowres_reft.run.metrics import Progress


class RunStopped(KeyboardInterrupt):
    """The run stopped on a signal; the CLI exits with 128 + the signal number (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


class StopFlag:
    """First Ctrl-C or SIGTERM (what `kill` and job schedulers send) asks the loop to checkpoint and stop after the
    current step; a second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = 0  # the signal number asked for, 0 = none
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            print(f"\n{signal.Signals(signum).name}: aborted; the last checkpoint is kept (continue with --resume)",
                  flush=True)
            raise RunStopped(signum)
        self.requested = signum
        name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


WRITE_FAILED = 1000  # halt code of a failed metrics write (signal numbers are below it)


def stop_with_checkpoint(checkpoint, step: int, halt: int, write_error: Exception | None, progress: Progress, say) -> None:
    """Save a checkpoint at `step`, then stop: on a signal (RunStopped), or because metrics.jsonl could not be written."""
    failed = write_error or UsageError("the main process could not write metrics.jsonl")
    try:
        path = checkpoint(step)
    except UsageError as err:
        if halt != WRITE_FAILED:
            raise
        raise UsageError(f"{failed}, and {err}") from None
    progress.close()
    if halt == WRITE_FAILED:
        raise UsageError(f"{failed}; stopped at step {step} with checkpoint {path}: free disk space, then continue with --resume")
    say(f"stopped at step {step}; checkpoint {path}; continue with --resume")
    raise RunStopped(halt)
