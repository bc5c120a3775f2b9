"""Refresh the README's dashboard screenshots: docs/screenshots/<page>.png at 1400x900.

Seeds a throw-away deployment root from configs/ and demo/ (the checkout is never written), serves the dashboard
on a free loopback port, opens each page from the sidebar in Debian's headless Chromium (playwright; never
`playwright install`), and stops exactly the process group it started.

    uv run python scripts/screenshots.py [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imageworks_core.dashboard_launcher import streamlit_argv  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1400, "height": 900}
PAGES = (("Registry", "registry"), ("Active Model", "active_model"), ("Vision Probe", "vision_probe"), ("Settings", "settings"))
STARTUP_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _seed(root: Path) -> None:
    (root / "configs").mkdir(parents=True)
    for name in ("model_registry.curated.json", "model_registry.discovered.json"):
        shutil.copy(REPO / "configs" / name, root / "configs" / name)
    shutil.copytree(REPO / "demo", root / "demo")


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the dashboard exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/_stcore/health", timeout=1).text == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the dashboard did not answer within {STARTUP_TIMEOUT_S} s")


def _shoot(url: str, out: Path) -> list[Path]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        # The first run replaces Streamlit's file-based page list with the app's own navigation: wait for it.
        expect(page.get_by_test_id("stSidebar").get_by_text("Models", exact=True)).to_be_visible()
        page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
        for link, stem in PAGES:
            page.get_by_test_id("stSidebar").get_by_role("link", name=link, exact=True).click()
            expect(page.get_by_role("heading", name=link, exact=True)).to_be_visible()
            page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
            time.sleep(1.5)  # let fragments and images paint before the picture
            path = out / f"{stem}.png"
            page.screenshot(path=str(path))
            shots.append(path)
        browser.close()
    return shots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imageworks-shots-") as tmp:
        root = Path(tmp) / "root"
        _seed(root)
        port = _free_port()
        env = {**os.environ, "IMAGEWORKS_ROOT": str(root), "CHAT_PROXY_VLLM_PORT": str(_free_port())}
        proc = subprocess.Popen(
            streamlit_argv(port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc)
            for path in _shoot(url, args.out):
                print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
