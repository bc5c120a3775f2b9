"""`make run` serves a git-ignored demo root, never the checkout: a GUI session leaves `git status` as it was.

The Makefile's `run` target calls ``scripts/demo_root.py``, which seeds the root from ``configs/`` and ``demo/``
(copies, on first run only) and execs the dashboard on it; `make clean` removes it. The session test starts the
dashboard exactly that way (on a temporary demo root), then locks and edits the demo entry through the page and
checks that no tracked file changed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from conftest import REPO, free_port, require, wait_for_dashboard
from streamlit.testing.v1 import AppTest

from imageworks_core import audit
from imageworks_core.registry import load_registry
from imageworks_core.settings import get_settings

SCRIPT = REPO / "scripts" / "demo_root.py"
DEMO = "demo-vision_(CPU)"
STARTUP_TIMEOUT_S = 60


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_root", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git_status() -> list[str]:
    """Tracked and untracked changes under the paths a served root would write (configs/, demo/)."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", "configs", "demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(out.splitlines())


def _make_dry_run(target: str) -> str:
    require(shutil.which("make") is not None, "make is not installed")
    return subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_make_run_serves_the_seeded_demo_root_and_make_clean_removes_it() -> None:
    run_lines = _make_dry_run("run").splitlines()
    assert any("python scripts/demo_root.py" in line for line in run_lines), run_lines
    assert not any("IMAGEWORKS_ROOT=" in line for line in run_lines), "make run never serves the checkout"
    assert ".demo-root" in _make_dry_run("clean").split()
    assert _script().DEFAULT_ROOT == REPO / ".demo-root"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".demo-root/configs/x.json"], cwd=REPO, check=False)
    assert ignored.returncode == 0, "the demo root is git-ignored"


def test_seeding_copies_configs_and_demo_once_and_never_links(tmp_path: Path) -> None:
    script = _script()
    source = tmp_path / "checkout"
    shutil.copytree(REPO / "configs", source / "configs", ignore=shutil.ignore_patterns("locks"))
    shutil.copytree(REPO / "demo", source / "demo")
    (source / "configs" / "model_registry.json").write_text("{}", encoding="utf-8")  # generated: not seeded
    root = tmp_path / "demo-root"
    assert script.seed(root, source) is True
    curated = root / "configs" / "model_registry.curated.json"
    assert curated.read_bytes() == (source / "configs" / "model_registry.curated.json").read_bytes()
    assert not curated.is_symlink() and not (root / "demo").is_symlink()
    assert (root / "demo" / "models" / "imageworks-demo-vision" / "LICENSE").is_file()
    assert not (root / "configs" / "model_registry.json").exists()
    curated.write_text(curated.read_text(encoding="utf-8").replace("demo", "edited", 1), encoding="utf-8")
    assert script.seed(root, source) is False, "a seeded root is served as it is"
    assert "edited" in curated.read_text(encoding="utf-8")
    assert not list(tmp_path.glob("*.seeding-*")), "no staging folder is left behind"


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """The dashboard started the way `make run` starts it (the same script), on a temporary demo root."""
    root, log = tmp_path / "demo-root", tmp_path / "dashboard.log"
    port = free_port()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "CHAT_PROXY_VLLM_PORT": str(free_port())}
    for var in ("IMAGEWORKS_ROOT", "IMAGEWORKS_PROFILE"):
        env.pop(var, None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--root", str(root), "--port", str(port)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_dashboard(url, proc, log, STARTUP_TIMEOUT_S)
        yield url, root, log
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)


def test_a_gui_session_after_make_run_leaves_the_checkout_clean(
    make_run: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = _git_status()
    url, root, log = make_run
    assert httpx.get(url, timeout=5).status_code == 200
    shown = log.read_text(errors="replace")
    assert f"seeded the demo root {root}" in shown and f"(root: {root})" in shown
    # The session: the page the server serves, on the root the launcher exported, locks and edits the demo entry.
    monkeypatch.setenv("IMAGEWORKS_ROOT", str(root))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=90)
    at.run()
    next(s for s in at.selectbox if s.label == "Entry").set_value(DEMO)
    at.run()
    next(t for t in at.toggle if t.label == "Lock version").set_value(True)
    at.run()
    next(b for b in at.button if b.label == "Verify and lock").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    settings = get_settings(root)
    entry = load_registry(force=True, settings=settings).get(DEMO)
    assert entry.locked and entry.version_lock is not None
    assert (root / entry.version_lock.manifest_path).is_file(), "the manifest went to the demo root"
    assert [e["event"] for e in audit.read_events(settings, "lock")] == ["lock"]
    assert _git_status() == before, "the session changed files of the checkout"
