"""Shared fixtures: a temporary deployment root seeded with the demo registry, and an in-process CLI runner."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from imageworks_core.settings import Settings, get_settings
from imageworks_demo.launch import demo_argv, demo_launch

__all__ = ["demo_argv", "demo_launch", "free_port", "require", "seed_root"]

REPO = Path(__file__).resolve().parent.parent


def require(condition: bool, reason: str) -> None:
    """Skip with a printed reason locally; in CI (CI=true) a missing prerequisite is a failure, never a skip."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must not skip: {reason}")
    pytest.skip(reason)


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds (instead of a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_for_clock_tick_past(path: Path) -> None:
    """Wait until the file system's clock has left the tick of ``path``'s ctime (coarse kernels tick every few
    ms), so an edit made now gets a new ctime. Probes with a scratch file beside ``path``'s directory."""
    probe = path.parent.parent / f".clock-probe-{os.getpid()}"
    before = path.stat().st_ctime_ns

    def ticked() -> bool:
        probe.write_bytes(b"")
        try:
            return probe.stat().st_ctime_ns > before
        finally:
            probe.unlink()

    wait_until(ticked, timeout=5, what=f"the clock to leave the ctime tick of {path}", interval=0.001)


def wait_for_dashboard(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 90) -> None:
    """Wait until the Streamlit server at ``url`` answers its health check; fail with its log if it exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the dashboard exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
        try:
            if httpx.get(f"{url}/_stcore/health", timeout=1).text == "ok":
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the dashboard did not answer within {timeout_s:g} s"
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_root(root: Path) -> Settings:
    """Copy the bundled demo registry and demo weights into ``root`` (tests never touch the repo's configs/)."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    for name in ("model_registry.curated.json", "model_registry.discovered.json"):
        shutil.copy(REPO / "configs" / name, root / "configs" / name)
    shutil.copytree(REPO / "demo", root / "demo", dirs_exist_ok=True)
    return get_settings(root)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A temporary deployment root with the demo registry; IMAGEWORKS_ROOT points at it."""
    settings = seed_root(tmp_path / "root")
    monkeypatch.setenv("IMAGEWORKS_ROOT", str(settings.root))
    for var in ("IMAGEWORKS_PROFILE", "CHAT_PROXY_VLLM_PORT", "CHAT_PROXY_VLLM_HOST"):
        monkeypatch.delenv(var, raising=False)
    return settings


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``imageworks-models`` in-process; returns exit code, stdout and stderr."""
    from imageworks_core.cli import commands  # noqa: F401
    from imageworks_core.cli.app import _global, app, run

    def invoke(*args: str) -> CliResult:
        _global["root"] = None
        capsys.readouterr()
        code = run(app, list(args), "imageworks-models")
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh HOME: the demo registry's real-model entries (under ~/ai-models) are reliably missing."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def single_port(root: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings with the single port on a free loopback port; whatever runs there is stopped at teardown."""
    from imageworks_core import runtime

    monkeypatch.setenv("CHAT_PROXY_VLLM_PORT", str(free_port()))
    monkeypatch.setenv("CHAT_PROXY_VLLM_STOP_TIMEOUT_S", "3")
    settings = get_settings(root.root)
    yield settings
    runtime.stop(settings, reason="test teardown")

