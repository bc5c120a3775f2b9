"""Activation and stop: preflight, the lock check, GPU fit, the activation lock, start, abort, stop.

One GPU, one port: activating an entry stops whatever of ours serves on the port and starts the entry's
backend there. Each activation and stop holds the activation lock (:mod:`.lock`), so they never interleave; an
activation takes it before its preflight and publishes its progress at once, so a stop can cancel it in every
phase, the lock check's hashing included (:mod:`.inflight`).

- Crash safety: the launch (launch id, status ``starting``, pid 0) is recorded *before* the spawn and rewritten
  with the pid and create time right after it, so an activator killed at any point leaves a record by which
  the next activation or stop finds and stops the orphan (:mod:`.process`). An exception after the spawn
  (Ctrl-C, a failing progress callback) stops it at once.
- A stop that leaves a process of the launch running raises BackendError (exit 6) naming it; the state is then
  kept so a later stop retries.
- A corrupt state file is never guessed at: with the port free it is removed; with the port held the operator
  gets one line naming the file, the holder and the fix, and nothing is signalled.
- Every activation, stop and failure is an audit-log line and a history row.
"""

from __future__ import annotations

import os
import shlex
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import psutil

from .. import history
from ..audit import current_actor, log_event
from ..errors import ActivationCancelled, ActivationError, BackendError, ImageWorksError, LockViolationError
from ..launch import expand_launch
from ..registry import Registry, load_registry
from ..schema import ModelEntry
from ..settings import Settings
from ..units import format_bytes
from ..upstream import endpoint_for, single_port_endpoint
from . import inflight, process, readiness
from .gpu_fit import check_gpu_fit, wait_gpu_release
from .lock import activation_lock, lock_wait
from .logs import LOG_TAIL_LINES, backend_log_path, open_log, tail
from .process import identify, processes_of, terminate
from .readiness import check_ready, health_client, health_path, port_holder, server_root
from .slot import SlotSettings
from .state import ActiveState, clear_state, read_state_lenient, write_state

Phase = Literal["preflight", "verify", "lock", "gpu", "stopping", "starting", "waiting", "ready", "failed"]
ProgressCallback = Callable[[str, float, str], None]


@dataclass
class StopResult:
    """What a stop did. ``stale``: the state no longer described a process of ours, so nothing was signalled."""

    name: str
    pid: int
    stop_s: float
    signal: str | None
    stopped_pids: list[int]
    stale: bool = False
    stale_reason: str | None = None
    gpu_released: bool | None = None
    warnings: list[str] | None = None
    cancelled: str | None = None
    """The entry whose start this stop cancelled (its processes were stopped by the activation itself)."""

    @property
    def cancelled_only(self) -> bool:
        """The stop cancelled a start and found nothing else running (the start's own processes, if any, were
        stopped by the activation)."""
        return self.cancelled is not None and not self.pid

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


PROGRESS_WRITE_S = 0.5
"""While a backend loads: how often the progress record (:mod:`.inflight`) is rewritten with the latest detail."""


