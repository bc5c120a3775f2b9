"""Backend processes: spawn with a launch marker, prove which processes are ours, signal and terminate them.

We only ever signal a process proven to be ours. Every launch gets a random launch id, recorded in the state
and set as ``IMAGEWORKS_LAUNCH_ID`` in the backend's environment (inherited by everything it starts). Proof is
one of: the leader's pid *with* its recorded create time; a descendant of that verified leader; a member of the
verified leader's own process group; a descendant recorded (pid + create time) when the backend became ready;
any process created after the leader whose environment carries the launch id (children that left the group or
session by double fork or ``setsid`` are found this way). The recorded ``pgid`` is informational and never used
to choose what to signal: after a reboot, pid reuse or a hand edit it may name anybody's group. Signals go to
single processes through psutil, which re-checks the create time, never to a whole group.

Adversary not covered: a process of the same user that copies our launch id into its environment on purpose,
and a child of a *dead* leader that both cleared its environment and was not yet recorded; the latter is left
running (the port check then names it) rather than guessed at.

Stopping (:func:`terminate`) sends SIGTERM to every process of the launch, SIGKILL after the stop timeout
(``CHAT_PROXY_VLLM_STOP_TIMEOUT_S``), rescans for processes forked meanwhile, and raises :class:`BackendError`
(exit 6) naming every pid still running. Nothing here reads or writes the state file; callers decide.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO

import psutil

from ..errors import BackendError
from ..schema import ModelEntry
from ..settings import Settings
from .state import LAUNCH_ID_ENV, ActiveState

CREATE_TIME_TOLERANCE_S = 0.05
"""psutil create times have clock-tick (10 ms) resolution; a reused pid differs by far more."""
EXIT_POLL_S = 0.02
"""While waiting for signalled processes to exit: the longest single wait between checks."""
KILL_WAIT_S = 5.0
"""After SIGKILL: how long the kernel gets to reap the processes before we call the stop failed."""
KILL_RESCAN_ROUNDS = 3
"""After SIGKILL: how many times to rescan for processes forked meanwhile before calling the stop failed."""

# Backends started by this process, by pid: kept so they can be reaped (no zombies in a long-lived server).
_spawned: dict[int, subprocess.Popen[bytes]] = {}
_spawned_guard = threading.Lock()


# Spawning ------------------------------------------------------------------------------------------------
def backend_env(settings: Settings, entry: ModelEntry, launch_id: str) -> dict[str, str]:
    """The backend's environment: ours, the entry's ``env``, the launch marker and the CHAT_PROXY_VLLM_* settings."""
    env = {**os.environ, **entry.backend_config.env, LAUNCH_ID_ENV: launch_id}
    # Python backends should flush their logs line by line, so a crash's last words reach the log.
    env.setdefault("PYTHONUNBUFFERED", "1")
    for alias, value, _source in settings.env_sources():
        if alias.startswith("CHAT_PROXY_VLLM_") and value != "":
            env[alias] = value
    return env


def spawn(
    settings: Settings, entry: ModelEntry, argv: list[str], launch_id: str, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session with the launch marker, output to ``log``. Raises OSError."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=backend_env(settings, entry, launch_id),
        cwd=settings.root,
        start_new_session=True,
        close_fds=True,
    )
    with _spawned_guard:
        _spawned[proc.pid] = proc
    return proc


def reap(pid: int) -> None:
    """Collect the exit status of a backend this process started (a zombie otherwise)."""
    with _spawned_guard:
        popen = _spawned.get(pid)
    if popen is not None and popen.poll() is not None:
        with _spawned_guard:
            _spawned.pop(pid, None)


def descendants(pid: int) -> list[tuple[int, float]]:
    """(pid, create time) of a process's descendants: proof they are ours even if they rewrite their environment
    (``setproctitle`` does, and vLLM's workers use it)."""
    try:
        return [(child.pid, child.create_time()) for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


# Identity ------------------------------------------------------------------------------------------------
def _live(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def identify(state: ActiveState) -> tuple[psutil.Process | None, str]:
    """(the recorded process, '') when the pid is alive with the recorded create time, else (None, why not)."""
    if state.pid <= 0:
        return None, "no backend pid was recorded (the activation stopped while spawning it)"
    reap(state.pid)
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
    leader, _why = identify(state)
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


def processes_of(state: ActiveState) -> list[psutil.Process]:
    """Every live process proven to belong to the launch ``state`` records."""
    return _find(_proof(state))


# Signals -------------------------------------------------------------------------------------------------
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
            reap(proc.pid)
        _gone, alive = psutil.wait_procs(alive, timeout=min(EXIT_POLL_S, max(0.0, deadline - time.monotonic())))
        alive = [p for p in alive if _live(p)]
        if time.monotonic() >= deadline:
            break
    return alive


def terminate(state: ActiveState, stop_timeout_s: float) -> tuple[str | None, list[int]]:
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
            reap(pid)
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
        reap(pid)
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
