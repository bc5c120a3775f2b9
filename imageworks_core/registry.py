"""The layered registry: curated (operator decisions) over discovered (machine facts), merged per field.

Precedence: curated wins wherever it sets a value; an explicit ``null`` in curated clears the field; nested
objects merge key by key; lists are replaced whole; the discovered layer fills the rest. ``version_lock`` lives
only in curated, so rebuilding the discovered overlay can never drop a lock.

A layer file is valid when it parses to an array of entries (``[]`` is the empty registry). A blank or 0-byte
file is invalid (a truncation, not a decision), and so is a curated file missing from a root whose history has
revisions of it; a fresh root with neither loads as empty.

``load_registry()`` caches by the files' (mtime_ns, size, inode) and re-reads only when they change (or with
``force=True``). A cold load first runs :func:`recover`, which writes only to settle a crashed write; otherwise
loading never writes. Every write goes through :func:`_write_layer` (or the importer's two-layer variant): under
the layer's file lock it reads the current text, computes and validates the would-be merged registry, then
applies one journaled change (:mod:`imageworks_core.journal`: history intent, atomic replace, snapshot, audit,
commit).
"""

from __future__ import annotations

import copy
import difflib
import gc
import json
import os
import shlex
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import pydantic
from filelock import Timeout
from pydantic import BaseModel, TypeAdapter

from . import audit, history, journal
from .errors import RegistryError, UnknownModelError, UnknownRevisionError, UsageError, ValidationError
from .registry_file import (
    WRITE_LOCK_TIMEOUT_S,
    atomic_write_text,
    lock_for,
    parse_entries,
    read_registry_text,
    splice,
)
from .schema import ModelEntry, fields_of_layer, rank_for_role
from .settings import Settings, get_settings, slugify

Layer = Literal["curated", "discovered"]
CURATED_ONLY_FIELDS: frozenset[str] = frozenset(fields_of_layer("curated_only"))
EMPTY_FILE_FIX = "an empty registry is `[]`"
_ENTRIES_ADAPTER = TypeAdapter(list[ModelEntry])


@dataclass
class Registry:
    """A validated, merged registry: entries by name (curated order first), plus the raw layers."""

    settings: Settings
    entries: dict[str, ModelEntry]
    curated: dict[str, dict[str, Any]]
    discovered: dict[str, dict[str, Any]]
    stamp: tuple[Any, ...] = ()
    warnings: list[str] = field(default_factory=list)
    _lookup: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Name, then alias, then served id: later passes never override an earlier, stronger match.
        for entry in self.entries.values():
            self._lookup.setdefault(entry.name, entry.name)
        for entry in self.entries.values():
            for alias in entry.model_aliases:
                self._lookup.setdefault(alias, entry.name)
        for entry in self.entries.values():
            if entry.served_model_id:
                self._lookup.setdefault(entry.served_model_id, entry.name)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> typing.Iterator[ModelEntry]:
        return iter(self.entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> ModelEntry:
        """The entry for a logical name, alias or served id; UnknownModelError with close matches."""
        key = self._lookup.get(name)
        if key is None:
            close = difflib.get_close_matches(name, list(self._lookup), n=3, cutoff=0.5)
            hint = f" — did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownModelError(
                f"unknown model {name!r}{hint} (see `imageworks-models list --include-testing`)",
                name=name,
                close_matches=close,
            )
        return self.entries[key]

    def layer_of(self, name: str) -> str:
        """'curated', 'discovered' or 'curated+discovered'."""
        layers = [layer for layer, raw in (("curated", self.curated), ("discovered", self.discovered)) if name in raw]
        return "+".join(layers)

    def provenance(self, name: str) -> dict[str, str]:
        """For each field path of the merged entry: the layer it came from (or 'default')."""
        curated, discovered = self.curated.get(name, {}), self.discovered.get(name, {})
        data = self.entries[name].model_dump(mode="json")
        result: dict[str, str] = {}

        def walk(value: Any, cur: Any, disc: Any, prefix: str) -> None:
            for key, sub in value.items():
                path = f"{prefix}{key}"
                cur_has = isinstance(cur, dict) and key in cur
                disc_has = isinstance(disc, dict) and key in disc
                if isinstance(sub, dict) and sub and (cur_has or disc_has):
                    walk(sub, cur.get(key) if cur_has else None, disc.get(key) if disc_has else None, path + ".")
                elif cur_has:
                    result[path] = "curated (cleared)" if cur[key] is None else "curated"
                elif disc_has:
                    result[path] = "discovered"
                else:
                    result[path] = "default"

        walk(data, curated, discovered, "")
        return result

    def weights_present(self, name: str) -> bool:
        entry = self.entries[name]
        return bool(entry.download_path) and self.settings.resolve_path(entry.download_path).exists()


