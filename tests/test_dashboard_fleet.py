"""The Active Model page in fleet mode: real Streamlit pointed at a real Ray cluster on loopback, in headless Chromium.

One cluster per module (``fleet_rig.fleet_on_loopback``): the head and ``n2``, whose two GPUs are seen through the
fake ``pynvml`` (memory figures). The dashboard runs with ``IMAGEWORKS_RAY_ADDRESS`` set to the cluster in its own
environment, so it joins the cluster as the operator's would. The tests read what the page shows (the node table
with the fake NVML memory, the slot rows), start a model on a chosen node from the page, stop it from its row, see
a model started elsewhere appear by itself, and see a refusal explained; processes and slots are checked from the
test's own connection to the cluster. They are marked both fleet and browser; the page without a cluster is
tests/test_dashboard_fleet_offline.py (this process stays joined to the module's cluster while it runs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import REPO, free_port, require, seed_root, wait_for_dashboard, wait_until
from fleet_rig import (
    FleetRig,
    demo_entry,
    fake_nvml_node,
    fleet_on_loopback,
    marked_processes,
)
from test_dashboard_browser import (  # noqa: F401  (browser and page are fixtures used by name)
    CHROMIUM,
    STARTUP_TIMEOUT_S,
    Dashboard,
    _stop_group,
    browser,
    no_exception,
    open_page,
    page,
    settle,
)

from imageworks_core.dashboard_launcher import streamlit_argv


def fleet_browser(test):  # type: ignore[no-untyped-def]
    """A test on the module's cluster in Chromium: marked both fleet and browser."""
    return pytest.mark.fleet(pytest.mark.browser(test))


PAGE_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def fleet_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetRig, Any]]:
    """The head, n2 (two GPUs through the fake NVML) and n3 (no GPU; only the last test uses it, and kills it)."""
    tmp = tmp_path_factory.mktemp("fleet-dashboard")
    settings = seed_root(tmp / "controller")
    roots = {name: tmp / name for name in ("head", "n2", "n3")}
    for node_root in roots.values():
        shutil.copytree(REPO / "demo", node_root / "demo")
    settings.curated_path.write_text(
        json.dumps(
            [
                demo_entry("fleet-a", "fleet/a"),
                demo_entry("fleet-b", "fleet/b"),
                demo_entry("fleet-slow", "fleet/slow", "--slow-start", "6"),
                demo_entry("fleet-broken", "fleet/broken", "--crash-at-start"),
            ],
            indent=2,
        )
    )
    (settings.configs_dir / "fleet.json").write_text(
        json.dumps({"defaults": {"max_models": 2}, "nodes": {name: {"root": str(p)} for name, p in roots.items()}})
    )
    nodes = {"n2": fake_nvml_node(tmp / "fake-nvml")}
    nodes["n3"] = {}
    with fleet_on_loopback(settings, roots, nodes) as (rig, cluster):
        yield rig, cluster


@pytest.fixture(scope="module")
def rig(fleet_cluster: tuple[FleetRig, Any]) -> FleetRig:
    return fleet_cluster[0]


