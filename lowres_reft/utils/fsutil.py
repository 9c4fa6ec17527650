"""File-system helpers: write a file or publish a built directory atomically, and check where we may write.

Atomic = a reader (or a crash) sees the old file or the new one, never half of one: write a temp file beside the
target, then rename it over (os.replace is atomic within a file system).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, fill: Callable[[Path], None]) -> None:
    """`fill(tmp)` writes the content to a temp path beside `path`, which then replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def publish_dir(tmp: Path, target: Path) -> Path:
    """Move a fully built directory `tmp` to `target`; when another process published it first (the rename fails
    on a non-empty target), keep theirs: builds of the same cache key are identical."""
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (where a later mkdir of `path` would start)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def writable_dir(path: Path) -> bool:
    """Whether `path` is a directory we may create entries in."""
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
