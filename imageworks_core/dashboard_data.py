"""Data shaping for the dashboard: every value a page shows, computed from the core without Streamlit.

The pages under ``dashboard/`` hold layout only; what they display (the registry table, badges, the curated diff
an edit would write, import candidates, backend targets, progress text, …) comes from these functions, which take
settings and core objects and return plain data or DataFrames, so tests call them directly.
"""

from __future__ import annotations

import copy
import difflib
import json
import threading
import time
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from . import audit, history
from .errors import ImageWorksError, RegistryError, UnknownRevisionError, UsageError, ValidationError
from .launch import preview_launch
from .registry import Registry, build_registry, load_registry, update_entry
from .registry_file import parse_entries, read_registry_text, splice
from .schema import CAPABILITY_NAMES, KNOWN_ROLES, PROCESS_BACKENDS, Capabilities, ModelEntry
from .selection import endpoint_for
from .service import EntryStatus, ImageWorks
from .settings import Settings
from .units import format_bytes

CAPABILITY_ICONS: dict[str, str] = {
    "text": "📝",
    "vision": "👁️",
    "tools": "🛠️",
    "embeddings": "🧭",
    "reasoning": "🧠",
    "audio": "🔊",
}
AUDIT_EVENTS: tuple[str, ...] = (
    "lock_violation",
    "probe_failure",
    "activation",
    "activation_failed",
    "stop",
    "verify",
    "lock",
    "unlock",
    "probe",
    "download",
    "registry_write",
    "rollback",
)
_FAILED_DOWNLOAD = ("fail", "error", "cancel", "partial", "incomplete", "running")


# Registry loading with a last-good fallback ---------------------------------------------------------------
@dataclass
class RegistryView:
    """What the pages show: the registry (possibly the last good one) and the error that made it stale."""

    registry: Registry | None
    error: RegistryError | None = None
    loaded_at: float = 0.0

    @property
    def stale(self) -> bool:
        """True when the files on disk are invalid and ``registry`` is the last good load."""
        return self.error is not None and self.registry is not None


_SERVICES: dict[str, ImageWorks] = {}
_SERVICES_LOCK = threading.Lock()


def service_for(settings: Settings) -> ImageWorks:
    """The one service object of this process for these settings (every session of the dashboard shares it)."""
    key = settings.model_dump_json()
    with _SERVICES_LOCK:
        service = _SERVICES.get(key)
        if service is None:
            service = _SERVICES[key] = ImageWorks(settings)
    return service


def load_registry_view(settings: Settings, *, force: bool = False) -> RegistryView:
    """The service's registry (the last good one when the files are invalid) with the error beside it."""
    service = service_for(settings)
    status = service.reload() if force else service.refresh()
    loaded_at = datetime.fromisoformat(status.loaded_at).timestamp() if status.loaded_at else 0.0
    return RegistryView(service.registry if service.has_registry else None, service.registry_error, loaded_at)


def badge_markdown(badges: Iterable[str]) -> str:
    """Streamlit badge markup: red for drift, orange for missing weights."""
    colors = {"drift": "red", "missing": "orange"}
    return " ".join(f":{colors.get(b, 'gray')}-badge[{b}]" for b in badges)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def age_text(timestamp: str | None, now: datetime | None = None) -> str:
    """'just now', '5 min ago', '3 h ago', '2 d ago' (or '' when unknown)."""
    moment = _parse_time(timestamp)
    if moment is None:
        return ""
    seconds = max(((now or datetime.now(UTC)) - moment).total_seconds(), 0.0)
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