class _Progress:
    """Reports the phases to the caller and, once the activation holds the lock, to every other process (the
    progress record); checks for a cancel request at every call, so a cancel is seen within one health poll or
    one progress report of the lock check's hashing (every 64 MiB read, or 0.1 s of small files)."""

    def __init__(self, settings: Settings, name: str, callback: ProgressCallback | None) -> None:
        self.settings = settings
        self.callback = callback
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.record = inflight.ActivationProgress(
            name=name,
            phase="preflight",
            started_at=datetime.now(UTC),
            updated_at=datetime.now(UTC),
            activated_by=current_actor(settings),
            pid=os.getpid(),
        )
        self.holding = False  # set while the activation lock is held: only then is the record ours to write
        self.written = 0.0

    def __call__(self, phase: Phase, detail: str = "", *, notify: bool = True) -> None:
        """Report ``phase``; ``notify=False`` for a repeat the caller's callback need not see (the hashing's
        byte counts, which the progress record still shows)."""
        if self.holding:
            if phase not in ("ready", "failed"):  # those report an outcome already decided
                self._raise_if_cancelled()
            now = time.monotonic()
            if phase != self.record.phase or now - self.written >= PROGRESS_WRITE_S:
                update = {"phase": phase, "detail": detail, "updated_at": datetime.now(UTC)}
                self.record = self.record.model_copy(update=update)
                inflight.write_progress(self.settings, self.record)
                self.written = now
        if self.callback is not None and notify:
            self.callback(phase, time.monotonic() - self.started, detail)

    def _raise_if_cancelled(self) -> None:
        request = inflight.cancel_request(self.settings, self.started_wall)
        if request is not None:
            who = request.get("actor") or "someone"
            raise ActivationCancelled(
                f"the start of {self.record.name!r} was cancelled by {who} ({request.get('reason') or 'stop'})"
            )

    @contextmanager
    def locked(self) -> Iterator[None]:
        """While the caller holds the activation lock: publish the progress record, and remove it after."""
        self.holding = True
        inflight.write_progress(self.settings, self.record)
        try:
            yield
        finally:
            self.holding = False
            inflight.clear_progress(self.settings)


# Activation ----------------------------------------------------------------------------------------------
def activate(
    settings: Settings,
    name: str,
    *,
    timeout_s: float | None = None,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
    registry: Registry | None = None,
) -> ActiveState:
    """Make ``name`` the backend on the single port and return its ready state.

    ``registry`` is the registry to take the entry from (a long-running server passes its last good one);
    by default the files on disk are loaded.

    Under the activation lock, published as the activation in progress (:mod:`.inflight`) from the start so a
    stop can cancel it in any phase: preflight (launch argv, weights present), lock verification, GPU fit, stop
    the current backend, check the port is free, start, wait until ready. On failure the process group is
    stopped, the state says ``failed`` and an :class:`ActivationError` (exit 6) carries the log tail. A cancel
    raises :class:`ActivationCancelled` (exit 6) after stopping what was started, with ``cancelled`` in history.
    ``on_progress(phase, elapsed_s, detail)`` is called as phases change and on every health poll.
    Activating the entry that is already ready and healthy (same argv) returns its state untouched.

    Only the entry lookup (an unknown name, a backend we do not start) happens before the lock: those answer at
    once, even while another activation runs. A waiter's bounded wait (:func:`.lock.lock_wait`) covers the
    holder's stop and start; a holder's lock check that re-hashes a large entry from scratch can outlast it, and
    the waiter then names the holder.
    """
    progress = _Progress(settings, name, on_progress)
    progress("preflight", f"checking {name!r}")
    entry = (registry or load_registry(settings=settings)).get(name)
    if not entry.is_process_backend:
        where = endpoint_for(entry, settings) if entry.backend else "nowhere (no backend set)"
        raise BackendError(
            f"{entry.name!r} uses backend {entry.backend!r}, which ImageWorks does not start: there is nothing to "
            f"activate; requests go to {where}"
        )
    start_timeout = start_timeout_for(settings, entry, timeout_s)
    progress("lock", "waiting for the activation lock")
    with (
        activation_lock(settings, lock_wait(settings, start_timeout), f"activating {entry.name!r}"),
        progress.locked(),
    ):
        try:
            progress("preflight", "launch argv and weights")
            try:
                argv = expand_launch(entry, settings, require_weights=True)
            except ImageWorksError as exc:
                _fail(settings, entry, f"preflight: {exc.message}")
                _leave_failed(settings, entry, f"preflight: {exc.message}")
                raise
            _check_lock(settings, entry, force, progress, registry)  # a refusal is no failed start: no state
            return _activate_locked(settings, entry, argv, start_timeout, progress)
        except ActivationCancelled as exc:
            _cancelled(settings, entry, exc.message)
            raise


