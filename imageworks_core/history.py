"""The history database (``state/history.sqlite3``): everything the operator may want to query later.

Registry revisions, verification runs and the stat cache, activations, probes and downloads. One connection per
call site (SQLite in WAL mode handles concurrent CLI processes); every function opens, works and closes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .hashing import StatCache, StatEntry
from .settings import Settings

WAL_SWITCH_WAIT_S = 30.0
"""How long a connection retries the switch to WAL while another connection opening a new database holds it."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS revisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file TEXT NOT NULL, at TEXT NOT NULL, actor TEXT, command TEXT,
    before_text TEXT NOT NULL, after_text TEXT NOT NULL, names TEXT
);
CREATE TABLE IF NOT EXISTS verifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL, at TEXT NOT NULL, mode TEXT NOT NULL, algorithm TEXT NOT NULL,
    duration_s REAL, bytes INTEGER, files INTEGER, result TEXT NOT NULL,
    aggregate TEXT, expected TEXT, report_json TEXT, actor TEXT
);
CREATE INDEX IF NOT EXISTS verifications_name ON verifications(name, id);
CREATE TABLE IF NOT EXISTS stat_cache (
    directory TEXT NOT NULL, path TEXT NOT NULL, algorithm TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, digest TEXT NOT NULL,
    ctime_ns INTEGER,
    PRIMARY KEY (directory, path, algorithm)
);
CREATE TABLE IF NOT EXISTS activations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT, at TEXT NOT NULL, action TEXT NOT NULL, result TEXT NOT NULL, actor TEXT,
    stop_s REAL, start_to_ready_s REAL, pid INTEGER, detail TEXT
);
CREATE INDEX IF NOT EXISTS activations_name ON activations(name, id);
CREATE TABLE IF NOT EXISTS probes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL, at TEXT NOT NULL, vision_ok INTEGER NOT NULL, grounded INTEGER,
    latency_ms REAL, prompt_tokens INTEGER, image_name TEXT, image_sha256 TEXT, image_bytes INTEGER,
    result_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS probes_name ON probes(name, id);
CREATE TABLE IF NOT EXISTS downloads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    repo_id TEXT NOT NULL, at TEXT NOT NULL, status TEXT NOT NULL, revision TEXT, commit_sha TEXT,
    location TEXT, path TEXT, total_bytes INTEGER, format TEXT, quantization TEXT, files_json TEXT,
    detail TEXT, actor TEXT
);
"""


def now_iso() -> str:
    """UTC timestamp, second precision, ISO 8601."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


@contextmanager
def connect(settings: Settings) -> Iterator[sqlite3.Connection]:
    """A connection to the history DB (created on first use); commits on success."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(settings.history_db_path, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        _use_wal(conn)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(_SCHEMA)
        _migrate_revisions(conn)
        yield conn
        conn.commit()
    finally:
        conn.close()


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the database to WAL (persistent: a no-op once any connection did it). Connections opening a new
    database at the same moment (the dashboard's verify thread and its page, two CLI runs) all ask; SQLite answers
    the losers "database is locked" at once, without the busy handler, so they retry until the switch is done."""
    deadline = time.monotonic() + WAL_SWITCH_WAIT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    return [dict(row) for row in cursor.fetchall()]


# The table names below are ours (never user input); values always travel as parameters.
def _insert(settings: Settings, table: str, fields: dict[str, Any]) -> int:
    """Insert one row (``fields`` are its columns; ``at`` defaults to now) and return its id."""
    fields.setdefault("at", now_iso())
    columns = ", ".join(fields)
    marks = ", ".join("?" for _ in fields)
    with connect(settings) as conn:
        cur = conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(fields.values()))
        return int(cur.lastrowid or 0)


def _newest(settings: Settings, select: str, name: str | None, limit: int) -> list[dict[str, Any]]:
    """The rows of ``select`` (a query of one table), newest first, at most ``limit``; only ``name``'s if given."""
    query, params = select, ()
    if name:
        query, params = query + " WHERE name = ?", (name,)
    with connect(settings) as conn:
        return _rows(conn.execute(query + " ORDER BY id DESC LIMIT ?", (*params, limit)))