def duration_text(seconds: float | None) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min' (or '' when unknown)."""
    if seconds is None:
        return ""
    seconds = max(float(seconds), 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def capability_icons(capabilities: Iterable[str]) -> str:
    """'📝 👁️ 🧠' for text, vision, reasoning."""
    return " ".join(CAPABILITY_ICONS.get(c, c) for c in capabilities)


def verification_text(verification: dict[str, Any] | None, now: datetime | None = None) -> str:
    """'ok · 5 min ago', 'drift · 1 d ago' or 'never'."""
    if not verification:
        return "never"
    age = age_text(verification.get("at"), now)
    return f"{verification['result']} · {age}" if age else str(verification["result"])


def probe_text(probe: dict[str, Any] | None, now: datetime | None = None) -> str:
    """'vision_ok · 2 h ago', 'failed · …' or 'never'."""
    if not probe:
        return "never"
    outcome = "vision_ok" if probe.get("vision_ok") else "failed"
    age = age_text(probe.get("at"), now)
    return f"{outcome} · {age}" if age else outcome


REGISTRY_COLUMNS: tuple[str, ...] = (
    "name",
    "status",
    "backend",
    "served_id",
    "roles",
    "capabilities",
    "format",
    "quantization",
    "size_gib",
    "weights",
    "lock",
    "last_verification",
    "last_probe",
    "layer",
    "flags",
)


def registry_frame(
    registry: Registry,
    entries: Iterable[ModelEntry],
    statuses: dict[str, EntryStatus],
    now: datetime | None = None,
) -> pd.DataFrame:
    """One row per entry with the columns of :data:`REGISTRY_COLUMNS` (the Registry page's table)."""
    now = now or datetime.now(UTC)
    rows = []
    for entry in entries:
        status = statuses[entry.name]
        flags = [flag for flag, on in (("testing", entry.testing), ("deprecated", entry.deprecated)) if on]
        badges = status.badges
        rows.append(
            {
                "name": entry.name,
                "status": " ".join(f"🔴 {b}" if b == "drift" else f"🟠 {b}" for b in badges),
                "backend": entry.backend or "-",
                "served_id": entry.effective_served_id,
                "roles": list(entry.roles),
                "capabilities": capability_icons(entry.capabilities.enabled()),
                "format": entry.download_format or "",
                "quantization": entry.quantization or "",
                "size_gib": None if entry.download_size_bytes is None else round(entry.download_size_bytes / 2**30, 2),
                "weights": status.weights,
                "lock": status.lock,
                "last_verification": verification_text(status.last_verification, now),
                "last_probe": probe_text(status.last_probe, now),
                "layer": registry.layer_of(entry.name),
                "flags": ", ".join(flags),
            }
        )
    return pd.DataFrame(rows, columns=list(REGISTRY_COLUMNS))


def filter_options(registry: Registry) -> dict[str, list[str]]:
    """Choices for the filter widgets: roles and backends in use, every capability."""
    roles = sorted({role for entry in registry for role in entry.roles} | set(KNOWN_ROLES))
    backends = sorted({entry.backend for entry in registry if entry.backend})
    return {"roles": roles, "capabilities": list(CAPABILITY_NAMES), "backends": backends}


# Entry detail ---------------------------------------------------------------------------------------------
def field_rows(registry: Registry, name: str) -> list[dict[str, str]]:
    """Every set field of the merged entry with the layer it came from (defaults left out)."""
    entry = registry.entries[name]
    data = entry.model_dump(mode="json")
    rows = []
    for path, layer in registry.provenance(name).items():
        value: Any = data
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if layer == "default" and value in (None, [], {}, False):
            continue
        rows.append({"field": path, "value": json.dumps(value, ensure_ascii=False, default=str), "from": layer})
    return rows


def launch_argv(entry: ModelEntry, settings: Settings) -> list[str] | None:
    """The exact argv activation would run (None for remote / ollama entries)."""
    return preview_launch(entry, settings)


def entry_history(settings: Settings, name: str, limit: int = 20) -> dict[str, pd.DataFrame]:
    """The entry's verifications, probes and activations, newest first."""
    if not settings.history_db_path.exists():
        return {"verifications": pd.DataFrame(), "probes": pd.DataFrame(), "activations": pd.DataFrame()}
    probes = [
        {k: row[k] for k in ("id", "at", "vision_ok", "grounded", "latency_ms", "prompt_tokens", "image_name")}
        for row in history.list_probes(settings, name, limit)
    ]
    return {
        "verifications": pd.DataFrame(history.list_verifications(settings, name, limit)),
        "probes": pd.DataFrame(probes),
        "activations": activation_frame(settings, name=name, limit=limit),
    }


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
    """Dry run of ``update_entry(..., layer='curated')``: the diff it would write and every validation problem.

    Validates the would-be merged registry with the same code the write path uses; writes nothing.
    """
    preview = CuratedPreview(name, changes)
    try:
        parsed = read_registry_text(settings.curated_path)
        discovered_text = (
            settings.discovered_path.read_text(encoding="utf-8") if settings.discovered_path.exists() else ""
        )
        discovered = parse_entries(settings.discovered_path, discovered_text)[0]
    except (RegistryError, OSError) as exc:
        preview.problems = exc.lines() if isinstance(exc, RegistryError) else [f"cannot read the registry: {exc}"]
        return preview
    entries = copy.deepcopy(parsed.entries)
    target = next((e for e in entries if isinstance(e, dict) and e.get("name") == name), None)
    if target is None:
        if not create:
            preview.problems = [f"{name!r} is not in the curated file {settings.curated_path}"]
            return preview
        entries.append({"name": name, **copy.deepcopy(changes)})
    else:
        if create:
            preview.problems = [f"{name!r} is already curated; edit it instead of importing it again"]
            return preview
        target.update(copy.deepcopy(changes))
    try:
        build_registry(settings, entries, discovered)
    except ValidationError as exc:
        preview.problems = exc.lines()
        return preview
    new_text = splice(parsed, entries)
    label = settings.curated_path.name
    preview.diff = "".join(
        difflib.unified_diff(
            parsed.text.splitlines(keepends=True), new_text.splitlines(keepends=True), f"a/{label}", f"b/{label}"
        )
    )
    return preview


def save_curated_change(
    settings: Settings, name: str, changes: dict[str, Any], *, create: bool = False, command: str
) -> Registry:
    """Write ``changes`` to the curated entry (atomic, validated, revision kept); raises on invalid input."""
    if create and name in load_registry(settings=settings).curated:
        raise UsageError(f"{name!r} is already curated; edit it instead of importing it again")
    return update_entry(settings, name, changes, layer="curated", command=command, create=create)


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
    from .discovery import entry_name_for
    from .formats import FormatInfo, WeightFormat

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


@dataclass
class RevisionDiff:
    """A revision's own change (before -> after) and what rolling back to it would apply (current -> before)."""

    rev: int
    file: str
    change: str
    rollback: str


def revision_diff(settings: Settings, rev: int) -> RevisionDiff:
    """Both diffs of revision ``rev``; UnknownRevisionError when there is no such revision."""
    row = history.get_revision(settings, rev) if settings.history_db_path.exists() else None
    if row is None:
        raise UnknownRevisionError(rev)
    path = history.revision_path(settings, row["file"])
    current = path.read_text(encoding="utf-8") if path.exists() else ""

    def diff(a: str, b: str, a_label: str, b_label: str) -> str:
        return "".join(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True), a_label, b_label))

    return RevisionDiff(
        rev=rev,
        file=str(path),
        change=diff(row["before_text"], row["after_text"], f"before rev {rev}", f"after rev {rev}"),
        rollback=diff(current, row["before_text"], "current", f"restored (rev {rev})"),
    )


