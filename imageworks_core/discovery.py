"""The discovered overlay: machine facts about weight directories, written to ``model_registry.discovered.json``.

The overlay is rebuildable and holds no operator decisions: an entry carries only what can be read off a
directory (path, format, quantization, size, file list) and where it came from (download location, Hub repo and
commit, the Hub's per-file sha256). Backends, roles, capabilities and locks belong to the curated file; the
registry merges curated over discovered, so an operator's value always wins.

Three writers, one set of rules:

- :func:`download_and_register` (``imageworks-download download``): download, record a history row (failures
  too), then add or update the entry for that directory.
- :func:`adopt_directory` (``imageworks-download scan``): the same for a folder already on disk; it only reads.
- :func:`normalize_formats` (``imageworks-download normalize-formats``): re-scan every entry's directory.

An existing entry (discovered or curated) is updated in place, keeping its name, when it already points at the
same directory or the same Hub repo; otherwise a name is derived from the repo (``Qwen2.5-VL-7B-Instruct-AWQ`` ->
``qwen2.5-vl-7b-instruct_(AWQ)``). Every write goes through :func:`registry.edit_layer` on the discovered layer.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shlex
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Unpack

from . import audit, history, schema
from .download import (
    DEFAULT_LOCATION,
    DownloadOptions,
    DownloadResult,
    download_repo,
    location_roots,
    read_marker,
    resolve_location,
)
from .errors import DownloadCancelled, RegistryError, UsageError, WeightsError
from .formats import FormatInfo, ScanResult, scan_directory
from .registry import Registry, edit_layer, load_registry
from .registry_file import read_registry_text, splice
from .settings import Settings

PROVIDER_HUGGINGFACE = "huggingface"
PROVIDER_LOCAL = "local"
SCAN_LOCATION = "scan"
DISCOVERED_FIELDS: tuple[str, ...] = schema.fields_of_layer("discovered")
"""The fields the overlay may hold (machine facts), as the schema declares them."""
# Keys normalize-formats recomputes from the directory (merge mode changes only these).
DERIVED_KEYS: tuple[str, ...] = ("download_format", "quantization", "download_size_bytes", "download_files")
# Provenance a directory scan cannot recompute; --rebuild keeps these and drops every other key.
IDENTITY_KEYS: tuple[str, ...] = ("name", "download_path", "download_location", "downloaded_at", "source")
# Formats that are a quantization, and so get a ``_(LABEL)`` suffix in a derived name.
_QUANTIZED_FORMATS = frozenset({"awq", "gptq", "fp8", "bitsandbytes", "compressed-tensors", "gguf"})
# Trailing repo-name tokens that only restate the quantization (the suffix says it instead).
_QUANT_TAIL = re.compile(
    r"[-_.](awq|gptq|fp8|gguf|bnb|int4|int8|w4a16|w8a8|w8a16|nf4|4bit|8bit|dynamic|marlin)$", re.IGNORECASE
)

EntryStatus = Literal["created", "updated", "unchanged"]
NormalizeStatus = Literal["unchanged", "updated", "missing", "skipped"]


# Results --------------------------------------------------------------------------------------------------------


@dataclass
class DiscoveredUpdate:
    """What a download or scan did to the discovered overlay."""

    name: str
    status: EntryStatus
    entry: dict[str, Any]
    matched_by: str | None = None  # "download_path" / "repo_id" / "name" when an existing entry was reused
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "matched_by": self.matched_by,
            "entry": self.entry,
            "notes": self.notes,
        }


@dataclass
class DownloadOutcome:
    """A finished download, its history row and its discovered entry."""

    result: DownloadResult
    location: str
    history_id: int
    update: DiscoveredUpdate

    def to_dict(self, settings: Settings) -> dict[str, Any]:
        return {
            "repo_id": self.result.repo_id,
            "revision": self.result.revision,
            "commit_sha": self.result.commit_sha,
            "path": str(self.result.target),
            "location": self.location,
            "total_bytes": self.result.total_bytes,
            "downloaded_bytes": self.result.downloaded_bytes,
            "reused_files": self.result.reused_files,
            "format": self.result.format.format,
            "quantization": self.result.format.quantization,
            "evidence": self.result.format.evidence,
            "history_id": self.history_id,
            "discovered": self.update.to_dict(),
            "next_steps": next_steps(settings, self.update.name),
        }


@dataclass
class NormalizeRow:
    """One discovered entry after a re-scan."""

    name: str
    path: str | None
    status: NormalizeStatus
    format: str | None = None
    quantization: str | None = None
    size_bytes: int | None = None
    files: int = 0
    changed: list[str] = field(default_factory=list)
    note: str | None = None


@dataclass
class NormalizeReport:
    """What ``normalize-formats`` found and changed; ``diff`` is the unified diff of the discovered file."""

    rebuild: bool
    dry_run: bool
    written: bool
    diff: str
    rows: list[NormalizeRow]

    @property
    def missing(self) -> list[str]:
        return [row.name for row in self.rows if row.status == "missing"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rebuild": self.rebuild,
            "dry_run": self.dry_run,
            "written": self.written,
            "missing": self.missing,
            "diff": self.diff,
            "entries": [row.__dict__ for row in self.rows],
        }


# Names ----------------------------------------------------------------------------------------------------------


def quant_label(fmt: FormatInfo) -> str | None:
    """The ``_(LABEL)`` a derived name carries: AWQ, GPTQ, FP8, BNB, the GGUF quant (Q4_K_M), ...; None if plain."""
    if fmt.format not in _QUANTIZED_FORMATS:
        return None
    if fmt.format == "gguf":
        quant = fmt.quantization or ""
        return quant.upper() if quant and "," not in quant else "GGUF"
    if fmt.format == "bitsandbytes":
        return "BNB"
    if fmt.format == "compressed-tensors" and fmt.quantization:
        return fmt.quantization.upper()
    return fmt.format.upper()


def entry_name_for(source_name: str, fmt: FormatInfo) -> str:
    """A logical name from a repo id or folder name: lowercase, plus ``_(LABEL)`` for a quantized format.

    ``Qwen/Qwen2.5-VL-7B-Instruct-AWQ`` (awq) -> ``qwen2.5-vl-7b-instruct_(AWQ)``;
    ``acme/Tiny-GGUF`` (gguf Q4_K_M) -> ``tiny_(Q4_K_M)``; ``acme/tiny-vlm`` (bf16 safetensors) -> ``tiny-vlm``.
    """
    base = re.sub(r"\s+", "-", source_name.rstrip("/").rsplit("/", 1)[-1].strip()).lower()
    base = re.sub(r"[\x00-\x1f\x7f]", "-", base) or "model"
    label = quant_label(fmt)
    if label is None:
        return base
    stripped = base
    while (match := _QUANT_TAIL.search(stripped)) and match.start() > 0:
        stripped = stripped[: match.start()]
    return f"{stripped or base}_({label})"


def _unique_name(wanted: str, taken: set[str]) -> str:
    if wanted not in taken:
        return wanted
    stem, paren, label = wanted.partition("_(")
    for number in range(2, 1000):
        candidate = f"{stem}-{number}{paren}{label}"
        if candidate not in taken:
            return candidate
    raise RegistryError(f"cannot find a free name for {wanted!r}; pass one with --name")


def check_name(name: str) -> str:
    """``name`` if it is a valid logical name (the schema's rule), else UsageError."""
    try:
        return schema.check_name(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# Facts ----------------------------------------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).isoformat()


def _hub_digests(marker: DownloadResult | None) -> dict[str, tuple[int, str | None]]:
    return {f.path: (f.size, f.sha256) for f in marker.files} if marker else {}


def directory_facts(scan: ScanResult, hub: dict[str, tuple[int, str | None]] | None = None) -> dict[str, Any]:
    """The derived keys (format, quantization, size, files) for a scanned directory.

    ``hub`` maps a relative path to the (size, sha256) the Hub published; a file whose size still matches keeps
    that digest in the file list. A missing directory gives ``download_size_bytes`` null and no files.
    """
    if scan.missing:
        return {"download_size_bytes": None, "download_files": []}
    hub = hub or {}
    files: list[dict[str, Any]] = []
    for scanned in scan.files:
        item: dict[str, Any] = {"path": scanned.path, "size": scanned.size}
        published = hub.get(scanned.path)
        if published is not None and published[0] == scanned.size and published[1]:
            item["sha256"] = published[1]
        files.append(item)
    return {
        "download_format": scan.format.format,
        "quantization": scan.format.quantization,
        "download_size_bytes": scan.total_bytes,
        "download_files": files,
    }


def _source_from_marker(marker: DownloadResult) -> dict[str, Any]:
    return {"provider": PROVIDER_HUGGINGFACE, "repo_id": marker.repo_id, "revision": marker.commit_sha}


def _ordered(entry: dict[str, Any]) -> dict[str, Any]:
    """Our canonical key order for an entry we build from scratch; ``None`` values dropped (schema default)."""
    order = ("name", "download_path", "download_location", *DERIVED_KEYS, "downloaded_at", "source")
    outside = set(entry) - {"name", *DISCOVERED_FIELDS}
    if outside:  # the overlay holds machine facts only: the schema says which fields those are
        raise ValueError(f"not discovered-layer fields: {sorted(outside)}")
    out = {key: entry[key] for key in order if key in entry and entry[key] is not None}
    out.update({k: v for k, v in entry.items() if k not in out and v is not None})
    return out


def _apply(existing: dict[str, Any] | None, facts: dict[str, Any]) -> dict[str, Any]:
    """Merge ``facts`` into an existing discovered entry (other keys kept); a None fact removes its key."""
    if existing is None:
        return _ordered(facts)
    entry = dict(existing)
    for key, value in facts.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    return entry


# Matching an existing entry -------------------------------------------------------------------------------------


def _same_path(settings: Settings, value: Any, path: Path) -> bool:
    return isinstance(value, str) and bool(value) and settings.resolve_path(value).resolve() == path.resolve()


def _repo_of(raw: dict[str, Any]) -> str | None:
    source = raw.get("source")
    repo = source.get("repo_id") if isinstance(source, dict) else None
    return repo.lower() if isinstance(repo, str) and repo else None


def find_existing(registry: Registry, path: Path, repo_id: str | None) -> tuple[str, str] | None:
    """(name, matched_by) of the entry that already describes ``path`` (first) or ``repo_id``, if any."""
    settings = registry.settings
    layers = [registry.discovered, registry.curated]
    for raw_layer in layers:
        for name, raw in raw_layer.items():
            if _same_path(settings, raw.get("download_path"), path):
                return name, "download_path"
    if repo_id:
        wanted = repo_id.lower()
        for raw_layer in layers:
            for name, raw in raw_layer.items():
                if _repo_of(raw) == wanted:
                    return name, "repo_id"
    return None


def _taken_names(registry: Registry) -> set[str]:
    names = set(registry.curated) | set(registry.discovered)
    for entry in registry:
        names.update(entry.model_aliases)
        if entry.served_model_id:
            names.add(entry.served_model_id)
    return names


def _write_entry(
    settings: Settings,
    path: Path,
    repo_id: str | None,
    facts: dict[str, Any],
    *,
    name: str | None,
    fallback_name: str,
    command: str,
) -> DiscoveredUpdate:
    """Add or update the discovered entry for ``path`` (by explicit name, path, repo, or a new derived name)."""
    registry = load_registry(force=True, settings=settings)
    matched_by: str | None = None
    if name is not None:
        chosen = check_name(name)
        matched_by = "name" if chosen in registry.curated or chosen in registry.discovered else None
    else:
        found = find_existing(registry, path, repo_id)
        if found is not None:
            chosen, matched_by = found
        else:
            chosen = _unique_name(check_name(fallback_name), _taken_names(registry))

    before = registry.discovered.get(chosen)
    written: dict[str, Any] = {}

    def mutate(entries: list[dict[str, Any]]) -> None:
        for index, raw in enumerate(entries):
            if isinstance(raw, dict) and raw.get("name") == chosen:
                entries[index] = _apply(raw, facts)
                written.update(entries[index])
                return
        entries.append(_apply(None, {"name": chosen, **facts}))
        written.update(entries[-1])

    registry = edit_layer(settings, "discovered", mutate, command=command)
    status: EntryStatus = "created" if before is None else ("unchanged" if before == written else "updated")
    notes: list[str] = []
    curated_path = registry.curated.get(chosen, {}).get("download_path")
    if curated_path and not _same_path(settings, curated_path, path):
        notes.append(
            f"the curated entry {chosen!r} sets download_path {curated_path!r}, which overrides "
            f"{path} from this run; edit download_path in {settings.curated_path} if the weights now live here"
        )
    return DiscoveredUpdate(name=chosen, status=status, entry=written, matched_by=matched_by, notes=notes)


def next_steps(settings: Settings, name: str) -> list[str]:
    """What an operator does after a new download, in runbook order."""
    quoted = shlex.quote(name)
    return [
        f"imageworks-models show {quoted}",
        f"add backend, served_model_id, roles and capabilities for {name!r}: edit {settings.curated_path}, "
        "or use Models -> Registry -> Import from Download History in the dashboard",
        f"imageworks-models verify {quoted}",
        f"imageworks-models lock {quoted} --set-expected",
    ]


# Download -------------------------------------------------------------------------------------------------------


def location_label(settings: Settings, location: str, target: Path) -> str:
    """What ``download_location`` records: the location's name, or the root directory for a path."""
    return location if location in location_roots(settings) else str(target.parent.parent)


def register_download(settings: Settings, result: DownloadResult, location: str) -> DiscoveredUpdate:
    """Add or update the discovered entry for a finished download (the directory is re-scanned for its facts)."""
    scan = scan_directory(result.target)
    facts = {
        "download_path": str(result.target),
        "download_location": location,
        **directory_facts(scan, _hub_digests(result)),
        "downloaded_at": _iso(result.finished_at),
        "source": _source_from_marker(result),
    }
    return _write_entry(
        settings,
        result.target,
        result.repo_id,
        facts,
        name=None,
        fallback_name=entry_name_for(result.repo_id, scan.format),
        command=f"imageworks-download download {result.repo_id}",
    )


def download_and_register(
    settings: Settings,
    repo_id: str,
    *,
    location: str = DEFAULT_LOCATION,
    **options: Unpack[DownloadOptions],
) -> DownloadOutcome:
    """Download ``repo_id`` into ``location``, record the run in the history DB and update the discovered overlay.

    ``options`` go to :func:`imageworks_core.download.download_repo` as they are.

    A failed or interrupted download is recorded with status ``failed`` and the error as detail, writes no
    discovered entry, and re-raises (BackendError: Hub unreachable/offline; WeightsError: checksum or disk;
    UsageError: bad arguments). One the operator cancelled (the ``progress`` callback raised
    :class:`~imageworks_core.errors.DownloadCancelled`) is recorded the same way with status ``cancelled``.
    Argument errors found before any transfer (repo id, location) are not recorded.
    """
    target = resolve_location(location, repo_id, settings)
    label = location_label(settings, location, target)
    actor = audit.current_actor(settings)
    row: dict[str, Any] = {
        "repo_id": repo_id,
        "revision": options.get("revision"),
        "location": label,
        "path": str(target),
    }
    try:
        result = download_repo(repo_id, target, settings=settings, **options)
    except BaseException as exc:
        detail = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        status = "cancelled" if isinstance(exc, DownloadCancelled) else "failed"
        # The original error matters more than a history DB that cannot be written.
        with contextlib.suppress(sqlite3.Error, OSError):
            history.record_download(settings, **row, status=status, detail=detail, actor=actor)
            audit.log_event(settings, "download", repo_id=repo_id, status=status, path=str(target), error=detail)
        raise
    row.update(
        commit_sha=result.commit_sha,
        total_bytes=result.total_bytes,
        format=result.format.format,
        quantization=result.format.quantization,
        files=[{"path": f.path, "size": f.size, "sha256": f.sha256} for f in result.files],
        actor=actor,
    )
    try:
        update = register_download(settings, result, label)
    except RegistryError as exc:
        # The weights are verified and complete; only the overlay write failed. Say how to register them later.
        history.record_download(settings, **row, status="ok", detail=f"discovered overlay not updated: {exc}")
        raise RegistryError(
            f"downloaded {repo_id} into {target}, but {settings.discovered_path.name} was not updated: {exc}; "
            f"fix the registry, then run `imageworks-download scan {shlex.quote(str(target))}`",
            exc.lines(),
        ) from exc
    history_id = history.record_download(settings, **row, status="ok", detail=f"discovered entry {update.name}")
    audit.log_event(
        settings,
        "download",
        repo_id=repo_id,
        status="ok",
        commit_sha=result.commit_sha,
        path=str(target),
        name=update.name,
        total_bytes=result.total_bytes,
    )
    return DownloadOutcome(result=result, location=label, history_id=history_id, update=update)


def list_download_rows(settings: Settings, limit: int = 200) -> list[dict[str, Any]]:
    """Download history, newest first, each row with ``files`` decoded and ``exists`` (the path is still there)."""
    if not settings.history_db_path.exists():
        return []  # listing never creates the history DB
    rows = history.list_downloads(settings, limit=limit)
    for row in rows:
        raw = row.pop("files_json", None)
        row["files"] = json.loads(raw) if raw else []
        row["exists"] = bool(row.get("path")) and Path(row["path"]).is_dir()
    return rows


# Scan -----------------------------------------------------------------------------------------------------------


def adopt_directory(settings: Settings, directory: Path, *, name: str | None = None) -> DiscoveredUpdate:
    """Register a folder already on disk (nothing copied, nothing written inside it) as a discovered entry.

    The source is the folder's download marker when it has one (repo and commit), else ``local``.
    """
    path = Path(os.path.abspath(Path(directory).expanduser()))
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory")
    scan = scan_directory(path)
    if not scan.files:
        raise WeightsError(f"{path} holds no files to adopt (tool state under .cache/ and .git/ is not counted)")
    marker = read_marker(path)
    facts: dict[str, Any] = {
        "download_path": str(path),
        "download_location": SCAN_LOCATION,
        **directory_facts(scan, _hub_digests(marker)),
        "downloaded_at": _iso(marker.finished_at) if marker else None,
        "source": _source_from_marker(marker) if marker else {"provider": PROVIDER_LOCAL},
    }
    return _write_entry(
        settings,
        path,
        marker.repo_id if marker else None,
        facts,
        name=name,
        fallback_name=entry_name_for(marker.repo_id if marker else path.name, scan.format),
        command=f"imageworks-download scan {path}",
    )


# normalize-formats ----------------------------------------------------------------------------------------------


def _normalized(
    settings: Settings, raw: dict[str, Any], rebuild: bool, scans: dict[Path, ScanResult]
) -> tuple[dict[str, Any], NormalizeRow]:
    name = str(raw.get("name"))
    value = raw.get("download_path")
    if not isinstance(value, str) or not value:
        return raw, NormalizeRow(name=name, path=None, status="skipped", note="no download_path")
    path = settings.resolve_path(value)
    scan = scans.get(path)
    if scan is None:
        scan = scans[path] = scan_directory(path)
    marker = None if scan.missing else read_marker(path)
    hub = _hub_digests(marker)
    if not hub:
        # No marker (scanned folder, or marker deleted): keep the digests the entry already had.
        old_files = raw.get("download_files") if isinstance(raw.get("download_files"), list) else []
        hub = {
            f["path"]: (f.get("size"), f.get("sha256"))
            for f in old_files
            if isinstance(f, dict) and isinstance(f.get("path"), str)
        }
    facts = directory_facts(scan, hub)
    if rebuild:
        kept = {key: raw[key] for key in IDENTITY_KEYS if key in raw}
        if scan.missing:
            # A missing directory is evidence of nothing else: keep the last known format.
            kept.update({key: raw[key] for key in ("download_format", "quantization") if key in raw})
        if marker is not None:
            kept["source"] = _source_from_marker(marker)
            kept["downloaded_at"] = _iso(marker.finished_at)
        new = _ordered(kept | {k: v for k, v in facts.items() if v is not None})
        if scan.missing:
            new["download_size_bytes"] = None  # explicit: "we looked, nothing is there"
    else:
        new = dict(raw)
        for key, fact in facts.items():
            if fact is None and not (scan.missing and key == "download_size_bytes"):
                new.pop(key, None)
            else:
                new[key] = fact
    changed = sorted(key for key in set(raw) | set(new) if raw.get(key, ...) != new.get(key, ...))
    status: NormalizeStatus = "missing" if scan.missing else ("updated" if changed else "unchanged")
    row = NormalizeRow(
        name=name,
        path=str(path),
        status=status,
        format=new.get("download_format"),
        quantization=new.get("quantization"),
        size_bytes=new.get("download_size_bytes"),
        files=len(new.get("download_files") or []),
        changed=changed,
        note=f"{path} does not exist or is not a directory; fix download_path" if scan.missing else None,
    )
    return new, row


def _normalize_entries(
    settings: Settings, entries: list[Any], rebuild: bool, scans: dict[Path, ScanResult]
) -> tuple[list[Any], list[NormalizeRow]]:
    out: list[Any] = []
    rows: list[NormalizeRow] = []
    for raw in entries:
        if not isinstance(raw, dict):
            out.append(raw)
            continue
        new, row = _normalized(settings, raw, rebuild, scans)
        out.append(new)
        rows.append(row)
    return out, rows


def normalize_formats(
    settings: Settings,
    *,
    rebuild: bool = False,
    dry_run: bool = False,
    show_diff: Callable[[str], None] | None = None,
) -> NormalizeReport:
    """Re-scan every discovered entry's directory and recompute format, quantization, size and file list.

    Merge mode updates only those keys; ``rebuild`` rebuilds each entry from the directory (plus its download
    marker) and drops every other key. A missing directory gets ``download_size_bytes`` null and no files.
    ``show_diff`` receives the unified diff before anything is written; ``dry_run`` writes nothing.
    The curated file is never read for writing, so locks (curated-only) cannot be dropped.
    """
    path = settings.discovered_path
    parsed = read_registry_text(path)
    scans: dict[Path, ScanResult] = {}
    planned, rows = _normalize_entries(settings, parsed.entries, rebuild, scans)
    after = splice(parsed, planned) if planned != parsed.entries else parsed.text
    diff = "".join(
        difflib.unified_diff(
            parsed.text.splitlines(keepends=True),
            after.splitlines(keepends=True),
            f"{path} (current)",
            f"{path} ({'rebuilt' if rebuild else 'normalized'})",
        )
    )
    if show_diff is not None:
        show_diff(diff)
    written = False
    if diff and not dry_run:

        def mutate(entries: list[dict[str, Any]]) -> list[Any]:
            # Recomputed under the file lock (reusing this run's scans) so a concurrent edit is not lost.
            return _normalize_entries(settings, entries, rebuild, scans)[0]

        command = "imageworks-download normalize-formats" + (" --rebuild" if rebuild else "")
        edit_layer(settings, "discovered", mutate, command=command)
        written = True
    return NormalizeReport(rebuild=rebuild, dry_run=dry_run, written=written, diff=diff, rows=rows)
