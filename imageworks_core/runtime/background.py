"""Activation in the background: a long-running front end (the dashboard) starts one and returns at once.

At most one background activation per root in this process; across processes the activation lock serialises
(a second one waits for it, bounded, as a CLI activation would). Nobody needs the thread to learn how the start
goes: the state file (``starting`` → ``ready`` / ``failed``), the progress record (:mod:`.inflight`) and the
history say it to every session, the API and the CLI; :func:`last_outcome` keeps what only this process saw
(a refusal that changed no state, e.g. a lock violation). Cancel it as any activation: :func:`.activate.stop`.

On crash: the thread dies with the process; the activation's own crash safety applies (:mod:`.activate`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError, ImageWorksError
from ..registry import Registry
from ..settings import Settings
from .activate import activate


@dataclass(frozen=True)
class BackgroundOutcome:
    """How this process's last background activation of a root ended (``error`` None: ready)."""

    name: str
    error: str | None
    exit_code: int | None
    finished: float  # time.time()


_guard = threading.Lock()
_running: dict[Path, tuple[str, threading.Thread]] = {}
_outcomes: dict[Path, BackgroundOutcome] = {}


def running(settings: Settings) -> str | None:
    """The entry this process is activating in the background for ``settings.root``, else None."""
    with _guard:
        name, thread = _running.get(settings.root, ("", None))
    return name if thread is not None and thread.is_alive() else None


def last_outcome(settings: Settings) -> BackgroundOutcome | None:
    """How the last background activation for ``settings.root`` ended (None: none ended yet)."""
    with _guard:
        return _outcomes.get(settings.root)


def start(settings: Settings, name: str, *, force: bool = False, registry: Registry | None = None) -> None:
    """Start activating ``name`` in a thread and return at once; BackendError when one is already running here."""
    with _guard:
        current = _running.get(settings.root)
        if current is not None and current[1].is_alive():
            raise BackendError(f"{current[0]!r} is already being started; cancel it (Stop) or wait for it")

        def work() -> None:
            error, code = None, None
            try:
                activate(settings, name, force=force, registry=registry)
            except ImageWorksError as exc:
                error, code = exc.message, exc.exit_code
            except Exception as exc:  # a thread's exception would vanish; the page shows this one
                error, code = f"{type(exc).__name__}: {exc}", None
            with _guard:
                _outcomes[settings.root] = BackgroundOutcome(name, error, code, time.time())

        thread = threading.Thread(target=work, name=f"activate-{name}", daemon=True)
        _running[settings.root] = (name, thread)
        _outcomes.pop(settings.root, None)
        thread.start()
