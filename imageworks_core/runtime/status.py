"""What runs on the single port now: :func:`current` (``current-model``, ``GET /v1/active``) and :func:`is_serving`.

Read-only towards processes: nothing here ever signals. A dead leader whose launch left processes running is
reported as ``failed`` with their pids (``leftover_pids``) until ``activate-model --stop`` or the next activation
stops them; a state with nothing of ours left is removed as ``stale`` (under the activation lock, so never
while an activation works on it).
"""

from __future__ import annotations

import time
from typing import Any

from .. import gpu
from ..audit import log_event
from ..errors import BackendError, ImageWorksError
from ..registry import Registry, load_registry
from ..schema import ModelEntry
from ..settings import Settings
from .activate import record_stop, unreadable_state_error
from .lock import try_lock
from .process import identify, processes_of
from .readiness import check_ready, health_client, health_path, server_root
from .state import ActiveState, ActiveStatus, clear_state, read_state, read_state_lenient


def is_serving(settings: Settings, name: str) -> bool:
    """Cheap check (no health request, no GPU query): the state says ``name`` is ready and its pid is ours."""
    try:
        state = read_state(settings)
    except BackendError:
        return False
    if state is None or state.name != name or state.status != "ready":
        return False
    return identify(state)[0] is not None


def current(settings: Settings, *, check_health: bool = True, registry: Registry | None = None) -> ActiveStatus | None:
    """The active backend with liveness, health, uptime and GPU figures; None when nothing is recorded.

    When the recorded leader is gone, processes its launch left running are reported (status ``failed``,
    ``leftover_pids``, the state kept for ``activate-model --stop``); with nothing of ours left the state is
    returned once as ``stale`` and removed. A ``failed`` state is kept (it says why the last activation failed)
    until the next activation or stop. An unreadable state file is a BackendError (removed first when the port
    is free). ``registry`` is where the entry's health path comes from (a fleet node holds no registry: the
    entry travels with the call); by default the files on disk are loaded.
    """
    state, problem = read_state_lenient(settings)
    if state is None:
        if problem is None:
            return None
        error = unreadable_state_error(settings, problem)
        if error is not None:
            raise error
        lock = try_lock(settings)
        if lock is None:
            raise BackendError(f"{problem}; an activation is in progress, try again")
        try:
            clear_state(settings)
            log_event(settings, "stop", name=None, result="stale", stale_reason=problem)
        finally:
            lock.release()
        raise BackendError(f"{problem}; it was removed (port {settings.vllm_port} is free; no process was signalled)")

    proc, why = identify(state)
    if proc is None:
        return _without_leader(settings, state, why, check_health, registry)

    healthy, detail = None, ""
    if check_health:
        entry = _entry_or_none(settings, state.name, registry)
        with health_client(entry) as client:
            healthy, detail = check_ready(
                client, server_root(state.host, state.port), health_path(settings, entry), state.served_model_id
            )
    fields: dict[str, Any] = {"healthy": healthy, "health_detail": detail}
    try:
        gpus = gpu.query_gpus()
        pids = [p.pid for p in processes_of(state)]
        fields["gpus"] = [g.to_dict() for g in gpus]
        fields["gpu_memory_bytes"] = sum(g.memory_held_by(pids) for g in gpus)
    except gpu.GpuUnavailable as exc:
        fields["gpu_note"] = exc.message
    return _status(
        state,
        status=state.status,
        alive=True,
        uptime_s=round(max(0.0, time.time() - state.create_time), 1),
        **fields,
    )


def _entry_or_none(settings: Settings, name: str, registry: Registry | None = None) -> ModelEntry | None:
    """The entry as the registry has it now; None when it is gone or the registry does not load."""
    try:
        return (registry or load_registry(settings=settings)).get(name)
    except ImageWorksError:
        return None


# The fields a status repeats from its state (name, pid, base_url, …); ``fields`` add liveness, health and GPU.
_FROM_STATE = frozenset(ActiveStatus.model_fields) & frozenset(ActiveState.model_fields)


def _status(state: ActiveState, **fields: Any) -> ActiveStatus:
    return ActiveStatus(**{**state.model_dump(include=_FROM_STATE), **fields}, state=state)


def _without_leader(
    settings: Settings, state: ActiveState, why: str, check_health: bool, registry: Registry | None = None
) -> ActiveStatus:
    """current() for a state whose leader is not (or no longer) our process. Finds, never signals."""
    if state.status == "failed":
        leftovers = sorted(p.pid for p in processes_of(state))
        error = state.error or ""
        if leftovers:
            error += f"; {_leftovers_note(leftovers)}"
        return _status(state, status="failed", alive=False, healthy=False, leftover_pids=leftovers, error=error)
    lock = try_lock(settings)
    if lock is None:  # an activation is working on it right now: report, do not touch
        return _status(state, status=state.status, alive=False, healthy=False, health_detail=why)
    try:
        latest, _ = read_state_lenient(settings)
        if latest != state:
            lock.release()
            lock = None
            return current(settings, check_health=check_health, registry=registry)
        leftovers = sorted(p.pid for p in processes_of(state))
        if leftovers:
            return _status(
                state,
                status="failed",
                alive=False,
                healthy=False,
                health_detail=why,
                leftover_pids=leftovers,
                error=f"{why}; {_leftovers_note(leftovers)}",
            )
        clear_state(settings)
        reason = "stale state found by current-model"
        record_stop(settings, state, "stale", f"{reason}; {why}", reason=reason, stale_reason=why, stopped_pids=[])
    finally:
        if lock is not None:
            lock.release()
    return _status(state, status="stale", alive=False, healthy=False, stale_reason=why)


def _leftovers_note(pids: list[int]) -> str:
    return (
        f"pid(s) {', '.join(map(str, pids))} of its launch are still running; stop them with "
        "`imageworks-models activate-model --stop`"
    )