def _latest_per_name(settings: Settings, table: str) -> dict[str, dict[str, Any]]:
    """The last row of every entry in ``table``, by name, with ``node``: the fleet node it ran on (kept in the
    row's report JSON by :meth:`imageworks_core.fleet.Fleet.verify` and fleet probes), None on this box."""
    with connect(settings) as conn:
        rows = _rows(
            conn.execute(
                f"SELECT t.* FROM {table} t JOIN (SELECT name, MAX(id) AS id FROM {table} GROUP BY name) last"
                " ON t.id = last.id"
            )
        )
    return {row["name"]: {**row, "node": row_node(row)} for row in rows}


def row_node(row: dict[str, Any]) -> str | None:
    """The fleet node a verification or probe row ran on (from its report JSON); None for this box's own."""
    try:
        found = json.loads(row.get("report_json") or row.get("result_json") or "{}").get("node")
    except (ValueError, AttributeError):
        return None
    return str(found) if found else None


# Registry revisions ---------------------------------------------------------------------------------------
# Columns added after the first release; older databases gain them on their first connect. A revision row is
# also the journal of the write protocol (imageworks_core.journal): 'pending' while its change is in flight,
# then 'applied', or 'not_applied' when recovery found that the change never fully reached the disk.
_REVISION_COLUMNS = {
    "change_id": "TEXT",
    "status": "TEXT NOT NULL DEFAULT 'applied'",
    "before_exists": "INTEGER NOT NULL DEFAULT 1",
    "audit_json": "TEXT",
}
REVISION_STATUSES = ("pending", "applied", "not_applied")


def _migrate_revisions(conn: sqlite3.Connection) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(revisions)")}
    for column, declaration in _REVISION_COLUMNS.items():
        if column not in have:
            try:
                conn.execute(f"ALTER TABLE revisions ADD COLUMN {column} {declaration}")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise
    conn.execute("CREATE INDEX IF NOT EXISTS revisions_status ON revisions(status)")
    conn.commit()


def stored_path(settings: Settings, path: Path) -> str:
    """How a revision names its file: root-relative (POSIX) under the root, so the root can move."""
    return path.relative_to(settings.root).as_posix() if path.is_relative_to(settings.root) else str(path)


def revision_path(settings: Settings, stored: str) -> Path:
    """The file a revision's stored path names in this root.

    Relative paths (what we store) are taken from the root. Rows written before paths were relative hold
    absolute ones; the database lives in the root and moves with it, so an absolute path under a previous root
    is the same ``configs/...`` file under this one. Any other absolute path is returned unchanged.
    """
    path = Path(stored)
    if not path.is_absolute():
        return settings.root / path
    if path.is_relative_to(settings.root):
        return path
    parts = path.parts
    marker = settings.configs_dir.name
    if marker in parts:
        index = len(parts) - 1 - parts[::-1].index(marker)
        return settings.root.joinpath(*parts[index:])
    return path


def record_change(
    settings: Settings,
    change_id: str,
    files: list[tuple[Path, str | None, str, list[str]]],
    *,
    actor: str,
    command: str,
    audit_events: list[dict[str, Any]],
) -> dict[Path, int]:
    """The intent of one change: a 'pending' row per (path, before or None, after, names), in one transaction."""
    at, events = now_iso(), json.dumps(audit_events, default=str)
    ids: dict[Path, int] = {}
    with connect(settings) as conn:
        for path, before, after, names in files:
            cur = conn.execute(
                "INSERT INTO revisions (file, at, actor, command, before_text, after_text, names, change_id, status,"
                " before_exists, audit_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                (
                    stored_path(settings, path),
                    at,
                    actor,
                    command,
                    before or "",
                    after,
                    json.dumps(names),
                    change_id,
                    int(before is not None),
                    events,
                ),
            )
            ids[path] = int(cur.lastrowid or 0)
    return ids


