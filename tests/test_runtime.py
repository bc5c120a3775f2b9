"""The single-port runtime against real processes: the demo backend with fault switches, and `transformers serve`.

Every test runs in a temporary root on its own free port; every process a test starts carries a marker in its
environment, and the fixture kills whatever still carries it afterwards (a failing test leaks nothing).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import e2e_backend
import httpx
import psutil
import pytest
from conftest import demo_launch, free_port, require

from imageworks_core import history, runtime
from imageworks_core.audit import read_events
from imageworks_core.errors import BackendError, LockViolationError
from imageworks_core.runtime import lock, process
from imageworks_core.settings import Settings, get_settings
from imageworks_demo.launch import SERVER_MODULE

A, B = "alpha_(CPU)", "beta_(CPU)"
STOP_TIMEOUT_S = 1.0
MARKER = "IMAGEWORKS_RUNTIME_TEST"
DEMO_WEIGHTS = "demo/models/imageworks-demo-vision"


def demo_entry(name: str, served: str, *flags: str, **overrides: Any) -> dict[str, Any]:
    """A demo-backend entry; ``flags`` are the demo backend's fault switches."""
    entry: dict[str, Any] = {
        "name": name,
        "backend": "vllm",
        "served_model_id": served,
        "capabilities": {"text": True, "vision": True},
        "download_path": DEMO_WEIGHTS,
        "backend_config": {
            "launch": demo_launch(*flags),
            "startup_timeout_s": 20,
        },
    }
    entry.update(overrides)
    return entry