def _activate_locked(
    settings: Settings, entry: ModelEntry, argv: list[str], start_timeout: float, progress: _Progress
) -> ActiveState:
    """The part of :func:`activate` under the activation lock: stop the current backend, start ``entry``."""
    previous, problem = read_state_lenient(settings)
    if problem:
        error = unreadable_state_error(settings, problem)
        if error is not None:
            _fail(settings, entry, error.message)
            raise error
    if _already_active(settings, previous, entry, argv):
        assert previous is not None
        progress("ready", f"{entry.name!r} is already active")
        return previous
    progress("gpu", "checking GPU memory")
    reclaimable = [p.pid for p in processes_of(previous)] if previous else []
    try:
        gpu_note = check_gpu_fit(settings, entry, argv, reclaimable)
    except BackendError as exc:
        _fail(settings, entry, exc.message)
        raise
    progress("gpu", gpu_note)

    stop_s = 0.0
    if previous is not None:
        progress("stopping", f"stopping {previous.name!r} (pid {previous.pid})")
        try:
            stop_s = stop_locked(settings, previous, reason=f"switching to {entry.name!r}").stop_s
        except BackendError as exc:
            _fail(settings, entry, f"could not stop {previous.name!r}: {exc.message}")
            raise
    elif problem:
        progress("stopping", f"ignoring {problem}")
        clear_state(settings)

    holder = port_holder(settings.vllm_host, settings.vllm_port)
    if holder:
        message = (
            f"port {settings.vllm_port} on {settings.vllm_host} is already in use by {holder}; it is not a "
            "backend ImageWorks started, so it was left alone: stop it or set CHAT_PROXY_VLLM_PORT"
        )
        # No failed state: the port is someone else's, and the message says whose.
        _fail(settings, entry, message, stop_s=stop_s)
        raise BackendError(message)
    return _start(settings, entry, argv, start_timeout, stop_s, previous, progress)


def start_timeout_for(settings: Settings, entry: ModelEntry | None, timeout_s: float | None) -> float:
    """The start timeout: the caller's, else the entry's ``startup_timeout_s``, else
    ``CHAT_PROXY_VLLM_START_TIMEOUT_S``."""
    if timeout_s is not None:
        return timeout_s
    if entry is not None and entry.backend_config.startup_timeout_s:
        return entry.backend_config.startup_timeout_s
    return settings.vllm_start_timeout_s


def _check_lock(
    settings: Settings, entry: ModelEntry, force: bool, progress: _Progress, registry: Registry | None = None
) -> None:
    """A locked entry must pass a fast verification; drift refuses (exit 2) unless forced (then audited).

    The hashing reports its progress here: the record shows the bytes re-hashed, and a cancel request aborts the
    verification at its next report (:class:`ActivationCancelled` out of the hashing engine, nothing recorded).
    """
    if not entry.locked:
        return
    progress("verify", "fast verification of the locked weights")
    from .. import verification  # imported here: verification imports the registry, not us

    def hashed(bytes_done: int, bytes_total: int, files_done: int, files_total: int, _path: str) -> None:
        detail = (
            f"fast verification: re-hashed {format_bytes(bytes_done)} of {format_bytes(bytes_total)} "
            f"({files_done}/{files_total} changed files)"
        )
        progress("verify", detail, notify=False)

    result = verification.verify_entry(settings, entry.name, fast=True, progress=hashed, registry=registry)
    if result.result in ("ok", "unlocked"):
        return
    detail = result.result
    if result.aggregate and result.expected:
        detail += f": aggregate {result.aggregate} != expected {result.expected}"
    if not force:
        log_event(settings, "activation_failed", name=entry.name, reason="lock_violation", verify_result=result.result)
        why = f"locked weights failed verification: {result.result}"
        _history_row(settings, entry.name, "activate", "refused", why)
        raise LockViolationError(
            f"{entry.name!r} is locked and its weights failed fast verification ({detail}); "
            f"inspect with `imageworks-models verify {shlex.quote(entry.name)}{_on_node(settings)}`, or pass --force to "
            "activate anyway "
            "(recorded as a lock violation)",
            report=result,
        )
    log_event(settings, "lock_violation", name=entry.name, action="activate", forced=True, verify_result=result.result)