# Merging and validation -----------------------------------------------------------------------------------
def merge_values(discovered: dict[str, Any], curated: dict[str, Any]) -> dict[str, Any]:
    """Per-field merge: curated wins, nested dicts merge recursively, lists replace, ``None`` clears.

    A cleared (``None``) field is dropped so the schema default applies (None for optional fields, [] / {} for
    collections). One pass, no copies of untouched values: this runs for every entry on a cold load.
    """
    result = {k: v for k, v in discovered.items() if v is not None}
    for key, value in curated.items():
        if value is None:
            result.pop(key, None)
        elif type(value) is dict:
            base = result.get(key)
            result[key] = merge_values(base if type(base) is dict else {}, value)
        else:
            result[key] = value
    return result


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last element of ``loc`` (for 'did you mean' suggestions)."""
    model: type[BaseModel] = ModelEntry
    for part in loc[:-1]:
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        annotation = info.annotation
        candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _has_path(raw: Any, loc: tuple[Any, ...]) -> bool:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return False
    return True


def _describe_error(
    error: Any, name: str, curated: dict[str, Any] | None, discovered: dict[str, Any] | None, settings: Settings
) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in loc) if loc else "(entry)"
    if curated is not None and _has_path(curated, loc):
        where = settings.curated_path
    elif discovered is not None and _has_path(discovered, loc):
        where = settings.discovered_path
    else:
        where = settings.curated_path if curated is not None else settings.discovered_path
    if error["type"] == "extra_forbidden":
        model = _model_at(loc)
        valid = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f" — did you mean {close[0]!r}?" if close else f" (valid keys: {', '.join(valid)})"
        return f"{where}: entry {name!r}: unknown key {path!r}{hint}"
    message = error["msg"].removeprefix("Value error, ")
    if loc == ("name",) and error["type"] == "string_pattern_mismatch":
        message = (
            f"invalid name {error['input']!r}: use no '/', whitespace or control characters (parentheses are fine)"
        )
    value = error.get("input")
    shown = ""
    if error["type"] != "missing" and not isinstance(value, dict | list):
        text = json.dumps(value, default=str)
        shown = f" (got {text if len(text) <= 80 else text[:77] + '...'})"
    return f"{where}: entry {name!r}: field {path!r}: {message}{shown}"


def _index_layer(path: Path, raw_entries: list[Any], layer: Layer, problems: list[str]) -> dict[str, dict[str, Any]]:
    by_name: dict[str, dict[str, Any]] = {}
    for index, raw in enumerate(raw_entries):
        if not isinstance(raw, dict):
            problems.append(f"{path}: entry #{index + 1}: expected an object, got {type(raw).__name__}")
            continue
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{path}: entry #{index + 1}: missing 'name' (every entry needs a unique logical name)")
            continue
        if name in by_name:
            problems.append(f"{path}: entry {name!r}: duplicate name (entry #{index + 1}); names must be unique")
            continue
        if layer == "discovered":
            for key in CURATED_ONLY_FIELDS & set(raw):
                problems.append(
                    f"{path}: entry {name!r}: {key!r} may only be set in the curated file "
                    "(the discovered overlay is machine-written)"
                )
        by_name[name] = raw
    return by_name


def build_registry(
    settings: Settings, curated_raw: list[Any], discovered_raw: list[Any], stamp: tuple[Any, ...] = ()
) -> Registry:
    """Merge and validate two layers' raw entries. Raises ValidationError listing every problem."""
    problems: list[str] = []
    curated = _index_layer(settings.curated_path, curated_raw, "curated", problems)
    discovered = _index_layer(settings.discovered_path, discovered_raw, "discovered", problems)
    names = list(curated) + [n for n in discovered if n not in curated]
    merged = [
        merge_values(discovered.get(n, {}), curated[n]) if n in curated else merge_values(discovered[n], {})
        for n in names
    ]
    try:
        models = _ENTRIES_ADAPTER.validate_python(merged)
    except pydantic.ValidationError as exc:
        for error in exc.errors():
            index, *rest = error["loc"]
            name = names[int(index)]
            error = {**error, "loc": tuple(rest)}
            problems.append(_describe_error(error, name, curated.get(name), discovered.get(name), settings))
        models = []
    if not problems:
        _check_cross_entry(models, problems, settings)
    if problems:
        raise ValidationError(f"registry invalid: {len(problems)} problem(s)", problems)
    return Registry(settings, {m.name: m for m in models}, curated, discovered, stamp)


