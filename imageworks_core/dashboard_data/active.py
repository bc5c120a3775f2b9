"""The Active Model page's view of the single port, derived each time from the current state, never from a click.

Every control and banner comes from :func:`active_view`: the state file, the activation in progress (any
process's: :mod:`imageworks_core.runtime.inflight`) and a health check. Two operators on two pages, the CLI and
the API therefore always agree, and a page left open follows what others do.

Health checks are log lines in the backend (vLLM logs every request): while a backend starts the activation
itself polls it, so the page asks nothing; once ready the page asks at most every :data:`HEALTH_CHECK_READY_S`
per root (cached in this process, shared by every session), and :func:`log_lines` hides our own poll lines
unless asked.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..errors import ImageWorksError
from ..runtime import background
from ..runtime.logs import tail
from ..settings import Settings

if TYPE_CHECKING:
    from ..runtime import ActivationProgress, ActiveStatus
    from ..runtime.background import BackgroundOutcome

REFRESH_S = 1.0
"""How often the page's live panel re-reads the state (a file read, NVML and psutil: cheap)."""
HEALTH_CHECK_READY_S = 15.0
"""Once ready, how often the page checks the backend's health (each check is two lines in its log)."""
LOG_LINES = 30
"""How many log lines the page shows."""
OWN_POLL = re.compile(r"\bGET /(health|v1/models)\b")
"""A log line of a health check: ours (the readiness poll, this page, the API) asks nothing else with GET
there; vLLM's uvicorn logs ``"GET /health HTTP/1.1" 200``, the demo backend ``GET /health 200``."""

Phase = Literal["idle", "starting", "ready", "unhealthy", "failed", "stale", "error"]

_health_guard = threading.Lock()
_health: dict[tuple[Path, str], tuple[float, bool | None, str]] = {}


@dataclass(frozen=True)
class ActiveView:
    """What the page shows and allows now."""

    phase: Phase
    status: ActiveStatus | None
    progress: ActivationProgress | None
    outcome: BackgroundOutcome | None
    error: str | None = None

    @property
    def name(self) -> str | None:
        if self.progress is not None:
            return self.progress.name
        return self.status.name if self.status is not None and self.phase != "stale" else None

    @property
    def occupant(self) -> str | None:
        """The entry holding the single port or starting on it (what a Start would switch away from); a failed
        or stale record holds nothing: starting then is a Start, not a Switch."""
        return self.name if self.phase in ("ready", "unhealthy", "starting") else None

    @property
    def status_text(self) -> str:
        """The Status figure: the state's status, ``starting`` from the first step of a start, or ``idle``."""
        if self.phase == "starting":
            return "starting"
        if self.status is None or self.phase == "stale":
            return "idle"
        return self.status.status

    @property
    def health_text(self) -> str:
        """The Health figure: ``starting`` while a start runs (the activation polls it), else as last checked."""
        if self.phase == "starting":
            return "starting"
        healthy = self.status.healthy if self.status is not None and self.phase != "stale" else None
        return {True: "healthy", False: "unhealthy", None: "—"}[healthy]

    @property
    def can_start(self) -> bool:
        """Start / Switch: not while a start is in progress."""
        return self.phase != "starting"

    @property
    def can_stop(self) -> bool:
        """Stop: whenever something is recorded (a failed state is cleared by it); Cancel replaces it while
        starting."""
        return self.phase in ("ready", "unhealthy", "failed", "error")

    @property
    def can_cancel(self) -> bool:
        return self.phase == "starting"

    @property
    def signature(self) -> tuple[object, ...]:
        """Changes exactly when the controls must change (the page then re-renders them)."""
        launch = self.status.state.launch_id if self.status is not None else None
        return (self.phase in ("ready", "unhealthy"), self.phase, self.name, launch, self.outcome)


def active_view(settings: Settings) -> ActiveView:
    """The single port as the page must show it now (see the module docstring)."""
    from .. import runtime

    progress = runtime.activation_in_progress(settings)
    outcome = background.last_outcome(settings)
    try:
        status = runtime.current(settings, check_health=False)
    except ImageWorksError as exc:
        return ActiveView("error", None, progress, outcome, error=exc.message)
    if progress is not None or (status is not None and status.status == "starting"):
        return ActiveView("starting", status, progress, outcome)
    if status is None:
        return ActiveView("idle", None, None, outcome)
    if status.status in ("failed", "stale"):
        return ActiveView(status.status, status, None, outcome)
    healthy, detail = _cached_health(settings, status)
    status = status.model_copy(update={"healthy": healthy, "health_detail": detail})
    return ActiveView("ready" if healthy is not False else "unhealthy", status, None, outcome)


def _cached_health(settings: Settings, status: ActiveStatus) -> tuple[bool | None, str]:
    """The backend's health, asked at most every HEALTH_CHECK_READY_S per launch (shared by every session)."""
    from .. import runtime

    key = (settings.root, status.state.launch_id or str(status.pid))
    now = time.monotonic()
    with _health_guard:
        cached = _health.get(key)
    if cached is not None and now - cached[0] < HEALTH_CHECK_READY_S:
        return cached[1], cached[2]
    checked = runtime.current(settings, check_health=True)
    healthy, detail = (checked.healthy, checked.health_detail) if checked is not None else (False, "stopped")
    with _health_guard:
        for old in [k for k in _health if k[0] == settings.root]:
            del _health[old]  # one launch per root matters; older ones are gone
        _health[key] = (now, healthy, detail)
    return healthy, detail


def log_lines(settings: Settings, name: str, *, show_polls: bool = False, lines: int = LOG_LINES) -> list[str]:
    """The last ``lines`` lines of the entry's backend log; our own health-check lines hidden unless
    ``show_polls`` (the start-up lines then stay in view)."""
    from ..runtime import backend_log_path

    everything = tail(backend_log_path(settings, name), 5000)
    kept = everything if show_polls else [line for line in everything if not OWN_POLL.search(line)]
    return kept[-lines:]


def hidden_polls(settings: Settings, name: str) -> int:
    """How many health-check lines :func:`log_lines` hides (of the log's last 5000)."""
    from ..runtime import backend_log_path

    return sum(1 for line in tail(backend_log_path(settings, name), 5000) if OWN_POLL.search(line))
