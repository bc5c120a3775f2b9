"""The ``imageworks-download`` CLI: download, list, scan, normalize-formats. A thin shell over :mod:`.discovery`.

Exit codes come from the one mapping in :func:`imageworks_core.cli.app.run`: 6 Hub unreachable/offline,
7 checksum mismatch or disk problem, 3 registry invalid, 64 usage.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from ..discovery import (
    DiscoveredUpdate,
    NormalizeReport,
    adopt_directory,
    list_download_rows,
    next_steps,
    normalize_formats,
)
from ..download import DEFAULT_LOCATION
from ..service import ImageWorks
from ..settings import Settings, get_settings
from ..units import format_bytes
from .app import JsonOpt, RootOpt, echo_json, format_table, new_app, run

app = new_app(
    name="imageworks-download",
    help="Download model weights from the Hugging Face Hub (verified, resumable) and keep the discovered overlay.",
)

# Redraw the terminal line at most this often; a chunk arrives far more often on a fast link.
REDRAW_INTERVAL_S = 0.1


class DownloadProgress:
    """Progress of a download on ``stream`` (stderr): a redrawn line per file and total on a terminal, else a
    few plain lines (plan, retries, checksum failures, summary) that read well in logs."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.files = 0
        self.file_index = 0
        self.total = 0
        self.first_done: int | None = None
        self.last_draw = 0.0
        self.drawn = False

    def _line(self, text: str) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def _rate(self, done: int) -> float:
        base = self.first_done if self.first_done is not None else done
        return (done - base) / max(time.monotonic() - self.started, 1e-6)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "plan":
            self.started = time.monotonic()
            self.files = event["files"]
            self.total = event["to_download_bytes"]
            reused = len(event["reused_files"])
            self._line(
                f"{event['repo_id']}@{event['commit_sha'][:12]}: {event['files']} file(s), "
                f"{format_bytes(event['total_bytes'])}; {format_bytes(event['to_download_bytes'])} to fetch"
                + (f", {reused} already present and verified" if reused else "")
            )
        elif kind == "file_start":
            self.file_index += 1
            if event.get("resume_from"):
                self._line(f"resuming {event['path']} from {format_bytes(event['resume_from'])}")
        elif kind == "bytes":
            if self.first_done is None:
                self.first_done = event["done"] - event["file_done"]
            now = time.monotonic()
            finished = event["file_done"] >= event["file_size"]
            if self.tty and (finished or now - self.last_draw >= REDRAW_INTERVAL_S):
                self.last_draw = now
                self._draw(event)
        elif kind == "retry":
            self._line(f"retrying {event['path']} (attempt {event['attempt']}): {event['error']}")
        elif kind == "verify_failed":
            self._line(f"checksum mismatch: {event['path']}: expected {event['expected']}, got {event['actual']}")
        elif kind == "file_done" and self.tty:
            self._line(f"  ok {event['path']} ({format_bytes(event['size'])})")
        elif kind == "done":
            elapsed = time.monotonic() - self.started
            fetched = event["downloaded_bytes"]
            self._line(
                f"done: {format_bytes(fetched)} fetched in {elapsed:.1f} s "
                f"({format_bytes(fetched / max(elapsed, 1e-6))}/s), {format_bytes(event['total_bytes'])} verified"
            )

    def _draw(self, event: dict[str, Any]) -> None:
        file_size = event["file_size"] or 1
        total = event["total"] or 1
        name = event["path"] if len(event["path"]) <= 40 else "..." + event["path"][-37:]
        self.stream.write(
            f"\r\x1b[K[{self.file_index}/{self.files}] {name} {event['file_done'] / file_size:4.0%} "
            f"| total {format_bytes(event['done'])}/{format_bytes(event['total'])} {event['done'] / total:4.0%} "
            f"{format_bytes(self._rate(event['done']))}/s"
        )
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _settings(root: Path | None) -> Settings:
    return get_settings(root)


def _print_update(settings: Settings, update: DiscoveredUpdate) -> None:
    matched = f" (matched an existing entry by {update.matched_by})" if update.matched_by else ""
    typer.echo(f"discovered entry: {update.name} — {update.status} in {settings.discovered_path}{matched}")
    for note in update.notes:
        typer.echo(f"note: {note}")
    typer.echo("next steps:")
    for step in next_steps(settings, update.name):
        typer.echo(f"  {step}")


