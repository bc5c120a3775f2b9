"""Verify and probe on a node: the controller asks a node's agent to hash that node's copy of the weights (against
the controller's lock manifest) or to carry a vision probe to the slot serving a model, and records the result in
its own history and audit log, naming the node.

One module cluster on loopback: the head, ``n2`` (its weights under a ``download_location`` mapped to a folder of
its own) and ``n3`` (the node the last test kills). The API runs in this process (uvicorn in a thread) on a free
127.0.0.1 port and joins the same cluster.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, seed_root, wait_until
from fleet_rig import FleetRig, api_in_thread, demo_entry, fleet_on_loopback, marked_processes

from imageworks_core import history, verification

pytestmark = pytest.mark.fleet

WEIGHTS = b"the locked bytes, the same on every node"


class Ops:
    def __init__(self, rig: FleetRig, cluster: Any, base: str, nas: dict[str, Path]) -> None:
        self.rig, self.cluster, self.base, self.nas = rig, cluster, base, nas

    def audit(self) -> list[dict[str, Any]]:
        path = self.rig.settings.root / "logs" / "model_loader.log"
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    from imageworks_core.api import create_app

    tmp = tmp_path_factory.mktemp("fleet-ops")
    settings = seed_root(tmp / "controller")
    roots = {name: tmp / name for name in ("head", "n2", "n3")}
    nas = {name: tmp / f"nas-{name}" for name in ("controller", "n2")}
    for node_root in roots.values():
        shutil.copytree(REPO / "demo", node_root / "demo")
    for folder in nas.values():  # the same weights, at another path on n2
        (folder / "locked").mkdir(parents=True)
        (folder / "locked" / "model.safetensors").write_bytes(WEIGHTS)
        (folder / "locked" / "config.json").write_text('{"layers": 2}\n')
    settings.locations_path.write_text(json.dumps({"locations": {"nas": str(nas["controller"])}}))
    entries = [
        demo_entry(
            "ops-locked", "ops/locked", download_path=str(nas["controller"] / "locked"), download_location="nas"
        ),
        demo_entry("ops-vision", "ops/vision", capabilities={"text": True, "vision": True}),
    ]
    settings.curated_path.write_text(json.dumps(entries, indent=2))
    nodes_config: dict[str, dict[str, Any]] = {name: {"root": str(path)} for name, path in roots.items()}
    nodes_config["n2"]["locations"] = {"nas": str(nas["n2"])}
    (settings.configs_dir / "fleet.json").write_text(json.dumps({"nodes": nodes_config}))
    with fleet_on_loopback(settings, roots, {"n2": {}, "n3": {}}) as (rig, cluster):
        with api_in_thread(create_app(settings, watch=False, ray_address=rig.address)) as base:
            yield Ops(rig, cluster, base, nas)


@pytest.fixture
def ops(served: Ops) -> Iterator[Ops]:
    """The module's cluster and API; every slot is stopped after the test and no backend may be left running."""
    yield served
    served.rig.fleet.stop(None, reason="test teardown")
    wait_until(lambda: not marked_processes(), 10, "every backend of the test to exit")


def test_verify_on_a_node_hashes_its_copy_and_records_drift_at_the_controller_naming_the_node(ops: Ops, cli) -> None:
    rig = ops.rig
    verification.lock_entry(rig.settings, "ops-locked", set_expected=True)  # pinned from the controller's copy
    n2_copy = ops.nas["n2"] / "locked"

    ok = cli(*rig.cli_args("verify", "ops-locked", "--node", "n2", "--json"))
    assert ok.code == 0, ok.err
    report = json.loads(ok.out)
    # n2's own copy (the path mapped through its download_location), checked against the controller's manifest.
    assert (report["result"], report["node"], report["directory"]) == ("ok", "n2", str(n2_copy))
    assert report["lock_file"] == str(rig.settings.locks_dir / "ops-locked.manifest.json")

    tampered = n2_copy / "model.safetensors"
    tampered.write_bytes(WEIGHTS.replace(b"same", b"SAME"))  # same size, other content: only n2's copy drifted
    try:
        drift = cli(*rig.cli_args("verify", "ops-locked", "--node", "n2"))
        assert drift.code == 2  # as on one box
        lines = drift.out.splitlines()
        assert lines[0] == f"ops-locked: full verification (sha256) of {n2_copy} on node n2"
        assert "DRIFT: 1 modified, 0 added, 0 removed" in drift.out
        assert any(line.strip().startswith("modified  model.safetensors  size 40 -> 40") for line in lines)
        # Recorded in the controller's history and audit, naming the node; show and list reflect it.
        row = history.latest_verifications(rig.settings)["ops-locked"]
        assert row["result"] == "drift" and json.loads(row["report_json"])["node"] == "n2"
        shown = cli("show", "ops-locked", "--root", str(rig.settings.root))
        assert f"last verification: drift at {row['at']} on node n2" in shown.out.splitlines()
        listed = json.loads(cli("list", "--json", "--root", str(rig.settings.root)).out)
        assert next(e for e in listed if e["name"] == "ops-locked")["last_verify"] == "drift"
        events = [e for e in ops.audit() if e.get("name") == "ops-locked"]
        assert {"event": "verify", "result": "drift", "node": "n2"}.items() <= events[-2].items()
        assert events[-1]["event"] == "lock_violation" and events[-1]["node"] == "n2"
        assert events[-1]["files"] == ["model.safetensors"]
        # The drift rule applies: a locked entry whose latest verification drifted is refused.
        refused = cli("select", "ops-locked", "--root", str(rig.settings.root))
        assert refused.code == 2 and "drifted" in refused.err

        # Without --node, fleet mode verifies this root's copy (untouched: ok, and no node named).
        local = cli(*rig.cli_args("verify", "ops-locked", "--json"))
        assert local.code == 0 and json.loads(local.out)["node"] is None
        assert json.loads(local.out)["directory"] == str(ops.nas["controller"] / "locked")
    finally:
        tampered.write_bytes(WEIGHTS)

    unknown = cli(*rig.cli_args("verify", "ops-locked", "--node", "nowhere"))
    assert unknown.code == 8 and "no alive node named 'nowhere'" in unknown.err
    single_box = cli("verify", "ops-locked", "--node", "n2", "--root", str(rig.settings.root))
    assert single_box.code == 64
    assert single_box.err.strip() == (
        "error: --node needs fleet mode: set IMAGEWORKS_RAY_ADDRESS or pass --ray-address"
    )


