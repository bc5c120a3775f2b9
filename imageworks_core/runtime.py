"""The single-port runtime: the one module that starts, watches and stops backend processes.

One GPU, one port. Activating an entry stops whatever serves on the port and starts the entry's backend there;
``_staging/active_vllm.json`` (an :class:`ActiveState`, written atomically) says what runs. Guarantees:

- Activations never interleave: each holds ``_staging/active_vllm.lock`` (bounded wait).
- A backend is "ready" only when its health path answers 200 *and* ``/v1/models`` lists the entry's served id,
  so a stranger on the port is never taken for ours.
- We only ever signal a process proven to be ours. Every launch gets a random launch id, recorded in the state
  and set as ``IMAGEWORKS_LAUNCH_ID`` in the backend's environment (inherited by everything it starts). Proof is
  one of: the leader's pid *with* its recorded create time; a descendant of that verified leader; a member of
  the verified leader's own process group; a descendant recorded (pid + create time) when the backend became
  ready; any process created after the leader whose environment carries the launch id (children that left the
  group or session by double fork or ``setsid`` are found this way). The recorded ``pgid`` is informational and
  never used to choose what to signal: after a reboot, pid reuse or a hand edit it may name anybody's group.
  Signals go to single processes through psutil, which re-checks the create time, never to a whole group.
- Adversary not covered: a process of the same user that copies our launch id into its environment on purpose,
  and a child of a *dead* leader that both cleared its environment and was not yet recorded; the latter is left
  running (the port check then names it) rather than guessed at.
- Read-only paths (:func:`read_state`, :func:`current`, :func:`is_serving`, so ``current-model``, ``GET
  /v1/active`` and a dashboard refresh) never signal. A dead leader whose launch left processes running is
  reported as ``failed`` with their pids (``leftover_pids``) until ``activate-model --stop`` or the next
  activation stops them; a state with nothing of ours left is removed as ``stale``.
- Stopping sends SIGTERM to every process of the launch, SIGKILL after ``CHAT_PROXY_VLLM_STOP_TIMEOUT_S``,
  rescans for processes forked meanwhile, and raises :class:`BackendError` (exit 6) naming every pid still
  running; the state is then kept so a later stop retries.
- Crash safety: the launch (launch id, status ``starting``, pid 0) is recorded *before* the spawn and rewritten
  with the pid and create time right after it, so an activator killed at any point leaves a record by which
  the next activation or stop finds and stops the orphan. An exception after the spawn stops it at once.
- A corrupt state file is never guessed at: with the port free it is removed; with the port held the operator
  gets one line naming the file, the holder and the fix, and nothing is signalled.
- Every activation, stop and failure is an audit-log line and a history row.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import filelock
import httpx
import psutil
from pydantic import BaseModel, ConfigDict, Field

from . import gpu, history
from .audit import current_actor, log_event
from .errors import ActivationError, BackendError, ImageWorksError, LockViolationError
from .launch import expand_launch
from .registry import Registry, load_registry
from .registry_file import atomic_write_text
from .schema import ModelEntry
from .selection import endpoint_for, single_port_endpoint
from .settings import Settings, slugify

HEALTH_POLL_INTERVAL_S = 0.25
"""How often a starting backend's health is polled."""
HEALTH_REQUEST_TIMEOUT_S = 2.0
"""One health or /v1/models request; a backend busy loading may answer slowly."""
KILL_WAIT_S = 5.0
"""After SIGKILL: how long the kernel gets to reap the processes before we call the stop failed."""
GPU_RELEASE_TIMEOUT_S = 10.0
"""After a stop: how long to wait for the driver to release the stopped processes' GPU memory."""
GPU_RELEASE_POLL_S = 0.25
LOG_TAIL_LINES = 30
CREATE_TIME_TOLERANCE_S = 0.05
"""psutil create times have clock-tick (10 ms) resolution; a reused pid differs by far more."""
ACTIVATION_LOCK_MARGIN_S = 10.0
"""Extra lock wait beyond the holder's worst case (its stop plus its start timeout)."""
LAUNCH_ID_ENV = "IMAGEWORKS_LAUNCH_ID"
"""Set in every backend's environment to its launch id: how a process that left the group is known as ours."""
KILL_RESCAN_ROUNDS = 3
"""After SIGKILL: how many times to rescan for processes forked meanwhile before calling the stop failed."""

Phase = Literal["preflight", "verify", "lock", "gpu", "stopping", "starting", "waiting", "ready", "failed"]
ProgressCallback = Callable[[str, float, str], None]

# Backends started by this process, by pid: kept so they can be reaped (no zombies in a long-lived server).
_spawned: dict[int, subprocess.Popen[bytes]] = {}
_spawned_guard = threading.Lock()


