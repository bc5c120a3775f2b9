"""The history database (``state/history.sqlite3``): everything the operator may want to query later.

Registry revisions, verification runs and the stat cache, activations, probes and downloads. One connection per
call site (SQLite in WAL mode handles concurrent CLI processes); every function opens, works and closes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from .settings import Settings

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
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(_SCHEMA)
        yield conn
        conn.commit()
    finally:
        conn.close()


def _rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    return [dict(row) for row in cursor.fetchall()]


# Registry revisions ---------------------------------------------------------------------------------------
def record_revision(
    settings: Settings, file: str, before: str, after: str, actor: str, command: str, names: list[str]
) -> int:
    """Keep ``before`` (the previous content) as a revision; returns its id."""
    with connect(settings) as conn:
        cur = conn.execute(
            "INSERT INTO revisions (file, at, actor, command, before_text, after_text, names)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (file, now_iso(), actor, command, before, after, json.dumps(names)),
        )
        return int(cur.lastrowid or 0)


def list_revisions(settings: Settings, name: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Newest first; with ``name``, only revisions that touched that entry."""
    query = "SELECT id, file, at, actor, command, names FROM revisions"
    params: tuple[Any, ...] = ()
    if name:
        query += " WHERE EXISTS (SELECT 1 FROM json_each(revisions.names) WHERE value = ?)"
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
    fields.setdefault("at", now_iso())
    if report is not None:
        fields["report_json"] = json.dumps(report, default=str)
    columns = ", ".join(fields)
    marks = ", ".join("?" for _ in fields)
    with connect(settings) as conn:
        cur = conn.execute(f"INSERT INTO verifications ({columns}) VALUES ({marks})", tuple(fields.values()))
        return int(cur.lastrowid or 0)


def latest_verifications(settings: Settings) -> dict[str, dict[str, Any]]:
    """The last verification of every entry, by name."""
    with connect(settings) as conn:
        rows = _rows(
            conn.execute(
                "SELECT v.* FROM verifications v JOIN (SELECT name, MAX(id) AS id FROM verifications"
                " GROUP BY name) last ON v.id = last.id"
            )
        )
    return {row["name"]: row for row in rows}


def list_verifications(settings: Settings, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    query = "SELECT id, name, at, mode, algorithm, duration_s, bytes, files, result, aggregate FROM verifications"
    params: tuple[Any, ...] = ()
    if name:
        query += " WHERE name = ?"
        params = (name,)
    with connect(settings) as conn:
        return _rows(conn.execute(query + " ORDER BY id DESC LIMIT ?", (*params, limit)))


def load_stat_cache(settings: Settings, directory: str, algorithm: str) -> dict[str, tuple[int, int, int, str]]:
    """``{path: (size, mtime_ns, inode, digest)}`` recorded for a weights directory."""
    with connect(settings) as conn:
        rows = conn.execute(
            "SELECT path, size, mtime_ns, inode, digest FROM stat_cache WHERE directory = ? AND algorithm = ?",
            (directory, algorithm),
        ).fetchall()
    return {row["path"]: (row["size"], row["mtime_ns"], row["inode"], row["digest"]) for row in rows}


def save_stat_cache(
    settings: Settings, directory: str, algorithm: str, cache: dict[str, tuple[int, int, int, str]]
) -> None:
    """Replace the stat cache of a directory."""
    with connect(settings) as conn:
        conn.execute("DELETE FROM stat_cache WHERE directory = ? AND algorithm = ?", (directory, algorithm))
        conn.executemany(
            "INSERT INTO stat_cache (directory, path, algorithm, size, mtime_ns, inode, digest)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(directory, path, algorithm, *values) for path, values in cache.items()],
        )


# Activations, probes, downloads ---------------------------------------------------------------------------
def _insert(settings: Settings, table: str, fields: dict[str, Any]) -> int:
    fields.setdefault("at", now_iso())
    columns = ", ".join(fields)
    marks = ", ".join("?" for _ in fields)
    with connect(settings) as conn:
        cur = conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(fields.values()))
        return int(cur.lastrowid or 0)


def record_activation(settings: Settings, **fields: Any) -> int:
    """Insert an activation row (name, action, result, actor, stop_s, start_to_ready_s, pid, detail)."""
    return _insert(settings, "activations", fields)


def list_activations(settings: Settings, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    query, params = "SELECT * FROM activations", ()
    if name:
        query, params = query + " WHERE name = ?", (name,)
    with connect(settings) as conn:
        return _rows(conn.execute(query + " ORDER BY id DESC LIMIT ?", (*params, limit)))


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
    query, params = "SELECT * FROM probes", ()
    if name:
        query, params = query + " WHERE name = ?", (name,)
    with connect(settings) as conn:
        return _rows(conn.execute(query + " ORDER BY id DESC LIMIT ?", (*params, limit)))


def latest_probes(settings: Settings) -> dict[str, dict[str, Any]]:
    """The last probe of every entry, by name."""
    with connect(settings) as conn:
        rows = _rows(
            conn.execute(
                "SELECT p.* FROM probes p JOIN (SELECT name, MAX(id) AS id FROM probes GROUP BY name) last"
                " ON p.id = last.id"
            )
        )
    return {row["name"]: row for row in rows}


def record_download(settings: Settings, **fields: Any) -> int:
    """Insert a download row (repo_id, status, revision, commit_sha, location, path, total_bytes, ...)."""
    if "files" in fields:
        fields["files_json"] = json.dumps(fields.pop("files"), default=str)
    return _insert(settings, "downloads", fields)


def list_downloads(settings: Settings, limit: int = 200) -> list[dict[str, Any]]:
    with connect(settings) as conn:
        return _rows(conn.execute("SELECT * FROM downloads ORDER BY id DESC LIMIT ?", (limit,)))
