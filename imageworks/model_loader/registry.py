"""``imageworks.model_loader.registry``: the older ImageWorks registry API over the service.

Consumers written for older ImageWorks keep working::

    from imageworks.model_loader.registry import load_registry, get_entry, save_registry, remove_entry

    entries = load_registry(force=True)          # {logical name: RegistryEntry}
    entry = get_entry("florence-2-large_(FP16)")  # KeyError when unknown
    entry.role_priority["caption"] = 80
    save_registry()                               # one journaled write of the curated file
    remove_entry("old-model_(Q4_K_M)")            # both layer files

Each call goes to :class:`imageworks_core.service.ImageWorks` for the root of ``IMAGEWORKS_ROOT`` (else the
current directory); nothing here reads or writes a registry file itself. What differs from older ImageWorks:

* ``load_registry`` reads our layered files; a ``path`` other than this root's merged snapshot is refused
  (import a single-file registry with ``imageworks-models import-legacy`` instead). It raises
  :data:`RegistryLoadError` (our ``RegistryError``, exit 3, every problem listed) when the files are invalid;
  a root without registry files is an empty registry.
* ``save_registry`` writes what changed in the loaded entries, as curated overrides in one validated,
  journaled change (revision kept, audited): only :data:`WRITABLE_FIELDS`; a change to any other attribute is
  refused (UsageError naming it) instead of being silently lost. Entries removed from the dict are removed
  from the files. Entries added to the dict by hand are refused: add them with the dashboard or
  ``imageworks-download scan``.
* ``remove_entry`` refuses a locked entry (unlock it first, with a reason).

``python -m imageworks.model_loader.registry --validate [--root DIR] [--write-snapshot]`` validates both
layers, as the runbook says.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

from imageworks_core.errors import RegistryError, UnknownModelError, UsageError
from imageworks_core.legacy import capability_for
from imageworks_core.registry import Registry, main, validate
from imageworks_core.service import ImageWorks
from imageworks_core.settings import Settings, get_settings

from .models import RegistryEntry

__all__ = [
    "WRITABLE_FIELDS",
    "Registry",
    "RegistryLoadError",
    "get_entry",
    "list_models",
    "load_registry",
    "main",
    "remove_entry",
    "save_registry",
    "service",
    "validate",
]

RegistryLoadError = RegistryError
"""The registry files are unreadable or invalid (``ValidationError`` is a subclass); exit code 3."""

WRITABLE_FIELDS: tuple[str, ...] = (
    "display_name",
    "served_model_id",
    "model_aliases",
    "roles",
    "role_priority",
    "capabilities",
    "deprecated",
    "testing",
    "license",
    "family",
    "metadata",
    "quantization",
    "download_path",
    "download_format",
    "backend_config.extra_args",
)
"""The ``RegistryEntry`` attributes ``save_registry`` writes back (as curated values, which win over discovered)."""

_COMMAND = "imageworks.model_loader.registry.save_registry"
_lock = threading.RLock()
_services: dict[str, ImageWorks] = {}
_cache: dict[str, RegistryEntry] | None = None
_loaded: dict[str, RegistryEntry] = {}  # the entries as last loaded or saved: what save_registry diffs against
_cache_root: Path | None = None


def service() -> ImageWorks:
    """The service for the current root (``IMAGEWORKS_ROOT``, else the current directory), one per root."""
    settings = get_settings()
    key = settings.model_dump_json()
    with _lock:
        if key not in _services:
            _services[key] = ImageWorks(settings)
        return _services[key]


def _views(svc: ImageWorks, registry: Registry) -> dict[str, RegistryEntry]:
    statuses = svc.statuses(list(registry))
    return {
        entry.name: RegistryEntry.from_model(
            entry,
            settings=svc.settings,
            last_verification=statuses[entry.name].last_verification,
            last_probe=statuses[entry.name].last_probe,
        )
        for entry in registry
    }


def _check_path(path: Path | str | None, settings: Settings) -> None:
    if path is not None and Path(path).expanduser().resolve() != settings.snapshot_path:
        raise UsageError(
            f"{path}: single-file registries are not loaded here; convert it once with "
            f"`imageworks-models import-legacy {path} --root {settings.root}`, then load without a path"
        )


def load_registry(path: Path | str | None = None, *, force: bool = False) -> dict[str, RegistryEntry]:
    """The merged registry as ``{logical name: RegistryEntry}``, cached until ``force`` (or another root).

    ``force`` re-reads the files. Raises :data:`RegistryLoadError` listing every problem when they are invalid
    (the service keeps serving its last good registry to others meanwhile).
    """
    global _cache, _loaded, _cache_root  # noqa: PLW0603 - the older API is module-level state
    svc = service()
    _check_path(path, svc.settings)
    with _lock:
        if _cache is not None and not force and _cache_root == svc.settings.root:
            return _cache
        if force:
            svc.reload()
        else:
            svc.refresh()
        registry, error, _status = svc.snapshot()
        if error is not None:
            # Older consumers print str(error): let it carry every problem, not just their count.
            raise type(error)("; ".join(error.lines()), error.problems) from error
        if registry is None:
            raise RegistryLoadError("no valid registry loaded")
        _cache = _views(svc, registry)
        _loaded = copy.deepcopy(_cache)
        _cache_root = svc.settings.root
        return _cache


def get_entry(name: str) -> RegistryEntry:
    """The loaded entry for a logical name (an alias or served id works too); KeyError when there is none."""
    entries = load_registry()
    if name in entries:
        return entries[name]
    try:
        resolved = service().registry.get(name).name
    except UnknownModelError as exc:
        raise KeyError(f"Model '{name}' not found in registry ({exc})") from exc
    if resolved not in entries:
        raise KeyError(f"Model '{name}' not found in the loaded registry (reload with load_registry(force=True))")
    return entries[resolved]


def list_models() -> list[str]:
    """Every loaded logical name, sorted."""
    return sorted(load_registry())


def _capability_changes(name: str, before: dict[str, bool], after: dict[str, bool], curated: dict[str, Any]) -> dict:
    result = dict(curated.get("capabilities") or {})
    for key in sorted(set(before) | set(after)):
        if bool(before.get(key)) == bool(after.get(key)):
            continue
        capability = capability_for(key)
        if capability is None:
            raise UsageError(f"{name}: capabilities[{key!r}] is not a capability here; nothing saved")
        result[capability] = bool(after.get(key))
    return result


def _entry_changes(before: RegistryEntry, after: RegistryEntry, curated: dict[str, Any]) -> dict[str, Any]:
    """The curated fields that express how ``after`` differs from ``before`` (UsageError for other changes)."""
    name = before.name
    changes: dict[str, Any] = {}
    refused = []
    for attribute in before.__dataclass_fields__:
        old, new = getattr(before, attribute), getattr(after, attribute)
        if attribute == "model" or old == new:
            continue
        if attribute == "backend_config":
            if old.extra_args != new.extra_args:
                changes["backend_config"] = {
                    **(curated.get("backend_config") or {}),
                    "extra_args": list(new.extra_args),
                }
            refused += [
                f"backend_config.{k}"
                for k in ("port", "model_path", "host", "base_url")
                if getattr(old, k) != getattr(new, k)
            ]
        elif attribute == "capabilities":
            changes["capabilities"] = _capability_changes(name, old, new, curated)
        elif attribute == "role_priority":
            changes["role_priority"] = {str(role): int(score) for role, score in dict(new).items()}
        elif attribute == "metadata":
            # Curated keys merge over discovered ones: a key removed here is cleared with an explicit null.
            changes["metadata"] = {**dict.fromkeys(set(old) - set(new)), **new}
        elif attribute == "served_model_id":
            changes[attribute] = None if new in (None, "", "None") else str(new)
        elif attribute in WRITABLE_FIELDS:
            changes[attribute] = copy.deepcopy(new)
        else:
            refused.append(attribute)
    if refused:
        raise UsageError(
            f"{name}: {', '.join(refused)} cannot be saved through imageworks.model_loader (writable: "
            f"{', '.join(WRITABLE_FIELDS)}); change them with imageworks-models or the dashboard. Nothing saved"
        )
    return changes


def save_registry(path: Path | str | None = None) -> Path:
    """Write the changes made to the loaded entries; returns the merged snapshot's path.

    Changed entries are written as curated values in one validated, journaled change (ValidationError and
    nothing written when the result would be invalid); entries deleted from the loaded dict are removed from
    both layer files. Only :data:`WRITABLE_FIELDS` can change.
    """
    global _loaded  # noqa: PLW0603
    svc = service()
    _check_path(path, svc.settings)
    with _lock:
        if _cache is None:
            raise RuntimeError("Registry not loaded; cannot save (call load_registry() first)")
        added = sorted(set(_cache) - set(_loaded))
        if added:
            raise UsageError(
                f"new entries {', '.join(added)} cannot be added through imageworks.model_loader; add them with the "
                "dashboard (Import) or `imageworks-download scan DIR`. Nothing saved"
            )
        curated = svc.registry.curated
        changes = {
            name: fields
            for name, entry in _cache.items()
            if (fields := _entry_changes(_loaded[name], entry, curated.get(name, {})))
        }
        if changes:
            svc.save_entries(changes, command=_COMMAND)
        for name in sorted(set(_loaded) - set(_cache)):
            svc.remove_entry(name, command=f"{_COMMAND} (remove {name})")
        _loaded = copy.deepcopy(_cache)
        return svc.settings.snapshot_path


def remove_entry(name: str, *, save: bool = True) -> bool:
    """Remove ``name`` from the loaded registry; with ``save``, from both layer files too (then the other
    pending changes are saved, as ``save_registry`` would). False when it is not loaded. A locked entry is
    refused (UsageError) and stays loaded."""
    global _loaded  # noqa: PLW0603
    entries = load_registry()
    if name not in entries:
        return False
    with _lock:
        if save:
            service().remove_entry(name, command=f"{_COMMAND} (remove {name})")
            _loaded = {k: v for k, v in _loaded.items() if k != name}
        del entries[name]
    if save:
        save_registry()
    return True


if __name__ == "__main__":
    raise SystemExit(main())
