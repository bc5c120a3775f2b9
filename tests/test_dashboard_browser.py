"""The dashboard in a real browser: `streamlit run` on a loopback port, driven by headless Chromium (playwright).

One server per module on a temporary deployment root (the demo registry) with the single port on a free port.
The tests walk the runbook's GUI steps: every page opens (Models → Registry / Active Model / Vision Probe,
Settings); Verify Hash on the demo entry shows the result; Lock version runs "Verify and lock"; the canonical
vision probe against the demo backend shows ``vision_ok: true`` in the modal; Reload registry after corrupting
the curated file shows every problem and the last-good banner. Screenshots go to each test's tmp dir.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import REPO, free_port, require, seed_root, wait_for_dashboard

from imageworks_core import runtime
from imageworks_core.dashboard_launcher import streamlit_argv
from imageworks_core.settings import Settings

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEMO = "demo-vision_(CPU)"
DEMO_TEXT = "demo-text_(CPU)"
STARTUP_TIMEOUT_S = 60
ACTION_TIMEOUT_MS = 60_000


@dataclass
class Dashboard:
    url: str
    settings: Settings
    log: Path
    process: subprocess.Popen[bytes]


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """`streamlit run dashboard/app.py` (the launcher's argv) on a temp root; stopped with its backend at the end."""
    require(CHROMIUM.exists(), "Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    base = tmp_path_factory.mktemp("dashboard")
    seed_root(base / "root")
    port, vllm_port = free_port(), free_port()
    env = {
        **os.environ,
        "IMAGEWORKS_ROOT": str(base / "root"),
        "CHAT_PROXY_VLLM_PORT": str(vllm_port),
        "CHAT_PROXY_VLLM_STOP_TIMEOUT_S": "3",
        "HOME": str(base / "home"),
    }
    env.pop("IMAGEWORKS_PROFILE", None)
    settings = Settings(IMAGEWORKS_ROOT=base / "root", CHAT_PROXY_VLLM_PORT=vllm_port, CHAT_PROXY_VLLM_STOP_TIMEOUT_S=3)
    log = base / "streamlit.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            streamlit_argv(port),
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
        yield Dashboard(url, settings, log, proc)
    finally:
        runtime.stop(settings, reason="browser test teardown")
        _stop_group(proc)
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")


@pytest.fixture(scope="module")
def browser(dashboard: Dashboard) -> Iterator[object]:
    from playwright.sync_api import expect, sync_playwright

    # The machine is shared and the first script run imports pandas and streamlit: be patient, not flaky.
    expect.set_options(timeout=ACTION_TIMEOUT_MS)

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1440, "height": 1100})  # type: ignore[attr-defined]
    tab = context.new_page()
    tab.set_default_timeout(ACTION_TIMEOUT_MS)
    yield tab
    context.close()


def settle(page: object) -> None:
    """Wait until the script run finished (a click during a run can be superseded by the run's end)."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')  # type: ignore[attr-defined]


def metric(page: object, label: str) -> object:
    """The ``label`` metric as the page shows it now. While a fragment re-renders, Streamlit keeps the previous
    element beside the new one, marked stale, for a moment: a plain locator would match both."""
    current = page.locator('[data-testid="stElementContainer"]:not([data-stale="true"])')  # type: ignore[attr-defined]
    return current.get_by_test_id("stMetric").filter(has_text=label)


def open_page(page: object, dashboard: Dashboard, path: str, heading: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{dashboard.url}/{path}")  # type: ignore[attr-defined]
    expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()  # type: ignore[attr-defined]
    settle(page)


def navigate(page: object, link: str, heading: str) -> None:
    """Click a sidebar link and wait for the page to have rendered."""
    from playwright.sync_api import expect

    settle(page)
    page.get_by_test_id("stSidebar").get_by_role("link", name=link).click()  # type: ignore[attr-defined]
    expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()  # type: ignore[attr-defined]
    settle(page)


def open_backends_tab(page: object) -> None:
    """Settings → Backends, waiting for the tab's own content: right after a click the app can still read
    'notRunning' (the rerun has not started), so :func:`settle` alone may return before the tab's run, and a
    file written next would race that run's registry read."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Backends").click()  # type: ignore[attr-defined]
    expect(page.get_by_role("button", name="Reload registry")).to_be_visible()  # type: ignore[attr-defined]
    settle(page)


def no_exception(page: object) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0  # type: ignore[attr-defined]


def test_every_page_opens_from_the_sidebar(page, dashboard: Dashboard, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    open_page(page, dashboard, "", "Registry")
    sidebar = page.get_by_test_id("stSidebar")
    expect(sidebar.get_by_text("Models", exact=True)).to_be_visible()
    expect(sidebar.get_by_text("Settings", exact=True).first).to_be_visible()
    expect(page.get_by_role("tab", name="Import from Download History")).to_be_visible()
    expect(page.get_by_role("button", name="Verify Hash")).to_be_visible()
    page.screenshot(path=str(tmp_path / "registry.png"), full_page=True)
    for link, heading, shot in (
        ("Active Model", "Active Model", "active_model.png"),
        ("Vision Probe", "Vision Probe", "vision_probe.png"),
        ("Settings", "Settings", "settings.png"),
        ("Registry", "Registry", "registry_again.png"),
    ):
        navigate(page, link, heading)
        no_exception(page)
        page.screenshot(path=str(tmp_path / shot), full_page=True)
    navigate(page, "Active Model", "Active Model")
    expect(page.get_by_text("No NVIDIA GPU visible").or_(page.get_by_text("GPU 0:"))).to_be_visible()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "active_model.png",
        "registry.png",
        "registry_again.png",
        "settings.png",
        "vision_probe.png",
    ]


