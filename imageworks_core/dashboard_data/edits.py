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
from ..units import format_bytes
from .registry_view import service_for

_FAILED_DOWNLOAD = ("fail", "error", "cancel", "partial", "incomplete", "running")


# Edit metadata ------------------------------------------------------------------------------------------------
# backend_config keys with a field of their own in the forms; the backend_config JSON box holds the rest.
_ARGV_FIELDS = ("launch", "extra_args", "env")
_EMPTY: dict[str, Any] = {"launch": None, "extra_args": [], "env": {}}


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _lines_text(values: Iterable[str]) -> str:
    return "\n".join(values)


def argv_text(argv: list[str] | None) -> str:
    """An argv list as the form shows it: one argument per line, or a JSON list when a line could not say it
    (an empty argument, surrounding whitespace, a line break)."""
    if not argv:
        return ""
    if all(arg and arg == arg.strip() and "\n" not in arg and not arg.startswith("[") for arg in argv):
        return _lines_text(argv)
    return json.dumps(argv, ensure_ascii=False)


def env_text(env: dict[str, str]) -> str:
    """An environment as the form shows it: KEY=VALUE lines, or a JSON object when a value spans lines."""
    if any("\n" in v or v != v.strip() for v in env.values()):
        return _json_text(env)
    return _lines_text(f"{k}={v}" for k, v in env.items())


def parse_argv(field_name: str, text: str) -> list[str]:
    """Form text to an argv list: a JSON list of strings (``[`` first), else one argument per line (each line
    stripped, blank lines skipped). Never a shell string: nothing is split on spaces."""
    stripped = text.strip()
    if not stripped:
        return []
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{field_name}: invalid JSON list at line {exc.lineno}, column {exc.colno}: {exc.msg} "
                "(write a JSON list of strings, or one argument per line)"
            ) from exc
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise UsageError(f"{field_name}: expected a JSON list of strings, or one argument per line")
        return value
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_env(text: str) -> dict[str, str]:
    """Form text to an environment: a JSON object of strings (``{`` first), else KEY=VALUE lines."""
    stripped = text.strip()
    if stripped.startswith("{"):
        value = _parse_json_object("env", stripped)
        bad = [k for k, v in value.items() if not isinstance(v, str)]
        if bad:
            raise UsageError(f'env: the value of {bad[0]} must be a string (quote numbers: "1")')
        return value
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"env: line {number} {line.strip()!r} is not KEY=VALUE")
        env[key.strip()] = value.strip()
    return env


def role_priority_text(priority: int | dict[str, int]) -> str:
    """A per-role priority mapping as the form shows it: ``role=score`` per line (empty for an integer)."""
    return "" if isinstance(priority, int) else _lines_text(f"{role}={score}" for role, score in priority.items())


def parse_role_priorities(text: str) -> dict[str, int]:
    """Form text to a ``{role: score}`` mapping: ``role=score`` (or ``role: score``) per line, or a JSON object;
    UsageError naming the line that is neither."""
    stripped = text.strip()
    if stripped.startswith("{"):
        value = _parse_json_object("role priorities", stripped)
        bad = [k for k, v in value.items() if type(v) is not int]
        if bad:
            raise UsageError(f"role priorities: the score of {bad[0]!r} must be an integer")
        return value
    scores: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        role, sep, score = line.replace(":", "=", 1).partition("=")
        try:
            scores[role.strip()] = int(score.strip())
        except ValueError:
            sep = ""
        if not sep or not role.strip():
            raise UsageError(f"role priorities: line {number} {line.strip()!r} is not role=score (an integer score)")
    return scores


def role_priority_from_form(role_priority: int, role_priorities: str | None) -> int | dict[str, int]:
    """The form's role_priority: the per-role lines when given (a role not listed scores 0), else the number
    (one priority for every role)."""
    if role_priorities is not None and role_priorities.strip():
        return parse_role_priorities(role_priorities)
    return int(role_priority)


def _names(text: str, *, sep: str | None = None) -> list[str]:
    parts = text.split(sep) if sep else text.splitlines()
    return list(dict.fromkeys(p.strip() for p in parts if p.strip()))