class ActiveState(BaseModel):
    """The content of ``_staging/active_vllm.json``: what we started on the single port."""

    model_config = ConfigDict(extra="ignore")

    name: str
    served_model_id: str
    pid: int = Field(description="the backend's leader; 0 while it is being spawned (not yet known)")
    create_time: float = Field(description="psutil create time of pid: proves the pid is still our process")
    pgid: int = Field(description="informational (the leader's own group); never used to choose whom to signal")
    launch_id: str | None = Field(
        default=None,
        description=f"random id set as {LAUNCH_ID_ENV} in the backend's environment; None in pre-marker states",
    )
    children: list[tuple[int, float]] = Field(
        default_factory=list, description="(pid, create time) of the leader's descendants when it became ready"
    )
    host: str
    port: int
    base_url: str = Field(description="OpenAI-compatible base URL (…/v1)")
    argv: list[str]
    started_at: datetime
    status: Literal["starting", "ready", "failed"]
    ready_at: datetime | None = None
    log_path: str
    activated_by: str | None = None
    error: str | None = Field(default=None, description="why the activation failed (status 'failed')")


class ActiveStatus(BaseModel):
    """What ``current-model`` reports: the state plus liveness, health, uptime and GPU figures."""

    name: str
    served_model_id: str
    base_url: str
    status: Literal["starting", "ready", "failed", "stale"]
    pid: int
    pgid: int
    alive: bool = Field(description="pid is running and has the recorded create time")
    healthy: bool | None = Field(default=None, description="None when not checked")
    health_detail: str = ""
    uptime_s: float | None = None
    started_at: datetime
    ready_at: datetime | None = None
    log_path: str
    stale_reason: str | None = Field(default=None, description="why the state was stale (it has been cleaned)")
    error: str | None = None
    leftover_pids: list[int] = Field(
        default_factory=list, description="processes of this launch still running although its leader is gone"
    )
    gpus: list[dict[str, Any]] = Field(default_factory=list)
    gpu_memory_bytes: int | None = Field(default=None, description="GPU memory held by the backend's processes")
    gpu_note: str | None = Field(default=None, description="why GPU figures are missing")
    state: ActiveState


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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# The state file ------------------------------------------------------------------------------------------
def read_state(settings: Settings) -> ActiveState | None:
    """The recorded active backend, or None. Raises BackendError when the file exists but is unreadable."""
    path = settings.active_state_path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return ActiveState.model_validate_json(text)
    except ValueError as exc:
        raise BackendError(f"{path}: unreadable state file ({str(exc).splitlines()[0]})") from exc


def _write_state(settings: Settings, state: ActiveState) -> None:
    atomic_write_text(settings.active_state_path, state.model_dump_json(indent=2) + "\n")


def _clear_state(settings: Settings) -> None:
    settings.active_state_path.unlink(missing_ok=True)


def _read_state_lenient(settings: Settings) -> tuple[ActiveState | None, str | None]:
    """(state, problem): an unreadable file is reported as a problem instead of raised."""
    try:
        return read_state(settings), None
    except BackendError as exc:
        return None, exc.message


# Process identity ----------------------------------------------------------------------------------------
def _reap(pid: int) -> None:
    """Collect the exit status of a backend this process started (a zombie otherwise)."""
    with _spawned_guard:
        popen = _spawned.get(pid)
    if popen is not None and popen.poll() is not None:
        with _spawned_guard:
            _spawned.pop(pid, None)