class Runtime:
    """A temp root with its own port, a marker for every process started from it, and registry helpers."""

    def __init__(self, settings: Settings, marker: str) -> None:
        self.settings = settings
        self.marker = marker

    @property
    def port(self) -> int:
        return self.settings.vllm_port

    def registry(self, *entries: dict[str, Any]) -> None:
        for entry in entries:
            entry.setdefault("backend_config", {}).setdefault("env", {})[MARKER] = self.marker
        self.settings.curated_path.write_text(json.dumps(list(entries), indent=2), encoding="utf-8")

    def state_json(self) -> dict[str, Any] | None:
        path = self.settings.active_state_path
        return json.loads(path.read_text()) if path.exists() else None

    def processes(self) -> list[psutil.Process]:
        """Live processes started for this test (found by the marker in their environment)."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARKER) == self.marker:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def backends(self) -> list[psutil.Process]:
        return [p for p in self.processes() if SERVER_MODULE in " ".join(p.cmdline())]

    def served_ids(self) -> list[str]:
        reply = httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=5, trust_env=False)
        return [m["id"] for m in reply.json()["data"]]

    def port_accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def cli_env(self) -> dict[str, str]:
        return {**os.environ, "IMAGEWORKS_ROOT": str(self.settings.root)}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def rt(root: Settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CHAT_PROXY_VLLM_PORT", str(free_port()))
    monkeypatch.setenv("CHAT_PROXY_VLLM_STOP_TIMEOUT_S", str(STOP_TIMEOUT_S))
    runtime_ = Runtime(get_settings(root.root), uuid.uuid4().hex)
    runtime_.registry(demo_entry(A, "test/alpha"), demo_entry(B, "test/beta"))
    yield runtime_
    leftovers = runtime_.processes()
    for proc in leftovers:
        try:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=5)
    for popen in list(process._spawned.values()):
        popen.poll()
    assert not leftovers, f"processes left running: {[p.pid for p in leftovers]}"


# The lifecycle ---------------------------------------------------------------------------------------------
def test_activate_current_switch_stop(rt: Runtime, cli) -> None:
    result = cli("activate-model", A)
    assert result.code == 0, result.err
    assert f"{A} ready at http://127.0.0.1:{rt.port}/v1" in result.out
    # Off a terminal the progress is one line per phase.
    assert "starting:" in result.err and "ready:" in result.err
    state = rt.state_json()
    assert state is not None and state["name"] == A and state["status"] == "ready"
    assert state["served_model_id"] == "test/alpha" and state["port"] == rt.port and state["pgid"] == state["pid"]
    assert state["base_url"] == f"http://127.0.0.1:{rt.port}/v1"
    assert psutil.Process(state["pid"]).create_time() == pytest.approx(state["create_time"], abs=0.05)
    assert rt.served_ids() == ["test/alpha"]
    first_pid = state["pid"]

    shown = cli("current-model")
    assert shown.code == 0, shown.err
    assert f"name:      {A}" in shown.out and "status:    ready (healthy)" in shown.out
    assert f"endpoint:  http://127.0.0.1:{rt.port}/v1" in shown.out and f"pid:       {first_pid}" in shown.out
    assert "gpu" in shown.out  # figures with NVML, else the reason there are none
    data = json.loads(cli("current-model", "--json").out)
    assert data["name"] == A and data["healthy"] is True and data["alive"] is True and data["uptime_s"] >= 0
    status = runtime.current(rt.settings)
    assert status is not None and status.status == "ready" and status.pid == first_pid

    # Switch through the API: the first backend is gone, the port serves the second.
    phases: list[str] = []
    second = runtime.activate(rt.settings, B, on_progress=lambda phase, _t, _d: phases.append(phase))
    assert phases[0] == "preflight" and "stopping" in phases and phases[-1] == "ready"
    assert second.name == B and second.status == "ready" and second.pid != first_pid
    assert gone(first_pid)
    assert rt.served_ids() == ["test/beta"]
    assert [p.pid for p in rt.backends()] == [second.pid]
    assert runtime.read_state(rt.settings) == second

    stopped = cli("activate-model", "--stop")
    assert stopped.code == 0, stopped.err
    assert f"stopped {B!r}" in stopped.out and "(SIGTERM)" in stopped.out
    assert rt.state_json() is None and gone(second.pid) and not rt.port_accepts() and rt.processes() == []
    again = cli("activate-model", "--stop")  # idempotent
    assert again.code == 0 and "nothing to stop" in again.out
    assert cli("current-model").out.strip() == "no model active"
    assert json.loads(cli("current-model", "--json").out) is None

    rows = history.list_activations(rt.settings)[::-1]
    assert [(r["name"], r["action"], r["result"]) for r in rows] == [
        (A, "activate", "ready"),
        (A, "stop", "stopped"),
        (B, "activate", "ready"),
        (B, "stop", "stopped"),
    ]
    assert rows[2]["stop_s"] > 0 and rows[2]["start_to_ready_s"] > 0 and rows[2]["pid"] == second.pid
    assert all(r["actor"] for r in rows)
    events = [(e["event"], e["name"]) for e in read_events(rt.settings)][::-1]
    assert events == [("activation", A), ("stop", A), ("activation", B), ("stop", B)]


def test_activating_the_active_entry_again_keeps_its_process(rt: Runtime) -> None:
    first = runtime.activate(rt.settings, A)
    assert runtime.activate(rt.settings, A) == first
    assert [p.pid for p in rt.backends()] == [first.pid]
    runtime.stop(rt.settings)


# Failures while starting ---------------------------------------------------------------------------------
def test_crash_at_start_exits_6_with_log_tail_and_leaves_failed_not_starting(rt: Runtime, cli) -> None:
    rt.registry(demo_entry(A, "test/alpha", "--crash-at-start"))
    result = cli("activate-model", A)
    assert result.code == 6
    assert f"error: {A!r}: backend exited with code 3 before it was ready" in result.err
    assert "--- last" in result.err and "simulated crash at start (--crash-at-start)" in result.err
    state = rt.state_json()
    assert state is not None and state["status"] == "failed" and "exited with code 3" in state["error"]
    assert any("simulated crash" in line for line in runtime.tail_backend_log(rt.settings, A))
    assert rt.processes() == []
    status = runtime.current(rt.settings)
    assert status is not None and status.status == "failed" and status.alive is False
    assert "status:    failed" in cli("current-model").out
    assert history.list_activations(rt.settings)[0]["result"] == "failed"
    assert read_events(rt.settings, "activation_failed")[0]["name"] == A
    # The next activation replaces the failed state.
    rt.registry(demo_entry(A, "test/alpha"))
    assert runtime.activate(rt.settings, A).status == "ready"
    runtime.stop(rt.settings)


def test_a_launch_binary_missing_from_path_leaves_a_failed_state_until_the_next_stop(rt: Runtime, cli) -> None:
    rt.registry(demo_entry(A, "test/alpha", backend_config={"launch": ["no-such-vllm-binary", "serve", "{port}"]}))
    result = cli("activate-model", A)
    assert result.code == 6 and "'no-such-vllm-binary': No such file or directory" in result.err
    state = rt.state_json()
    assert state is not None and state["status"] == "failed" and state["pid"] == 0
    assert "no-such-vllm-binary" in state["error"] and "on PATH" in state["error"]
    assert any("no-such-vllm-binary" in line for line in state["log_tail"])
    shown = cli("current-model")
    assert shown.code == 0 and "status:    failed" in shown.out and "no-such-vllm-binary" in shown.out
    as_json = json.loads(cli("current-model", "--json").out)
    assert as_json["status"] == "failed" and as_json["log_tail"] == state["log_tail"]
    assert cli("activate-model", "--stop").code == 0
    assert rt.state_json() is None and cli("current-model").out.strip() == "no model active"


def test_get_active_reports_a_failed_start_with_its_reason_and_log_tail(rt: Runtime, cli) -> None:
    from api_server import api_server

    rt.registry(demo_entry(A, "test/alpha", backend_config={"launch": ["no-such-vllm-binary", "serve"]}))
    assert cli("activate-model", A).code == 6
    with api_server(rt.settings.root, env={"CHAT_PROXY_VLLM_PORT": str(rt.port)}) as base:
        active = httpx.get(f"{base}/v1/active", timeout=10).json()["active"]
    assert active["name"] == A and active["status"] == "failed" and "no-such-vllm-binary" in active["error"]
    assert any("no-such-vllm-binary" in line for line in active["log_tail"])


def test_a_preflight_failure_is_recorded_but_never_replaces_a_running_backend(rt: Runtime, cli) -> None:
    rt.registry(demo_entry(A, "test/alpha"), demo_entry(B, "test/beta", download_path="demo/models/missing"))
    assert cli("activate-model", B).code == 7
    state = rt.state_json()
    assert state["status"] == "failed" and state["name"] == B and "weights" in state["error"]
    assert runtime.activate(rt.settings, A).status == "ready"
    assert cli("activate-model", B).code == 7
    assert rt.state_json()["status"] == "ready" and rt.state_json()["name"] == A
    runtime.stop(rt.settings)


def test_unhealthy_backend_times_out_and_its_group_is_stopped(rt: Runtime, cli) -> None:
    rt.registry(demo_entry(A, "test/alpha", "--unhealthy"))
    started = time.monotonic()
    result = cli("activate-model", A, "--timeout", "1")
    assert result.code == 6
    assert time.monotonic() - started < 1 + STOP_TIMEOUT_S + 3
    assert f"{A!r}: not ready after 1s (/health answered 503)" in result.err
    assert rt.state_json()["status"] == "failed"
    assert rt.processes() == [] and not rt.port_accepts()


def test_ready_requires_models_to_list_our_served_id(rt: Runtime) -> None:
    # The server answers /health but serves another model id: not proof it is ours.
    entry = demo_entry(A, "test/alpha")
    entry["backend_config"]["launch"][-1] = "someone/else"
    rt.registry(entry)
    with pytest.raises(runtime.ActivationError) as caught:
        runtime.activate(rt.settings, A, timeout_s=1)
    assert "/v1/models lists ['someone/else'], not 'test/alpha'" in caught.value.summary
    assert caught.value.exit_code == 6 and rt.processes() == []


def test_missing_health_path_falls_back_to_models(rt: Runtime) -> None:
    entry = demo_entry(A, "test/alpha")
    entry["backend_config"]["health_path"] = "/no-such-health"  # the demo server answers 404
    rt.registry(entry)
    assert runtime.activate(rt.settings, A).status == "ready"
    runtime.stop(rt.settings)


def test_interrupted_activation_stops_the_backend_and_marks_failed(rt: Runtime) -> None:
    rt.registry(demo_entry(A, "test/alpha", "--slow-start", "30"))

    def interrupt(phase: str, _elapsed: float, _detail: str) -> None:
        if phase == "waiting":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runtime.activate(rt.settings, A, on_progress=interrupt)
    state = rt.state_json()
    assert state["status"] == "failed" and "interrupted" in state["error"]
    assert gone(state["pid"]) and rt.processes() == []


# Stopping ------------------------------------------------------------------------------------------------
def slow_bash_entry(seconds: int) -> dict[str, Any]:
    """The issue's slow start: a shell that sleeps (a child in the backend's group) before exec'ing the backend."""
    return demo_entry(
        A,
        "test/alpha",
        backend_config={
            "launch": ["bash", "-c", f'sleep {seconds}; exec "$@"', "-"] + demo_launch(),
            "startup_timeout_s": 60,
        },
    )


