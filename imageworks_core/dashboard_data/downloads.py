"""Downloads and scans started from the dashboard: live progress figures, Cancel, and the Download History table.

A :class:`DownloadTracker` is the ``progress`` callback handed to :meth:`ImageWorks.download`; it keeps the
figures a progress bar shows and raises :class:`DownloadCancelled` at the next event once cancelled, which
aborts the run the way the downloader promises: no marker written, partial bytes kept for a resume, the run
recorded as ``cancelled`` in the download history with the reason (:func:`imageworks_core.discovery.download_and_register`
tells a cancel from a failure; the error lives in :mod:`imageworks_core.errors`).

Adversaries: the download runs in a worker thread while the page's script reads the tracker and a click on
Cancel sets its flag from another thread; every figure is read and written under one lock, and a Cancel that
arrives between two chunks takes effect at the next chunk (a stalled connection is ended by the downloader's
own timeouts, not by Cancel).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from ..discovery import list_download_rows
from ..errors import DownloadCancelled
from ..settings import Settings
from ..units import format_bytes


@dataclass(frozen=True)
class DownloadProgress:
    """What the progress bar shows at one moment."""

    phase: str  # 'connecting', 'checking', 'downloading', 'verifying', 'done'
    fraction: float
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    rate_bps: float
    eta_s: float | None
    current: str
    cancelling: bool

    @property
    def text(self) -> str:
        """``12.0 MiB / 48.0 MiB · 1/4 files · 5.0 MiB/s · ETA 7 s · model.safetensors``."""
        if self.phase == "connecting":
            return "asking the Hub for the file list…"
        if self.phase == "checking":
            return (
                f"checking files already on disk · {format_bytes(self.bytes_done)} / {format_bytes(self.bytes_total)}"
            )
        parts = [
            f"{format_bytes(self.bytes_done)} / {format_bytes(self.bytes_total)}",
            f"{self.files_done}/{self.files_total} files",
            f"{format_bytes(self.rate_bps)}/s",
            f"ETA {eta_text(self.eta_s)}",
        ]
        if self.current:
            parts.append(self.current)
        text = " · ".join(parts)
        return f"cancelling… {text}" if self.cancelling else text


def eta_text(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; ``?`` before the rate is known."""
    if seconds is None:
        return "?"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


class DownloadTracker:
    """The progress callback of one download: keeps its figures, and aborts it once :meth:`cancel` was called."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._phase = "connecting"
        self._files_total = 0
        self._files_done = 0
        self._bytes_total = 0
        self._bytes_done = 0
        self._check = (0, 0)
        self._current = ""
        self._rate_from: tuple[float, int] | None = None  # (time, bytes) at the first chunk: the rate's base

    def cancel(self) -> None:
        """Abort at the next progress event (a chunk, a file, the plan)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __call__(self, event: dict[str, Any]) -> None:
        if self._cancel.is_set():
            raise DownloadCancelled("download cancelled by the operator; partial bytes kept for a resume")
        kind = event.get("event")
        with self._lock:
            if kind == "check":
                self._phase, self._check, self._current = "checking", (event["done"], event["total"]), event["path"]
            elif kind == "plan":
                self._phase = "downloading"
                self._files_total = event["files"] - len(event["reused_files"])
                self._bytes_total = event["to_download_bytes"]
            elif kind == "file_start":
                self._current = event["path"]
            elif kind == "bytes":
                self._bytes_done, self._bytes_total = event["done"], event["total"]
                if self._rate_from is None:
                    self._rate_from = (self._clock(), event["done"])
            elif kind == "file_done":
                self._files_done += 1
            elif kind == "done":
                self._phase, self._current = "done", ""
                self._bytes_done = self._bytes_total

    def snapshot(self) -> DownloadProgress:
        """The figures now: fraction, bytes, files, rate (since the first chunk) and ETA."""
        with self._lock:
            if self._phase == "checking":
                done, total = self._check
                return DownloadProgress(
                    "checking",
                    done / total if total else 0.0,
                    done,
                    total,
                    0,
                    0,
                    0.0,
                    None,
                    self._current,
                    self.cancelled,
                )
            rate = 0.0
            if self._rate_from is not None:
                since, base = self._rate_from
                elapsed = self._clock() - since
                rate = (self._bytes_done - base) / elapsed if elapsed > 0 else 0.0
            left = max(self._bytes_total - self._bytes_done, 0)
            eta = left / rate if rate > 0 else (0.0 if self._phase == "done" else None)
            fraction = self._bytes_done / self._bytes_total if self._bytes_total else float(self._phase == "done")
            return DownloadProgress(
                self._phase,
                min(max(fraction, 0.0), 1.0),
                self._bytes_done,
                self._bytes_total,
                self._files_done,
                self._files_total,
                rate,
                eta,
                self._current,
                self.cancelled,
            )


def download_history_rows(settings: Settings, limit: int = 200) -> list[dict[str, Any]]:
    """Download History for the Import tab, newest first: when, status, repo, commit, size, path, whether the
    folder is still there, and the detail (the error, or the discovered entry it made)."""
    return [
        {
            "id": row["id"],
            "at": row["at"],
            "status": row["status"],
            "repo": row["repo_id"],
            "commit": (row.get("commit_sha") or "")[:12],
            "size": format_bytes(row.get("total_bytes"), missing=""),
            "exists": "yes" if row["exists"] else "missing",
            "path": row.get("path") or "",
            "detail": row.get("detail") or "",
        }
        for row in list_download_rows(settings, limit=limit)
    ]
