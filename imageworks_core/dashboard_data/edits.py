"""What an edit or an import would write: metadata forms to changes, curated previews, import candidates, revisions."""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import history
from ..errors import ImageWorksError, UsageError
from ..registry import Registry
from ..schema import CAPABILITY_NAMES, Capabilities
from ..settings import Settings
from .registry_view import service_for

_FAILED_DOWNLOAD = ("fail", "error", "cancel", "partial", "incomplete", "running")


# Edit metadata --------------------------------------------------------------------------------------------
def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def metadata_defaults(registry: Registry, name: str) -> dict[str, Any]:
    """The Edit-metadata form's initial values, from the merged entry."""
    entry = registry.entries[name]
    return {
        "roles": list(entry.roles),
        "capabilities": entry.capabilities.enabled(),
        "role_priority": entry.role_priority,
        "backend_config": _json_text(entry.backend_config.model_dump(mode="json", exclude_defaults=True)),
        "generation_defaults": _json_text(entry.generation_defaults),
        "notes": entry.notes or "",
    }


def _parse_json_object(field_name: str, text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{field_name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} "
            "(fix the syntax: double-quoted keys, no trailing commas)"
        ) from exc
    if not isinstance(value, dict):
        raise UsageError(f"{field_name}: expected a JSON object {{...}}, got {type(value).__name__}")
    return value


def capability_changes(registry: Registry, name: str, enabled: Iterable[str]) -> dict[str, bool]:
    """The curated ``capabilities`` object for a set of enabled capabilities.

    Keeps the keys the curated file already has, states every key the discovered layer sets (so curated wins),
    and adds only keys that differ from the default: a small diff that still means exactly ``enabled``.
    """
    wanted = set(enabled)
    unknown = wanted - set(CAPABILITY_NAMES)
    if unknown:
        raise UsageError(f"capabilities: unknown {', '.join(sorted(unknown))}; valid: {', '.join(CAPABILITY_NAMES)}")
    curated = registry.curated.get(name, {}).get("capabilities") or {}
    discovered = registry.discovered.get(name, {}).get("capabilities") or {}
    defaults = Capabilities()
    keys = set(curated) | set(discovered) | {c for c in CAPABILITY_NAMES if (c in wanted) != getattr(defaults, c)}
    return {c: c in wanted for c in CAPABILITY_NAMES if c in keys}


def metadata_changes(
    registry: Registry,
    name: str,
    *,
    roles: Iterable[str],
    capabilities: Iterable[str],
    role_priority: int,
    backend_config: str,
    generation_defaults: str,
    notes: str,
) -> dict[str, Any]:
    """The curated fields an Edit-metadata submission changes (only those that differ from the merged entry).

    JSON text fields are parsed here; a syntax error raises UsageError naming the field.
    """
    entry = registry.entries[name]
    current = metadata_defaults(registry, name)
    new_backend_config = _parse_json_object("backend_config", backend_config)
    new_generation = _parse_json_object("generation_defaults", generation_defaults)
    changes: dict[str, Any] = {}
    roles = list(dict.fromkeys(r.strip() for r in roles if r.strip()))
    if roles != list(entry.roles):
        changes["roles"] = roles
    enabled = list(capabilities)
    if set(enabled) != set(entry.capabilities.enabled()):
        changes["capabilities"] = capability_changes(registry, name, enabled)
    if int(role_priority) != entry.role_priority:
        changes["role_priority"] = int(role_priority)
    if new_backend_config != json.loads(current["backend_config"]):
        changes["backend_config"] = new_backend_config
    if new_generation != entry.generation_defaults:
        changes["generation_defaults"] = new_generation
    new_notes = notes.strip() or None
    if new_notes != entry.notes:
        changes["notes"] = new_notes
    return changes


@dataclass
class CuratedPreview:
    """What saving ``changes`` would do to the curated file: the unified diff, or the problems refusing it."""

    name: str
    changes: dict[str, Any]
    diff: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def empty(self) -> bool:
        return self.ok and not self.diff


def preview_curated_change(
    settings: Settings, name: str, changes: dict[str, Any], *, create: bool = False
) -> CuratedPreview:
    """Dry run of :func:`save_curated_change`: the diff it would write and every validation problem.

    The registry transaction's own preview: the same mutation and validation as the write; nothing written.
    """
    preview = CuratedPreview(name, changes)
    try:
        preview.diff = service_for(settings).preview_entry(name, changes, create=create).diff
    except ImageWorksError as exc:
        preview.problems = exc.lines()
    return preview


def save_curated_change(
    settings: Settings, name: str, changes: dict[str, Any], *, create: bool = False, command: str
) -> Registry:
    """Write ``changes`` to the curated entry (atomic, validated, revision kept); ``create`` adds a new entry
    and refuses one that is already curated. Raises on invalid input."""
    return service_for(settings).save_entry(name, changes, create=create, command=command)


