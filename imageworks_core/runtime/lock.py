"""The activation lock ``_staging/active_vllm.lock``: activations and stops never interleave.

An flock (released by the kernel when its holder dies, so a crash never leaves it held). A waiter gives up
after a bounded wait, long enough for one other activation's worst case, and names the holder, whose pid and
purpose are written into the lock file (informational only: the flock is what locks).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock

from .. import history
from ..errors import BackendError
from ..settings import Settings
from . import process

ACTIVATION_LOCK_MARGIN_S = 10.0
"""Extra lock wait beyond the holder's worst case (its stop plus its start timeout)."""


def lock_wait(settings: Settings, start_timeout_s: float | None) -> float:
    """Long enough for one other activation to stop its predecessor and start (the worst case we wait for)."""
    start = max(start_timeout_s or 0.0, settings.vllm_start_timeout_s)
    return start + settings.vllm_stop_timeout_s + process.KILL_WAIT_S + ACTIVATION_LOCK_MARGIN_S


@contextmanager
def activation_lock(settings: Settings, wait_s: float, purpose: str) -> Iterator[None]:
    """Hold the activation lock; the lock file names the holder so a waiter can say who it waited for."""
    path = settings.activation_lock_path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=wait_s)
    except filelock.Timeout as exc:
        try:
            holder = path.read_text(encoding="utf-8").strip() or "pid unknown"
        except OSError:
            holder = "pid unknown"
        raise BackendError(
            f"another activation ({holder}) is in progress; gave up waiting after {wait_s:g}s "
            "(see `imageworks-models current-model`)"
        ) from exc
    try:
        _write_holder(path, f"pid {os.getpid()}: {purpose} since {history.now_iso()}")
        yield
    finally:
        _write_holder(path, "")
        lock.release()


def try_lock(settings: Settings) -> filelock.BaseFileLock | None:
    """The activation lock when it is free right now (the caller releases it), else None."""
    settings.activation_lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(settings.activation_lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return None
    return lock


def _write_holder(path: Path, text: str) -> None:
    # The lock's content is informational (the flock is what locks); written in place, same inode.
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