# Settings page --------------------------------------------------------------------------------------------
def path_rows(settings: Settings) -> list[dict[str, Any]]:
    """Every resolved path under the root, and whether it exists."""
    paths = {
        "root": settings.root,
        "curated registry": settings.curated_path,
        "discovered overlay": settings.discovered_path,
        "merged snapshot": settings.snapshot_path,
        "lock manifests": settings.locks_dir,
        "active state": settings.active_state_path,
        "activation lock": settings.activation_lock_path,
        "audit log": settings.audit_log_path,
        "backend logs": settings.backend_logs_dir,
        "history DB": settings.history_db_path,
    }
    return [{"what": what, "path": str(path), "exists": path.exists()} for what, path in paths.items()]


def env_rows(settings: Settings) -> list[dict[str, str]]:
    """Every ``IMAGEWORKS_*`` / ``CHAT_PROXY_VLLM_*`` setting with its effective value and source (secrets masked)."""
    rows = []
    for variable, value, source in settings.env_sources():
        if ("TOKEN" in variable or "KEY" in variable) and value:
            value = "••••••"
        rows.append({"variable": variable, "value": value, "source": source})
    return rows


@dataclass
class BackendTarget:
    """One endpoint the registry points at, and the entries that use it."""

    endpoint: str
    kind: str
    entries: list[str]
    api_key_env: str | None = None


def backend_targets(registry: Registry, settings: Settings) -> list[BackendTarget]:
    """Distinct endpoints: the single port (process backends), remote base URLs, Ollama hosts."""
    targets: dict[str, BackendTarget] = {}
    for entry in registry:
        if not entry.backend:
            continue
        endpoint = endpoint_for(entry, settings)
        kind = "single port (vllm/lmdeploy)" if entry.backend in PROCESS_BACKENDS else entry.backend
        target = targets.setdefault(endpoint, BackendTarget(endpoint, kind, [], entry.backend_config.api_key_env))
        target.entries.append(entry.name)
    return list(targets.values())


@dataclass
class ConnectionResult:
    """The outcome of ``GET {endpoint}/models``."""

    ok: bool
    message: str
    status_code: int | None = None
    latency_ms: float | None = None
    models: list[str] = field(default_factory=list)