def metadata_defaults(registry: Registry, name: str) -> dict[str, Any]:
    """The Edit-metadata form's initial values, from the merged entry (the keyword arguments of
    :func:`metadata_changes`, as the form's widgets hold them)."""
    entry = registry.entries[name]
    config = entry.backend_config.model_dump(mode="json", exclude_defaults=True)
    return {
        "display_name": entry.display_name or "",
        "served_model_id": entry.served_model_id or "",
        "download_path": entry.download_path or "",
        "aliases": _lines_text(entry.model_aliases),
        "roles": list(entry.roles),
        "capabilities": entry.capabilities.enabled(),
        "role_priority": entry.role_priority if isinstance(entry.role_priority, int) else 0,
        "role_priorities": role_priority_text(entry.role_priority),
        "launch": argv_text(entry.backend_config.launch),
        "extra_args": argv_text(entry.backend_config.extra_args),
        "env": env_text(entry.backend_config.env),
        "backend_config": _json_text({k: v for k, v in config.items() if k not in _ARGV_FIELDS}),
        "generation_defaults": _json_text(entry.generation_defaults),
        "profiles": ", ".join(entry.profiles),
        "testing": entry.testing,
        "deprecated": entry.deprecated,
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


def backend_config_from_form(
    current: dict[str, Any], config_json: str, *, launch: str | None, extra_args: str | None, env: str | None
) -> dict[str, Any]:
    """The backend_config the form states: the JSON box, with launch / extra_args / env from their own fields.

    ``current`` is the entry's backend_config (defaults excluded). A field left as it was keeps the JSON box's
    value for that key (or the current one); a changed field wins, and the JSON box naming the same key with
    another value is refused (two answers to one question). ``None`` for a field means the form has none.
    """
    config = _parse_json_object("backend_config", config_json)
    texts = {"launch": launch, "extra_args": extra_args, "env": env}
    for key in _ARGV_FIELDS:
        was = current.get(key, _EMPTY[key])
        text = texts[key]
        value = was if text is None else parse_env(text) if key == "env" else parse_argv(key, text) or _EMPTY[key]
        if value == was:
            config.setdefault(key, was)
        elif key in config and config[key] != value:
            raise UsageError(
                f"{key}: set both in its own field and in backend_config (JSON) with different values; keep one"
            )
        else:
            config[key] = value
    return {k: v for k, v in config.items() if not (k in _EMPTY and v == _EMPTY[k])}


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
    display_name: str | None = None,
    served_model_id: str | None = None,
    download_path: str | None = None,
    aliases: str | None = None,
    launch: str | None = None,
    extra_args: str | None = None,
    env: str | None = None,
    profiles: str | None = None,
    testing: bool | None = None,
    deprecated: bool | None = None,
    role_priorities: str | None = None,
) -> dict[str, Any]:
    """The curated fields an Edit-metadata submission changes (only those that differ from the merged entry).

    ``role_priorities`` (``role=score`` lines) replaces the number ``role_priority`` when not blank; clearing it
    returns the entry to one priority for every role.

    Text fields are parsed here (aliases one per line, profiles comma-separated, launch / extra_args as a JSON
    list or one argument per line, env as KEY=VALUE lines or a JSON object); a syntax error raises UsageError
    naming the field. A keyword left ``None`` is not on the form and changes nothing. The schema (invisible
    characters in an alias, unknown launch placeholders, ...) is checked by the registry preview, not here.
    """
    entry = registry.entries[name]
    current_config = entry.backend_config.model_dump(mode="json", exclude_defaults=True)
    new_backend_config = backend_config_from_form(
        current_config, backend_config, launch=launch, extra_args=extra_args, env=env
    )
    new_generation = _parse_json_object("generation_defaults", generation_defaults)
    changes: dict[str, Any] = {}
    for key, text, was in (
        ("display_name", display_name, entry.display_name),
        ("served_model_id", served_model_id, entry.served_model_id),
        ("download_path", download_path, entry.download_path),
    ):
        if text is not None and (text.strip() or None) != was:
            changes[key] = text.strip() or None
    if aliases is not None and _names(aliases) != list(entry.model_aliases):
        changes["model_aliases"] = _names(aliases)
    roles = list(dict.fromkeys(r.strip() for r in roles if r.strip()))
    if roles != list(entry.roles):
        changes["roles"] = roles
    enabled = list(capabilities)
    if set(enabled) != set(entry.capabilities.enabled()):
        changes["capabilities"] = capability_changes(registry, name, enabled)
    new_priority = role_priority_from_form(role_priority, role_priorities)
    if new_priority != entry.role_priority:
        changes["role_priority"] = new_priority
    if new_backend_config != current_config:
        changes["backend_config"] = new_backend_config
    if new_generation != entry.generation_defaults:
        changes["generation_defaults"] = new_generation
    if profiles is not None and _names(profiles, sep=",") != list(entry.profiles):
        changes["profiles"] = _names(profiles, sep=",")
    for key, flag, was_flag in (("testing", testing, entry.testing), ("deprecated", deprecated, entry.deprecated)):
        if flag is not None and bool(flag) != was_flag:
            changes[key] = bool(flag)
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


