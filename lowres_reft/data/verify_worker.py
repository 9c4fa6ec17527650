"""math-verify in worker processes, so that every symbolic check has a hard time bound, from any thread.

math-verify bounds its own time with SIGALRM, which works only in a process's main thread, and not at all inside
a long C call (a huge integer power); called from a reward thread it can run for minutes (`2^{99999*99999}`).
So the checks run in small persistent worker processes (`python -c _WORKER_SOURCE`: math-verify only, no torch),
each serving one request at a time in its own main thread, where math-verify's timeouts work. A worker that does
not answer within CALL_TIMEOUT_S is killed (the check counts as wrong) and the next call starts a fresh one.
Idle workers are reused; concurrent callers get one each. Only the slow path comes here: plain numbers are
compared exactly in-process by `rewards.is_equivalent` and never start a worker.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time

TIMEOUT_S = 3  # math-verify's own timeout for each parse and for the comparison (in the worker's main thread)
CALL_TIMEOUT_S = 12.0  # hard bound of one check: two parses + one comparison, each up to TIMEOUT_S, and slack
START_TIMEOUT_S = 120.0  # a worker's start (imports sympy): not part of a check's bound

_WORKER_SOURCE = r"""
import functools, json, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent (it checkpoints and stops)
out, sys.stdout = sys.stdout, sys.stderr  # the answers' channel: nothing a library prints can end up in it

def answer(value):
    out.write(json.dumps(value) + "\n")
    out.flush()

try:
    from math_verify import parse, verify
except BaseException as e:
    answer({"error": f"cannot import math_verify: {type(e).__name__}: {e}"})
    sys.exit(1)
timeout = int(sys.argv[1])

@functools.lru_cache(maxsize=8192)
def parsed(s):
    return tuple(parse("$" + s + "$", parsing_timeout=timeout))

answer("ready")
for line in sys.stdin:
    pred, gold = json.loads(line)
    try:
        g, p = parsed(gold), parsed(pred)
        ok = bool(g and p and verify(list(g), list(p), timeout_seconds=timeout))
    except BaseException:  # math-verify's TimeoutException derives from BaseException
        ok = False
    answer(ok)
"""


class WorkerTimeout(Exception):
    """The worker gave no answer within the bound (killed) or died."""


class StartError(RuntimeError):
    """The worker reported that it cannot run (math-verify missing): not retried in this process."""


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_SOURCE, str(TIMEOUT_S)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buffer = b""
        try:
            first = self._read(START_TIMEOUT_S)
        except WorkerTimeout:
            self.close()
            raise
        if first != "ready":
            self.close()
            raise StartError(first.get("error") if isinstance(first, dict) else f"unexpected {first!r}")

    def _read(self, timeout: float):
        """The next JSON line from the worker, or raise WorkerTimeout after `timeout` seconds or on its exit."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise WorkerTimeout
            chunk = os.read(fd, 65536)
            if not chunk:
                raise WorkerTimeout
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def check(self, pred: str, gold: str) -> bool:
        try:
            self.proc.stdin.write(json.dumps([pred, gold]).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # it died since its last answer
            raise WorkerTimeout from None
        return bool(self._read(CALL_TIMEOUT_S))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


_idle: list[_Worker] = []
_lock = threading.Lock()
_owner_pid = os.getpid()
_start_error: str | None = None


def equivalent(pred: str, gold: str) -> bool:
    """math-verify's parse + verify of gold and pred, in a worker. Raises WorkerTimeout past CALL_TIMEOUT_S."""
    global _owner_pid, _start_error
    with _lock:
        if _owner_pid != os.getpid():  # a forked child: the workers' pipes belong to the parent
            _idle.clear()
            _owner_pid = os.getpid()
        if _start_error is not None:  # e.g. math-verify missing: do not retry a failing start on every call
            raise RuntimeError(_start_error)
        worker = _idle.pop() if _idle else None
    if worker is None:
        try:
            worker = _Worker()
        except StartError as err:
            with _lock:
                _start_error = str(err)
            raise
    try:
        result = worker.check(pred, gold)
    except BaseException:
        worker.close()  # stuck (killed here) or dead: never reused
        raise
    with _lock:
        _idle.append(worker)
    return result


@atexit.register
def close_workers() -> None:
    with _lock:
        workers = _idle[:] if _owner_pid == os.getpid() else []
        _idle.clear()
    for worker in workers:
        worker.close()
