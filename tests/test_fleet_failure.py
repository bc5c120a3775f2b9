"""A node dies under a running model: its slot shows ``lost`` within 10 s, the model starts elsewhere, and no
process of ours survives on any node (a cluster of its own: this test kills one of its nodes)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from conftest import REPO, seed_root, wait_until
from fleet_rig import FleetRig, demo_entry, fleet_on_loopback, marked_processes

from imageworks_core.errors import SlotLost

pytestmark = pytest.mark.fleet

LOST_WITHIN_S = 10.0


def reapers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "imageworks_core.fleet.reaper" in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def doomed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetRig, Any, Any]]:
    """A head, n2 and n3, each with its own root holding the demo weights; n2 is the one to kill."""
    tmp = tmp_path_factory.mktemp("fleet-failure")
    settings = seed_root(tmp / "controller")
    roots = {name: tmp / name for name in ("head", "n2", "n3")}
    for node_root in roots.values():
        shutil.copytree(REPO / "demo", node_root / "demo")
    # --spawn-child: the backend starts a worker process of its own, which only its launch id ties to us.
    settings.curated_path.write_text(json.dumps([demo_entry("fleet-a", "fleet/a", "--spawn-child")]))
    (settings.configs_dir / "fleet.json").write_text(
        json.dumps({"nodes": {name: {"root": str(path)} for name, path in roots.items()}})
    )
    with fleet_on_loopback(settings, roots, {"n2": {}, "n3": {}}) as (rig, cluster):
        n2 = next(node for node in cluster.worker_nodes if node.node_id == _node_id(rig, "n2"))
        yield rig, cluster, n2


def _node_id(rig: FleetRig, name: str) -> str:
    return next(node.node_id for node in rig.fleet.nodes() if node.name == name)


def test_a_dead_nodes_slot_is_lost_within_10s_restarts_elsewhere_and_leaves_no_process(doomed, cli) -> None:
    rig, cluster, n2 = doomed
    fleet = rig.fleet
    slot = fleet.activate("fleet-a", node="n2")
    assert (slot.node_name, slot.status) == ("n2", "ready")
    wait_until(lambda: len(marked_processes()) == 2, 10, "the backend and the worker it spawns")
    n2_reaper = [p for p in reapers() if str(rig.roots["n2"]) in " ".join(p.cmdline())]
    assert len(n2_reaper) == 1

    killed_at = time.monotonic()
    cluster.remove_node(n2, allow_graceful=False)  # raylet, its workers and our agent die at once
    wait_until(lambda: [s.status for s in fleet.slots()] == ["lost"], LOST_WITHIN_S, "the slot to show lost")
    assert time.monotonic() - killed_at < LOST_WITHIN_S
    (lost,) = fleet.slots()
    assert (lost.slot_id, lost.node_name, lost.name) == (slot.slot_id, "n2", "fleet-a")
    assert "node n2" in lost.detail

    # A fresh controller (a CLI run after the death) sees it too, from the head's directory.
    listed = cli("current-model", "--ray-address", rig.address, "--root", str(rig.settings.root))
    assert listed.code == 0
    assert f"{slot.slot_id}: lost: " in listed.out and "node n2" in listed.out
    with pytest.raises(SlotLost) as info:
        fleet.route("fleet/a")
    assert (info.value.node, info.value.exit_code) == ("n2", 8)
    assert "served by node n2, which is lost" in info.value.message

    # The agent's reaper stopped the backend and the worker it spawned, then exited.
    wait_until(lambda: marked_processes() == [], 10, "the dead node's backend processes to be stopped")
    wait_until(lambda: not any(p.is_running() for p in n2_reaper), 10, "the dead agent's reaper to exit")
    audit = (rig.roots["n2"] / "logs" / "model_loader.log").read_text().splitlines()
    assert any('"event": "fleet_reaper"' in line and '"problems": []' in line for line in audit)
    # Ray ends the agent's own children; the worker the backend spawned is found by its launch id and stopped.
    stops = [json.loads(line) for line in audit if '"event": "stop"' in line]
    assert [s["reason"] for s in stops] == ["the node agent that started it is gone"]
    assert len(stops[0]["stopped_pids"]) >= 1

    # Activating it again places it on a surviving node; the lost record goes.
    again = fleet.activate("fleet-a")
    assert again.node_name in ("head", "n3") and again.status == "ready"
    assert [(s.slot_id, s.status) for s in fleet.slots()] == [(again.slot_id, "ready")]
    assert len(marked_processes()) == 2

    stopped = cli("activate-model", "--stop", "--ray-address", rig.address, "--root", str(rig.settings.root))
    assert stopped.code == 0 and f"stopped 'fleet-a' (slot {again.slot_id} on node {again.node_name})" in stopped.out
    assert marked_processes() == []
    assert fleet.slots() == []