def check_connection(endpoint: str, *, api_key: str | None = None, timeout_s: float = 3.0) -> ConnectionResult:
    """Ask an OpenAI-compatible endpoint for its models (short timeout; never raises)."""
    url = endpoint.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.perf_counter()
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
        return ConnectionResult(False, f"{url}: no answer within {timeout_s:.0f} s (is the backend up and reachable?)")
    except httpx.HTTPError as exc:
        return ConnectionResult(
            False, f"{url}: cannot connect ({exc}); start the backend (Active Model page) or fix the base URL"
        )
    latency = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        hint = " (set the API key env var)" if response.status_code in (401, 403) else ""
        return ConnectionResult(False, f"{url}: HTTP {response.status_code}{hint}", response.status_code, latency)
    try:
        models = [str(m.get("id")) for m in response.json().get("data", []) if isinstance(m, dict)]
    except (ValueError, AttributeError):
        return ConnectionResult(False, f"{url}: answered 200 but not with an OpenAI model list", 200, latency)
    return ConnectionResult(True, f"{url}: OK, {len(models)} model(s) in {latency:.0f} ms", 200, latency, models)


def audit_frame(settings: Settings, event: str | None = None, limit: int = 500) -> pd.DataFrame:
    """Audit-log events, newest first, with ts/event/actor first and the remaining fields as JSON."""
    rows = []
    for record in audit.read_events(settings, event=event, limit=limit):
        rest = {k: v for k, v in record.items() if k not in ("ts", "event", "actor")}
        rows.append(
            {
                "ts": record.get("ts"),
                "event": record.get("event"),
                "actor": record.get("actor"),
                "name": rest.get("name", ""),
                "details": json.dumps(rest, ensure_ascii=False, default=str),
            }
        )
    return pd.DataFrame(rows, columns=["ts", "event", "actor", "name", "details"])


# Verification ---------------------------------------------------------------------------------------------
def verify_progress(
    bytes_done: int, bytes_total: int, files_done: int, files_total: int, elapsed_s: float, current_path: str = ""
) -> tuple[float, str]:
    """(fraction 0..1, 'text') for a progress bar: MB done/total, files, MB/s, current file."""
    fraction = bytes_done / bytes_total if bytes_total else (files_done / files_total if files_total else 0.0)
    rate = bytes_done / elapsed_s / 1e6 if elapsed_s > 0 else 0.0
    text = (
        f"{bytes_done / 1e6:,.1f} / {bytes_total / 1e6:,.1f} MB · {files_done}/{files_total} files · {rate:,.1f} MB/s"
    )
    if current_path:
        text += f" · {current_path}"
    return min(max(fraction, 0.0), 1.0), text


def verify_summary(result: Any) -> dict[str, Any]:
    """Key figures of a :class:`~imageworks_core.verification.VerifyResult` for display."""
    duration = result.duration_s or 0.0
    read = result.bytes_read
    return {
        "result": result.result,
        "aggregate": result.aggregate,
        "expected": result.expected,
        "files": result.file_count,
        "size": format_bytes(result.total_bytes),
        "read": format_bytes(read),
        "duration": duration_text(duration),
        "rate": f"{format_bytes(read / duration)}/s" if duration else "",
        "rehashed": len(result.rehashed),
        "notes": list(result.notes),
    }


def drift_tables(report: Any) -> dict[str, Any]:
    """A DriftReport as tables: modified / added / removed rows and the text diffs by path."""
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report or {})

    def rows(items: Any) -> list[dict[str, Any]]:
        if isinstance(items, dict):
            return [{"path": k, **(v if isinstance(v, dict) else {"detail": v})} for k, v in items.items()]
        return [i if isinstance(i, dict) else {"path": str(i)} for i in items or []]

    diffs = data.get("text_diffs") or {}
    if isinstance(diffs, list):
        diffs = {str(d.get("path")): str(d.get("diff", "")) for d in diffs if isinstance(d, dict)}
    return {
        "modified": rows(data.get("modified")),
        "added": rows(data.get("added")),
        "removed": rows(data.get("removed")),
        "text_diffs": {str(k): str(v) for k, v in diffs.items()},
    }


# Active model ---------------------------------------------------------------------------------------------
def process_entries(registry: Registry) -> list[str]:
    """Entries the single-port runtime can activate."""
    return [entry.name for entry in registry if entry.is_process_backend]


def activation_frame(settings: Settings, *, name: str | None = None, limit: int = 50) -> pd.DataFrame:
    """Activation history, newest first, with readable durations."""
    columns = ["at", "name", "action", "result", "start_to_ready", "stop", "pid", "actor", "detail"]
    if not settings.history_db_path.exists():
        return pd.DataFrame(columns=columns)
    rows = [
        {
            "at": row.get("at"),
            "name": row.get("name"),
            "action": row.get("action"),
            "result": row.get("result"),
            "start_to_ready": duration_text(row.get("start_to_ready_s")),
            "stop": duration_text(row.get("stop_s")),
            "pid": row.get("pid"),
            "actor": row.get("actor"),
            "detail": row.get("detail") or "",
        }
        for row in history.list_activations(settings, name, limit)
    ]
    return pd.DataFrame(rows, columns=columns)


