"""Refresh the README's dashboard screenshots: docs/screenshots/<page>.png at 1400x900.

Seeds a throw-away deployment root from configs/ and demo/ (the checkout is never written), serves the dashboard
on a free loopback port, opens each page from the sidebar in Debian's headless Chromium (playwright; never
`playwright install`), and stops exactly the process group it started.

``--fleet`` takes the Active Model page in fleet mode instead (active_model_fleet.png): a Ray cluster on loopback
started here (the head, and ``n2`` with two GPUs as Ray resources; this box's NVML, if any, is not faked, so
memory may read "unknown"), a ``configs/fleet.json`` giving each node its own throw-away root, the two demo
entries started on nodes through :class:`imageworks_core.fleet.Fleet`, and the dashboard joined to the cluster
through ``IMAGEWORKS_RAY_ADDRESS``. Afterwards every slot is stopped, the cluster shut down and the dashboard's
process group stopped, also when a step fails.

    uv run python scripts/screenshots.py [--out docs/screenshots] [--fleet]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imageworks_core.dashboard_launcher import streamlit_argv  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1400, "height": 900}
PAGES = (("Registry", "registry"), ("Active Model", "active_model"), ("Vision Probe", "vision_probe"), ("Settings", "settings"))
STARTUP_TIMEOUT_S = 90
# The fleet pass: where each demo entry runs (node, GPUs), and how long the page may take to show it.
FLEET_STARTS = (("demo-vision_(CPU)", "n2", 1), ("demo-text_(CPU)", "head", None))
FLEET_NODES = ("head", "n2")
FLEET_PAGE_TIMEOUT_MS = 30_000


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


def _open_app(page: Any, url: str) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    # The first run replaces Streamlit's file-based page list with the app's own navigation: wait for it.
    expect(page.get_by_test_id("stSidebar").get_by_text("Models", exact=True)).to_be_visible()
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')


def _open_page(page: Any, link: str) -> None:
    from playwright.sync_api import expect

    page.get_by_test_id("stSidebar").get_by_role("link", name=link, exact=True).click()
    expect(page.get_by_role("heading", name=link, exact=True)).to_be_visible()
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')


def _shoot(url: str, out: Path) -> list[Path]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport=VIEWPORT)
        _open_app(page, url)
        for link, stem in PAGES:
            _open_page(page, link)
            time.sleep(1.5)  # let fragments and images paint before the picture
            path = out / f"{stem}.png"
            page.screenshot(path=str(path))
            shots.append(path)
        browser.close()
    return shots


@contextmanager
def _dashboard(root: Path, **extra_env: str) -> Iterator[str]:
    """The dashboard on ``root`` at a free loopback port (its URL); its process group is stopped at exit."""
    port = _free_port()
    env = {**os.environ, "IMAGEWORKS_ROOT": str(root), "CHAT_PROXY_VLLM_PORT": str(_free_port()), **extra_env}
    proc = subprocess.Popen(
        streamlit_argv(port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def _fleet_cluster(root: Path) -> Iterator[tuple[Any, str]]:
    """A Ray cluster on loopback (the head, and n2 with two GPUs as Ray resources), each node with its own root
    in ``configs/fleet.json``, and a Fleet on it for ``root``; at exit every slot and agent is stopped and the
    cluster shut down."""
    # Else Ray rewrites 127.0.0.1 to the machine's address; the dashboard inherits it too.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.pop("IMAGEWORKS_RAY_ADDRESS", None)
    from imageworks_core.fleet import Fleet
    from imageworks_core.fleet.cluster import import_ray
    from imageworks_core.settings import get_settings

    nodes = {name: root.parent / name for name in FLEET_NODES}
    for node_root in nodes.values():
        shutil.copytree(REPO / "demo", node_root / "demo")
    fleet_json = {"defaults": {"max_models": 2}, "nodes": {name: {"root": str(p)} for name, p in nodes.items()}}
    (root / "configs" / "fleet.json").write_text(json.dumps(fleet_json, indent=2) + "\n")
    ray = import_ray()  # as the product does: a `uv run` driver must not ship the checkout to Ray's workers
    from ray.cluster_utils import Cluster

    common = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**common, "node_name": "head"})
    try:
        cluster.add_node(**common, node_name="n2", num_gpus=2)
        cluster.wait_for_nodes()
        fleet = Fleet.connect(get_settings(root), cluster.address)
        try:
            yield fleet, cluster.address
        finally:
            fleet.shutdown()
            fleet.close()
    finally:
        ray.shutdown()
        cluster.shutdown()


def _shoot_fleet(url: str, out: Path, slot_ids: list[str]) -> Path:
    """The Active Model page in fleet mode once every slot in ``slot_ids`` shows ready, scrolled to the nodes."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=FLEET_PAGE_TIMEOUT_MS)
    path = out / "active_model_fleet.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport=VIEWPORT)
        _open_app(page, url)
        _open_page(page, "Active Model")
        expect(page.get_by_text("Fleet mode: Ray cluster at")).to_be_visible()
        for slot_id in slot_ids:
            expect(page.locator(f".st-key-fleet_slot_{slot_id}")).to_contain_text("ready")
        page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
        time.sleep(1.5)  # let the fragment's table paint before the picture
        page.screenshot(path=str(path))
        browser.close()
    return path


def _fleet_pass(root: Path, out: Path) -> list[Path]:
    with _fleet_cluster(root) as (fleet, address):
        slot_ids = [fleet.activate(name, node=node, gpus=gpus).slot_id for name, node, gpus in FLEET_STARTS]
        with _dashboard(root, IMAGEWORKS_RAY_ADDRESS=address) as url:
            return [_shoot_fleet(url, out, slot_ids)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument(
        "--fleet", action="store_true", help="take the Active Model page in fleet mode (a Ray cluster on loopback)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imageworks-shots-") as tmp:
        root = Path(tmp) / "root"
        _seed(root)
        if args.fleet:
            shots = _fleet_pass(root, args.out)
        else:
            with _dashboard(root) as url:
                shots = _shoot(url, args.out)
        for path in shots:
            print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
