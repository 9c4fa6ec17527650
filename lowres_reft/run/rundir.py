"""One run per run directory: a lock held for the run's lifetime, and the cleanup of killed saves' leftovers.

The lock is an `fcntl.flock` on `<run>/.lock`: the kernel releases it when the holder exits, however it exits
(SIGKILL, OOM killer, power loss of a local disk), so a stale lock never blocks a run. The file holds the
holder's pid and host, only for the message a second run prints; it is emptied on a clean release, so a pid
found in it by the next holder names a process that died while holding it. The file itself is never deleted
(deleting a lock file races with a process that has opened it but not locked it yet).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from lowres_reft.run.checkpoint import latest_good_checkpoint, list_checkpoints
from lowres_reft.utils.errors import UsageError
from lowres_reft.utils.fsutil import nearest_existing, writable_dir

if TYPE_CHECKING:
    from lowres_reft.config import Recipe

LOCK = ".lock"
# Left by a save killed midway (checkpoint.save_checkpoint): a temp checkpoint dir and the temp checkpoint-last link.
LEFTOVER_PATTERNS = (".tmp-checkpoint-*", ".checkpoint-last.*")


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 256).decode("utf-8", "replace").strip()


def _busy(run_dir: Path, holder: str) -> UsageError:
    who = f"process {holder}" if holder else "another process"
    return UsageError(f"{run_dir} is in use by {who} (another run writes there); wait for it to end, "
                      f"or set [log] run_name to start a separate run")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def check_not_locked(run_dir: Path) -> None:
    """Raise UsageError if a live run holds `run_dir`; writes nothing (the run dir may not exist yet)."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        if not _try_lock(fd):
            raise _busy(run_dir, _holder(fd))
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RunLock:
    """The exclusive lock of a run directory (created if missing). Use as a context manager or call release()."""

    def __init__(self, run_dir: Path, say=print) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(self.fd):
            holder = _holder(self.fd)
            os.close(self.fd)
            raise _busy(run_dir, holder)
        stale = _holder(self.fd)
        if stale:
            say(f"note: taking over the lock of {run_dir} left by process {stale}, which is no longer running")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        remove_leftovers(run_dir)

    def release(self) -> None:
        if self.fd < 0:
            return
        os.ftruncate(self.fd, 0)  # a clean exit leaves no pid behind (see the module docstring)
        os.close(self.fd)  # closing releases the flock
        self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete what killed checkpoint saves left behind. Only call it while holding the run's lock."""
    removed = []
    for pattern in LEFTOVER_PATTERNS:
        for path in run_dir.glob(pattern):
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_run_dir(recipe: Recipe, resume: bool) -> Path:
    """The run directory, checked (writable, not clobbering a run) without creating anything yet."""
    run_dir = Path(recipe.log.output_dir) / recipe.run_name
    try:
        check_not_locked(run_dir)  # a live run there: say so before anything else (and before loading the model)
        existing = nearest_existing(run_dir)
        if not writable_dir(existing):
            raise UsageError(f"output directory {run_dir} is not writable ({existing} is not a writable directory); "
                             "set [log] output_dir")
        if not resume and list_checkpoints(run_dir):
            raise UsageError(f"{run_dir} already holds checkpoints: add --resume to continue it, or set [log] run_name "
                             "to start a new run")
    except OSError as err:  # a name the file system refuses (too long, ...): say which, not a traceback
        raise UsageError(f"run directory {str(run_dir)[:80]}{'...' if len(str(run_dir)) > 80 else ''}: {err.strerror}; "
                         "set [log] run_name (or [log] output_dir)") from None
    return run_dir


def check_unchanged(run_dir: Path, ckpt: Path | None) -> None:
    """While this run loaded, another one may have written checkpoints there: refuse rather than mix them."""
    now = latest_good_checkpoint(run_dir, warn=lambda *a: None)
    if (now and now.name) != (ckpt and ckpt.name):
        raise UsageError(f"{run_dir} changed while this run was loading (another run wrote {now.name if now else 'to it'}); "
                         "start it again")