def _on_node(settings: Settings) -> str:
    """`` --node N`` when ``settings`` are a fleet slot's (the copy that failed is that node's), else nothing."""
    return f" --node {shlex.quote(settings.node_name)}" if isinstance(settings, SlotSettings) and settings.node_name else ""


def _fail(settings: Settings, entry: ModelEntry, reason: str, *, pid: int | None = None, **fields: Any) -> None:
    log_event(settings, "activation_failed", name=entry.name, reason=reason, pid=pid, **fields)
    stop_s = fields.get("stop_s")
    _history_row(settings, entry.name, "activate", "failed", reason, pid=pid, start_to_ready_s=None, stop_s=stop_s)


def _new_state(
    settings: Settings,
    entry: ModelEntry,
    argv: list[str],
    status: Literal["starting", "failed"],
    *,
    launch_id: str | None = None,
    log_path: Path | None = None,
    **fields: Any,
) -> ActiveState:
    """A fresh state for ``entry`` on the single port (pid 0: nothing spawned yet)."""
    return ActiveState(
        name=entry.name,
        served_model_id=entry.effective_served_id,
        pid=0,
        create_time=0.0,
        pgid=0,
        launch_id=launch_id,
        host=settings.vllm_host,
        port=settings.vllm_port,
        base_url=single_port_endpoint(settings),
        argv=argv,
        started_at=datetime.now(UTC),
        status=status,
        log_path=str(log_path or backend_log_path(settings, entry.name)),
        activated_by=current_actor(settings),
        **fields,
    )


def _leave_failed(settings: Settings, entry: ModelEntry, reason: str) -> None:
    """Record a start that failed in preflight (missing weights, a bad launch template) as a ``failed`` state,
    saying why, until the next start or stop; unless the state describes a backend of ours that still runs (that
    record must not be lost). The caller holds the activation lock.

    Refusals (a lock violation, the GPU fit, a stranger on the port) change nothing on the port and leave the
    state as it was; their audit line and history row say why.
    """
    current, problem = read_state_lenient(settings)
    if problem or (current is not None and current.status != "failed"):
        return
    write_state(settings, _new_state(settings, entry, [], "failed", error=reason))


def _history_row(settings: Settings, name: str, action: str, result: str, detail: str | None, **columns: Any) -> None:
    """The history row of an activation (refused, failed, ready) or of a stop, with the actor who asked."""
    history.record_activation(
        settings,
        name=name,
        action=action,
        result=result,
        actor=current_actor(settings),
        detail=detail,
        **columns,
    )


def _already_active(settings: Settings, state: ActiveState | None, entry: ModelEntry, argv: list[str]) -> bool:
    if state is None or state.name != entry.name or state.argv != argv or state.status != "ready":
        return False
    if identify(state)[0] is None:
        return False
    with health_client(entry) as client:
        ready, _detail = check_ready(
            client, server_root(state.host, state.port), health_path(settings, entry), state.served_model_id
        )
    return ready


