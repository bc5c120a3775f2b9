"""The one service object: ``ImageWorks(settings)`` keeps each promise once; the CLI, API and dashboard format.

It owns the registry a front end serves (the last good one when the files on disk turn invalid, with the error
beside it), the status of every entry (lock state, weights, latest verification and probe, the drift rule,
per-field provenance), and every action, listed on :class:`ImageWorks`. Front ends parse arguments and format
results; they hold no rules.

Adversaries: concurrent callers in one process (threads of the API server, Streamlit sessions) share one object:
swaps of the registry are atomic under a lock; a registry that turns invalid never replaces a good one.
"""

from __future__ import annotations

import copy
import difflib
import shlex
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from . import audit, history
from .errors import LockViolationError, RegistryError, UnknownRevisionError, UsageError
from .registry import LayerChange, Registry, edit_layer, entry_update, load_registry, preview_edit, update_entry
from .schema import ModelEntry
from .selection import Selection, select_model
from .settings import Settings, get_settings

if TYPE_CHECKING:  # the actions import httpx, Pillow and psutil on use: listing the registry stays fast
    from .discovery import DiscoveredUpdate, DownloadOutcome
    from .fleet import Fleet
    from .hashing import Algorithm, ProgressCallback
    from .legacy import ImportReport
    from .probe import ProbeResult, ProbeRoute
    from .runtime import ActivationProgress as ActivationInProgress
    from .runtime import ActiveState, ActiveStatus, StopResult
    from .runtime import ProgressCallback as ActivationProgress
    from .verification import VerifyResult

LockState = Literal["locked", "pinned", "unlocked"]
WeightsState = Literal["present", "missing", "n/a"]


@dataclass
class RegistryStatus:
    """What the last load or reload did (``GET /v1/registry/status``, the dashboard's banner)."""

    ok: bool = True
    entries: int = 0
    loaded_at: str | None = None
    last_attempt_at: str | None = None
    errors: list[str] = field(default_factory=list)
    reloads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RevisionDiff:
    """Revision ``rev`` of a registry file: what it changed, and what rolling back to before it would change now."""

    rev: int
    file: str
    change: str
    rollback: str


@dataclass(frozen=True)
class EntryStatus:
    """Everything an operator checks about one entry before trusting it."""

    name: str
    lock: LockState
    weights: WeightsState
    last_verification: dict[str, Any] | None
    last_probe: dict[str, Any] | None

    @property
    def drifted(self) -> bool:
        """The drift rule: a locked entry whose latest verification found drift is not to be used."""
        return self.lock == "locked" and (self.last_verification or {}).get("result") == "drift"

    @property
    def new_weights_to_accept(self) -> bool:
        """A pinned entry (locked or not) whose latest verification drifted: the operator may accept the new
        weights (:meth:`ImageWorks.accept_new_weights`) or restore the old ones."""
        return self.lock in ("locked", "pinned") and (self.last_verification or {}).get("result") == "drift"

    @property
    def badges(self) -> list[str]:
        """'drift' and/or 'missing' (weights), the two states that make an entry unusable."""
        return [b for b, on in (("drift", self.drifted), ("missing", self.weights == "missing")) if on]


def lock_state(entry: ModelEntry) -> LockState:
    """'locked', 'pinned' (expected hash kept, lock off) or 'unlocked'."""
    if entry.version_lock is None or not entry.version_lock.expected_aggregate_sha256:
        return "unlocked"
    return "locked" if entry.version_lock.locked else "pinned"


def weights_state(registry: Registry, entry: ModelEntry) -> WeightsState:
    """'present', 'missing' or 'n/a' (remote / ollama entries have no download_path)."""
    if not entry.download_path:
        return "n/a"
    return "present" if registry.weights_present(entry.name) else "missing"


def drift_violation(status: EntryStatus) -> LockViolationError:
    """The error for using an entry that :attr:`EntryStatus.drifted` (exit 2, HTTP 423)."""
    at = (status.last_verification or {}).get("at", "?")
    return LockViolationError(
        f"{status.name!r} is locked and its last verification ({at}) drifted; "
        f"inspect with `imageworks-models verify {shlex.quote(status.name)}`",
        reason="locked_drift",
    )


