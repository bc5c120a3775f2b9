"""The audit log: ``logs/model_loader.log``, one JSON object per line.

Events: registry_write, registry_reload_failed, rollback, verify, lock, unlock, lock_violation, activation,
activation_failed, activation_cancelled, stop, probe, probe_failure, download. Fleet mode adds, in the controller's
log: fleet_activation, fleet_stop, fleet_eviction (autoswitch made room by stopping the least recently used slot);
and in a node's own root: fleet_idle_stop / fleet_idle_stop_failed (idle_ttl_s) and fleet_reaper (a backend
stopped because the agent that started it is gone), beside that node's activation and stop events. Appends are single ``write`` calls on an O_APPEND file, so concurrent
processes never interleave within a line.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from typing import Any

from .history import now_iso
from .settings import Settings


def current_actor(settings: Settings) -> str:
    """Who is acting: ``IMAGEWORKS_ACTOR`` or user@host."""
    if settings.actor:
        return settings.actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def log_event(settings: Settings, event: str, **fields: Any) -> dict[str, Any]:
    """Append one event; returns the record written."""
    record = {"ts": now_iso(), "event": event, "actor": current_actor(settings), **fields}
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str, ensure_ascii=False) + "\n"
    fd = os.open(settings.audit_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return record


def read_events(settings: Settings, event: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """The newest ``limit`` events (optionally of one kind), newest first; unparsable lines are skipped."""
    path = settings.audit_log_path
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    for line in reversed(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event and record.get("event") != event:
            continue
        records.append(record)
        if len(records) >= limit:
            break
    return records