def _start(
    settings: Settings,
    entry: ModelEntry,
    argv: list[str],
    start_timeout: float,
    stop_s: float,
    previous: ActiveState | None,
    progress: _Progress,
) -> ActiveState:
    progress("starting", " ".join(argv))
    log_path, log_handle = open_log(settings, entry, argv)
    # Recorded before the spawn: whenever this process dies from here on, the next stop or activation finds
    # the backend (and all it started) by the launch id in its environment.
    state = _new_state(settings, entry, argv, "starting", launch_id=uuid.uuid4().hex, log_path=log_path)
    try:
        write_state(settings, state)
        spawned_at = time.monotonic()
        try:
            proc = process.spawn(settings, entry, argv, state.launch_id or "", log_handle)
        except OSError as exc:
            message = f"cannot start {entry.name!r}: {argv[0]!r}: {exc.strerror or exc}; is it installed and on PATH?"
            log_handle.write(f"# {history.now_iso()} imageworks: {message}\n".encode())
            log_handle.flush()
            # Nothing was started; the failed state says why until the next start or stop.
            failed = {"status": "failed", "error": message, "log_tail": tail(log_path, LOG_TAIL_LINES)}
            write_state(settings, state.model_copy(update=failed))
            _fail(settings, entry, message, stop_s=stop_s)
            raise BackendError(message) from exc
    finally:
        log_handle.close()
    # start_new_session: the backend leads its own session and process group.
    state = state.model_copy(update={"pid": proc.pid, "pgid": proc.pid})
    try:
        state = state.model_copy(update={"create_time": psutil.Process(proc.pid).create_time()})
        write_state(settings, state)
        failure = readiness.wait_ready(
            proc,
            entry,
            server_root(state.host, state.port),
            health_path(settings, entry),
            start_timeout,
            lambda detail: progress("waiting", detail),
            started=spawned_at,
        )
    except ActivationCancelled:
        _stop_cancelled(settings, state)
        raise
    except BaseException as exc:  # Ctrl-C or a failing progress callback: never leave a half-started backend
        _abort(settings, state, entry, f"activation interrupted ({type(exc).__name__})", stop_s)
        raise
    if failure:
        progress("failed", failure)
        _abort(settings, state, entry, failure, stop_s)
        raise ActivationError(failure, name=entry.name, log_path=log_path, log_tail=tail(log_path, LOG_TAIL_LINES))

    start_to_ready_s = round(time.monotonic() - spawned_at, 3)
    ready = {"status": "ready", "ready_at": datetime.now(UTC), "children": process.descendants(proc.pid)}
    state = state.model_copy(update=ready)
    write_state(settings, state)
    log_event(
        settings,
        "activation",
        name=entry.name,
        served_model_id=state.served_model_id,
        pid=state.pid,
        base_url=state.base_url,
        previous=previous.name if previous else None,
        stop_s=stop_s,
        start_to_ready_s=start_to_ready_s,
    )
    note = f"previous: {previous.name}" if previous else None
    _history_row(
        settings, entry.name, "activate", "ready", note, stop_s=stop_s, start_to_ready_s=start_to_ready_s, pid=state.pid
    )
    progress("ready", f"{entry.name!r} ready at {state.base_url} in {start_to_ready_s:.2f}s")
    return state


def _stop_cancelled(settings: Settings, state: ActiveState) -> None:
    """Stop the process group of a cancelled start and clear the state (kept, saying why, if a process survives)."""
    try:
        terminate(state, settings.vllm_stop_timeout_s)
    except BackendError as exc:
        write_state(settings, state.model_copy(update={"status": "failed", "error": exc.message}))
        raise
    clear_state(settings)


def _cancelled(settings: Settings, entry: ModelEntry, reason: str) -> None:
    """The audit line and history row of a cancelled start (its backend, if spawned, is stopped already)."""
    log_event(settings, "activation_cancelled", name=entry.name, reason=reason)
    _history_row(settings, entry.name, "activate", "cancelled", reason)


def _abort(settings: Settings, state: ActiveState, entry: ModelEntry, reason: str, stop_s: float) -> None:
    """Stop a backend that did not become ready and leave the state saying ``failed`` with the reason."""
    try:
        terminate(state, settings.vllm_stop_timeout_s)
    finally:
        failed = {"status": "failed", "error": reason, "log_tail": tail(Path(state.log_path), LOG_TAIL_LINES)}
        write_state(settings, state.model_copy(update=failed))
        _fail(settings, entry, reason, pid=state.pid, stop_s=stop_s, log_path=state.log_path)