class ImageWorks:
    """The service every front end calls for one deployment root.

    What it offers (each method's docstring says more):

    - The registry: :attr:`registry` (the last good one), :attr:`registry_status`, :meth:`snapshot` (registry,
      error and status read together), :meth:`reload` (hot reload, the Reload button) and :meth:`refresh` (a
      cheap re-check of the files, cached by their stat); both swap in a newer registry only when it is valid.
    - Entry status: :meth:`statuses`, :meth:`status` (:class:`EntryStatus`: lock, weights, latest verification
      and probe, the drift rule), :meth:`provenance` (the layer of each field), :meth:`select`.
    - Weights: :meth:`verify`, :meth:`lock`, :meth:`unlock`, :meth:`accept_new_weights` (the runbook's
      intentional update: unlock with a reason, re-lock at the new hash).
    - The single port: :meth:`activate` (waits until ready), :meth:`start_activation` (in the background, for a
      long-running front end), :meth:`activation` (the start in progress, any process's), :meth:`current`,
      :meth:`stop` (also cancels a start in progress).
    - Probing: :meth:`probe`.
    - In fleet mode (:attr:`fleet`): :meth:`verify` with ``node`` hashes a node's copy, :meth:`probe` reaches the
      slot serving the entry; both are recorded here, naming the node.
    - Registry edits: :meth:`preview_entry`, :meth:`save_entry`, :meth:`save_entries`, :meth:`remove_entry`,
      :meth:`revision_diff`, :meth:`rollback`, :meth:`import_legacy`.
    - New weights: :meth:`download` (from the Hub, verified) and :meth:`scan` (a folder already on disk,
      offline), both recorded in the discovered overlay.
    """

    def __init__(self, settings: Settings | None = None, *, ray_address: str | None = None) -> None:
        self.settings = settings or get_settings()
        self._ray_address = ray_address  # None: IMAGEWORKS_RAY_ADDRESS decides (see fleet_address)
        self._fleet: Fleet | None = None
        self._fleet_guard = threading.Lock()
        self._lock = threading.Lock()
        self._registry: Registry | None = None
        self._error: RegistryError | None = None
        self._status = RegistryStatus()
        self._loaded = False  # the first load happens on first use: stopping a backend needs no registry
        self._first_load = threading.Lock()

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._first_load:  # concurrent first users wait for the one load instead of seeing none
            if not self._loaded:
                self._load(force=True, audited=False)

    # Fleet mode ----------------------------------------------------------------------------------------------
    @property
    def fleet_address(self) -> str | None:
        """The Ray cluster this service runs models on (``ray_address``, else ``IMAGEWORKS_RAY_ADDRESS``); None
        in single-box mode. Reading it never imports Ray."""
        from .fleet.config import ray_address

        return ray_address(self._ray_address)

    @property
    def fleet(self) -> Fleet | None:
        """The fleet (:class:`imageworks_core.fleet.Fleet`, joined on first use, entries from this service's last
        good registry); None in single-box mode. FleetUnavailable (exit 8) when Ray is missing or unreachable."""
        address = self.fleet_address
        if address is None:
            return None
        with self._fleet_guard:
            if self._fleet is None:
                from .fleet import Fleet

                self._fleet = Fleet.connect(self.settings, address, registry=lambda: self.registry)
            return self._fleet

    # The registry --------------------------------------------------------------------------------------------
    @property
    def registry(self) -> Registry:
        """The last good registry (RegistryError with the problems when none ever loaded)."""
        self._ensure_loaded()
        with self._lock:
            if self._registry is None:
                raise self._error or RegistryError("no valid registry loaded yet", self._status.errors)
            return self._registry

    @property
    def registry_status(self) -> RegistryStatus:
        self._ensure_loaded()
        with self._lock:
            return self._status

    def snapshot(self) -> tuple[Registry | None, RegistryError | None, RegistryStatus]:
        """The served registry, the error that keeps the files from being served, and the status, read together
        (several sessions share one service: separate reads could pair one load's error with another's status)."""
        self._ensure_loaded()
        with self._lock:
            return self._registry, self._error, self._status

    def reload(self) -> RegistryStatus:
        """Force-load the files; swap in when valid, else keep the last good registry and record the problems
        (a failed reload is audited: a running server kept serving something other than the files)."""
        return self._load(force=True, audited=True)

    def refresh(self) -> RegistryStatus:
        """Re-check the files (cheap when unchanged: the loader caches by their stat)."""
        return self._load(force=False, audited=False)

    def _load(self, *, force: bool, audited: bool) -> RegistryStatus:
        attempt = history.now_iso()
        try:
            registry = load_registry(force=force, settings=self.settings)
        except RegistryError as exc:
            with self._lock:
                self._error, self._loaded = exc, True
                self._status = RegistryStatus(
                    ok=False,
                    entries=len(self._registry) if self._registry else 0,
                    loaded_at=self._status.loaded_at,
                    last_attempt_at=attempt,
                    errors=exc.lines(),
                    reloads=self._status.reloads,
                )
                status = self._status
            if audited:
                audit.log_event(self.settings, "registry_reload_failed", errors=exc.lines())
            return status
        with self._lock:
            if registry is not self._registry or self._error is not None:
                self._status = RegistryStatus(True, len(registry), attempt, attempt, [], self._status.reloads + 1)
            self._registry, self._error, self._loaded = registry, None, True
            return self._status

    # Entry status ----------------------------------------------------------------------------------------------
    def _latest(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        # Reading never creates the history DB ("loading never writes").
        if not self.settings.history_db_path.exists():
            return {}, {}
        return history.latest_verifications(self.settings), history.latest_probes(self.settings)

    def statuses(self, entries: Iterable[ModelEntry] | None = None) -> dict[str, EntryStatus]:
        """Status of ``entries`` (default: every entry), from one read of the history DB."""
        registry = self.registry
        verifications, probes = self._latest()
        return {
            entry.name: EntryStatus(
                name=entry.name,
                lock=lock_state(entry),
                weights=weights_state(registry, entry),
                last_verification=verifications.get(entry.name),
                last_probe=probes.get(entry.name),
            )
            for entry in (registry if entries is None else entries)
        }

    def status(self, name: str) -> EntryStatus:
        """Status of one entry (by name, alias or served id)."""
        entry = self.registry.get(name)
        return self.statuses([entry])[entry.name]

    def provenance(self, name: str) -> dict[str, str]:
        """Which layer each field of the merged entry came from."""
        registry = self.registry
        return registry.provenance(registry.get(name).name)

    # Selection -------------------------------------------------------------------------------------------------
    def select(
        self,
        *,
        name: str | None = None,
        role: str | None = None,
        require_capabilities: Sequence[str] = (),
        profile: str | None = None,
        preferred: Sequence[str] = (),
        allow_hidden: bool = False,
    ) -> Selection:
        """Resolve a name or role to an endpoint (see :func:`imageworks_core.selection.select_model` for
        ``preferred`` and ``allow_hidden``); a locked entry whose last verification drifted is refused."""
        selection = select_model(
            name=name,
            role=role,
            require_capabilities=list(require_capabilities),
            profile=profile,
            registry=self.registry,
            settings=self.settings,
            preferred=list(preferred),
            allow_hidden=allow_hidden,
        )
        status = self.status(selection.name)
        if status.drifted:
            raise drift_violation(status)
        return selection

    # Actions ---------------------------------------------------------------------------------------------------
    # Each takes the entry from the registry this service serves (the last good one), and refreshes it after a
    # write, so the next answer reflects the change.
    def verify(
        self,
        name: str,
        *,
        fast: bool = False,
        algorithm: Algorithm | None = None,
        progress: ProgressCallback | None = None,
        node: str | None = None,
    ) -> VerifyResult:
        """Hash the entry's weights and compare with its lock (recorded in history; never raises on drift).

        ``node`` (fleet mode): hash that node's copy instead of this root's (``"auto"``: the node serving the
        entry, else the least loaded node holding its weights; see :meth:`Fleet.verify`), recorded here with the
        node named. UsageError (exit 64) when fleet mode is off."""
        from .verification import verify_entry

        if node is not None:
            fleet = self.fleet
            if fleet is None:
                raise UsageError("--node needs fleet mode: set IMAGEWORKS_RAY_ADDRESS or pass --ray-address")
            chosen = None if node == "auto" else node
            return fleet.verify(self.registry.get(name).name, node=chosen, fast=fast, algorithm=algorithm)
        return verify_entry(
            self.settings, name, fast=fast, algorithm=algorithm, progress=progress, registry=self.registry
        )

    def lock(
        self,
        name: str,
        *,
        set_expected: bool = False,
        algorithm: Algorithm = "sha256",
        progress: ProgressCallback | None = None,
    ) -> VerifyResult | None:
        """Lock the entry (``set_expected``: full read, pin the aggregate and write the manifest)."""
        from .verification import lock_entry

        try:
            return lock_entry(self.settings, name, set_expected=set_expected, algorithm=algorithm, progress=progress)
        finally:
            self.refresh()

    def unlock(self, name: str, *, reason: str) -> None:
        """Unlock the entry, keeping the pin; the reason is audited."""
        from .verification import unlock_entry

        try:
            unlock_entry(self.settings, name, reason=reason)
        finally:
            self.refresh()

    def accept_new_weights(self, name: str, *, reason: str, progress: ProgressCallback | None = None) -> VerifyResult:
        """After drift the operator expected (new quant, patch release): unlock with ``reason`` and re-lock at the
        new hash from a fresh full read, both audited (see :func:`imageworks_core.verification.accept_new_weights`)."""
        from .verification import accept_new_weights

        try:
            return accept_new_weights(self.settings, name, reason=reason, progress=progress)
        finally:
            self.refresh()

    def activate(
        self,
        name: str,
        *,
        timeout_s: float | None = None,
        force: bool = False,
        on_progress: ActivationProgress | None = None,
    ) -> ActiveState:
        """Make the entry the backend on the single port (see :func:`imageworks_core.runtime.activate`)."""
        from . import runtime

        return runtime.activate(
            self.settings, name, timeout_s=timeout_s, force=force, on_progress=on_progress, registry=self.registry
        )

    def start_activation(self, name: str, *, force: bool = False) -> None:
        """Start activating the entry in the background and return at once (see
        :mod:`imageworks_core.runtime.background`); its progress is :meth:`current` and :meth:`activation`."""
        from .runtime import background

        background.start(self.settings, name, force=force, registry=self.registry)

    def activation(self) -> ActivationInProgress | None:
        """The activation in progress on this root (any process's), None when none is."""
        from . import runtime

        return runtime.activation_in_progress(self.settings)

    def stop(self, *, reason: str = "", lock_timeout_s: float | None = None) -> StopResult | None:
        """Stop the active backend, cancelling a start in progress first (None when nothing was active)."""
        from . import runtime

        return runtime.stop(self.settings, reason=reason, lock_timeout_s=lock_timeout_s)

    def current(self, *, check_health: bool = True) -> ActiveStatus | None:
        """What serves on the single port now; never signals a process."""
        from . import runtime

        return runtime.current(self.settings, check_health=check_health)

    def probe(self, name: str, image_path: Any = None, **options: Any) -> ProbeResult:
        """Prove the entry really sees (see :func:`imageworks_core.probe.probe_vision` for ``options``). In fleet
        mode a process-backed entry is probed in the slot serving it, through its node's agent (recorded here)."""
        from .probe import probe_vision

        if self.fleet_address is not None:  # joined on use: a bad image is refused before any cluster is asked

            def router(entry: ModelEntry, activate: bool) -> ProbeRoute:
                fleet = self.fleet
                assert fleet is not None  # fleet_address is set
                return fleet.probe_route(entry.name, activate=activate)

            options["router"] = router
        return probe_vision(self.settings, name, image_path, registry=self.registry, **options)

    def preview_entry(self, name: str, changes: dict[str, Any], *, create: bool = False) -> LayerChange:
        """Dry run of :meth:`save_entry`: the curated file's diff and the validated registry; raises what the
        write would raise (ValidationError with every problem, UnknownModelError, UsageError)."""
        mutate = entry_update(self.settings, name, copy.deepcopy(changes), create=create, must_be_new=create)
        return preview_edit(self.settings, "curated", mutate)

    def save_entry(self, name: str, changes: dict[str, Any], *, create: bool = False, command: str) -> Registry:
        """Set curated fields of ``name`` (``create``: add a new entry, refusing one already curated)."""
        try:
            return update_entry(self.settings, name, changes, command=command, create=create, must_be_new=create)
        finally:
            self.refresh()

    def save_entries(self, changes: dict[str, dict[str, Any]], *, command: str) -> Registry:
        """Set curated fields of several entries in one change (all or nothing); an entry not yet curated gets a
        curated record holding just these fields."""
        updates = [entry_update(self.settings, name, dict(fields), create=True) for name, fields in changes.items()]

        def mutate(entries: list[dict[str, Any]]) -> None:
            for update in updates:
                update(entries)

        try:
            return edit_layer(self.settings, "curated", mutate, command=command)
        finally:
            self.refresh()

    def remove_entry(self, name: str, *, command: str) -> Registry:
        """Remove an entry (by name, alias or served id) from both layer files, curated first (each write journaled
        and kept as a revision; a crash in between leaves a valid discovered-only entry). A locked entry is
        refused (UsageError): unlock it first, so dropping a pin is always a recorded decision."""
        entry = self.registry.get(name)
        if entry.locked:
            raise UsageError(
                f"{entry.name!r} is locked; nothing removed. Unlock it first: "
                f"imageworks-models unlock {shlex.quote(entry.name)} --reason '...'"
            )
        registry = self.registry

        def drop(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [raw for raw in entries if raw.get("name") != entry.name]

        try:
            for layer, present in (("curated", registry.curated), ("discovered", registry.discovered)):
                if entry.name in present:
                    registry = edit_layer(self.settings, layer, drop, command=command)
            return registry
        finally:
            self.refresh()

    def rollback(self, rev: int, *, command: str | None = None) -> Registry:
        """Restore a layer file to revision ``rev`` (itself a revision); the new registry is served at once."""
        from .registry import rollback

        try:
            return rollback(self.settings, rev, command=command)
        finally:
            self.refresh()

    def download(self, repo_id: str, **options: Any) -> DownloadOutcome:
        """Download, verify and record ``repo_id`` in the discovered overlay (see
        :func:`imageworks_core.discovery.download_and_register` for ``options``); the new entry is served at once."""
        from .discovery import download_and_register

        try:
            return download_and_register(self.settings, repo_id, **options)
        finally:
            self.refresh()

    def scan(self, directory: Any, *, name: str | None = None) -> DiscoveredUpdate:
        """Adopt a folder already on disk as a discovered entry, offline (``imageworks-download scan``; see
        :func:`imageworks_core.discovery.adopt_directory`); the entry is served at once."""
        from .discovery import adopt_directory

        try:
            return adopt_directory(self.settings, directory, name=name)
        finally:
            self.refresh()

    def import_legacy(self, path: Any, *, discovered_path: Any = None, force: bool = False) -> ImportReport:
        """Convert an older ImageWorks registry into the two layer files (one journaled change; see
        :func:`imageworks_core.legacy.import_legacy`); the imported registry is served at once."""
        from .legacy import import_legacy

        try:
            return import_legacy(path, self.settings, discovered_path=discovered_path, force=force)
        finally:
            self.refresh()

    def revision_diff(self, rev: int) -> RevisionDiff:
        """Both diffs of revision ``rev`` (UnknownRevisionError when there is none): its own change, and what
        :meth:`rollback` would do to the file as it is now."""
        row = history.get_revision(self.settings, rev) if self.settings.history_db_path.exists() else None
        if row is None:
            raise UnknownRevisionError(rev)
        path = history.revision_path(self.settings, row["file"])
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        return RevisionDiff(
            rev=rev,
            file=str(path),
            change=_diff(row["before_text"], row["after_text"], f"before rev {rev}", f"after rev {rev}"),
            rollback=_diff(current, row["before_text"], "current", f"restored (rev {rev})"),
        )


def _diff(a: str, b: str, a_label: str, b_label: str) -> str:
    return "".join(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True), a_label, b_label))