@pytest.fixture(scope="module")
def dashboard(rig: FleetRig) -> Iterator[Dashboard]:
    """`streamlit run dashboard/app.py` on the controller root, in fleet mode on the module's cluster."""
    require(CHROMIUM.exists(), "Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    base = rig.settings.root.parent
    port = free_port()
    env = {
        **os.environ,
        "IMAGEWORKS_ROOT": str(rig.settings.root),
        "IMAGEWORKS_RAY_ADDRESS": rig.address,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "CHAT_PROXY_VLLM_PORT": str(free_port()),
        "HOME": str(base / "home"),
    }
    env.pop("IMAGEWORKS_PROFILE", None)
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
        yield Dashboard(url, rig.settings, log, proc)
    finally:
        _stop_group(proc)
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")


@pytest.fixture
def fleet_page(page, dashboard: Dashboard, rig: FleetRig) -> Iterator[object]:  # noqa: F811
    """The Active Model page in fleet mode; every slot is stopped after the test and no backend may be left."""
    from playwright.sync_api import expect

    open_page(page, dashboard, "active_model", "Active Model")
    expect(page.get_by_text(f"Fleet mode: Ray cluster at {rig.address}")).to_be_visible()
    yield page
    rig.fleet.stop(None, reason="test teardown")
    wait_until(lambda: not marked_processes(), 10, "every backend of the test to exit")


def node_row(tab: object, name: str) -> object:
    return tab.get_by_test_id("stTable").get_by_role("row", name=re.compile(rf"^{re.escape(name)} "))  # type: ignore[attr-defined]


def slot_row(tab: object, slot_id: str) -> object:
    return tab.locator(f".st-key-fleet_slot_{slot_id}")  # type: ignore[attr-defined]


def pick(tab: object, label: str, option: str) -> None:
    """Choose ``option`` in a select box. The page re-renders by itself when the fleet's nodes change (a node
    dying), which closes an open list: then the list is opened again."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    box = tab.get_by_role("combobox", name=label, exact=True)  # type: ignore[attr-defined]
    for _attempt in range(5):
        settle(tab)
        box.click()
        try:
            tab.get_by_role("option", name=option, exact=True).click(timeout=5_000)  # type: ignore[attr-defined]
            break
        except PlaywrightTimeout:
            continue
    settle(tab)
    expect(box).to_have_value(option)


@fleet_browser
def test_the_node_table_shows_each_node_with_the_fake_nvml_gpu_memory(
    fleet_page, rig: FleetRig, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    tab = fleet_page
    n2 = node_row(tab, "n2")
    # The fake NVML: GPU 0 has 4 of 24 GiB used, GPU 1 has 2 of 24.
    expect(n2).to_contain_text("GPU 0: 4.0/24.0 GiB · GPU 1: 2.0/24.0 GiB")
    expect(n2).to_contain_text("127.0.0.1")
    cells = [c.strip() for c in n2.locator("td, th").all_inner_texts()]
    assert cells[:7] == ["n2", "127.0.0.1", "yes", "0/2", "GPU 0: 4.0/24.0 GiB · GPU 1: 2.0/24.0 GiB", "0/2", "ok"]
    head = [c.strip() for c in node_row(tab, "head").locator("td, th").all_inner_texts()]
    assert head[:7] == ["head (head)", "127.0.0.1", "yes", "0/0", "no GPU", "0/2", "ok"]
    expect(tab.get_by_text("No model runs in the fleet.")).to_be_visible()
    no_exception(tab)
    tab.screenshot(path=str(tmp_path / "fleet_nodes.png"), full_page=True)


@fleet_browser
def test_start_on_a_chosen_node_from_the_page_then_stop_it_from_its_row(
    fleet_page, rig: FleetRig, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    tab = fleet_page
    pick(tab, "Model to start in the fleet", "fleet-a")
    pick(tab, "Node", "n2")
    tab.get_by_role("button", name="Start", exact=True).click()
    expect(tab.get_by_text(re.compile(r"fleet-a is ready on node n2 \(slot \S+, GPU\(s\) 1\)"))).to_be_visible(
        timeout=PAGE_TIMEOUT_MS
    )
    (slot,) = rig.fleet.slots()
    assert (slot.name, slot.node_name, slot.gpus, slot.status) == ("fleet-a", "n2", [1], "ready")
    (backend,) = marked_processes()
    assert backend.environ()["CUDA_VISIBLE_DEVICES"] == "1"
    row = slot_row(tab, slot.slot_id)
    expect(row).to_contain_text("fleet-a")
    expect(row).to_contain_text(str(slot.port))
    expect(row).to_contain_text("ready")
    # The node table follows: one of n2's GPUs and one of its two slots are taken.
    expect(node_row(tab, "n2")).to_contain_text("1/2")
    tab.screenshot(path=str(tmp_path / "fleet_slot_ready.png"), full_page=True)

    row.get_by_role("button", name="Stop").click()
    expect(tab.get_by_text(f"Stopped fleet-a (slot {slot.slot_id} on node n2) in")).to_be_visible()
    expect(tab.get_by_text("No model runs in the fleet.")).to_be_visible()
    assert rig.fleet.slots() == []
    assert not psutil.pid_exists(backend.pid) or backend.status() == psutil.STATUS_ZOMBIE
    no_exception(tab)


@fleet_browser
def test_a_model_started_elsewhere_shows_by_itself_and_a_refusal_says_why(
    fleet_page, rig: FleetRig, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    tab = fleet_page
    # Started by another front end (the CLI, the API): the tab shows it without a click.
    slot = rig.fleet.activate("fleet-b", node="head")
    row = slot_row(tab, slot.slot_id)
    expect(row).to_contain_text("fleet-b", timeout=10_000)
    expect(row).to_contain_text("head")
    expect(row).to_contain_text("ready")

    # More GPUs than n2 has: nothing starts, and the tab says why.
    pick(tab, "Model to start in the fleet", "fleet-a")
    pick(tab, "Node", "n2")
    gpus = tab.get_by_role("spinbutton", name="GPUs", exact=True)
    gpus.fill("3")
    gpus.press("Enter")
    settle(tab)
    tab.get_by_role("button", name="Start", exact=True).click()
    expect(
        tab.get_by_text("Starting fleet-a on n2 failed: no node can take 'fleet-a': n2: 2 of 2 GPU(s) free, 3 needed")
    ).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    assert [s.name for s in rig.fleet.slots()] == ["fleet-b"]
    tab.screenshot(path=str(tmp_path / "fleet_refusal.png"), full_page=True)
    no_exception(tab)


@fleet_browser
def test_a_slow_start_shows_its_phase_and_a_failed_one_its_reason_until_stopped(
    fleet_page, rig: FleetRig, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    tab = fleet_page
    pick(tab, "Model to start in the fleet", "fleet-slow")
    tab.get_by_role("button", name="Start", exact=True).click()
    # While it loads: the page's own line with the phase, and the slot's row says starting.
    expect(tab.get_by_text(re.compile(r"Starting fleet-slow · \d+ s · waiting"))).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    (starting,) = rig.fleet.slots()
    expect(slot_row(tab, starting.slot_id)).to_contain_text("starting (waiting)")
    tab.screenshot(path=str(tmp_path / "fleet_starting.png"), full_page=True)
    expect(tab.get_by_text(re.compile(r"fleet-slow is ready on node \S+ \(slot "))).to_be_visible(
        timeout=PAGE_TIMEOUT_MS
    )
    expect(slot_row(tab, starting.slot_id)).to_contain_text("ready")

    pick(tab, "Model to start in the fleet", "fleet-broken")
    pick(tab, "Node", "head")
    tab.get_by_role("button", name="Start", exact=True).click()
    expect(tab.get_by_text(re.compile(r"Starting fleet-broken on head failed: .*exited with code 3"))).to_be_visible(
        timeout=PAGE_TIMEOUT_MS
    )
    # The backend's last log lines follow in a code block, not in the error's markdown.
    expect(tab.get_by_test_id("stCode").filter(has_text="--crash-at-start").first).to_be_visible()
    failed = next(s for s in rig.fleet.slots() if s.name == "fleet-broken")
    row = slot_row(tab, failed.slot_id)
    expect(row).to_contain_text("failed: ")
    expect(row).to_contain_text("exited with code 3")
    row.get_by_role("button", name="Stop").click()
    expect(row).to_have_count(0)
    assert [s.name for s in rig.fleet.slots()] == ["fleet-slow"]
    no_exception(tab)


@fleet_browser
def test_a_dead_nodes_slot_shows_lost_is_forgotten_and_starts_elsewhere(
    fleet_page, fleet_cluster: tuple[FleetRig, Any], tmp_path: Path
) -> None:
    # Runs last: it kills n3, which no other test uses.
    from playwright.sync_api import expect

    tab = fleet_page
    rig, cluster = fleet_cluster
    slot = rig.fleet.activate("fleet-b", node="n3")
    row = slot_row(tab, slot.slot_id)
    expect(row).to_contain_text("ready", timeout=10_000)
    n3 = next(node for node in cluster.worker_nodes if node.node_id == slot.node_id)
    cluster.remove_node(n3, allow_graceful=False)  # raylet, its workers and our agent die at once
    # Lost within 10 s of the kill, the row names the node; the node table says so too.
    expect(row).to_contain_text("lost: ", timeout=10_000)
    expect(row).to_contain_text("n3")
    expect(row.get_by_role("button", name="Forget")).to_be_visible()
    expect(node_row(tab, "n3")).to_contain_text(re.compile(r"is gone|is dead|did not answer"))
    tab.screenshot(path=str(tmp_path / "fleet_lost.png"), full_page=True)
    row.get_by_role("button", name="Forget").click()
    expect(
        tab.get_by_text(re.compile(rf"Forgot fleet-b \(slot {slot.slot_id} on node n3\): its node is lost"))
    ).to_be_visible()
    expect(row).to_have_count(0)
    # Started again from the page, it lands on a live node.
    pick(tab, "Model to start in the fleet", "fleet-b")
    tab.get_by_role("button", name="Start", exact=True).click()
    expect(tab.get_by_text(re.compile(r"fleet-b is ready on node (head|n2) \(slot "))).to_be_visible(
        timeout=PAGE_TIMEOUT_MS
    )
    (moved,) = rig.fleet.slots()
    assert (moved.name, moved.status) == ("fleet-b", "ready") and moved.node_name in ("head", "n2")
    no_exception(tab)
