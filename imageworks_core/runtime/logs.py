"""Backend logs: ``logs/backends/<slug>.log`` holds the stdout and stderr of the entry's latest backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from .. import history
from ..schema import ModelEntry
from ..settings import Settings, slugify

LOG_TAIL_LINES = 30
"""How many log lines an activation failure and ``current-model --log`` show."""
_TAIL_READ_BYTES = 256 * 1024


def backend_log_path(settings: Settings, name: str) -> Path:
    """``logs/backends/<slug>.log``: stdout and stderr of the entry's latest backend."""
    return settings.backend_logs_dir / f"{slugify(name)}.log"


def tail_backend_log(settings: Settings, name: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of the entry's backend log ([] when there is none)."""
    return tail(backend_log_path(settings, name), lines)


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path`` (reads at most the last 256 KiB; [] when it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - _TAIL_READ_BYTES))
            data = handle.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:] if lines > 0 else []


def open_log(settings: Settings, entry: ModelEntry, argv: list[str]) -> tuple[Path, IO[bytes]]:
    """A fresh log for this start, opened for the backend to write; the previous one is kept as ``.log.1``."""
    path = backend_log_path(settings, entry.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        os.replace(path, path.with_name(path.name + ".1"))
    handle = path.open("ab")
    handle.write(f"# {history.now_iso()} imageworks: starting {entry.name!r}: {argv}\n".encode())
    handle.flush()
    return path, handle