def _field(obj: Any, *names: str) -> Any:
    for name in names:
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def gpu_cards() -> tuple[list[dict[str, Any]], str | None]:
    """NVML GPU cards for display, or ([], 'No NVIDIA GPU visible (reason)') when NVML is unavailable."""
    from . import gpu

    try:
        snapshot = gpu.query_gpus()
    except gpu.GpuUnavailable as exc:
        return [], exc.message
    except Exception as exc:  # a broken driver must degrade to a message, never a traceback on the page
        return [], f"{gpu.NO_GPU_MESSAGE} ({type(exc).__name__}: {exc})"
    cards = [
        {
            "name": info.name,
            "index": info.index,
            "memory": f"{format_bytes(info.memory_used_bytes)} / {format_bytes(info.memory_total_bytes)}",
            "memory_fraction": info.memory_used_bytes / info.memory_total_bytes if info.memory_total_bytes else 0.0,
            "utilization": info.utilization_percent,
            "temperature": info.temperature_c,
        }
        for info in snapshot
    ]
    if not cards:
        return [], gpu.NO_GPU_MESSAGE
    return cards, None


def system_stats() -> dict[str, Any]:
    """Host RAM and CPU figures via psutil."""
    import psutil

    memory = psutil.virtual_memory()
    return {
        "ram": f"{format_bytes(memory.total - memory.available)} / {format_bytes(memory.total)}",
        "ram_percent": memory.percent,
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpus": psutil.cpu_count() or 0,
        "load": " ".join(f"{x:.2f}" for x in psutil.getloadavg()),
    }


def status_view(status: Any) -> dict[str, Any]:
    """An ActiveStatus (or None) as display values."""
    if status is None:
        return {"name": None, "status": "idle", "endpoint": "", "uptime": "", "healthy": None, "pid": None}
    return {
        "name": _field(status, "name"),
        "status": str(_field(status, "status") or ""),
        "endpoint": _field(status, "base_url", "endpoint") or "",
        "uptime": duration_text(_field(status, "uptime_s")),
        "healthy": _field(status, "healthy"),
        "pid": _field(status, "pid"),
    }


# Vision probe ---------------------------------------------------------------------------------------------
def vision_entries(registry: Registry) -> list[str]:
    """Entries that claim vision (the probe checks the claim)."""
    return [entry.name for entry in registry if entry.capabilities.vision]


def probe_view(result: dict[str, Any]) -> dict[str, Any]:
    """A probe result (``ProbeResult.to_dict()``) as the modal's fields."""
    image = result.get("image") or {}
    return {
        "vision_ok": bool(result.get("vision_ok")),
        "grounded": result.get("grounded"),
        "answer": result.get("answer") or "",
        "reasoning": result.get("reasoning") or "",
        "latency": f"{result['latency_ms']:.0f} ms" if result.get("latency_ms") is not None else "",
        "prompt_tokens": result.get("prompt_tokens"),
        "model": result.get("model") or "",
        "endpoint": result.get("endpoint") or "",
        "image": image.get("name") or "",
        "matched": result.get("matched") or result.get("matched_words") or [],
        "error": result.get("error") or "",
    }


def probe_frame(settings: Settings, name: str | None = None, limit: int = 50) -> pd.DataFrame:
    """Past probe results, newest first."""
    columns = ["at", "name", "vision_ok", "grounded", "latency_ms", "prompt_tokens", "image_name"]
    if not settings.history_db_path.exists():
        return pd.DataFrame(columns=columns)
    rows = [{c: row.get(c) for c in columns} for row in history.list_probes(settings, name, limit)]
    for row in rows:
        row["vision_ok"] = bool(row["vision_ok"])
        row["grounded"] = None if row["grounded"] is None else bool(row["grounded"])
    return pd.DataFrame(rows, columns=columns)


def error_lines(exc: BaseException) -> list[str]:
    """An exception as operator-facing lines (every problem of a RegistryError; one line otherwise)."""
    if isinstance(exc, ImageWorksError):
        return exc.lines()
    return [f"unexpected {type(exc).__name__}: {exc} (see logs/model_loader.log; set IMAGEWORKS_DEBUG=1 for details)"]