def test_stop_from_the_cli_cancels_a_slow_start_within_two_seconds(rt: Runtime, cli) -> None:
    rt.registry(slow_bash_entry(25))
    activator = subprocess.Popen(
        [sys.executable, "-m", "imageworks_core.cli", "activate-model", A],
        env=rt.cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while (rt.state_json() or {}).get("status") != "starting" or not rt.processes():
            assert time.monotonic() < deadline and activator.poll() is None, activator.stderr
            time.sleep(0.05)
        progress = runtime.activation_in_progress(rt.settings)
        assert progress is not None and progress.name == A and progress.phase in ("starting", "waiting")
        shown = cli("current-model").out
        assert f"activating {A!r}" in shown and "status:    starting" in shown, shown
        started = time.monotonic()
        stopped = cli("activate-model", "--stop")
        took = time.monotonic() - started
        assert stopped.code == 0, stopped.err
        assert f"cancelled the start of {A!r}" in stopped.out
        assert took < 2.0, took
        assert rt.processes() == [] and rt.state_json() is None
        assert runtime.activation_in_progress(rt.settings) is None
        _out, err = activator.communicate(timeout=10)
        assert activator.returncode == 6 and f"the start of {A!r} was cancelled" in err
    finally:
        if activator.poll() is None:
            activator.kill()
    row = history.list_activations(rt.settings)[0]
    assert (row["name"], row["action"], row["result"]) == (A, "activate", "cancelled")
    assert read_events(rt.settings, "activation_cancelled")[0]["name"] == A
    assert cli("current-model").out.strip() == "no model active"


BIG_SPARSE_BYTES = 32 * 2**30
"""A sparse weights file this large takes the fast check many seconds to re-hash (about 1.6 GB/s per core)."""


def test_stop_cancels_a_start_during_the_fast_verification_of_a_big_locked_entry(
    rt: Runtime, cli, tmp_path: Path
) -> None:
    """The start is recorded (phase ``verify``) and cancellable before any process exists: a stop during the lock
    check aborts the re-hash at its next progress report, nothing is started, history says ``cancelled``."""
    from imageworks_core.verification import lock_entry

    weights = tmp_path / "big-weights"
    weights.mkdir()
    (weights / "config.json").write_text('{"architectures": ["Demo"]}\n', encoding="utf-8")
    (weights / "model.safetensors").write_bytes(b"small at lock time")
    rt.registry(demo_entry(A, "test/alpha", download_path=str(weights)))
    lock_entry(rt.settings, A, set_expected=True)
    # Grown in place (sparse, no disk used): its size changed, so the fast check must re-read all of it.
    os.truncate(weights / "model.safetensors", BIG_SPARSE_BYTES)
    verifications_before = len(history.list_verifications(rt.settings, A))
    activator = subprocess.Popen(
        [sys.executable, "-m", "imageworks_core.cli", "activate-model", A],
        env=rt.cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while (progress := runtime.activation_in_progress(rt.settings)) is None or progress.phase != "verify":
            assert time.monotonic() < deadline and activator.poll() is None, activator.stderr
            time.sleep(0.02)
        assert progress.name == A and rt.state_json() is None, "recorded before anything is spawned"
        shown = cli("current-model").out
        assert f"activating {A!r} (verify" in shown, shown
        stopped = cli("activate-model", "--stop")
        assert stopped.code == 0, stopped.err
        assert f"cancelled the start of {A!r}" in stopped.out
        _out, err = activator.communicate(timeout=30)
        assert activator.returncode == 6 and f"the start of {A!r} was cancelled" in err, err
    finally:
        if activator.poll() is None:
            activator.kill()
    assert rt.processes() == [] and rt.state_json() is None
    assert runtime.activation_in_progress(rt.settings) is None
    rows = history.list_activations(rt.settings, A)
    assert [(r["action"], r["result"]) for r in rows] == [("activate", "cancelled")], "no refusal, no start"
    assert len(history.list_verifications(rt.settings, A)) == verifications_before, "the re-hash never finished"
    assert read_events(rt.settings, "activation_cancelled")[0]["name"] == A
    assert cli("current-model").out.strip() == "no model active"


def test_sigterm_ignoring_backend_is_killed_after_the_stop_timeout(rt: Runtime, cli) -> None:
    rt.registry(demo_entry(A, "test/alpha", "--ignore-sigterm"))
    state = runtime.activate(rt.settings, A)
    started = time.monotonic()
    result = runtime.stop(rt.settings)
    elapsed = time.monotonic() - started
    assert result is not None and result.signal == "SIGKILL" and result.stopped_pids == [state.pid]
    assert STOP_TIMEOUT_S <= result.stop_s < STOP_TIMEOUT_S + 2 and elapsed < STOP_TIMEOUT_S + 3
    assert gone(state.pid) and rt.state_json() is None
    assert history.list_activations(rt.settings)[0]["result"] == "killed"
    assert read_events(rt.settings, "stop")[0]["signal"] == "SIGKILL"


def test_backend_children_are_stopped_with_it(rt: Runtime) -> None:
    rt.registry(demo_entry(A, "test/alpha", "--spawn-child"))
    state = runtime.activate(rt.settings, A)
    children = psutil.Process(state.pid).children(recursive=True)
    assert len(children) == 1
    result = runtime.stop(rt.settings)
    assert result is not None and sorted(result.stopped_pids) == sorted([state.pid, children[0].pid])
    assert gone(state.pid) and gone(children[0].pid) and rt.processes() == []


def test_orphans_of_a_dead_backend_are_reported_by_current_model_and_stopped_by_stop(rt: Runtime, cli) -> None:
    rt.registry(demo_entry(A, "test/alpha", "--spawn-child"))
    state = runtime.activate(rt.settings, A)
    child = psutil.Process(state.pid).children()[0]
    os.kill(state.pid, signal.SIGKILL)  # the backend dies on its own; its worker is orphaned, still in the group
    psutil.wait_procs([psutil.Process(state.pid)], timeout=5)
    process.reap(state.pid)
    # current-model is read-only: it names the leftover and keeps the state, it never signals.
    shown = cli("current-model")
    assert shown.code == 0
    assert "status:    failed" in shown.out and f"pid(s) {child.pid} of its launch are still running" in shown.out
    assert "activate-model --stop" in shown.out
    assert runtime.current(rt.settings).leftover_pids == [child.pid]
    assert not gone(child.pid) and rt.state_json() is not None
    stopped = cli("activate-model", "--stop")
    assert stopped.code == 0, stopped.err
    assert f"stopped {A!r}" in stopped.out and f"pids: {child.pid}" in stopped.out
    assert gone(child.pid) and rt.state_json() is None and rt.processes() == []


def test_stale_state_naming_a_reused_pid_kills_nothing(rt: Runtime, cli) -> None:
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        created = psutil.Process(stranger.pid).create_time()
        fake = {
            "name": A, "served_model_id": "test/alpha", "pid": stranger.pid, "create_time": created - 1000.0,
            "pgid": stranger.pid, "host": "127.0.0.1", "port": rt.port, "base_url": f"http://127.0.0.1:{rt.port}/v1",
            "argv": ["python"], "started_at": "2026-01-01T00:00:00Z", "status": "ready", "log_path": "x.log",
        }  # fmt: skip
        rt.settings.staging_dir.mkdir(parents=True, exist_ok=True)
        rt.settings.active_state_path.write_text(json.dumps(fake))
        shown = cli("current-model")
        assert shown.code == 0, shown.err
        assert f"pid {stranger.pid} now belongs to another process" in shown.out
        assert rt.state_json() is None and stranger.poll() is None

        rt.settings.active_state_path.write_text(json.dumps(fake))
        result = runtime.stop(rt.settings)
        assert result is not None and result.stale and result.stopped_pids == [] and result.signal is None
        assert rt.state_json() is None and stranger.poll() is None
        assert history.list_activations(rt.settings)[0]["result"] == "stale"

        rt.settings.active_state_path.write_text(json.dumps(fake))
        assert runtime.activate(rt.settings, B).status == "ready"  # replaces the stale state, spares the stranger
        assert stranger.poll() is None
        runtime.stop(rt.settings)
    finally:
        end(stranger)
        stranger.wait()


def test_stop_on_unreadable_state_file_clears_it_without_signalling(rt: Runtime, cli) -> None:
    rt.settings.staging_dir.mkdir(parents=True, exist_ok=True)
    rt.settings.active_state_path.write_text("{not json")
    assert runtime.stop(rt.settings) is None
    assert rt.state_json() is None


# Process safety: only processes proven ours are ever signalled -------------------------------------------
def write_fake_state(rt: Runtime, *, pid: int, create_time: float, pgid: int, **extra: Any) -> None:
    fake = {
        "name": A, "served_model_id": "test/alpha", "pid": pid, "create_time": create_time, "pgid": pgid,
        "host": "127.0.0.1", "port": rt.port, "base_url": f"http://127.0.0.1:{rt.port}/v1", "argv": ["python"],
        "started_at": "2026-01-01T00:00:00Z", "status": "ready", "log_path": "x.log", **extra,
    }  # fmt: skip
    rt.settings.staging_dir.mkdir(parents=True, exist_ok=True)
    rt.settings.active_state_path.write_text(json.dumps(fake))


def end(proc: psutil.Process) -> None:
    with contextlib.suppress(psutil.Error):
        proc.kill()
        proc.wait(timeout=5)


def dead_pid() -> tuple[int, float]:
    """(pid, create time) of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    created = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, created


def strangers_group(leader_exits: bool) -> tuple[int, psutil.Process]:
    """(process group number, a live member) of a group that is not ours. With ``leader_exits`` the group's
    leader is gone and only its child remains (the shape a rebooted machine or a reused pid leaves)."""
    code = (
        "import subprocess, sys; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], stdout=subprocess.DEVNULL); "
        "print(child.pid)"
    )
    if not leader_exits:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        return sleeper.pid, psutil.Process(sleeper.pid)
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    out, _ = leader.communicate(timeout=30)
    member = psutil.Process(int(out))
    assert os.getpgid(member.pid) == leader.pid and gone(leader.pid)
    return leader.pid, member


@pytest.mark.parametrize("shape", ["leader-exited", "pgid-of-a-live-stranger"])
def test_dead_leader_with_a_strangers_group_signals_nothing(rt: Runtime, cli, shape: str) -> None:
    group, stranger = strangers_group(leader_exits=shape == "leader-exited")
    if shape == "leader-exited":
        pid, created = group, time.time() - 1000.0  # the recorded pid is the dead leader of that group
    else:
        pid, created = dead_pid()
    try:
        fields = {"pid": pid, "create_time": created, "pgid": group, "launch_id": uuid.uuid4().hex}
        write_fake_state(rt, **fields)
        status = runtime.current(rt.settings)
        assert stranger.is_running() and stranger.status() != psutil.STATUS_ZOMBIE
        assert status is not None and status.status == "stale" and status.stale_reason
        assert rt.state_json() is None

        write_fake_state(rt, **fields)
        result = runtime.stop(rt.settings)
        assert result is not None and result.stale and result.stopped_pids == [] and result.signal is None
        assert stranger.is_running() and stranger.status() != psutil.STATUS_ZOMBIE

        write_fake_state(rt, **fields)
        shown = cli("activate-model", "--stop")
        assert shown.code == 0 and "no process was signalled" in shown.out
        assert stranger.is_running() and stranger.status() != psutil.STATUS_ZOMBIE
    finally:
        end(stranger)


def test_a_state_without_launch_id_and_a_dead_leader_signals_nothing(rt: Runtime) -> None:
    group, stranger = strangers_group(leader_exits=True)
    try:
        write_fake_state(rt, pid=group, create_time=time.time() - 1000.0, pgid=group)  # a pre-marker state file
        result = runtime.stop(rt.settings)
        assert result is not None and result.stale and result.stopped_pids == []
        assert stranger.is_running() and stranger.status() != psutil.STATUS_ZOMBIE
    finally:
        end(stranger)


def test_recorded_pgid_other_than_the_pid_is_not_trusted(rt: Runtime, cli) -> None:
    state = runtime.activate(rt.settings, A)
    group, stranger = strangers_group(leader_exits=False)
    try:
        edited = {**rt.state_json(), "pgid": group}  # a hand edit (or a corrupted field) naming someone's group
        rt.settings.active_state_path.write_text(json.dumps(edited))
        status = runtime.current(rt.settings)
        assert status is not None and status.status == "ready" and status.alive
        result = runtime.stop(rt.settings)
        assert result is not None and result.stopped_pids == [state.pid] and result.signal == "SIGTERM"
        assert gone(state.pid) and rt.processes() == []
        assert stranger.is_running() and stranger.status() != psutil.STATUS_ZOMBIE
    finally:
        end(stranger)


def escaping_entry(sleeper_code: str) -> dict[str, Any]:
    """A demo backend whose launch first starts ``sleeper_code`` by double fork into its own session (no longer
    a descendant or group member of the backend), then execs the demo backend."""
    escape = (
        "import os, subprocess, sys; "
        "subprocess.run([sys.executable, '-c', "
        f'\'import subprocess, sys; subprocess.Popen([sys.executable, "-c", "{sleeper_code}"], '
        "start_new_session=True)'], check=True); "
        "os.execv(sys.executable, [sys.executable, '-m', 'imageworks_demo.server', *sys.argv[1:]])"
    )
    entry = demo_entry(A, "test/alpha")
    entry["backend_config"]["launch"] = ["{python}", "-c", escape, *demo_launch()[3:]]
    return entry


def escaped(rt: Runtime, state: runtime.ActiveState) -> psutil.Process:
    others = [p for p in rt.processes() if p.pid != state.pid]
    assert len(others) == 1
    runaway = others[0]
    assert runaway.pid not in {c.pid for c in psutil.Process(state.pid).children(recursive=True)}
    assert os.getsid(runaway.pid) != state.pid and os.getpgid(runaway.pid) != state.pid
    return runaway


def test_a_child_that_escaped_the_group_is_stopped_by_the_launch_marker(rt: Runtime) -> None:
    rt.registry(escaping_entry("import time; time.sleep(60)"))
    state = runtime.activate(rt.settings, A)
    runaway = escaped(rt, state)
    marker = runaway.environ().get("IMAGEWORKS_LAUNCH_ID")
    result = runtime.stop(rt.settings)
    assert result is not None and sorted(result.stopped_pids) == sorted([state.pid, runaway.pid])
    assert marker is not None and marker == state.launch_id
    assert gone(state.pid) and gone(runaway.pid) and rt.processes() == []


def test_stop_exits_6_naming_a_marked_process_that_survives(rt: Runtime, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    rt.registry(escaping_entry("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"))
    state = runtime.activate(rt.settings, A)
    runaway = escaped(rt, state)
    # We run as root here, so no process is truly beyond our signals: the kernel's EPERM is simulated for it.
    real_send = process._send_signal

    def refuse(proc: psutil.Process, sig: signal.Signals) -> None:
        if proc.pid == runaway.pid:
            raise psutil.AccessDenied(proc.pid)
        real_send(proc, sig)

    monkeypatch.setattr(process, "_send_signal", refuse)
    monkeypatch.setattr(process, "KILL_WAIT_S", 0.3)
    result = cli("activate-model", "--stop")
    assert result.code == 6
    assert f"could not stop {A!r}: pid(s) {runaway.pid} of its launch are still running after SIGKILL" in result.err
    assert f"refused to signal pid(s) {runaway.pid}" in result.err
    assert gone(state.pid) and not gone(runaway.pid)
    assert rt.state_json() is not None  # kept, so a later stop retries
    assert history.list_activations(rt.settings)[0]["result"] == "failed"

    monkeypatch.setattr(process, "_send_signal", real_send)
    again = cli("activate-model", "--stop")
    assert again.code == 0, again.err
    assert f"pids: {runaway.pid}" in again.out and "(SIGKILL)" in again.out
    assert gone(runaway.pid) and rt.state_json() is None and rt.processes() == []


CRASH_AFTER_SPAWN = """
import os, subprocess, sys
from imageworks_core import runtime
from imageworks_core.settings import get_settings

real_popen = subprocess.Popen


class CrashAfterSpawn(real_popen):
    # The activator dies (as under SIGKILL or a power cut of the CLI) the instant the backend exists.
    def __init__(self, argv, *args, **kwargs):
        super().__init__(argv, *args, **kwargs)
        if "imageworks_demo.server" in argv:
            os._exit(9)


subprocess.Popen = CrashAfterSpawn
runtime.activate(get_settings(), sys.argv[1])
"""


def crash_after_spawn(rt: Runtime, name: str) -> psutil.Process:
    """Activate ``name`` in a process that dies right after the spawn; returns the orphaned backend."""
    crashed = subprocess.run([sys.executable, "-c", CRASH_AFTER_SPAWN, name], env=rt.cli_env(), timeout=60)
    assert crashed.returncode == 9
    orphans = rt.backends()
    assert len(orphans) == 1
    return orphans[0]


def test_a_crash_between_spawn_and_state_write_leaves_an_orphan_the_next_activation_or_stop_stops(
    rt: Runtime, cli
) -> None:
    orphan = crash_after_spawn(rt, A)
    state = rt.state_json()
    assert state is not None and state["status"] == "starting" and state["launch_id"]
    shown = cli("current-model")  # read-only: reports the orphan, leaves it alone
    assert shown.code == 0 and f"pid(s) {orphan.pid} of its launch are still running" in shown.out
    assert not gone(orphan.pid)

    activated = cli("activate-model", B)
    assert activated.code == 0, activated.err
    assert gone(orphan.pid) and rt.served_ids() == ["test/beta"]

    orphan = crash_after_spawn(rt, A)
    stopped = cli("activate-model", "--stop")
    assert stopped.code == 0, stopped.err
    assert f"stopped {A!r}" in stopped.out and str(orphan.pid) in stopped.out
    assert gone(orphan.pid) and rt.state_json() is None and rt.processes() == []


def test_corrupt_state_file_with_the_port_held_is_one_line_naming_file_holder_and_fix(rt: Runtime, cli) -> None:
    state = runtime.activate(rt.settings, A)
    path = rt.settings.active_state_path
    path.write_text("{not json")
    for args in (("activate-model", "--stop"), ("current-model",), ("activate-model", B)):
        result = cli(*args)
        assert result.code == 6, args
        errors = [line for line in result.err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and result.err.strip().endswith(errors[0]), result.err
        assert errors[0].startswith(f"error: {path}: unreadable state file")
        assert f"port {rt.port} on 127.0.0.1 is held by pid {state.pid}" in errors[0]
        assert "nothing was signalled" in errors[0] and f"(`kill {state.pid}`), then delete {path}" in errors[0]
        assert not gone(state.pid) and path.read_text() == "{not json"
    # The operator's fix: stop the holder; the file then goes on the next stop.
    os.kill(state.pid, signal.SIGTERM)
    psutil.wait_procs([psutil.Process(state.pid)], timeout=10)
    process.reap(state.pid)
    assert cli("activate-model", "--stop").out.strip() == "no model active; nothing to stop"
    assert not path.exists() and rt.processes() == []


# Concurrency ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_activations_end_with_one_backend_and_a_consistent_state(rt: Runtime) -> None:
    commands = [[sys.executable, "-m", "imageworks_core.cli", "activate-model", name] for name in (A, B)]
    procs = [
        subprocess.Popen(cmd, env=rt.cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in commands
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    backends = rt.backends()
    assert len(backends) == 1
    state = rt.state_json()
    assert state["status"] == "ready" and state["pid"] == backends[0].pid
    served = {A: "test/alpha", B: "test/beta"}[state["name"]]
    assert rt.served_ids() == [served]
    rows = history.list_activations(rt.settings)[::-1]
    # Serialised by the lock: activate, stop (by the second), activate.
    assert [(r["action"], r["result"]) for r in rows] == [
        ("activate", "ready"),
        ("stop", "stopped"),
        ("activate", "ready"),
    ]
    assert rows[2]["name"] == state["name"]
    runtime.stop(rt.settings)


def test_activation_lock_wait_is_bounded_and_names_the_holder(rt: Runtime) -> None:
    with lock.activation_lock(rt.settings, 1, "a test holding the lock"):
        with pytest.raises(BackendError) as caught:
            runtime.stop(rt.settings, lock_timeout_s=0.3)
    assert f"another activation (pid {os.getpid()}: a test holding the lock since" in caught.value.message


# Preflight -----------------------------------------------------------------------------------------------
def test_locked_entry_with_drift_is_refused_unless_forced(rt: Runtime, cli) -> None:
    from imageworks_core.verification import lock_entry

    lock_entry(rt.settings, A, set_expected=True)
    assert runtime.activate(rt.settings, A).status == "ready"  # locked and intact: fine
    runtime.stop(rt.settings)
    weights = rt.settings.resolve_path(DEMO_WEIGHTS)
    with (weights / "config.json").open("a") as handle:
        handle.write("\n")  # drift

    refused = cli("activate-model", A)
    assert refused.code == 2
    assert f"{A!r} is locked and its weights failed fast verification (drift" in refused.err
    assert "--force" in refused.err
    assert rt.state_json() is None and rt.processes() == []
    assert history.list_activations(rt.settings)[0]["result"] == "refused"

    forced = cli("activate-model", A, "--force")
    assert forced.code == 0, forced.err
    violation = read_events(rt.settings, "lock_violation")[0]
    assert violation["name"] == A and violation["forced"] is True
    runtime.stop(rt.settings)


def test_locked_entry_refusal_uses_the_verifier_answer(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    from imageworks_core import verification

    drift = verification.VerifyResult(
        name=A,
        result="drift",
        mode="fast",
        algorithm="sha256",
        directory=DEMO_WEIGHTS,
        aggregate="aa",
        expected="bb",
        locked=True,
        file_count=1,
        total_bytes=1,
        bytes_read=0,
        duration_s=0.0,
    )
    monkeypatch.setattr(verification, "verify_entry", lambda settings, name, **_options: drift)
    entry = demo_entry(A, "test/alpha", version_lock={"locked": True, "expected_aggregate_sha256": "bb" * 32})
    rt.registry(entry)
    with pytest.raises(LockViolationError) as caught:
        runtime.activate(rt.settings, A)
    assert caught.value.exit_code == 2 and "aggregate aa != expected bb" in caught.value.message


def test_port_held_by_a_stranger_exits_6_naming_it(rt: Runtime, cli) -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", rt.port))
        holder.listen()
        result = cli("activate-model", A)
    assert result.code == 6
    assert f"port {rt.port} on 127.0.0.1 is already in use by pid {os.getpid()}" in result.err
    assert rt.state_json() is None and rt.processes() == []
    assert read_events(rt.settings, "activation_failed")[0]["name"] == A


@pytest.mark.parametrize(
    ("entry", "code", "message"),
    [
        (demo_entry(A, "test/alpha", download_path="demo/models/not-downloaded"), 7, "does not exist"),
        (demo_entry(A, "test/alpha", "--tp", "{gpus}"), 3, "unknown placeholder {gpus}"),
        (
            {"name": A, "backend": "openai", "backend_config": {"base_url": "https://example.invalid/v1"}},
            6,
            "nothing to activate; requests go to https://example.invalid/v1",
        ),
        (
            demo_entry(A, "test/alpha", backend_config={"launch": ["/nonexistent/vllm", "serve", "{port}"]}),
            6,
            "'/nonexistent/vllm': No such file or directory",
        ),
    ],
    ids=["missing-weights", "unknown-placeholder", "remote-backend", "missing-executable"],
)
def test_preflight_errors(rt: Runtime, cli, entry: dict[str, Any], code: int, message: str) -> None:
    rt.registry(entry)
    result = cli("activate-model", A)
    assert result.code == code, result.err
    assert message in result.err
    assert rt.processes() == [] and (rt.state_json() or {}).get("status") != "starting"


def test_cli_usage_and_unknown_name(rt: Runtime, cli) -> None:
    assert cli("activate-model").code == 64
    assert cli("activate-model", A, "--stop").code == 64
    unknown = cli("activate-model", "alpah_(CPU)")
    assert unknown.code == 4 and "did you mean 'alpha_(CPU)'" in unknown.err


# A real inference server ---------------------------------------------------------------------------------
@pytest.mark.e2e
def test_e2e_transformers_serve_activate_switch_stop(rt: Runtime, cli) -> None:
    require(*e2e_backend.inference_backend_available())
    model = str(e2e_backend.tiny_llava_path())
    llava = {
        "name": "tiny-llava_(e2e)",
        "backend": "vllm",
        "served_model_id": e2e_backend.served_model_id_for(model),
        "capabilities": {"text": True, "vision": True},
        "download_path": model,
        "backend_config": {
            "launch": list(e2e_backend.TRANSFORMERS_SERVE_LAUNCH),
            "env": dict(e2e_backend.launch_env()),
            "health_path": e2e_backend.HEALTH_PATH,
            "startup_timeout_s": 120,
        },
    }
    rt.registry(llava, demo_entry(A, "test/alpha"))
    result = cli("activate-model", "tiny-llava_(e2e)")
    assert result.code == 0, result.err
    state = runtime.read_state(rt.settings)
    assert state is not None and state.status == "ready" and rt.served_ids() == [model]
    status = runtime.current(rt.settings)
    assert status is not None and status.healthy is True
    workers = [state.pid, *(p.pid for p in psutil.Process(state.pid).children(recursive=True))]

    assert runtime.activate(rt.settings, A).status == "ready"
    assert all(gone(pid) for pid in workers) and rt.served_ids() == ["test/alpha"]
    assert cli("activate-model", "--stop").code == 0
    assert rt.processes() == []


def test_readiness_is_polled_fast_at_first_and_backs_off() -> None:
    from imageworks_core.runtime.readiness import READY_POLL_MAX_S, READY_POLL_MIN_S, poll_delay

    assert poll_delay(0.0) == READY_POLL_MIN_S == 0.01
    assert poll_delay(0.08) == READY_POLL_MIN_S  # a backend up in 80 ms is seen within 10 ms
    assert poll_delay(2.0) == pytest.approx(0.2)  # then a tenth of the time waited
    assert poll_delay(600.0) == READY_POLL_MAX_S == 0.5