def test_verify_hash_then_lock_version(page, dashboard: Dashboard, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    open_page(page, dashboard, "", "Registry")
    expect(page.get_by_role("heading", name="ImageWorks demo vision backend (CPU, no GPU needed)")).to_be_visible()
    page.get_by_role("button", name="Verify Hash").click()
    expect(page.get_by_text("Verify Hash: hash")).to_be_visible()
    settle(page)
    page.screenshot(path=str(tmp_path / "verified.png"), full_page=True)
    page.locator("label").filter(has_text=re.compile(r"^Lock version$")).click()
    expect(page.get_by_text("Locking requires a fresh full verification")).to_be_visible()
    settle(page)
    page.get_by_role("button", name="Verify and lock").click()
    expect(page.get_by_text("Locked: expected hash set to")).to_be_visible()
    no_exception(page)
    page.screenshot(path=str(tmp_path / "locked.png"), full_page=True)
    curated = json.loads(dashboard.settings.curated_path.read_text(encoding="utf-8"))
    lock = next(e for e in curated if e["name"] == DEMO)["version_lock"]
    assert lock["locked"] is True and len(lock["expected_aggregate_sha256"]) == 64


def test_canonical_vision_probe_shows_vision_ok_in_the_modal(page, dashboard: Dashboard, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    open_page(page, dashboard, "vision_probe", "Vision Probe")
    page.locator("label").filter(has_text="Activate the model first if it is not the active backend").click()
    settle(page)
    page.get_by_role("button", name="Run probe").click()
    modal = page.get_by_role("dialog")
    expect(modal.get_by_text("vision_ok: true")).to_be_visible(timeout=120_000)
    expect(modal.get_by_text("grounded: true")).to_be_visible()
    page.screenshot(path=str(tmp_path / "probe_modal.png"))
    modal.get_by_role("button", name="Done").click()
    expect(page.get_by_role("dialog")).to_have_count(0)
    assert runtime.read_state(dashboard.settings).name == DEMO


def test_active_model_panel_stops_with_confirmation_and_refreshes_by_itself(
    page, dashboard: Dashboard, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    runtime.activate(dashboard.settings, DEMO_TEXT)
    open_page(page, dashboard, "active_model", "Active Model")
    active = metric(page, "Active model")
    expect(active).to_contain_text(DEMO_TEXT)
    page.get_by_role("button", name="Stop").click()
    modal = page.get_by_role("dialog")
    expect(modal.get_by_text(f"Stop {DEMO_TEXT}?")).to_be_visible()
    settle(page)
    modal.get_by_role("button", name="Confirm").click()
    expect(page.get_by_text(f"Stopped {DEMO_TEXT} in")).to_be_visible()
    expect(active).to_contain_text("none")
    assert runtime.read_state(dashboard.settings) is None
    # Started elsewhere (the CLI, another operator): the panel shows it without a click or a reload.
    runtime.activate(dashboard.settings, DEMO)
    expect(active).to_contain_text(DEMO, timeout=20_000)
    expect(metric(page, "Health")).to_contain_text("healthy")
    no_exception(page)
    page.screenshot(path=str(tmp_path / "active_model_running.png"), full_page=True)


def open_active_model(page: object, dashboard: Dashboard) -> None:
    """The Active Model page as an operator reaches it: the app, then the sidebar link."""
    open_page(page, dashboard, "", "Registry")
    navigate(page, "Active Model", "Active Model")


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def launch_processes(settings: Settings) -> list[psutil.Process]:
    """Every live process of the launch the state file records (the runtime's own proof of ownership)."""
    from imageworks_core.runtime import process

    state = runtime.read_state(settings)
    return process.processes_of(state) if state is not None else []


def test_a_slow_start_is_live_in_the_page_and_cancelled_from_it(page, dashboard: Dashboard, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    from imageworks_core import history
    from imageworks_core.registry import load_registry, update_entry

    runtime.stop(dashboard.settings, reason="test setup")
    config = load_registry(settings=dashboard.settings).get(DEMO_TEXT).backend_config.model_dump(exclude_none=True)
    slow = ["bash", "-c", 'sleep 25; exec "$@"', "-", *config["launch"]]
    update_entry(dashboard.settings, DEMO_TEXT, {"backend_config": {**config, "launch": slow}}, command="test")
    try:
        open_active_model(page, dashboard)
        page.get_by_label("Model to run on the single port").click()
        page.get_by_role("option", name=DEMO_TEXT).click()
        settle(page)
        page.get_by_role("button", name="Start", exact=True).click()
        page.get_by_role("dialog").get_by_role("button", name="Confirm").click()
        # While it starts the page stays live: phase and elapsed time move, the status says starting.
        banner = page.get_by_text(re.compile(rf"Starting {re.escape(DEMO_TEXT)}.* · \d+ s · waiting"))
        expect(banner).to_be_visible(timeout=20_000)
        expect(metric(page, "Status")).to_contain_text("starting")
        first = banner.inner_text()
        expect(banner).not_to_have_text(first, timeout=5_000)  # the elapsed time advances by itself
        expect(page.get_by_role("button", name="Start", exact=True)).to_be_disabled()
        started = launch_processes(dashboard.settings)
        assert len(started) >= 2, "bash and its sleep are running"
        page.screenshot(path=str(tmp_path / "active_model_starting.png"), full_page=True)
        clicked = time.monotonic()
        page.get_by_role("button", name="Cancel start").click()
        deadline = clicked + 2.0
        while runtime.read_state(dashboard.settings) is not None or any(map(alive, started)):
            assert time.monotonic() < deadline, (
                f"not cancelled within 2 s: state {runtime.read_state(dashboard.settings)}, "
                f"alive {[p.pid for p in started if alive(p)]}"
            )
            time.sleep(0.05)
        expect(page.get_by_text(f"Cancelled the start of {DEMO_TEXT}")).to_be_visible()
        expect(metric(page, "Active model")).to_contain_text("none")
        row = history.list_activations(dashboard.settings)[0]
        assert (row["name"], row["action"], row["result"]) == (DEMO_TEXT, "activate", "cancelled")
        expect(page.get_by_role("button", name="Start", exact=True)).to_be_enabled()
        no_exception(page)
    finally:
        update_entry(dashboard.settings, DEMO_TEXT, {"backend_config": config}, command="test")


def test_a_stop_by_another_operator_shows_in_the_first_page_within_seconds(
    browser, dashboard: Dashboard, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    runtime.activate(dashboard.settings, DEMO)
    contexts = [browser.new_context(viewport={"width": 1400, "height": 900}) for _ in range(2)]
    try:
        first, second = (context.new_page() for context in contexts)
        for tab in (first, second):
            tab.set_default_timeout(ACTION_TIMEOUT_MS)
            open_active_model(tab, dashboard)
            expect(metric(tab, "Active model")).to_contain_text(DEMO)
        expect(first.get_by_text(f"{DEMO} is ready at")).to_be_visible()
        second.get_by_role("button", name="Stop").click()
        second.get_by_role("dialog").get_by_role("button", name="Confirm").click()
        expect(second.get_by_text(f"Stopped {DEMO} in")).to_be_visible()
        # The first operator clicked nothing: within a few seconds the page says not ready and offers Start.
        expect(metric(first, "Active model")).to_contain_text("none", timeout=5_000)
        expect(first.get_by_text(f"{DEMO} is ready at")).to_have_count(0)
        expect(first.get_by_role("button", name="Start", exact=True)).to_be_enabled()
        expect(first.get_by_role("button", name="Stop")).to_be_disabled()
        first.screenshot(path=str(tmp_path / "active_model_after_other_stop.png"), full_page=True)
        no_exception(first)
    finally:
        for context in contexts:
            context.close()


def test_reload_registry_after_corruption_shows_the_error_banner(page, dashboard: Dashboard, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    curated = dashboard.settings.curated_path
    good = curated.read_text(encoding="utf-8")
    open_page(page, dashboard, "settings", "Settings")
    open_backends_tab(page)
    try:
        curated.write_text(good.replace('"role_priority": 1,', '"role_priorty": 1,'), encoding="utf-8")
        page.get_by_role("button", name="Reload registry").click()
        expect(page.get_by_text("Registry reload failed — 1 problem:")).to_be_visible()
        # The banner lists the problem too (issue 13): the text may stand twice on the page.
        expect(page.get_by_text("unknown key 'role_priorty' — did you mean 'role_priority'?").first).to_be_visible()
        expect(page.get_by_text("showing the last good registry")).to_be_visible()
        page.screenshot(path=str(tmp_path / "reload_error.png"), full_page=True)
        navigate(page, "Registry", "Registry")
        expect(page.get_by_text("showing the last good registry")).to_be_visible()
        expect(page.get_by_role("button", name="Verify Hash")).to_be_visible()
    finally:
        curated.write_text(good, encoding="utf-8")
    navigate(page, "Settings", "Settings")
    open_backends_tab(page)
    page.get_by_role("button", name="Reload registry").click()
    expect(page.get_by_text("Registry reloaded: 6 entries, valid.")).to_be_visible()
    no_exception(page)


def test_deep_links_open_their_page_without_a_page_not_found_dialog(page, dashboard: Dashboard) -> None:
    # Was a bug: /active-model (a url_path unlike the file's name) first showed Streamlit's "Page not found".
    from playwright.sync_api import expect

    for path, heading in (("active_model", "Active Model"), ("vision_probe", "Vision Probe"), ("settings", "Settings")):
        open_page(page, dashboard, path, heading)
        expect(page.get_by_text("Page not found")).to_have_count(0)
        no_exception(page)