def _check_cross_entry(models: list[ModelEntry], problems: list[str], settings: Settings) -> None:
    names = {m.name for m in models}
    seen_alias: dict[str, str] = {}
    for model in models:
        for alias in model.model_aliases:
            if alias in names and alias != model.name:
                problems.append(
                    f"{settings.curated_path}: entry {model.name!r}: alias {alias!r} is another entry's name"
                )
            elif alias in seen_alias and seen_alias[alias] != model.name:
                problems.append(
                    f"{settings.curated_path}: entry {model.name!r}: alias {alias!r} also used by {seen_alias[alias]!r}"
                )
            seen_alias[alias] = model.name


# Loading with a stat-keyed cache --------------------------------------------------------------------------
_CACHE: dict[Path, Registry] = {}
_CACHE_LOCK = threading.Lock()


def _stamp(settings: Settings) -> tuple[Any, ...]:
    out: list[Any] = []
    for path in (settings.curated_path, settings.discovered_path):
        try:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def _blank_problem(path: Path) -> str:
    return (
        f"{path}: the file is empty; {EMPTY_FILE_FIX} (write `[]`, or restore it: "
        "`imageworks-models history`, `imageworks-models rollback REV`)"
    )


def _missing_problem(path: Path) -> str:
    return (
        f"{path} is missing, but the history has revisions of it: restore it with `imageworks-models history` "
        f"and `imageworks-models rollback REV` (or write `[]` if emptying the registry is intended)"
    )


def _missing_with_history(settings: Settings, path: Path) -> bool:
    return not path.exists() and settings.history_db_path.exists() and history.has_revisions(settings, path)


