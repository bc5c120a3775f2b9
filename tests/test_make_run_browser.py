"""The quick start leaves the checkout clean: `make run`'s own script, a GUI session in Chromium, `git status`.

A clone of the repository stands in for a fresh checkout (the real one is never written by tests). The dashboard is
started the way `make run` starts it (`scripts/demo_root.py`, which seeds the git-ignored `.demo-root/`), the demo
entry is verified and locked from the Registry page, and afterwards the clone's `git status --porcelain` is empty
while the lock landed in the demo root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port, require, wait_for_dashboard
from test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, DEMO, _stop_group

pytestmark = pytest.mark.browser


def test_a_gui_session_after_make_run_leaves_a_fresh_checkout_clean(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    require(CHROMIUM.exists(), "Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    port = free_port()
    env = {**os.environ, "CHAT_PROXY_VLLM_PORT": str(free_port()), "HOME": str(tmp_path / "home")}
    for var in ("IMAGEWORKS_ROOT", "IMAGEWORKS_PROFILE"):
        env.pop(var, None)
    log = (tmp_path / "make-run.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "scripts/demo_root.py", "--port", str(port)],
        cwd=clone,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_dashboard(url, server, tmp_path / "make-run.log")
        expect.set_options(timeout=60_000)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            expect(page.get_by_test_id("stSidebar").get_by_text("Models", exact=True)).to_be_visible()
            expect(page.get_by_text(str(clone / ".demo-root"))).to_be_visible()  # the sidebar names the root served
            page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
            page.locator("label").filter(has_text=re.compile(r"^Lock version$")).click()
            page.get_by_role("button", name="Verify and lock").click()
            expect(page.get_by_text("Locked: expected hash set to")).to_be_visible()
            browser.close()
    finally:
        _stop_group(server)
        log.close()
    curated = json.loads((clone / ".demo-root" / "configs" / "model_registry.curated.json").read_text())
    assert next(e for e in curated if e["name"] == DEMO)["version_lock"]["locked"] is True
    assert list((clone / ".demo-root" / "configs" / "locks").glob("*.manifest.json"))
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout == ""