def import_candidates(registry: Registry, downloads: Iterable[dict[str, Any]] | None = None) -> list[ImportCandidate]:
    """Discovered entries not in the curated file, then downloads whose directory no entry uses yet.

    ``downloads``: download-history rows, newest first; by default the root's own (reading never creates the
    history DB)."""
    settings = registry.settings
    if downloads is None:
        from ..discovery import list_download_rows

        downloads = list_download_rows(settings)
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


def candidate_rows(candidates: Iterable[ImportCandidate]) -> list[dict[str, Any]]:
    """The Import tab's table of candidates: name, origin, repo, path, format, quantization, size, when."""
    return [
        {
            "name": c.name,
            "origin": c.origin,
            "repo": c.repo_id,
            "path": c.path,
            "format": c.download_format,
            "quantization": c.quantization,
            "size": format_bytes(c.size_bytes, missing=""),
            "at": c.at,
        }
        for c in candidates
    ]


def import_defaults(candidate: ImportCandidate) -> dict[str, Any]:
    """The Import form's initial values (the keyword arguments of :func:`import_changes` it shows)."""
    return {
        "display_name": "",
        "served_model_id": candidate.repo_id or "",
        "download_path": candidate.path or "",
        "aliases": "",
        "roles": [],
        "role_priority": 0,
        "role_priorities": "",
        "capabilities": ["text"],
        "launch": "",
        "extra_args": "",
        "env": "",
        "profiles": "",
        "testing": False,
        "deprecated": False,
        "notes": "",
    }


def import_changes(
    candidate: ImportCandidate,
    *,
    backend: str,
    served_model_id: str,
    roles: Iterable[str],
    capabilities: Iterable[str],
    display_name: str = "",
    download_path: str | None = None,
    aliases: str = "",
    role_priority: int = 0,
    role_priorities: str = "",
    launch: str = "",
    extra_args: str = "",
    env: str = "",
    profiles: str = "",
    testing: bool = False,
    deprecated: bool = False,
    notes: str = "",
) -> dict[str, Any]:
    """The new curated entry's fields: the operator's metadata over the download facts (when not discovered).

    Text fields parse as in :func:`metadata_changes`; only fields that differ from the schema default are
    written, so the new entry reads as what the operator decided. ``download_path`` overrides the candidate's
    directory only when it differs from it (the fix for weights that moved).
    """
    wanted = set(capabilities)
    unknown = wanted - set(CAPABILITY_NAMES)
    if unknown:
        raise UsageError(f"capabilities: unknown {', '.join(sorted(unknown))}; valid: {', '.join(CAPABILITY_NAMES)}")
    config = backend_config_from_form({}, "", launch=launch, extra_args=extra_args, env=env)
    changes: dict[str, Any] = copy.deepcopy(candidate.base)
    if download_path is not None and download_path.strip() and download_path.strip() != (candidate.path or ""):
        changes["download_path"] = download_path.strip()
    if display_name.strip():
        changes["display_name"] = display_name.strip()
    changes["backend"] = backend
    if served_model_id.strip():
        changes["served_model_id"] = served_model_id.strip()
    if _names(aliases):
        changes["model_aliases"] = _names(aliases)
    changes["roles"] = list(dict.fromkeys(r.strip() for r in roles if r.strip()))
    priority = role_priority_from_form(role_priority, role_priorities)
    if priority:
        changes["role_priority"] = priority
    changes["capabilities"] = {c: c in wanted for c in CAPABILITY_NAMES if c in wanted or c == "text"}
    if config:
        changes["backend_config"] = config
    if _names(profiles, sep=","):
        changes["profiles"] = _names(profiles, sep=",")
    changes.update({k: True for k, on in (("testing", testing), ("deprecated", deprecated)) if on})
    if notes.strip():
        changes["notes"] = notes.strip()
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