def test_probe_vision_reaches_the_slot_on_n2_through_its_agent_and_is_recorded(ops: Ops, cli) -> None:
    rig = ops.rig
    nowhere = cli(*rig.cli_args("probe-vision", "ops-vision"))
    assert nowhere.code == 6 and "'ops-vision' runs nowhere in the fleet; activate it first" in nowhere.err

    slot = rig.fleet.activate("ops-vision", node="n2")
    result = cli(*rig.cli_args("probe-vision", "ops-vision", "--json"))
    assert result.code == 0, result.err
    probe = json.loads(result.out)
    assert (probe["vision_ok"], probe["grounded"], probe["matched"]) == (True, True, ["red", "circle", "42"])
    assert (probe["node"], probe["endpoint"], probe["model"]) == (
        "n2",
        f"http://127.0.0.1:{slot.port}/v1",
        "ops/vision",
    )
    text = cli(*rig.cli_args("probe-vision", "ops-vision")).out.splitlines()
    assert f"endpoint: http://127.0.0.1:{slot.port}/v1 (on node n2)" in text and "vision_ok: true" in text

    row = history.latest_probes(rig.settings)["ops-vision"]
    assert row["vision_ok"] == 1 and json.loads(row["result_json"])["node"] == "n2"
    shown = cli("show", "ops-vision", "--root", str(rig.settings.root)).out
    assert f"last probe: vision_ok=True grounded=1 at {row['at']} on node n2" in shown.splitlines()
    assert {"event": "probe", "name": "ops-vision", "node": "n2"}.items() <= ops.audit()[-1].items()
    (served,) = rig.fleet.slots()
    assert served.last_used_at is not None and served.requests_in_flight == 0  # it went through the slot

    # The API's probe does the same; --node auto verifies on the node serving the model.
    answer = httpx.post(f"{ops.base}/v1/probe/vision", json={"name": "ops-vision"}, timeout=60)
    assert answer.status_code == 200 and (answer.json()["vision_ok"], answer.json()["node"]) == (True, "n2")
    auto = cli(*rig.cli_args("verify", "ops-vision", "--node", "auto", "--json"))
    assert auto.code == 0 and json.loads(auto.out)["node"] == "n2"


def test_probing_a_model_whose_node_is_lost_exits_8_and_answers_503_naming_the_node(ops: Ops, cli) -> None:
    rig = ops.rig
    slot = rig.fleet.activate("ops-vision", node="n3")
    n3_id = next(n.node_id for n in rig.fleet.nodes() if n.name == "n3")
    n3 = next(node for node in ops.cluster.worker_nodes if node.node_id == n3_id)
    before = len(history.list_probes(rig.settings, "ops-vision"))
    ops.cluster.remove_node(n3, allow_graceful=False)
    wait_until(lambda: [s.status for s in rig.fleet.slots()] == ["lost"], 10, "the slot to show lost")

    lost = cli(*rig.cli_args("probe-vision", "ops-vision"))
    assert lost.code == 8
    assert lost.err.startswith("error: 'ops-vision' was served by node n3, which is lost")
    answer = httpx.post(f"{ops.base}/v1/probe/vision", json={"name": "ops-vision"}, timeout=30)
    assert answer.status_code == 503
    assert "served by node n3, which is lost" in answer.json()["error"]["message"]
    assert len(history.list_probes(rig.settings, "ops-vision")) == before  # nothing was probed, nothing recorded
    assert slot.node_name == "n3"
