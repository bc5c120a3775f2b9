"""Hot reload: serve the last good registry, swap in a valid new one when the config files change.

A ``watchdog`` observer watches ``configs/``; events for the two layer files are debounced (editors write in
several steps: truncate, write, rename) and then trigger one :meth:`ImageWorks.reload`, which rejects an
invalid registry (its problems are logged and exposed as ``registry_status``) and keeps serving the last good
one. A reload never touches the running backend.
"""

from __future__ import annotations

import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .service import ImageWorks

DEBOUNCE_S = 0.3


class _Debounced(FileSystemEventHandler):
    def __init__(self, service: ImageWorks, watched: set[str]) -> None:
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

    def __init__(self, service: ImageWorks) -> None:
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