def _read_layer(path: Path, problems: list[str]) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read: {exc}")
        return []
    if not text.strip():
        problems.append(_blank_problem(path))
        return []
    try:
        return parse_entries(path, text)[0]
    except RegistryError as exc:
        problems.extend(exc.lines())
        return []


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while a registry is built: tens of thousands of fresh, acyclic objects otherwise
    trigger repeated full collections that more than double a cold load of 5,000 entries."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_registry(force: bool = False, settings: Settings | None = None, root: str | Path | None = None) -> Registry:
    """The merged registry of a root (cached until either layer file changes).

    A cold load first settles a crashed write (:func:`recover`); on a clean root it writes nothing.
    ``Registry.warnings`` lists what recovery did and every lock manifest that disagrees with its curated hash.
    """
    settings = settings or get_settings(root)
    stamp = _stamp(settings)
    with _CACHE_LOCK:
        cached = _CACHE.get(settings.root)
        if cached is not None and not force and cached.stamp == stamp:
            return cached
    report = recover(settings)
    if report.settled:
        stamp = _stamp(settings)
    problems: list[str] = []
    with _gc_paused():
        curated_raw = _read_layer(settings.curated_path, problems)
        discovered_raw = _read_layer(settings.discovered_path, problems)
        if _missing_with_history(settings, settings.curated_path):
            problems.append(_missing_problem(settings.curated_path))
        if problems:
            raise RegistryError(f"registry cannot be read: {len(problems)} problem(s)", problems)
        registry = build_registry(settings, curated_raw, discovered_raw, stamp)
    registry.warnings = [*report.lines(), *lock_mismatches(registry)]
    with _CACHE_LOCK:
        _CACHE[settings.root] = registry
    return registry


# Crash recovery and lock manifests --------------------------------------------------------------------------
def _current_snapshot_text(settings: Settings) -> str | None:
    """The merged snapshot of the layer files as they are now (None when they do not form a valid registry)."""
    problems: list[str] = []
    curated_raw = _read_layer(settings.curated_path, problems)
    discovered_raw = _read_layer(settings.discovered_path, problems)
    if problems:
        return None
    try:
        return snapshot_text(build_registry(settings, curated_raw, discovered_raw))
    except RegistryError:
        return None


def recover(settings: Settings) -> journal.RecoveryReport:
    """Settle a crashed write of this root (see :mod:`imageworks_core.journal`); a no-op on a clean root.

    Every cold :func:`load_registry` and every write runs it, so a process that starts after a crash (CLI, API,
    dashboard) finds the root consistent without calling it itself.
    """
    return journal.recover(settings, lambda: _current_snapshot_text(settings))


def lock_file_path(settings: Settings, entry: ModelEntry) -> Path:
    """Where the entry's lock manifest lives (``configs/locks/<slug>.manifest.json`` unless the lock says)."""
    lock = entry.version_lock
    if lock and lock.manifest_path:
        return settings.resolve_path(lock.manifest_path)
    return settings.locks_dir / f"{slugify(entry.name)}.manifest.json"


def lock_mismatches(registry: Registry) -> list[str]:
    """Pinned entries whose lock manifest is missing, unreadable or holds another aggregate, each with its fix."""
    out = []
    for entry in registry:
        lock = entry.version_lock
        if lock is None or not lock.expected_aggregate_sha256:
            continue
        path = lock_file_path(registry.settings, entry)
        try:
            aggregate = json.loads(path.read_text(encoding="utf-8")).get("aggregate")
        except FileNotFoundError:
            aggregate, state = None, "is missing"
        except (OSError, ValueError, AttributeError):
            aggregate, state = None, "is unreadable"
        else:
            state = f"holds aggregate {str(aggregate)[:16]}…"
        if aggregate == lock.expected_aggregate_sha256:
            continue
        quoted = shlex.quote(entry.name)
        out.append(
            f"{entry.name}: lock manifest {path} {state} but the curated expected hash is "
            f"{lock.expected_aggregate_sha256[:16]}…: if the weights on disk are the intended ones, re-pin with "
            f"`imageworks-models lock {quoted} --set-expected`; otherwise restore the matching curated revision "
            f"(`imageworks-models history {quoted}`, `imageworks-models rollback REV`)"
        )
    return out


# Writing ----------------------------------------------------------------------------------------------------
def _layer_path(settings: Settings, layer: Layer) -> Path:
    return settings.curated_path if layer == "curated" else settings.discovered_path


def _changed_names(before: list[Any], after: list[Any]) -> list[str]:
    old = {e.get("name"): e for e in before if isinstance(e, dict)}
    new = {e.get("name"): e for e in after if isinstance(e, dict)}
    return sorted(str(n) for n in set(old) | set(new) if old.get(n) != new.get(n))


