"""The write protocol: every registry mutation is one journaled change, and recovery settles a crashed one.

A change is a set of file replacements (a layer file, the other layer for an import, a lock manifest for a
re-pin) plus the audit lines that announce it. Its writer holds the file lock of every file it changes and has
computed every new text under those locks (read-modify-write never reads outside the lock). Then, in order:

1. ``intent``: one history row per file, status ``pending``, holding the before text, the after text and the
   audit lines to come, written in one SQLite transaction;
2. ``replace``: each file replaced atomically (temp file, fsync, ``os.replace``, directory fsync);
3. ``snapshot``: the merged snapshot regenerated;
4. ``audit``: the audit lines appended, each carrying the change id;
5. ``commit``: the rows become ``applied``.

Adversary: a crash (SIGKILL, OOM, power loss) at any instant, and concurrent writers in other processes and
threads. A crash before step 5 leaves pending rows; :func:`recover` (run by every cold registry load and before
every write) takes every registry lock and settles them: a change whose every file holds its after text is
finished (missing audit lines appended, marked ``recovered``; rows committed); any other change is undone (files
already replaced get their before text back, a file that did not exist is removed; rows marked
``not_applied``). Temp files left by a killed writer are removed. So a reader never sees a torn file, a
change is all-or-nothing across its files, and history lists no change that is not on disk. Not defended: a
disk that loses fsynced data, and hand edits made between a crash and the next load to a file of the crashed
change (recovery leaves such a file alone and marks the change not applied).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import Timeout

from . import audit, history
from .errors import RegistryError
from .registry_file import atomic_write_text, crash_point, lock_for, temp_files
from .settings import Settings


@dataclass
class FileChange:
    """One file of a change: its text before (None: it did not exist) and after."""

    path: Path
    before: str | None
    after: str
    names: list[str] = field(default_factory=list)


@dataclass
class AppliedChange:
    """What :func:`apply_change` wrote: the change id and the revision id of each file."""

    change_id: str = ""
    revisions: dict[Path, int] = field(default_factory=dict)


@dataclass
class RecoveryReport:
    """What :func:`recover` did; ``lines()`` is for operators (warnings on load, the audit log)."""

    removed_temps: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)
    skipped: bool = False

    @property
    def settled(self) -> bool:
        return bool(self.finished or self.undone)

    def lines(self) -> list[str]:
        return [
            *(f"recovery: change {c} had reached the disk before a crash; committed it" for c in self.finished),
            *(f"recovery: change {c} was interrupted by a crash; undone and marked not applied" for c in self.undone),
            *(f"recovery: removed {t} left by a killed writer" for t in self.removed_temps),
        ]


def apply_change(
    settings: Settings,
    files: list[FileChange],
    *,
    command: str,
    actor: str,
    events: list[tuple[str, dict[str, Any]]],
    write_snapshot: Callable[[], object] | None = None,
) -> AppliedChange:
    """Apply one change by the protocol above. The caller holds every file's lock. Unchanged files are skipped;
    with nothing changed nothing is written (no rows, no audit lines)."""
    changed = [f for f in files if f.before != f.after]
    if not changed:
        return AppliedChange()
    change_id = uuid.uuid4().hex
    records = [{"event": event, **fields} for event, fields in events]
    revisions = history.record_change(
        settings,
        change_id,
        [(f.path, f.before, f.after, f.names) for f in changed],
        actor=actor,
        command=command,
        audit_events=records,
    )
    crash_point("intent")
    for change in changed:
        atomic_write_text(change.path, change.after)
        crash_point("replace")
    if write_snapshot is not None:
        write_snapshot()
    crash_point("snapshot")
    for record in records:
        audit.log_event(settings, record["event"], change=change_id, **_fields(record))
    crash_point("audit")
    history.settle_change(settings, change_id, "applied")
    crash_point("commit")
    return AppliedChange(change_id, revisions)


def refuse_over_pending(settings: Settings, paths: list[Path]) -> None:
    """Under the writer's locks: RegistryError when a crashed change still pending touches one of ``paths``.

    Writing on top of it would make its recovery wrong (its files no longer hold its after text). Recovery
    normally ran just before; it is skipped only while another writer holds a registry lock, so retrying works.
    """
    if not settings.history_db_path.exists():
        return
    stuck = {
        history.revision_path(settings, row["file"])
        for rows in history.pending_changes(settings).values()
        for row in rows
    } & set(paths)
    if stuck:
        raise RegistryError(
            f"{', '.join(sorted(str(p) for p in stuck))}: an interrupted change awaits recovery while another writer "
            "holds a registry lock; nothing written, retry (any load, e.g. `imageworks-models validate`, recovers it)"
        )


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("event", "change", "ts", "actor")}


def _our_temps(settings: Settings) -> list[Path]:
    names = (settings.curated_path.name, settings.discovered_path.name, settings.snapshot_path.name)
    found = [t for name in names for t in temp_files(settings.configs_dir, name)]
    return found + temp_files(settings.locks_dir, ".manifest.json")


def _needs_recovery(settings: Settings) -> bool:
    if _our_temps(settings):
        return True
    return settings.history_db_path.exists() and bool(history.pending_changes(settings))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _logged_events(settings: Settings, change_id: str) -> set[str]:
    path = settings.audit_log_path
    if not path.exists():
        return set()
    return {
        record["event"]
        for record in audit.read_events(settings, limit=100_000)
        if record.get("change") == change_id and "event" in record
    }


def recover(settings: Settings, render_snapshot: Callable[[], str | None]) -> RecoveryReport:
    """Settle crashed changes and remove stale temp files (see the module docstring). Writes nothing on a clean
    root. When another process holds a registry lock, that writer is alive: recovery is skipped for now.
    ``render_snapshot`` returns the merged snapshot text of the current layer files (None when invalid)."""
    report = RecoveryReport()
    if not _needs_recovery(settings):
        return report
    locks = [lock_for(p) for p in (settings.curated_path, settings.discovered_path, settings.snapshot_path)]
    held = []
    try:
        for lock in locks:
            lock.acquire(timeout=0)
            held.append(lock)
    except Timeout:
        report.skipped = True
        for lock in reversed(held):
            lock.release()
        return report
    try:
        for temp in _our_temps(settings):
            temp.unlink(missing_ok=True)
            report.removed_temps.append(str(temp.relative_to(settings.root)))
        pending = history.pending_changes(settings) if settings.history_db_path.exists() else {}
        for change_id, rows in pending.items():
            _settle(settings, change_id, rows, report)
        if report.settled:
            text = render_snapshot()
            if text is not None:
                atomic_write_text(settings.snapshot_path, text)
    finally:
        for lock in reversed(held):
            lock.release()
    if report.settled or report.removed_temps:
        audit.log_event(
            settings,
            "recovery",
            finished=report.finished,
            undone=report.undone,
            removed_temps=report.removed_temps,
        )
    return report


def _settle(settings: Settings, change_id: str, rows: list[dict[str, Any]], report: RecoveryReport) -> None:
    paths = [history.revision_path(settings, row["file"]) for row in rows]
    current = [_read(path) for path in paths]
    label = f"{change_id[:12]} ({rows[0]['command']})"
    if all(text == row["after_text"] for text, row in zip(current, rows, strict=True)):
        logged = _logged_events(settings, change_id)
        for record in json.loads(rows[0].get("audit_json") or "[]"):
            if record["event"] not in logged:
                audit.log_event(settings, record["event"], change=change_id, recovered=True, **_fields(record))
        history.settle_change(settings, change_id, "applied")
        report.finished.append(label)
        return
    for path, text, row in zip(paths, current, rows, strict=True):
        if text != row["after_text"]:
            continue  # never replaced (or edited by hand since): leave it
        if row["before_exists"]:
            atomic_write_text(path, row["before_text"])
        else:
            path.unlink(missing_ok=True)
    history.settle_change(settings, change_id, "not_applied")
    report.undone.append(label)
