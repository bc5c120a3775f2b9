"""Verify and lock an entry's weights: the registry-facing side of :mod:`imageworks_core.hashing`.

``verify_entry`` hashes ``download_path`` (full: every byte; fast: only files whose stat changed since the
last run, via the stat cache in the history DB) and compares with the lock. ``lock_entry(set_expected=True)``
pins the entry from a *full* read: the curated entry gets a small ``version_lock`` block, and the full manifest
(per-file digests, ignore rules, small text files) goes to ``configs/locks/<slug>.manifest.json``, whose own
aggregate must equal the curated one — a tampered manifest is itself drift. Every run is recorded in the
history DB and the audit log; drift on a locked entry is logged as ``lock_violation``.

Lock, re-pin and unlock are registry writes: each reads ``version_lock`` under the curated file's lock (a
concurrent unlock, re-lock or re-pin is never overwritten with stale data) and is one journaled change with its
``lock``/``unlock`` audit line; a re-pin writes the manifest and the curated hash in that same change, so a
crash never leaves them out of step (see :mod:`imageworks_core.journal`).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, Field, ValidationError

from . import audit, history
from .errors import UsageError, WeightsError
from .hashing import (
    Algorithm,
    DriftReport,
    Manifest,
    ProgressCallback,
    aggregate_of,
    compare_manifests,
    hash_directory,
)
from .history import now_iso
from .registry import Registry, edit_layer, load_registry, lock_file_path
from .schema import ModelEntry
from .settings import Settings, slugify

VerifyOutcome = Literal["ok", "drift", "unlocked"]
# The lock file is the manifest plus who/when; these keys are not part of the manifest model.
_LOCK_FILE_EXTRA_KEYS = ("name", "locked_at")


class VerifyResult(BaseModel):
    """One verification run, as the CLI, dashboard and API show it."""

    name: str
    result: VerifyOutcome
    mode: Literal["full", "fast"]
    algorithm: str
    directory: str
    aggregate: str
    expected: str | None = None
    locked: bool = False
    file_count: int
    total_bytes: int
    bytes_read: int
    rehashed: list[str] = Field(default_factory=list)
    duration_s: float
    report: DriftReport | None = None
    lock_file: str | None = None
    notes: list[str] = Field(default_factory=list)
    node: str | None = None
    """The fleet node whose copy was hashed (None: this box's)."""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def format_text(self) -> str:
        """The CLI's report."""
        rate = self.bytes_read / self.duration_s / 1e6 if self.duration_s > 0 else 0.0
        where = f" on node {self.node}" if self.node else ""
        lines = [
            f"{self.name}: {self.mode} verification ({self.algorithm}) of {self.directory}{where}",
            f"  {self.file_count} files, {self.total_bytes:,} bytes; read {self.bytes_read:,} bytes "
            f"in {self.duration_s:.2f} s ({rate:,.0f} MB/s)",
        ]
        if self.mode == "fast":
            lines.append(
                f"  fast mode: re-hashed {len(self.rehashed)} of {self.file_count} files (stat changed)"
                + (
                    ": " + ", ".join(self.rehashed[:10]) + (" …" if len(self.rehashed) > 10 else "")
                    if self.rehashed
                    else ""
                )
            )
        lines.append(f"  aggregate sha256: {self.aggregate}")
        if self.result == "unlocked":
            lines.append(
                f"  no expected hash yet: pin it with `imageworks-models lock {shlex.quote(self.name)} --set-expected`"
            )
        elif self.result == "ok":
            lines.append(f"  OK: matches the expected aggregate ({'locked' if self.locked else 'pinned, not locked'})")
        else:
            lines.append(f"  expected:         {self.expected}")
            if self.report is not None:
                lines.append(self.report.format_text())
            lines.append(
                "  if the change is expected: re-run `imageworks-models lock "
                f"{shlex.quote(self.name)} --set-expected`; if not: re-download with `imageworks-download download --force`"
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def weights_dir(settings: Settings, entry: ModelEntry) -> Path:
    """The entry's resolved ``download_path`` (WeightsError when it has none)."""
    if not entry.download_path:
        raise WeightsError(f"{entry.name!r} has no download_path; set it in the curated file or download the weights")
    return settings.resolve_path(entry.download_path)


def _read_lock_manifest(path: Path, expected_aggregate: str) -> tuple[Manifest | None, list[str]]:
    """The lock manifest, or None with notes explaining why it cannot be trusted."""
    if not path.exists():
        return None, [f"lock manifest {path} is missing: only the aggregate can be compared"]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in _LOCK_FILE_EXTRA_KEYS:
            data.pop(key, None)
        manifest = Manifest.model_validate(data)
    except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as exc:
        return None, [f"lock manifest {path} is unreadable ({type(exc).__name__}): treat as tampered"]
    notes = []
    if aggregate_of(manifest.files) != manifest.aggregate or manifest.aggregate != expected_aggregate:
        notes.append(f"lock manifest {path} does not match the curated expected aggregate: tampered or stale")
        return None, notes
    return manifest, notes


def verify_entry(
    settings: Settings,
    name: str,
    *,
    fast: bool = False,
    algorithm: Algorithm | None = None,
    progress: ProgressCallback | None = None,
    registry: Registry | None = None,
) -> VerifyResult:
    """Hash the entry's weights and compare with its lock; record the run. Never raises on drift."""
    registry = registry or load_registry(settings=settings)
    verify = verify_weights(settings, registry.get(name), fast=fast, algorithm=algorithm, progress=progress)
    record_verification(settings, verify)
    return verify


def verify_weights(
    settings: Settings,
    entry: ModelEntry,
    *,
    fast: bool = False,
    algorithm: Algorithm | None = None,
    progress: ProgressCallback | None = None,
    manifest_file: Path | None = None,
) -> VerifyResult:
    """Hash ``entry``'s weights under ``settings``' root and compare with its lock; records nothing (the stat
    cache of fast mode excepted). ``manifest_file``: where the lock manifest is (default: the entry's own,
    :func:`~imageworks_core.registry.lock_file_path`). Never raises on drift."""
    directory = weights_dir(settings, entry)
    lock = entry.version_lock
    expected = lock.expected_aggregate_sha256 if lock else None
    if expected and algorithm and algorithm != lock.algorithm:  # type: ignore[union-attr]
        raise UsageError(f"{entry.name!r} is pinned with {lock.algorithm}; verify with that algorithm")  # type: ignore[union-attr]
    algo: Algorithm = (lock.algorithm if expected else algorithm) or "sha256"  # type: ignore[union-attr,assignment]
    mode: Literal["full", "fast"] = "fast" if fast else "full"
    key = str(directory.resolve())
    cache = history.stat_entries(settings, key, algo) if fast else None
    notes: list[str] = []
    if expected and manifest_file is None:
        manifest_file = lock_file_path(settings, entry)
    expected_manifest, manifest_notes = (
        _read_lock_manifest(manifest_file, expected) if expected and manifest_file else (None, [])
    )
    notes.extend(manifest_notes)
    result = hash_directory(
        directory,
        algorithm=algo,
        ignore=expected_manifest.ignore if expected_manifest else None,
        extra_ignore=() if expected_manifest else entry.hash_ignore,
        mode=mode,
        cache=cache,
        progress=progress,
    )
    history.save_stat_entries(settings, key, algo, result.cache)
    manifest = result.manifest
    report: DriftReport | None = None
    outcome: VerifyOutcome
    if not expected:
        outcome = "unlocked"
    elif expected_manifest is not None:
        report = compare_manifests(expected_manifest, manifest)
        outcome = "ok" if report.ok else "drift"
    else:
        outcome = "drift"
        report = DriftReport(
            algorithm=algo,
            expected_aggregate=expected,
            actual_aggregate=manifest.aggregate,
            file_count=manifest.file_count,
            total_bytes=manifest.total_bytes,
            notes=list(notes),
        )
        notes = []
    by_path = manifest.by_path()
    bytes_read = (
        manifest.total_bytes if mode == "full" else sum(by_path[p].size for p in result.rehashed if p in by_path)
    )
    verify = VerifyResult(
        name=entry.name,
        result=outcome,
        mode=mode,
        algorithm=algo,
        directory=str(directory),
        aggregate=manifest.aggregate,
        expected=expected,
        locked=entry.locked,
        file_count=manifest.file_count,
        total_bytes=manifest.total_bytes,
        bytes_read=bytes_read,
        rehashed=result.rehashed if mode == "fast" else [],
        duration_s=manifest.duration_s,
        report=report,
        lock_file=str(manifest_file) if manifest_file else None,
        notes=notes,
    )
    return verify


def record_verification(settings: Settings, verify: VerifyResult) -> None:
    """Record a run in ``settings``' history DB and audit log (a fleet node's run at the controller: the node is
    kept in the history row's report JSON and named in the audit lines)."""
    actor = audit.current_actor(settings)
    where = {"node": verify.node} if verify.node else {}
    report = verify.report.to_dict() if verify.report else None
    history.record_verification(
        settings,
        name=verify.name,
        mode=verify.mode,
        algorithm=verify.algorithm,
        duration_s=verify.duration_s,
        bytes=verify.bytes_read,
        files=verify.file_count,
        result=verify.result,
        aggregate=verify.aggregate,
        expected=verify.expected,
        report={**(report or {}), **where} if where else report,
        actor=actor,
    )
    audit.log_event(
        settings,
        "verify",
        name=verify.name,
        mode=verify.mode,
        result=verify.result,
        aggregate=verify.aggregate,
        **where,
    )
    if verify.result == "drift" and verify.locked:
        report = verify.report
        files = (
            [c.path for c in report.modified] + [f.path for f in report.added] + [f.path for f in report.removed]
            if report
            else []
        )
        audit.log_event(
            settings,
            "lock_violation",
            name=verify.name,
            files=files,
            expected=verify.expected,
            actual=verify.aggregate,
            **where,
        )


def _curated_entry(entries: list[dict[str, Any]], name: str, *, create: bool) -> dict[str, Any] | None:
    """The entry's raw curated object among ``entries`` (read under the lock); appended when ``create``."""
    for raw in entries:
        if isinstance(raw, dict) and raw.get("name") == name:
            return raw
    if not create:
        return None
    entries.append({"name": name})
    return entries[-1]


def _raw_lock(raw: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of the version_lock as written in the curated file (untouched fields keep their exact text)."""
    lock = raw.get("version_lock") if raw else None
    return dict(lock) if isinstance(lock, dict) else {}


def lock_entry(
    settings: Settings,
    name: str,
    *,
    set_expected: bool = False,
    algorithm: Algorithm = "sha256",
    progress: ProgressCallback | None = None,
    reason: str | None = None,
) -> VerifyResult | None:
    """Lock an entry. ``set_expected``: full read, write the lock manifest, pin the aggregate and lock.

    Without ``set_expected`` an entry that already has an expected hash only gets ``locked: true``.
    ``reason`` (when given) goes into the ``lock`` audit line. Returns the verification that pinned it (None for
    a plain toggle).
    """
    entry = load_registry(settings=settings).get(name)  # resolves an alias; the lock itself is read under the lock
    actor = audit.current_actor(settings)
    if not set_expected:
        events: list[tuple[str, dict[str, Any]]] = []

        def toggle(entries: list[dict[str, Any]]) -> None:
            raw = _curated_entry(entries, entry.name, create=False)
            lock = _raw_lock(raw)
            if raw is None or not lock.get("expected_aggregate_sha256"):
                raise UsageError(
                    f"{entry.name!r} has no expected hash yet: run `imageworks-models lock {shlex.quote(entry.name)} --set-expected`"
                )
            lock.update(locked=True, locked_at=now_iso(), locked_by=actor)
            raw["version_lock"] = lock
            events.append(
                ("lock", {"name": entry.name, "expected": lock["expected_aggregate_sha256"], "set_expected": False})
            )

        edit_layer(settings, "curated", toggle, command=f"lock {entry.name}", events=events)
        return None
    directory = weights_dir(settings, entry)
    result = hash_directory(
        directory, algorithm=algorithm, extra_ignore=entry.hash_ignore, mode="full", progress=progress
    )
    manifest = result.manifest
    history.save_stat_entries(settings, str(directory.resolve()), algorithm, result.cache)
    path = settings.locks_dir / f"{slugify(entry.name)}.manifest.json"
    payload = {"name": entry.name, "locked_at": now_iso(), **manifest.model_dump(mode="json")}
    new_lock = {
        "locked": True,
        "algorithm": algorithm,
        "expected_aggregate_sha256": manifest.aggregate,
        "locked_at": now_iso(),
        "locked_by": actor,
        "manifest_path": str(path.relative_to(settings.root)) if path.is_relative_to(settings.root) else str(path),
    }

    def pin(entries: list[dict[str, Any]]) -> None:
        raw = _curated_entry(entries, entry.name, create=True)
        assert raw is not None
        raw["version_lock"] = new_lock

    edit_layer(
        settings,
        "curated",
        pin,
        command=f"lock {entry.name} --set-expected",
        events=[
            (
                "lock",
                {
                    "name": entry.name,
                    "expected": manifest.aggregate,
                    "set_expected": True,
                    "lock_file": str(path),
                    **({"reason": reason.strip()} if reason and reason.strip() else {}),
                },
            )
        ],
        extra_files={path: json.dumps(payload, indent=2, ensure_ascii=False) + "\n"},
    )
    verify = VerifyResult(
        name=entry.name,
        result="ok",
        mode="full",
        algorithm=algorithm,
        directory=str(directory),
        aggregate=manifest.aggregate,
        expected=manifest.aggregate,
        locked=True,
        file_count=manifest.file_count,
        total_bytes=manifest.total_bytes,
        bytes_read=manifest.total_bytes,
        duration_s=manifest.duration_s,
        lock_file=str(path),
    )
    record_verification(settings, verify)
    return verify


def unlock_entry(settings: Settings, name: str, *, reason: str) -> None:
    """Unlock (keeping the expected hash); a reason is mandatory and goes to the audit log."""
    if not reason or not reason.strip():
        raise UsageError('unlocking needs --reason "…" (the runbook asks for an incident report before unlocking)')
    entry = load_registry(settings=settings).get(name)  # resolves an alias; the lock itself is read under the lock
    actor = audit.current_actor(settings)

    def unlock(entries: list[dict[str, Any]]) -> None:
        raw = _curated_entry(entries, entry.name, create=False)
        lock = _raw_lock(raw)
        if raw is None or not lock.get("locked"):
            raise UsageError(f"{entry.name!r} is not locked")
        lock.update(locked=False, unlocked_at=now_iso(), unlocked_by=actor, unlock_reason=reason.strip())
        raw["version_lock"] = lock

    edit_layer(
        settings,
        "curated",
        unlock,
        command=f"unlock {entry.name}",
        events=[("unlock", {"name": entry.name, "reason": reason.strip()})],
    )


def accept_new_weights(
    settings: Settings, name: str, *, reason: str, progress: ProgressCallback | None = None
) -> VerifyResult:
    """The runbook's "intentional update": the weights changed on purpose (new quant, patch release), so unlock
    with ``reason`` and re-lock at the hash of a fresh full read, with the pinned algorithm.

    Two audited, journaled changes: ``unlock`` (with the reason; skipped when the entry is only pinned) and
    ``lock --set-expected`` (the reason again). Adversary: a failure or crash between them (weights removed,
    unreadable file) leaves the entry unlocked with the reason recorded — never locked to a hash nobody read.
    """
    if not reason or not reason.strip():
        raise UsageError(
            "accepting new weights needs a reason (the runbook asks for one: ticket or incident reference)"
        )
    entry = load_registry(settings=settings).get(name)
    lock = entry.version_lock
    if lock is None or not lock.expected_aggregate_sha256:
        raise UsageError(
            f"{entry.name!r} has no expected hash to replace: lock it with `imageworks-models lock "
            f"{shlex.quote(entry.name)} --set-expected`"
        )
    directory = weights_dir(settings, entry)
    if not directory.is_dir():
        raise WeightsError(f"weights of {entry.name!r} are missing ({directory}): nothing to accept")
    if lock.locked:
        unlock_entry(settings, entry.name, reason=reason)
    result = lock_entry(
        settings,
        entry.name,
        set_expected=True,
        algorithm=cast(Algorithm, lock.algorithm),
        progress=progress,
        reason=reason,
    )
    assert result is not None  # set_expected always returns the pinning verification
    return result
