"""An activation in progress, seen from outside it: its progress record and the cancel request.

Both are files under ``_staging`` so every process sees them (the dashboard's sessions, the API, the CLI):

- ``activation.json`` (an :class:`ActivationProgress`, written atomically by the activator while it holds the
  activation lock, which it takes before its preflight and lock check): which entry, phase, detail, since when.
  It is believed only while the activation lock is held: an activator that crashed leaves a file that
  :func:`read_progress` ignores (the kernel released its lock).
- ``activation.cancel``: written by :func:`request_cancel` (``activate-model --stop``, the page's Cancel). The
  activator checks it on every phase change, every progress report of its lock check's hashing (each 64 MiB
  read) and every health poll (at most :data:`~.readiness.READY_POLL_MAX_S` apart), then stops the process
  group it started, if any, records ``cancelled`` and releases the lock. A request older
  than the activation it would cancel is ignored, so a stale file (its writer crashed) never cancels a later
  start; the requester removes it when done.

Adversary: any process of the same user may write either file; the worst it can do is cancel a start or make the
page show a wrong phase. Nothing is ever signalled on the strength of these files.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ..registry_file import atomic_write_text
from ..settings import Settings
from .lock import try_lock


class ActivationProgress(BaseModel):
    """What the activation holding the lock is doing now (``current-model``, ``GET /v1/active``'s ``starting``,
    the Active Model page)."""

    name: str
    phase: str
    detail: str = ""
    started_at: datetime
    updated_at: datetime
    activated_by: str | None = None
    pid: int

    @property
    def elapsed_s(self) -> float:
        return max(0.0, (datetime.now(UTC) - self.started_at).total_seconds())

    def to_dict(self) -> dict[str, object]:
        """The record as JSON data plus ``elapsed_s`` now (the file stores no elapsed time: it would go stale)."""
        return {**self.model_dump(mode="json"), "elapsed_s": round(self.elapsed_s, 1)}


def progress_path(settings: Settings) -> Path:
    """``_staging/activation.json``."""
    return settings.staging_dir / "activation.json"


def cancel_path(settings: Settings) -> Path:
    """``_staging/activation.cancel``."""
    return settings.staging_dir / "activation.cancel"


def write_progress(settings: Settings, progress: ActivationProgress) -> None:
    """Replace the progress record (the caller holds the activation lock)."""
    atomic_write_text(progress_path(settings), progress.model_dump_json() + "\n", durable=False)


def clear_progress(settings: Settings) -> None:
    progress_path(settings).unlink(missing_ok=True)


def read_progress(settings: Settings) -> ActivationProgress | None:
    """The activation in progress, or None (no record, an unreadable one, or the lock is free: a dead activator)."""
    try:
        progress = ActivationProgress.model_validate_json(progress_path(settings).read_text(encoding="utf-8"))
    except (OSError, ValidationError):
        return None
    lock = try_lock(settings)
    if lock is not None:  # nobody holds the lock: the record is a crashed activator's leftover
        lock.release()
        return None
    return progress


def request_cancel(settings: Settings, *, actor: str | None, reason: str) -> None:
    """Ask the activation in progress (if any) to abort; see the module docstring."""
    record = {"actor": actor, "reason": reason, "at": datetime.now(UTC).isoformat(), "pid": os.getpid()}
    atomic_write_text(cancel_path(settings), json.dumps(record) + "\n", durable=False)


def cancel_request(settings: Settings, since: float) -> dict[str, object] | None:
    """The cancel request made at or after ``since`` (a ``time.time()`` value), else None."""
    path = cancel_path(settings)
    try:
        if path.stat().st_mtime < since:
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else {}


def clear_cancel(settings: Settings) -> None:
    cancel_path(settings).unlink(missing_ok=True)