@app.command("download")
def download_cmd(
    repo_id: Annotated[str, typer.Argument(help="Hugging Face model repo id, OWNER/REPO.")],
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit (default: the main branch).")] = None,
    location: Annotated[
        str,
        typer.Option(help="linux_wsl, windows_lmstudio, a name from configs/locations.json, or a directory path."),
    ] = DEFAULT_LOCATION,
    include: Annotated[
        list[str] | None, typer.Option("--include", metavar="GLOB", help="Only files matching (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", metavar="GLOB", help="Skip files matching (repeatable).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Re-download everything and swap it in atomically once verified.")
    ] = False,
    as_json: JsonOpt = False,
    root: RootOpt = None,
) -> None:
    """Download OWNER/REPO into <location>/<owner>/<repo>, verify every file, and record it in the discovered
    overlay and the download history (exit 6 Hub unreachable/offline, 7 checksum mismatch or disk)."""
    service = ImageWorks(_settings(root))
    settings = service.settings
    progress = DownloadProgress()
    try:
        outcome = service.download(
            repo_id,
            location=location,
            revision=revision,
            include=include or None,
            exclude=exclude or None,
            force=force,
            progress=progress,
        )
    finally:
        progress.close()
    if as_json:
        echo_json(outcome.to_dict(settings))
        return
    result = outcome.result
    quant = f" {result.format.quantization}" if result.format.quantization else ""
    typer.echo(
        f"downloaded {result.repo_id}@{result.commit_sha[:12]} into {result.target}: {len(result.files)} file(s), "
        f"{format_bytes(result.total_bytes)}, format {result.format.format}{quant}"
    )
    _print_update(settings, outcome.update)


@app.command("list")
def list_cmd(
    limit: Annotated[int, typer.Option(help="How many downloads.")] = 200,
    as_json: JsonOpt = False,
    root: RootOpt = None,
) -> None:
    """Download history, newest first, and whether each directory still exists."""
    rows = list_download_rows(_settings(root), limit=limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        typer.echo("no downloads recorded yet")
        return
    table = [
        (
            row["id"],
            row["at"],
            row["status"],
            row["repo_id"],
            (row.get("commit_sha") or "-")[:12],
            row.get("format") or "-",
            row.get("quantization") or "-",
            format_bytes(row.get("total_bytes")),
            "yes" if row["exists"] else "MISSING",
            row.get("path") or "-",
        )
        for row in rows
    ]
    headers = ("ID", "AT", "STATUS", "REPO", "COMMIT", "FORMAT", "QUANT", "SIZE", "EXISTS", "PATH")
    typer.echo(format_table(headers, table))
    failed = [row for row in rows if row["status"] != "ok"]
    for row in failed[:5]:
        typer.echo(f"#{row['id']} {row['repo_id']}: {row.get('detail') or row['status']}")


@app.command("scan")
def scan_cmd(
    directory: Annotated[Path, typer.Argument(help="A model folder already on disk.")],
    name: Annotated[str | None, typer.Option(help="Logical name (default: derived, or the matching entry's).")] = None,
    as_json: JsonOpt = False,
    root: RootOpt = None,
) -> None:
    """Adopt an existing folder (read-only ones too) as a discovered entry without copying or writing inside it."""
    settings = _settings(root)
    update = adopt_directory(settings, directory, name=name)
    if as_json:
        echo_json({**update.to_dict(), "next_steps": next_steps(settings, update.name)})
        return
    entry = update.entry
    quant = f" {entry['quantization']}" if entry.get("quantization") else ""
    typer.echo(
        f"scanned {entry['download_path']}: {len(entry.get('download_files') or [])} file(s), "
        f"{format_bytes(entry.get('download_size_bytes'))}, format {entry.get('download_format')}{quant}"
    )
    _print_update(settings, update)


def _print_normalize(settings: Settings, report: NormalizeReport) -> None:
    table = [
        (
            row.name,
            row.status,
            row.format or "-",
            row.quantization or "-",
            format_bytes(row.size_bytes),
            row.files,
            ",".join(row.changed) or "-",
        )
        for row in report.rows
    ]
    if table:
        typer.echo(format_table(("NAME", "STATUS", "FORMAT", "QUANT", "SIZE", "FILES", "CHANGED"), table))
    else:
        typer.echo(f"no entries in {settings.discovered_path}")
    for row in report.rows:
        if row.note:
            typer.echo(f"{row.name}: {row.note}")
    if not report.diff:
        typer.echo("no changes")
    elif report.dry_run:
        typer.echo("dry run: nothing written")
    else:
        typer.echo(f"wrote {settings.discovered_path}")


@app.command("normalize-formats")
def normalize_formats_cmd(
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Rebuild each entry's machine facts from scratch (drop stale keys).")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the diff; write nothing.")] = False,
    as_json: JsonOpt = False,
    root: RootOpt = None,
) -> None:
    """Re-scan every discovered entry's directory: format, quantization, size, files; mark missing directories.

    Prints the unified diff of the discovered file before writing. Never touches the curated file or its locks.
    """
    settings = _settings(root)
    report = normalize_formats(
        settings, rebuild=rebuild, dry_run=dry_run, show_diff=None if as_json else lambda d: typer.echo(d, nl=False)
    )
    if as_json:
        echo_json(report.to_dict())
        return
    _print_normalize(settings, report)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point of ``imageworks-download``."""
    sys.exit(run(app, argv, "imageworks-download"))


if __name__ == "__main__":
    main()