def read_current(path: Path) -> str | None:
    """A file's text for a write (None: missing); RegistryError when it exists but cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read: {exc}; nothing written") from exc


def _entries_or_empty(path: Path, text: str | None) -> list[Any]:
    try:
        return parse_entries(path, text or "")[0]
    except RegistryError:
        return []


Events = list[tuple[str, dict[str, Any]]]


@dataclass
class LayerChange:
    """What one mutation of a layer would do (the registry transaction's result, written or previewed)."""

    path: Path
    before: str | None
    after: str
    names: list[str]
    registry: Registry

    @property
    def diff(self) -> str:
        """Unified diff of the layer file (empty when nothing changes)."""
        label = self.path.name
        return "".join(
            difflib.unified_diff(
                (self.before or "").splitlines(keepends=True),
                self.after.splitlines(keepends=True),
                f"a/{label}",
                f"b/{label}",
            )
        )


def _plan(
    settings: Settings, layer: Layer, compute: Callable[[str | None], tuple[list[Any], str]], before: str | None
) -> LayerChange:
    """The new layer text and the validated merged registry it gives (ValidationError when invalid)."""
    path = _layer_path(settings, layer)
    entries, new_text = compute(before)
    other_path = _layer_path(settings, "discovered" if layer == "curated" else "curated")
    problems: list[str] = []
    other = _read_layer(other_path, problems)
    if problems:
        raise RegistryError(f"cannot write {path.name}: {other_path.name} is unreadable", problems)
    curated_raw, discovered_raw = (entries, other) if layer == "curated" else (other, entries)
    registry = build_registry(settings, curated_raw, discovered_raw)
    names = _changed_names(_entries_or_empty(path, before), entries)
    return LayerChange(path, before, new_text, names, registry)


def _write_layer(
    settings: Settings,
    layer: Layer,
    compute: Callable[[str | None], tuple[list[Any], str]],
    *,
    command: str,
    actor: str | None,
    events: Events | None = None,
    extra_files: dict[Path, str] | None = None,
) -> Registry:
    """The one write path of a layer: lock, read, compute new entries + text, validate the merge, apply one
    journaled change (the layer, ``extra_files`` such as a lock manifest, the snapshot, audit lines).

    ``compute`` gets the layer's current text (None: missing) read under the lock. ``events`` are the audit lines
    of the change besides ``registry_write``; ``compute`` may append to the list (it runs first).
    """
    path = _layer_path(settings, layer)
    actor = actor or audit.current_actor(settings)
    events = events if events is not None else []
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(settings)
    try:
        with lock_for(path):
            journal.refuse_over_pending(settings, [path, *(extra_files or {})])
            before = read_current(path)
            change = _plan(settings, layer, compute, before)
            registry, new_text, names = change.registry, change.after, change.names
            files = [journal.FileChange(path, before, new_text, names)]
            files += [journal.FileChange(p, read_current(p), text, names) for p, text in (extra_files or {}).items()]
            if all(f.before == f.after for f in files):
                return registry
            journal.apply_change(
                settings,
                files,
                command=command,
                actor=actor,
                events=[("registry_write", {"file": str(path), "command": command, "names": names}), *events],
                write_snapshot=lambda: write_snapshot(settings, registry),
            )
    except Timeout as exc:
        raise RegistryError(f"{path}: another process holds its lock for over {WRITE_LOCK_TIMEOUT_S:.0f} s") from exc
    return load_registry(force=True, settings=settings)


def edit_layer(
    settings: Settings,
    layer: Layer,
    mutate: Callable[[list[dict[str, Any]]], list[dict[str, Any]] | None],
    *,
    command: str,
    actor: str | None = None,
    events: Events | None = None,
    extra_files: dict[Path, str] | None = None,
) -> Registry:
    """Read-modify-write one layer under its file lock; returns the new merged registry.

    ``mutate`` gets a deep copy of the layer's entries *as read under the lock* and changes it in place (or
    returns a new list); it may append audit lines to ``events``. A concurrent writer therefore never loses an
    update: the second writer's ``mutate`` sees the first one's result. The merged result is validated before
    anything is written: invalid input raises ValidationError and leaves every file untouched. Unchanged
    entries keep their exact bytes. A blank layer file, or a curated file missing from a root with history, is
    refused (RegistryError): restore it first rather than silently starting over.
    """
    compute = _mutation(settings, layer, mutate)
    return _write_layer(settings, layer, compute, command=command, actor=actor, events=events, extra_files=extra_files)


def preview_edit(
    settings: Settings, layer: Layer, mutate: Callable[[list[dict[str, Any]]], list[dict[str, Any]] | None]
) -> LayerChange:
    """Dry run of :func:`edit_layer`: the same mutation and validation, nothing locked or written.

    Raises what the write would raise (ValidationError with every problem, UnknownModelError, ...).
    """
    path = _layer_path(settings, layer)
    return _plan(settings, layer, _mutation(settings, layer, mutate), read_current(path))


def _mutation(
    settings: Settings, layer: Layer, mutate: Callable[[list[dict[str, Any]]], list[dict[str, Any]] | None]
) -> Callable[[str | None], tuple[list[Any], str]]:
    """``mutate`` as a computation of the layer's new entries and text from its current text."""
    path = _layer_path(settings, layer)

    def compute(text: str | None) -> tuple[list[Any], str]:
        if text is not None and not text.strip():
            raise RegistryError(f"{_blank_problem(path)}; nothing written")
        if text is None and layer == "curated" and _missing_with_history(settings, path):
            raise RegistryError(f"{_missing_problem(path)}; nothing written")
        parsed = read_registry_text(path, text or "")
        entries = copy.deepcopy(parsed.entries)
        result = mutate(entries)
        if result is not None:
            entries = result
        if _changed_names(parsed.entries, entries) or len(entries) != len(parsed.entries):
            return entries, splice(parsed, entries)
        return entries, parsed.text

    return compute


def replace_layer_text(
    settings: Settings,
    layer: Layer,
    text: str,
    *,
    command: str,
    actor: str | None = None,
    events: Events | None = None,
) -> Registry:
    """Replace a whole layer file with ``text`` verbatim (rollback, imports), validating the merge first.

    The current file may be broken (bad JSON, blank, missing): replacing it is how it gets repaired.
    """
    path = _layer_path(settings, layer)
    if not text.strip():
        raise RegistryError(f"{_blank_problem(path)}; nothing written")
    entries = parse_entries(path, text)[0]
    return _write_layer(settings, layer, lambda _current: (entries, text), command=command, actor=actor, events=events)


def snapshot_text(registry: Registry) -> str:
    """The merged snapshot's text (what ``configs/model_registry.json`` holds)."""
    data = [entry.model_dump(mode="json", exclude_defaults=True) for entry in registry]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_snapshot(settings: Settings, registry: Registry | None = None) -> Path:
    """Regenerate ``configs/model_registry.json`` (the merged view, for jq and outside readers)."""
    registry = registry or load_registry(force=True, settings=settings)
    path = settings.snapshot_path
    with lock_for(path):
        atomic_write_text(path, snapshot_text(registry))
    return path


def entry_update(
    settings: Settings,
    name: str,
    changes: dict[str, Any],
    *,
    layer: Layer = "curated",
    create: bool = False,
    must_be_new: bool = False,
) -> Callable[[list[dict[str, Any]]], None]:
    """The mutation that sets top-level fields of one entry (``create``: add it when missing; ``must_be_new``:
    refuse when it exists, judged under the lock like every read of a write)."""

    def mutate(entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            if entry.get("name") == name:
                if must_be_new:
                    raise UsageError(f"{name!r} is already {layer}; edit it instead of importing it again")
                entry.update(changes)
                return
        if not create:
            raise UnknownModelError(f"{name!r} is not in the {layer} file {_layer_path(settings, layer)}", name=name)
        entries.append({"name": name, **changes})

    return mutate


class EntryUpdateOptions(TypedDict, total=False):
    """The options of :func:`entry_update` (see it for each) that :func:`update_entry` passes on."""

    layer: Layer
    create: bool
    must_be_new: bool


def update_entry(
    settings: Settings,
    name: str,
    changes: dict[str, Any],
    *,
    command: str,
    events: Events | None = None,
    **options: Unpack[EntryUpdateOptions],
) -> Registry:
    """Set top-level fields of one entry in a layer (a value of ``None`` writes an explicit null)."""
    mutate = entry_update(settings, name, changes, **options)
    return edit_layer(settings, options.get("layer", "curated"), mutate, command=command, events=events)


def rollback(settings: Settings, rev: int, *, command: str | None = None) -> Registry:
    """Restore a file to the content kept as revision ``rev`` (the rollback is itself a revision).

    Revisions name their file relative to the root, so this works after the root moved. Restoring the
    content from before a file existed (or was blank) writes ``[]``, the empty registry.
    """
    row = history.get_revision(settings, rev) if settings.history_db_path.exists() else None
    if row is None:
        raise UnknownRevisionError(rev)
    path = history.revision_path(settings, row["file"])
    layer: Layer
    if path == settings.curated_path:
        layer = "curated"
    elif path == settings.discovered_path:
        layer = "discovered"
    else:
        raise RegistryError(f"revision {rev} belongs to {path}, not to this root's registry ({settings.configs_dir})")
    text = row["before_text"] if row["before_text"].strip() else "[]\n"
    return replace_layer_text(
        settings,
        layer,
        text,
        command=command or f"rollback {rev}",
        events=[("rollback", {"file": str(path), "revision": rev})],
    )


def filter_entries(
    registry: Registry,
    *,
    role: str | None = None,
    capability: str | None = None,
    backend: str | None = None,
    profile: str | None = None,
    include_testing: bool = False,
    search: str | None = None,
) -> list[ModelEntry]:
    """Entries matching every given filter; testing/deprecated hidden unless ``include_testing``. With ``role``,
    best first for that role (:func:`schema.rank_for_role`, the order selection uses); else registry order."""
    out = []
    needle = (search or "").lower()
    for entry in registry:
        if not include_testing and (entry.testing or entry.deprecated):
            continue
        if role and role not in entry.roles:
            continue
        if capability and not getattr(entry.capabilities, capability, False):
            continue
        if backend and entry.backend != backend:
            continue
        if profile and entry.profiles and profile not in entry.profiles:
            continue
        if needle and not any(
            needle in (value or "").lower() for value in (entry.name, entry.display_name, entry.served_model_id)
        ):
            continue
        out.append(entry)
    return rank_for_role(out, role) if role else out


def validate(settings: Settings | None = None) -> Registry:
    """Force-load and validate; raises RegistryError/ValidationError listing every problem."""
    return load_registry(force=True, settings=settings)


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m imageworks_core.registry --validate [--root DIR] [--write-snapshot]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m imageworks_core.registry")
    parser.add_argument("--validate", action="store_true", help="validate the registry (exit 0 / 3)")
    parser.add_argument("--write-snapshot", action="store_true", help="regenerate configs/model_registry.json")
    parser.add_argument("--root", default=None)
    args = parser.parse_args(list(argv) if argv is not None else None)
    settings = get_settings(args.root)
    try:
        registry = validate(settings)
    except RegistryError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return exc.exit_code
    for warning in registry.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.write_snapshot:
        write_snapshot(settings, registry)
    print(f"registry valid: {len(registry)} entries ({settings.curated_path.name} + {settings.discovered_path.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
