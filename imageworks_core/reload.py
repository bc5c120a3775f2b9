"""Hot reload: serve the last good registry, swap in a valid new one when the config files change.

A ``watchdog`` observer watches ``configs/``; events for the two layer files are debounced (editors write in
several steps: truncate, write, rename) and then trigger one reload. An invalid registry is rejected: its
problems are logged and exposed through :attr:`RegistryService.status`, and the last good registry keeps
serving. A reload never touches the running backend.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from . import audit
from .errors import RegistryError
from .history import now_iso
from .registry import Registry, load_registry
from .settings import Settings

DEBOUNCE_S = 0.3


@dataclass
class ReloadStatus:
    """What the last reload attempt did (exposed at ``GET /v1/registry/status``)."""

    ok: bool = True
    entries: int = 0
    loaded_at: str | None = None
    last_attempt_at: str | None = None
    errors: list[str] = field(default_factory=list)
    reloads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RegistryService:
    """Holds the registry a long-running process serves; thread-safe swaps, last good kept on failure."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._registry: Registry | None = None
        self.status = ReloadStatus()
        self.reload()

    @property
    def registry(self) -> Registry:
        """The last good registry (RegistryError when none ever loaded)."""
        with self._lock:
            if self._registry is None:
                raise RegistryError("no valid registry loaded yet", self.status.errors)
            return self._registry

    def reload(self) -> ReloadStatus:
        """Force-load; swap in when valid, else keep the last good one and record the problems."""
        attempt = now_iso()
        try:
            registry = load_registry(force=True, settings=self.settings)
        except RegistryError as exc:
            with self._lock:
                self.status = ReloadStatus(
                    ok=False,
                    entries=len(self._registry) if self._registry else 0,
                    loaded_at=self.status.loaded_at,
                    last_attempt_at=attempt,
                    errors=exc.lines(),
                    reloads=self.status.reloads,
                )
            audit.log_event(self.settings, "registry_reload_failed", errors=exc.lines())
            return self.status
        with self._lock:
            self._registry = registry
            self.status = ReloadStatus(True, len(registry), attempt, attempt, [], self.status.reloads + 1)
        return self.status


class _Debounced(FileSystemEventHandler):
    def __init__(self, service: RegistryService, watched: set[str]) -> None:
        self.service = service
        self.watched = watched
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = {Path(str(event.src_path)).name, Path(str(getattr(event, "dest_path", "") or "")).name}
        if not paths & self.watched or event.event_type in ("opened", "closed_no_write"):
            return
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(DEBOUNCE_S, self.service.reload)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()


class RegistryWatcher:
    """Start/stop a watchdog observer that reloads ``service`` when a layer file changes."""

    def __init__(self, service: RegistryService) -> None:
        settings = service.settings
        self._handler = _Debounced(service, {settings.curated_path.name, settings.discovered_path.name})
        self._observer = Observer()
        settings.configs_dir.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(self._handler, str(settings.configs_dir), recursive=False)

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._handler.cancel()
        self._observer.stop()
        self._observer.join(timeout=5)


def wait_for_reload(service: RegistryService, after: int, timeout_s: float = 5.0) -> bool:
    """Test helper: wait until ``service.status.reloads`` exceeds ``after`` or a failed attempt is recorded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.status.reloads > after or not service.status.ok:
            return True
        time.sleep(0.05)
    return False