# Import from Download History -----------------------------------------------------------------------------
@dataclass
class ImportCandidate:
    """A discovered entry or a finished download that no curated entry covers yet."""

    key: str
    name: str
    origin: str  # 'discovered' or 'download'
    repo_id: str | None = None
    path: str | None = None
    download_format: str | None = None
    quantization: str | None = None
    size_bytes: int | None = None
    at: str | None = None
    base: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        where = f" — {self.repo_id}" if self.repo_id and self.repo_id != self.name else ""
        return f"{self.name}{where} ({self.origin})"


def suggest_name(repo_id: str, download_format: str | None = None, quantization: str | None = None) -> str:
    """The name the downloader would give: ``Qwen/Qwen2.5-VL-7B-Instruct-AWQ`` -> ``qwen2.5-vl-7b-instruct_(AWQ)``."""
    from ..discovery import entry_name_for
    from ..formats import FormatInfo, WeightFormat

    known = download_format if download_format in typing.get_args(WeightFormat) else "unknown"
    return entry_name_for(repo_id or "model", FormatInfo(format=known, quantization=quantization))


def _resolved(settings: Settings, path: str | None) -> Path | None:
    return settings.resolve_path(path).resolve() if path else None


def import_candidates(registry: Registry, downloads: Iterable[dict[str, Any]]) -> list[ImportCandidate]:
    """Discovered entries not in the curated file, then downloads whose directory no entry uses yet."""
    settings = registry.settings
    out: list[ImportCandidate] = []
    for name, raw in registry.discovered.items():
        if name in registry.curated:
            continue
        entry = registry.entries[name]
        out.append(
            ImportCandidate(
                key=f"discovered:{name}",
                name=name,
                origin="discovered",
                repo_id=entry.source.repo_id,
                path=entry.download_path,
                download_format=entry.download_format,
                quantization=entry.quantization,
                size_bytes=entry.download_size_bytes,
                at=str(raw.get("downloaded_at") or "") or None,
            )
        )
    used_paths = {_resolved(settings, e.download_path) for e in registry if e.download_path}
    seen: set[Path] = set()
    for row in downloads:
        status = str(row.get("status") or "").lower()
        path = _resolved(settings, row.get("path"))
        if path is None or any(word in status for word in _FAILED_DOWNLOAD) or path in used_paths or path in seen:
            continue
        seen.add(path)
        repo_id = str(row.get("repo_id") or "")
        base: dict[str, Any] = {"download_path": row["path"]}
        for column, key in (("format", "download_format"), ("quantization", "quantization")):
            if row.get(column):
                base[key] = row[column]
        if row.get("total_bytes") is not None:
            base["download_size_bytes"] = int(row["total_bytes"])
        if row.get("location"):
            base["download_location"] = row["location"]
        base["source"] = {
            k: v
            for k, v in (
                ("provider", "huggingface"),
                ("repo_id", repo_id),
                ("revision", row.get("commit_sha") or row.get("revision")),
            )
            if v
        }
        out.append(
            ImportCandidate(
                key=f"download:{row.get('id')}",
                name=suggest_name(repo_id, row.get("format"), row.get("quantization")),
                origin="download",
                repo_id=repo_id or None,
                path=row["path"],
                download_format=row.get("format"),
                quantization=row.get("quantization"),
                size_bytes=row.get("total_bytes"),
                at=row.get("at"),
                base=base,
            )
        )
    return out


def import_changes(
    candidate: ImportCandidate,
    *,
    backend: str,
    served_model_id: str,
    roles: Iterable[str],
    capabilities: Iterable[str],
) -> dict[str, Any]:
    """The new curated entry's fields: the operator's metadata over the download facts (when not discovered)."""
    wanted = set(capabilities)
    unknown = wanted - set(CAPABILITY_NAMES)
    if unknown:
        raise UsageError(f"capabilities: unknown {', '.join(sorted(unknown))}; valid: {', '.join(CAPABILITY_NAMES)}")
    changes: dict[str, Any] = copy.deepcopy(candidate.base)
    changes["backend"] = backend
    if served_model_id.strip():
        changes["served_model_id"] = served_model_id.strip()
    changes["roles"] = list(dict.fromkeys(r.strip() for r in roles if r.strip()))
    changes["capabilities"] = {c: c in wanted for c in CAPABILITY_NAMES if c in wanted or c == "text"}
    return changes


# History and rollback -------------------------------------------------------------------------------------
def revision_rows(settings: Settings, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Registry revisions, newest first (empty without a history DB)."""
    if not settings.history_db_path.exists():
        return []
    return [
        {
            "rev": row["id"],
            "at": row["at"],
            "file": Path(row["file"]).name,
            "actor": row["actor"],
            "command": history.revision_label(row),
            "entries": ", ".join(row["names"]),
        }
        for row in history.list_revisions(settings, name, limit)
    ]