def _live(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _identify(state: ActiveState) -> tuple[psutil.Process | None, str]:
    """(the recorded process, '') when the pid is alive with the recorded create time, else (None, why not)."""
    if state.pid <= 0:
        return None, "no backend pid was recorded (the activation stopped while spawning it)"
    _reap(state.pid)
    try:
        proc = psutil.Process(state.pid)
        created = proc.create_time()
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None, f"pid {state.pid} has exited"
    except psutil.NoSuchProcess:
        return None, f"pid {state.pid} is not running"
    if abs(created - state.create_time) > CREATE_TIME_TOLERANCE_S:
        try:
            what = f" ({proc.name()})"
        except psutil.Error:
            what = ""
        started = datetime.fromtimestamp(created, UTC).isoformat(timespec="seconds")
        return None, (
            f"pid {state.pid} now belongs to another process{what} started {started}, not the backend we "
            f"started at {datetime.fromtimestamp(state.create_time, UTC).isoformat(timespec='seconds')}"
        )
    return proc, ""


@dataclass(frozen=True)
class _Proof:
    """What proves a process belongs to one launch; taken once per stop so every rescan applies the same proof."""

    leader: psutil.Process | None
    group: int | None  # the verified leader's own process group, None once the leader is gone
    launch_id: str | None
    born_after: float  # every process of the launch was created after its leader
    children: tuple[tuple[int, float], ...]


def _proof(state: ActiveState) -> _Proof:
    leader, _why = _identify(state)
    group = None
    if leader is not None:
        try:
            # The recorded pgid is not trusted: the group counts only while the verified leader leads it.
            group = leader.pid if os.getpgid(leader.pid) == leader.pid else None
        except OSError:
            group = None
    created = leader.create_time() if leader is not None else (state.create_time if state.pid > 0 else 0.0)
    return _Proof(
        leader=leader,
        group=group,
        launch_id=state.launch_id,
        born_after=created - CREATE_TIME_TOLERANCE_S,
        children=tuple((int(pid), float(ct)) for pid, ct in state.children),
    )


def _find(proof: _Proof) -> list[psutil.Process]:
    """Every live process ``proof`` shows to be ours (see the module docstring). Reads /proc, signals nothing."""
    found: dict[int, psutil.Process] = {}
    if proof.leader is not None and _live(proof.leader):
        found[proof.leader.pid] = proof.leader
        try:
            found.update({p.pid: p for p in proof.leader.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for pid, created in proof.children:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) <= CREATE_TIME_TOLERANCE_S:
                found.setdefault(pid, proc)
        except psutil.NoSuchProcess:
            continue
    if proof.group is not None or proof.launch_id:
        own = os.getpid()
        for proc in psutil.process_iter():
            if proc.pid in found or proc.pid == own:
                continue
            try:
                if proc.create_time() < proof.born_after:
                    continue
                if proof.group is not None and os.getpgid(proc.pid) == proof.group:
                    found[proc.pid] = proc
                elif proof.launch_id and proc.environ().get(LAUNCH_ID_ENV) == proof.launch_id:
                    found[proc.pid] = proc
            except (psutil.Error, OSError):
                continue  # gone, or another user's process (whose environment we cannot read)
    return [proc for proc in found.values() if _live(proc)]


def _processes_of(state: ActiveState) -> list[psutil.Process]:
    """Every live process proven to belong to the launch ``state`` records."""
    return _find(_proof(state))


def _send_signal(proc: psutil.Process, sig: signal.Signals) -> None:
    """Signal one process; psutil re-checks its create time first, so a reused pid is never hit."""
    proc.send_signal(sig)


def _signal_all(procs: list[psutil.Process], sig: signal.Signals) -> set[int]:
    """Signal each process; returns the pids the kernel refused to signal (another user's)."""
    refused = set()
    for proc in procs:
        try:
            _send_signal(proc, sig)
        except psutil.AccessDenied:
            refused.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return refused


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited (reaping our own children); returns those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if _live(p)]
    while alive:
        for proc in alive:
            _reap(proc.pid)
        _gone, alive = psutil.wait_procs(alive, timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        alive = [p for p in alive if _live(p)]
        if time.monotonic() >= deadline:
            break
    return alive


def _terminate(state: ActiveState, stop_timeout_s: float) -> tuple[str | None, list[int]]:
    """SIGTERM every process of the launch, SIGKILL what is left after the timeout. Returns (last signal, pids).

    Raises BackendError naming every pid still running after SIGKILL (and rescans for processes forked meanwhile).
    """
    proof = _proof(state)
    procs = _find(proof)
    if not procs:
        return None, []
    pids = {p.pid for p in procs}
    refused = _signal_all(procs, signal.SIGTERM)
    alive = _wait_gone(procs, stop_timeout_s)
    # A process forked while we waited carries the marker (or sits in the leader's group) too.
    alive += [p for p in _find(proof) if p.pid not in {a.pid for a in alive}]
    if not alive:
        for pid in pids:
            _reap(pid)
        return "SIGTERM", sorted(pids)
    for _round in range(KILL_RESCAN_ROUNDS):
        pids |= {p.pid for p in alive}
        refused |= _signal_all(alive, signal.SIGKILL)
        alive = _wait_gone(alive, KILL_WAIT_S)
        late = [p for p in _find(proof) if p.pid not in {a.pid for a in alive}]
        if not late:
            break
        alive += late
    for pid in pids:
        _reap(pid)
    survivors = sorted(p.pid for p in alive if _live(p))
    if survivors:
        denied = sorted(refused & set(survivors))
        why = f"; the kernel refused to signal pid(s) {', '.join(map(str, denied))} (another user's?)" if denied else ""
        listed = ",".join(map(str, survivors))
        raise BackendError(
            f"could not stop {state.name!r}: pid(s) {', '.join(map(str, survivors))} of its launch are still "
            f"running after SIGKILL{why}; the state is kept so `imageworks-models activate-model --stop` can "
            f"retry: check `ps -o pid,user,stat,cmd -p {listed}` (stuck in the kernel, e.g. on a GPU driver call?)"
        )
    return "SIGKILL", sorted(pids)


# GPU -----------------------------------------------------------------------------------------------------
def _cuda_devices(entry: ModelEntry) -> list[int] | None:
    """GPU indexes the backend may use per CUDA_VISIBLE_DEVICES (entry env first), None when unrestricted."""
    value = entry.backend_config.env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
    if value is None or not value.strip():
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        return None  # GPU UUIDs: cannot map to NVML indexes cheaply, check every GPU


def _tensor_parallel(argv: list[str]) -> int:
    for flag in ("--tensor-parallel-size", "-tp"):
        if flag in argv[:-1]:
            try:
                return max(1, int(argv[argv.index(flag) + 1]))
            except ValueError:
                return 1
        prefix = flag + "="
        for arg in argv:
            if arg.startswith(prefix) and arg[len(prefix) :].isdigit():
                return max(1, int(arg[len(prefix) :]))
    return 1


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_gpu_fit(
    settings: Settings, entry: ModelEntry, argv: list[str], reclaimable_pids: list[int] | tuple[int, ...] = ()
) -> str:
    """Refuse (BackendError) when the weights x ``IMAGEWORKS_GPU_OVERHEAD_FACTOR`` cannot fit in free GPU memory.

    Memory held by ``reclaimable_pids`` (the backend about to be stopped) counts as free. Returns a note for the
    operator; without NVML the check is skipped and the note says so.
    """
    try:
        gpus = gpu.query_gpus()
    except gpu.GpuUnavailable as exc:
        return f"GPU check skipped: {exc.message}"
    if settings.gpu_overhead_factor <= 0:
        return "GPU check disabled (IMAGEWORKS_GPU_OVERHEAD_FACTOR <= 0)"
    devices = _cuda_devices(entry)
    if devices is not None:
        gpus = [g for g in gpus if g.index in devices] or gpus
    weights = gpu.weights_size_bytes(settings.resolve_path(entry.download_path or ""))
    needed = int(weights * settings.gpu_overhead_factor)
    spread = _tensor_parallel(argv)
    free = gpu.free_bytes_for(gpus, spread, reclaimable_pids)
    where = ", ".join(f"GPU {g.index} {g.name}" for g in gpus)
    if needed > free:
        raise BackendError(
            f"{entry.name!r} needs about {_gib(needed)} of GPU memory (weights {_gib(weights)} x overhead "
            f"{settings.gpu_overhead_factor:g}) but only {_gib(free)} is free on {spread} GPU(s) ({where}); "
            "stop other GPU users, or adjust IMAGEWORKS_GPU_OVERHEAD_FACTOR if the estimate is wrong"
        )
    return f"GPU fit: needs about {_gib(needed)}, {_gib(free)} free ({where})"


def _gpu_pids_present(pids: set[int]) -> bool | None:
    """Whether any of ``pids`` still holds GPU memory; None without NVML."""
    try:
        gpus = gpu.query_gpus()
    except gpu.GpuUnavailable:
        return None
    return any(p.pid in pids for g in gpus for p in g.processes)


def _wait_gpu_release(pids: list[int]) -> tuple[bool | None, str | None]:
    held = _gpu_pids_present(set(pids))
    if held is None:
        return None, None
    deadline = time.monotonic() + GPU_RELEASE_TIMEOUT_S
    while held and time.monotonic() < deadline:
        time.sleep(GPU_RELEASE_POLL_S)
        held = _gpu_pids_present(set(pids))
    if held:
        return False, (
            f"GPU memory of pid(s) {', '.join(map(str, pids))} was not released within {GPU_RELEASE_TIMEOUT_S:g}s; "
            "check `nvidia-smi` before starting another model"
        )
    return True, None


# Locking -------------------------------------------------------------------------------------------------
@contextmanager
def _activation_lock(settings: Settings, wait_s: float, purpose: str) -> Iterator[None]:
    """Hold the activation lock; the lock file names the holder so a waiter can say who it waited for."""
    path = settings.activation_lock_path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=wait_s)
    except filelock.Timeout as exc:
        try:
            holder = path.read_text(encoding="utf-8").strip() or "pid unknown"
        except OSError:
            holder = "pid unknown"
        raise BackendError(
            f"another activation ({holder}) is in progress; gave up waiting after {wait_s:g}s "
            "(see `imageworks-models current-model`)"
        ) from exc
    try:
        _write_holder(path, f"pid {os.getpid()}: {purpose} since {history.now_iso()}")
        yield
    finally:
        _write_holder(path, "")
        lock.release()


def _write_holder(path: Path, text: str) -> None:
    # The lock's content is informational (the flock is what locks); written in place, same inode.
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# Health --------------------------------------------------------------------------------------------------
def _connect_host(host: str) -> str:
    """Where to connect to reach a server bound to ``host`` (a wildcard bind is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _server_root(host: str, port: int) -> str:
    host = _connect_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _health_path(settings: Settings, entry: ModelEntry | None) -> str:
    path = (entry.backend_config.health_path if entry else None) or settings.vllm_health_path or "/health"
    return path if path.startswith("/") else "/" + path


def check_ready(client: httpx.Client, root: str, health_path: str, served_id: str) -> tuple[bool, str]:
    """(ready, detail): health answers 200 (a 404 health path falls back to /v1/models) and /v1/models lists
    ``served_id``."""
    try:
        if health_path != "/v1/models":
            health = client.get(root + health_path)
            if health.status_code != 200 and health.status_code != 404:
                return False, f"{health_path} answered {health.status_code}"
        models = client.get(root + "/v1/models")
        if models.status_code != 200:
            return False, f"/v1/models answered {models.status_code}"
        ids = [str(m.get("id")) for m in models.json().get("data", []) if isinstance(m, dict)]
    except httpx.ConnectError:
        return False, "not listening yet"
    except httpx.TimeoutException:
        return False, "health request timed out"
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return False, f"bad answer: {type(exc).__name__}: {exc}"
    if served_id not in ids:
        return False, f"/v1/models lists {ids}, not {served_id!r}"
    return True, "healthy"


# Ports ---------------------------------------------------------------------------------------------------
def port_holder(host: str, port: int) -> str | None:
    """None when nothing accepts connections on host:port, else who holds it (pid and command when visible)."""
    try:
        with socket.create_connection((_connect_host(host), port), timeout=0.5):
            pass
    except OSError:
        return None
    try:
        listeners = [
            c
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        ]
    except (psutil.AccessDenied, PermissionError):
        listeners = []
    for conn in listeners:
        try:
            proc = psutil.Process(conn.pid)
            command = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            command = "?"
        return f"pid {conn.pid} ({command[:160]})"
    return f"a process this user cannot see (try `ss -ltnp 'sport = :{port}'` as root)"


# Logs ----------------------------------------------------------------------------------------------------
def backend_log_path(settings: Settings, name: str) -> Path:
    """``logs/backends/<slug>.log``: stdout and stderr of the entry's latest backend."""
    return settings.backend_logs_dir / f"{slugify(name)}.log"


def tail_backend_log(settings: Settings, name: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of the entry's backend log ([] when there is none)."""
    return _tail(backend_log_path(settings, name), lines)


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:] if lines > 0 else []


def _open_log(settings: Settings, entry: ModelEntry, argv: list[str]) -> tuple[Path, Any]:
    """A fresh log for this start; the previous one is kept as ``.log.1``."""
    path = backend_log_path(settings, entry.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        os.replace(path, path.with_name(path.name + ".1"))
    handle = path.open("ab")
    handle.write(f"# {history.now_iso()} imageworks: starting {entry.name!r}: {argv}\n".encode())
    handle.flush()
    return path, handle


# Stop ----------------------------------------------------------------------------------------------------
def _record_stop(settings: Settings, state: ActiveState, outcome: str, detail: str, **fields: Any) -> None:
    """The audit line and history row of a stop (also of a stale state removed without a stop)."""
    log_event(settings, "stop", name=state.name, pid=state.pid or None, result=outcome, **fields)
    history.record_activation(
        settings,
        name=state.name,
        action="stop",
        result=outcome,
        actor=current_actor(settings),
        stop_s=fields.get("stop_s"),
        pid=state.pid or None,
        detail=detail or None,
    )


def _stop_locked(settings: Settings, state: ActiveState, *, reason: str) -> StopResult:
    """Stop the recorded backend (the caller holds the activation lock), clear the state, log and record it.

    If a process of the launch survives, BackendError (exit 6) names it and the state is kept for a retry.
    """
    started = time.monotonic()
    leader, why = _identify(state)
    leader_gone = leader is None and state.status != "failed"
    try:
        sig, pids = _terminate(state, settings.vllm_stop_timeout_s)
    except BackendError as exc:
        _record_stop(settings, state, "failed", f"{reason}; {exc.message}", reason=reason, error=exc.message)
        raise
    stop_s = round(time.monotonic() - started, 3)
    gpu_released, warning = _wait_gpu_release(pids) if pids else (None, None)
    _clear_state(settings)
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
    _record_stop(
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


def _unreadable_state_error(settings: Settings, problem: str) -> BackendError | None:
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


def stop(settings: Settings, *, reason: str = "", lock_timeout_s: float | None = None) -> StopResult | None:
    """Stop the active backend and clear the state. Idempotent: None when nothing was recorded.

    Waits (bounded) for an activation in progress to finish first. An unreadable state file is removed when the
    port is free, and is a BackendError naming the file, the port holder and the fix when it is not.
    """
    wait_s = lock_timeout_s if lock_timeout_s is not None else _lock_wait(settings, None)
    with _activation_lock(settings, wait_s, "stopping"):
        state, problem = _read_state_lenient(settings)
        if state is None:
            if problem:
                error = _unreadable_state_error(settings, problem)
                if error is not None:
                    log_event(settings, "stop", name=None, result="failed", reason=reason, error=error.message)
                    raise error
                _clear_state(settings)
                log_event(settings, "stop", name=None, result="stale", reason=reason, stale_reason=problem)
            return None
        return _stop_locked(settings, state, reason=reason or "stop requested")


# Activation ----------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.started = time.monotonic()

    def __call__(self, phase: Phase, detail: str = "") -> None:
        if self.callback is not None:
            self.callback(phase, time.monotonic() - self.started, detail)


def _start_timeout(settings: Settings, entry: ModelEntry | None, timeout_s: float | None) -> float:
    if timeout_s is not None:
        return timeout_s
    if entry is not None and entry.backend_config.startup_timeout_s:
        return entry.backend_config.startup_timeout_s
    return settings.vllm_start_timeout_s


def _lock_wait(settings: Settings, start_timeout_s: float | None) -> float:
    """Long enough for one other activation to stop its predecessor and start (the worst case we wait for)."""
    start = max(start_timeout_s or 0.0, settings.vllm_start_timeout_s)
    return start + settings.vllm_stop_timeout_s + KILL_WAIT_S + ACTIVATION_LOCK_MARGIN_S


def _backend_env(settings: Settings, entry: ModelEntry, launch_id: str) -> dict[str, str]:
    env = {**os.environ, **entry.backend_config.env, LAUNCH_ID_ENV: launch_id}
    # Python backends should flush their logs line by line, so a crash's last words reach the log.
    env.setdefault("PYTHONUNBUFFERED", "1")
    for alias, value, _source in settings.env_sources():
        if alias.startswith("CHAT_PROXY_VLLM_") and value != "":
            env[alias] = value
    return env


def _check_lock(
    settings: Settings, entry: ModelEntry, force: bool, progress: _Progress, registry: Registry | None = None
) -> None:
    """A locked entry must pass a fast verification; drift refuses (exit 2) unless forced (then audited)."""
    if not entry.locked:
        return
    progress("verify", "fast verification of the locked weights")
    from .verification import verify_entry  # imported here: verification imports the registry, not us

    result = verify_entry(settings, entry.name, fast=True, registry=registry)
    outcome = str(getattr(result, "result", result))
    if outcome in ("ok", "unlocked"):
        return
    actual, expected = getattr(result, "aggregate", None), getattr(result, "expected", None)
    detail = f"{outcome}: aggregate {actual} != expected {expected}" if actual and expected else outcome
    if not force:
        log_event(settings, "activation_failed", name=entry.name, reason="lock_violation", verify_result=outcome)
        history.record_activation(
            settings,
            name=entry.name,
            action="activate",
            result="refused",
            actor=current_actor(settings),
            detail=f"locked weights failed verification: {outcome}",
        )
        raise LockViolationError(
            f"{entry.name!r} is locked and its weights failed fast verification ({detail}); "
            f"inspect with `imageworks-models verify {shlex.quote(entry.name)}`, or pass --force to activate anyway "
            "(recorded as a lock violation)",
            report=result,
        )
    log_event(settings, "lock_violation", name=entry.name, action="activate", forced=True, verify_result=outcome)


def _fail(settings: Settings, entry: ModelEntry, reason: str, *, pid: int | None = None, **fields: Any) -> None:
    log_event(settings, "activation_failed", name=entry.name, reason=reason, pid=pid, **fields)
    history.record_activation(
        settings,
        name=entry.name,
        action="activate",
        result="failed",
        actor=current_actor(settings),
        pid=pid,
        start_to_ready_s=None,
        stop_s=fields.get("stop_s"),
        detail=reason,
    )


def _already_active(settings: Settings, state: ActiveState | None, entry: ModelEntry, argv: list[str]) -> bool:
    if state is None or state.name != entry.name or state.argv != argv or state.status != "ready":
        return False
    if _identify(state)[0] is None:
        return False
    with httpx.Client(timeout=HEALTH_REQUEST_TIMEOUT_S, trust_env=False) as client:
        ready, _detail = check_ready(
            client, _server_root(state.host, state.port), _health_path(settings, entry), state.served_model_id
        )
    return ready


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

    Preflight (process backend, launch argv, weights present, lock verification, GPU fit), then under the
    activation lock: stop the current backend, check the port is free, start, wait until ready. On failure the
    process group is stopped, the state says ``failed`` and an :class:`ActivationError` (exit 6) carries the
    log tail. ``on_progress(phase, elapsed_s, detail)`` is called as phases change and on every health poll.
    Activating the entry that is already ready and healthy (same argv) returns its state untouched.
    """
    progress = _Progress(on_progress)
    progress("preflight", f"checking {name!r}")
    entry = (registry or load_registry(settings=settings)).get(name)
    if not entry.is_process_backend:
        where = endpoint_for(entry, settings) if entry.backend else "nowhere (no backend set)"
        raise BackendError(
            f"{entry.name!r} uses backend {entry.backend!r}, which ImageWorks does not start: there is nothing to "
            f"activate; requests go to {where}"
        )
    try:
        argv = expand_launch(entry, settings, require_weights=True)
    except ImageWorksError as exc:
        _fail(settings, entry, f"preflight: {exc.message}")
        raise
    _check_lock(settings, entry, force, progress, registry)

    start_timeout = _start_timeout(settings, entry, timeout_s)
    progress("lock", "waiting for the activation lock")
    with _activation_lock(settings, _lock_wait(settings, start_timeout), f"activating {entry.name!r}"):
        previous, problem = _read_state_lenient(settings)
        if problem:
            error = _unreadable_state_error(settings, problem)
            if error is not None:
                _fail(settings, entry, error.message)
                raise error
        if _already_active(settings, previous, entry, argv):
            assert previous is not None
            progress("ready", f"{entry.name!r} is already active")
            return previous
        progress("gpu", "checking GPU memory")
        reclaimable = [p.pid for p in _processes_of(previous)] if previous else []
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
                stop_s = _stop_locked(settings, previous, reason=f"switching to {entry.name!r}").stop_s
            except BackendError as exc:
                _fail(settings, entry, f"could not stop {previous.name!r}: {exc.message}")
                raise
        elif problem:
            progress("stopping", f"ignoring {problem}")
            _clear_state(settings)

        holder = port_holder(settings.vllm_host, settings.vllm_port)
        if holder:
            message = (
                f"port {settings.vllm_port} on {settings.vllm_host} is already in use by {holder}; it is not a "
                "backend ImageWorks started, so it was left alone: stop it or set CHAT_PROXY_VLLM_PORT"
            )
            _fail(settings, entry, message, stop_s=stop_s)
            raise BackendError(message)
        return _start(settings, entry, argv, start_timeout, stop_s, previous, progress)


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
    log_path, log_handle = _open_log(settings, entry, argv)
    # Recorded before the spawn: whenever this process dies from here on, the next stop or activation finds
    # the backend (and all it started) by the launch id in its environment.
    state = ActiveState(
        name=entry.name,
        served_model_id=entry.effective_served_id,
        pid=0,
        create_time=0.0,
        pgid=0,
        launch_id=uuid.uuid4().hex,
        host=settings.vllm_host,
        port=settings.vllm_port,
        base_url=single_port_endpoint(settings),
        argv=argv,
        started_at=datetime.now(UTC),
        status="starting",
        log_path=str(log_path),
        activated_by=current_actor(settings),
    )
    try:
        _write_state(settings, state)
        spawned_at = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                env=_backend_env(settings, entry, state.launch_id or ""),
                cwd=settings.root,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            _clear_state(settings)  # nothing was started
            message = f"cannot start {entry.name!r}: {argv[0]!r}: {exc.strerror or exc}; is it installed and on PATH?"
            _fail(settings, entry, message, stop_s=stop_s)
            raise BackendError(message) from exc
    finally:
        log_handle.close()
    with _spawned_guard:
        _spawned[proc.pid] = proc
    # start_new_session: the backend leads its own session and process group.
    state = state.model_copy(update={"pid": proc.pid, "pgid": proc.pid})
    root, health_path = _server_root(state.host, state.port), _health_path(settings, entry)
    failure = ""
    try:
        state = state.model_copy(update={"create_time": psutil.Process(proc.pid).create_time()})
        _write_state(settings, state)
        with httpx.Client(timeout=HEALTH_REQUEST_TIMEOUT_S, trust_env=False) as client:
            while True:
                code = proc.poll()
                if code is not None:
                    failure = f"{entry.name!r}: backend exited with code {code} before it was ready"
                    break
                ready, detail = check_ready(client, root, health_path, state.served_model_id)
                if ready and proc.poll() is None:
                    break
                waited = time.monotonic() - spawned_at
                if waited >= start_timeout:
                    failure = f"{entry.name!r}: not ready after {start_timeout:g}s ({detail})"
                    break
                progress("waiting", detail)
                time.sleep(min(HEALTH_POLL_INTERVAL_S, max(0.0, start_timeout - waited)))
    except BaseException as exc:  # Ctrl-C or a failing progress callback: never leave a half-started backend
        _abort(settings, state, entry, f"activation interrupted ({type(exc).__name__})", stop_s)
        raise
    if failure:
        progress("failed", failure)
        _abort(settings, state, entry, failure, stop_s)
        raise ActivationError(failure, name=entry.name, log_path=log_path, log_tail=_tail(log_path, LOG_TAIL_LINES))

    start_to_ready_s = round(time.monotonic() - spawned_at, 3)
    ready = {"status": "ready", "ready_at": datetime.now(UTC), "children": _descendants(proc.pid)}
    state = state.model_copy(update=ready)
    _write_state(settings, state)
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
    history.record_activation(
        settings,
        name=entry.name,
        action="activate",
        result="ready",
        actor=current_actor(settings),
        stop_s=stop_s,
        start_to_ready_s=start_to_ready_s,
        pid=state.pid,
        detail=f"previous: {previous.name}" if previous else None,
    )
    progress("ready", f"{entry.name!r} ready at {state.base_url} in {start_to_ready_s:.2f}s")
    return state


def _descendants(pid: int) -> list[tuple[int, float]]:
    """(pid, create time) of a process's descendants: proof they are ours even if they rewrite their environment
    (``setproctitle`` does, and vLLM's workers use it)."""
    try:
        return [(child.pid, child.create_time()) for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _abort(settings: Settings, state: ActiveState, entry: ModelEntry, reason: str, stop_s: float) -> None:
    """Stop a backend that did not become ready and leave the state saying ``failed`` with the reason."""
    try:
        _terminate(state, settings.vllm_stop_timeout_s)
    finally:
        _write_state(settings, state.model_copy(update={"status": "failed", "error": reason}))
        _fail(settings, entry, reason, pid=state.pid, stop_s=stop_s, log_path=state.log_path)


# Status --------------------------------------------------------------------------------------------------
def _try_lock(settings: Settings) -> filelock.BaseFileLock | None:
    settings.activation_lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(settings.activation_lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return None
    return lock


def _entry_or_none(settings: Settings, name: str) -> ModelEntry | None:
    """The entry as the registry has it now; None when it is gone or the registry does not load."""
    try:
        return load_registry(settings=settings).get(name)
    except ImageWorksError:
        return None


def _status(state: ActiveState, **fields: Any) -> ActiveStatus:
    return ActiveStatus(
        name=state.name,
        served_model_id=state.served_model_id,
        base_url=state.base_url,
        pid=state.pid,
        pgid=state.pgid,
        started_at=state.started_at,
        ready_at=state.ready_at,
        log_path=state.log_path,
        state=state,
        **{"error": state.error, **fields},
    )


def is_serving(settings: Settings, name: str) -> bool:
    """Cheap check (no health request, no GPU query): the state says ``name`` is ready and its pid is ours."""
    try:
        state = read_state(settings)
    except BackendError:
        return False
    if state is None or state.name != name or state.status != "ready":
        return False
    return _identify(state)[0] is not None


def current(settings: Settings, *, check_health: bool = True) -> ActiveStatus | None:
    """The active backend with liveness, health, uptime and GPU figures; None when nothing is recorded.

    Read-only towards processes: it never signals. When the recorded leader is gone, processes its launch left
    running are reported (status ``failed``, ``leftover_pids``, the state kept for ``activate-model --stop``);
    with nothing of ours left the state is returned once as ``stale`` and removed. A ``failed`` state is kept
    (it says why the last activation failed) until the next activation or stop. An unreadable state file is a
    BackendError (removed first when the port is free).
    """
    state, problem = _read_state_lenient(settings)
    if state is None:
        if problem is None:
            return None
        error = _unreadable_state_error(settings, problem)
        if error is not None:
            raise error
        lock = _try_lock(settings)
        if lock is None:
            raise BackendError(f"{problem}; an activation is in progress, try again")
        try:
            _clear_state(settings)
            log_event(settings, "stop", name=None, result="stale", stale_reason=problem)
        finally:
            lock.release()
        raise BackendError(f"{problem}; it was removed (port {settings.vllm_port} is free; no process was signalled)")

    proc, why = _identify(state)
    if proc is None:
        return _without_leader(settings, state, why, check_health)

    healthy, detail = None, ""
    if check_health:
        with httpx.Client(timeout=HEALTH_REQUEST_TIMEOUT_S, trust_env=False) as client:
            healthy, detail = check_ready(
                client,
                _server_root(state.host, state.port),
                _health_path(settings, _entry_or_none(settings, state.name)),
                state.served_model_id,
            )
    fields: dict[str, Any] = {"healthy": healthy, "health_detail": detail}
    try:
        gpus = gpu.query_gpus()
        pids = [p.pid for p in _processes_of(state)]
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


def _without_leader(settings: Settings, state: ActiveState, why: str, check_health: bool) -> ActiveStatus:
    """current() for a state whose leader is not (or no longer) our process. Finds, never signals."""
    if state.status == "failed":
        leftovers = sorted(p.pid for p in _processes_of(state))
        error = state.error or ""
        if leftovers:
            error += f"; {_leftovers_note(leftovers)}"
        return _status(state, status="failed", alive=False, healthy=False, leftover_pids=leftovers, error=error)
    lock = _try_lock(settings)
    if lock is None:  # an activation is working on it right now: report, do not touch
        return _status(state, status=state.status, alive=False, healthy=False, health_detail=why)
    try:
        latest, _ = _read_state_lenient(settings)
        if latest != state:
            lock.release()
            lock = None
            return current(settings, check_health=check_health)
        leftovers = sorted(p.pid for p in _processes_of(state))
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
        _clear_state(settings)
        reason = "stale state found by current-model"
        _record_stop(settings, state, "stale", f"{reason}; {why}", reason=reason, stale_reason=why, stopped_pids=[])
    finally:
        if lock is not None:
            lock.release()
    return _status(state, status="stale", alive=False, healthy=False, stale_reason=why)


def _leftovers_note(pids: list[int]) -> str:
    return (
        f"pid(s) {', '.join(map(str, pids))} of its launch are still running; stop them with "
        "`imageworks-models activate-model --stop`"
    )