# Stop ----------------------------------------------------------------------------------------------------
def stop(settings: Settings, *, reason: str = "", lock_timeout_s: float | None = None) -> StopResult | None:
    """Stop the active backend and clear the state. Idempotent: None when nothing was recorded nor starting.

    An activation in progress is cancelled first (:mod:`.inflight`): it stops what it started within one health
    poll and releases the lock; then whatever the state still records is stopped. An unreadable state file is removed when the
    port is free, and is a BackendError naming the file, the port holder and the fix when it is not.
    """
    wait_s = lock_timeout_s if lock_timeout_s is not None else lock_wait(settings, None)
    started = time.monotonic()
    starting = inflight.read_progress(settings)
    if starting is not None:
        inflight.request_cancel(settings, actor=current_actor(settings), reason=reason or "stop requested")
    try:
        with activation_lock(settings, wait_s, "stopping"):
            state, problem = read_state_lenient(settings)
            cancelled = starting.name if starting is not None else None
            if state is None:
                if problem:
                    error = unreadable_state_error(settings, problem)
                    if error is not None:
                        log_event(settings, "stop", name=None, result="failed", reason=reason, error=error.message)
                        raise error
                    clear_state(settings)
                    log_event(settings, "stop", name=None, result="stale", reason=reason, stale_reason=problem)
                if cancelled is None:
                    return None
                stop_s = round(time.monotonic() - started, 3)
                return StopResult(cancelled, 0, stop_s, None, [], cancelled=cancelled)
            result = stop_locked(settings, state, reason=reason or "stop requested")
            result.cancelled = cancelled
            return result
    finally:
        if starting is not None:
            inflight.clear_cancel(settings)


def stop_locked(settings: Settings, state: ActiveState, *, reason: str) -> StopResult:
    """Stop the recorded backend (the caller holds the activation lock), clear the state, log and record it.

    If a process of the launch survives, BackendError (exit 6) names it and the state is kept for a retry.
    """
    started = time.monotonic()
    leader, why = identify(state)
    leader_gone = leader is None and state.status != "failed"
    try:
        sig, pids = terminate(state, settings.vllm_stop_timeout_s)
    except BackendError as exc:
        record_stop(settings, state, "failed", f"{reason}; {exc.message}", reason=reason, error=exc.message)
        raise
    stop_s = round(time.monotonic() - started, 3)
    gpu_released, warning = wait_gpu_release(pids) if pids else (None, None)
    clear_state(settings)
    stale = leader_gone and not pids  # the state described nothing of ours: nothing was signalled
    result = StopResult(
        name=state.name,
        pid=state.pid,
        stop_s=stop_s,
        signal=sig,
        stopped_pids=pids,
        stale=stale,
        stale_reason=why if leader_gone else None,
        gpu_released=gpu_released,
        warnings=[warning] if warning else [],
    )
    if not pids:
        outcome = "stale" if stale else "cleared"
    else:
        outcome = "killed" if sig == "SIGKILL" else "stopped"
    left = f"{why}; stopped what its launch left running" if leader_gone and pids else why if leader_gone else ""
    record_stop(
        settings,
        state,
        outcome,
        "; ".join(x for x in (reason, left, warning or "") if x),
        signal=sig,
        stopped_pids=pids,
        stop_s=stop_s,
        reason=reason,
        stale_reason=result.stale_reason,
        gpu_released=gpu_released,
    )
    return result


def record_stop(settings: Settings, state: ActiveState, outcome: str, detail: str, **fields: Any) -> None:
    """The audit line and history row of a stop (also of a stale state removed without a stop)."""
    log_event(settings, "stop", name=state.name, pid=state.pid or None, result=outcome, **fields)
    _history_row(
        settings, state.name, "stop", outcome, detail or None, stop_s=fields.get("stop_s"), pid=state.pid or None
    )


def unreadable_state_error(settings: Settings, problem: str) -> BackendError | None:
    """None when nothing holds the port (the unreadable file may go); else the one-line error for the operator.

    An unreadable file proves nothing about which process is ours, so nothing is ever signalled on its account.
    """
    holder = port_holder(settings.vllm_host, settings.vllm_port)
    if holder is None:
        return None
    pid = holder.split(" ", 2)[1] if holder.startswith("pid ") else "PID"
    return BackendError(
        f"{problem}; port {settings.vllm_port} on {settings.vllm_host} is held by {holder}, which may be the "
        f"backend it recorded, so nothing was signalled: if it is, stop it (`kill {pid}`), then delete "
        f"{settings.active_state_path}"
    )