def settle_change(settings: Settings, change_id: str, status: str) -> None:
    """Mark every row of a change 'applied' or 'not_applied'."""
    with connect(settings) as conn:
        conn.execute("UPDATE revisions SET status = ? WHERE change_id = ?", (status, change_id))


def pending_changes(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """Rows still 'pending', grouped by change id (oldest change first)."""
    with connect(settings) as conn:
        rows = _rows(conn.execute("SELECT * FROM revisions WHERE status = 'pending' ORDER BY id"))
    changes: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        changes.setdefault(row["change_id"], []).append(row)
    return changes


def revision_label(row: dict[str, Any]) -> str:
    """A revision's command as listed, marked when its change never reached the disk."""
    return row["command"] + (" (not applied: interrupted)" if row.get("status") == "not_applied" else "")


def has_revisions(settings: Settings, path: Path) -> bool:
    """Whether an applied revision of ``path`` (stored relative or absolute) exists."""
    with connect(settings) as conn:
        stored = [row[0] for row in conn.execute("SELECT DISTINCT file FROM revisions WHERE status = 'applied'")]
    return any(revision_path(settings, file) == path for file in stored)


def list_revisions(settings: Settings, name: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Newest first, changes still in flight left out; with ``name``, only revisions that touched that entry."""
    query = "SELECT id, file, at, actor, command, names, change_id, status FROM revisions WHERE status != 'pending'"
    params: tuple[Any, ...] = ()
    if name:
        query += " AND EXISTS (SELECT 1 FROM json_each(revisions.names) WHERE value = ?)"
        params = (name,)
    query += " ORDER BY id DESC LIMIT ?"
    with connect(settings) as conn:
        rows = _rows(conn.execute(query, (*params, limit)))
    for row in rows:
        row["names"] = json.loads(row["names"] or "[]")
    return rows


def get_revision(settings: Settings, rev: int) -> dict[str, Any] | None:
    with connect(settings) as conn:
        row = conn.execute("SELECT * FROM revisions WHERE id = ?", (rev,)).fetchone()
    return dict(row) if row else None


# Verifications and the stat cache -------------------------------------------------------------------------
def record_verification(settings: Settings, **fields: Any) -> int:
    """Insert a verification row; ``fields`` are the table's columns (``report`` is stored as JSON)."""
    report = fields.pop("report", None)
    if report is not None:
        fields["report_json"] = json.dumps(report, default=str)
    return _insert(settings, "verifications", fields)


def latest_verifications(settings: Settings) -> dict[str, dict[str, Any]]:
    """The last verification of every entry, by name."""
    return _latest_per_name(settings, "verifications")


def list_verifications(settings: Settings, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    select = "SELECT id, name, at, mode, algorithm, duration_s, bytes, files, result, aggregate FROM verifications"
    return _newest(settings, select, name, limit)


def _stat_cache_with_ctime(conn: sqlite3.Connection) -> None:
    """Add ``ctime_ns`` to a stat_cache table made before it joined the key; its old rows stay NULL (a miss)."""
    if any(row["name"] == "ctime_ns" for row in conn.execute("PRAGMA table_info(stat_cache)")):
        return
    try:
        conn.execute("ALTER TABLE stat_cache ADD COLUMN ctime_ns INTEGER")
    except sqlite3.OperationalError as exc:  # another process added it first
        if "duplicate column" not in str(exc):
            raise


def load_stat_cache(
    settings: Settings, directory: str, algorithm: str
) -> dict[str, tuple[int, int, int, int | None, str]]:
    """``{path: (size, mtime_ns, inode, ctime_ns, digest)}`` recorded for a weights directory.

    ``ctime_ns`` is None for rows written before it was recorded; the hashing code treats those as misses.
    """
    with connect(settings) as conn:
        _stat_cache_with_ctime(conn)
        rows = conn.execute(
            "SELECT path, size, mtime_ns, inode, ctime_ns, digest FROM stat_cache"
            " WHERE directory = ? AND algorithm = ?",
            (directory, algorithm),
        ).fetchall()
    return {
        row["path"]: (row["size"], row["mtime_ns"], row["inode"], row["ctime_ns"], row["digest"]) for row in rows
    }


def save_stat_cache(
    settings: Settings, directory: str, algorithm: str, cache: dict[str, tuple[int, int, int, int, str]]
) -> None:
    """Replace the stat cache of a directory; values are ``(size, mtime_ns, inode, ctime_ns, digest)``."""
    with connect(settings) as conn:
        _stat_cache_with_ctime(conn)
        conn.execute("DELETE FROM stat_cache WHERE directory = ? AND algorithm = ?", (directory, algorithm))
        conn.executemany(
            "INSERT INTO stat_cache (directory, path, algorithm, size, mtime_ns, inode, ctime_ns, digest)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(directory, path, algorithm, *values) for path, values in cache.items()],
        )


def stat_entries(settings: Settings, directory: str, algorithm: str) -> StatCache:
    """The stat cache of a directory as :class:`StatEntry` rows; ``{}`` without creating a missing history DB.

    The one reader for the verifier's fast mode and the downloader's reuse check (same rows, same key).
    """
    if not settings.history_db_path.exists():
        return {}
    # A NULL ctime (a row from before it was recorded) never equals a file's: the hashing engine re-reads it.
    return {
        path: StatEntry(size, mtime, inode, ctime, algorithm, digest)  # type: ignore[arg-type]
        for path, (size, mtime, inode, ctime, digest) in load_stat_cache(settings, directory, algorithm).items()
    }


def save_stat_entries(settings: Settings, directory: str, algorithm: str, entries: Mapping[str, StatEntry]) -> None:
    """Replace the stat cache of a directory for ``algorithm`` with ``entries`` (creates the history DB)."""
    rows = {path: (e.size, e.mtime_ns, e.inode, e.ctime_ns, e.digest) for path, e in entries.items()}
    save_stat_cache(settings, directory, algorithm, rows)


# Activations, probes, downloads ---------------------------------------------------------------------------
def record_activation(settings: Settings, **fields: Any) -> int:
    """Insert an activation row (name, action, result, actor, stop_s, start_to_ready_s, pid, detail)."""
    return _insert(settings, "activations", fields)


def list_activations(settings: Settings, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    return _newest(settings, "SELECT * FROM activations", name, limit)


def record_probe(settings: Settings, name: str, result: dict[str, Any]) -> int:
    """Store a probe result (the full result as JSON, key figures as columns)."""
    image = result.get("image") or {}
    return _insert(
        settings,
        "probes",
        {
            "name": name,
            "at": result.get("timestamp") or now_iso(),
            "vision_ok": int(bool(result.get("vision_ok"))),
            "grounded": None if result.get("grounded") is None else int(bool(result["grounded"])),
            "latency_ms": result.get("latency_ms"),
            "prompt_tokens": result.get("prompt_tokens"),
            "image_name": image.get("name"),
            "image_sha256": image.get("sha256"),
            "image_bytes": image.get("original_bytes"),
            "result_json": json.dumps(result, default=str),
        },
    )


def list_probes(settings: Settings, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    return _newest(settings, "SELECT * FROM probes", name, limit)


def latest_probes(settings: Settings) -> dict[str, dict[str, Any]]:
    """The last probe of every entry, by name."""
    return _latest_per_name(settings, "probes")


def record_download(settings: Settings, **fields: Any) -> int:
    """Insert a download row (repo_id, status, revision, commit_sha, location, path, total_bytes, ...)."""
    if "files" in fields:
        fields["files_json"] = json.dumps(fields.pop("files"), default=str)
    return _insert(settings, "downloads", fields)


def list_downloads(settings: Settings, limit: int = 200) -> list[dict[str, Any]]:
    return _newest(settings, "SELECT * FROM downloads", None, limit)
