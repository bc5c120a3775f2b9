"""Fleet mode on a real three-node Ray cluster on loopback, serving demo backends.

``ray.cluster_utils.Cluster`` starts a head and two more nodes on this machine (everything bound to 127.0.0.1).
Each node has its own deployment root. ``n2`` has two GPUs seen through a fake ``pynvml`` (a test double put on
that node's PYTHONPATH, with memory figures); ``n3`` has two GPUs as Ray resources only (no NVML); the head has
none. Every backend carries a marker in its environment, so the tests can prove which processes exist and none
leaks. The cluster is shared by the module; each test stops every slot when it ends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest
from conftest import REPO, seed_root, wait_until
from fleet_rig import (
    GIB,
    FleetRig,
    demo_entry,
    fake_nvml_node,
    fleet_on_loopback,
    marked_processes,
)

from imageworks_core import verification

pytestmark = pytest.mark.fleet


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetRig]:
    tmp = tmp_path_factory.mktemp("fleet")
    settings = seed_root(tmp / "controller")
    roots = {name: tmp / name for name in ("head", "n2", "n3")}
    for node_root in roots.values():
        shutil.copytree(REPO / "demo", node_root / "demo")
        (node_root / "locked-weights").mkdir()
        (node_root / "locked-weights" / "model.safetensors").write_bytes(b"the same bytes everywhere")
    (roots["n3"] / "only-here").mkdir()
    (roots["n3"] / "only-here" / "model.safetensors").write_bytes(b"weights only n3 holds")
    (settings.root / "locked-weights").mkdir()
    (settings.root / "locked-weights" / "model.safetensors").write_bytes(b"the same bytes everywhere")
    entries = [
        demo_entry("fleet-a", "fleet/a"),
        demo_entry("fleet-b", "fleet/b", model_aliases=["bee"]),
        demo_entry("fleet-c", "fleet/c"),
        demo_entry("fleet-local", "fleet/local", download_path="only-here"),
        demo_entry("fleet-locked", "fleet/locked", download_path="locked-weights"),
        demo_entry("fleet-span", "fleet/span"),
        demo_entry("fleet-broken", "fleet/broken", "--crash-at-start"),
    ]
    settings.curated_path.write_text(json.dumps(entries, indent=2))
    fleet_config = {
        "defaults": {"max_models": 2},
        "nodes": {name: {"root": str(path)} for name, path in roots.items()},
    }
    fleet_config["nodes"]["n3"]["max_models"] = 1
    (settings.configs_dir / "fleet.json").write_text(json.dumps(fleet_config))
    nodes = {
        "n2": fake_nvml_node(tmp / "fake-nvml"),
        "n3": {"num_gpus": 2},
    }
    with fleet_on_loopback(settings, roots, nodes) as (rig, _cluster):
        yield rig


@pytest.fixture
def fleet_rig(rig: FleetRig) -> Iterator[FleetRig]:
    """The module's cluster; every slot is stopped after the test, and no backend may be left running."""
    yield rig
    rig.fleet.stop(None, reason="test teardown")
    wait_until(lambda: not marked_processes(), 10, "every backend of the test to exit")


def test_fleet_lists_every_node_with_gpus_vram_and_slots(fleet_rig: FleetRig, cli) -> None:
    result = cli(*fleet_rig.cli_args("fleet", "--json"))
    assert result.code == 0, result.err
    nodes = {n["name"]: n for n in json.loads(result.out)}
    assert set(nodes) == {"head", "n2", "n3"}
    assert all(n["alive"] and n["address"] == "127.0.0.1" and n["agent"] == "ok" for n in nodes.values())
    assert nodes["head"]["is_head"] and nodes["head"]["gpus_total"] == 0
    assert nodes["head"]["root"] == str(fleet_rig.roots["head"])
    n2 = nodes["n2"]
    assert (n2["gpus_total"], n2["gpus_used"], n2["max_models"]) == (2, 0, 2)
    assert (n2["vram_total_bytes"], n2["vram_free_bytes"]) == (48 * GIB, 42 * GIB)
    assert [g["name"] for g in n2["gpus"]] == ["Fake A100", "Fake A100"]
    n3 = nodes["n3"]  # GPUs as a Ray resource only: counted, memory unknown
    assert (n3["gpus_total"], n3["vram_total_bytes"], n3["max_models"]) == (2, None, 1)
    assert n3["gpu_note"].startswith("No NVIDIA GPU visible")
    text = cli(*fleet_rig.cli_args("fleet"))
    assert text.code == 0
    lines = text.out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "ADDRESS", "ALIVE", "GPUS", "USED", "VRAM", "FREE", "SLOTS", "MODELS"]
    n2_line = next(line for line in lines if " n2 " in line)
    assert "0/2" in n2_line and "42.0/48.0 GiB" in n2_line and "0/2" in n2_line


def test_a_separate_cli_process_joins_with_auto_and_with_the_environment(fleet_rig: FleetRig) -> None:
    # Another process, as an operator's shell would run it: `auto` finds the cluster (Ray reads RAY_ADDRESS, as it
    # does after `ray start` on the box), and IMAGEWORKS_RAY_ADDRESS alone turns fleet mode on.
    base = {**os.environ, "IMAGEWORKS_ROOT": str(fleet_rig.settings.root)}
    runs = {
        "auto": ({**base, "RAY_ADDRESS": fleet_rig.address}, ["--ray-address", "auto"]),
        "env": ({**base, "IMAGEWORKS_RAY_ADDRESS": fleet_rig.address}, []),
    }
    for how, (env, extra) in runs.items():
        done = subprocess.run(
            [sys.executable, "-m", "imageworks_core.cli", "fleet", "--json", *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (how, done.stderr)
        assert {n["name"] for n in json.loads(done.stdout)} == {"head", "n2", "n3"}, how


def test_activate_places_slots_with_their_gpus_on_loopback_and_lists_them(fleet_rig: FleetRig, cli) -> None:
    fleet = fleet_rig.fleet
    result = cli(*fleet_rig.cli_args("activate-model", "fleet-a", "--node", "n2", "--json"))
    assert result.code == 0, result.err
    a = json.loads(result.out)
    # One GPU, the one with the most free memory (NVML via the fake: GPU 1 has 22 GiB free, GPU 0 has 20).
    assert (a["node_name"], a["gpus"], a["status"], a["served_model_id"]) == ("n2", [1], "ready", "fleet/a")
    backend = psutil.Process(a["pid"])
    assert backend.environ()["CUDA_VISIBLE_DEVICES"] == "1"
    listening = [c.laddr for c in backend.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert [(addr.ip, addr.port) for addr in listening] == [("127.0.0.1", a["port"])]
    # The slot's state lives under n2's own root, in the slot's own directory.
    states = list((fleet_rig.roots["n2"] / "_staging" / "fleet").glob(f"*/{a['slot_id']}/active_vllm.json"))
    assert len(states) == 1 and json.loads(states[0].read_text())["status"] == "ready"

    # No node given: the least loaded alive node holding the weights (n3: no model yet, two free GPUs).
    b = fleet.activate("bee")
    assert (b.name, b.node_name, b.gpus) == ("fleet-b", "n3", [0])
    # Weights only n3 holds: n3 or nothing, and n3 is full (max_models 1).
    local = cli(*fleet_rig.cli_args("activate-model", "fleet-local"))
    assert local.code == 8
    assert "n3: serves 1 of max_models 1" in local.err and "head: weights not found at" in local.err

    listed = cli(*fleet_rig.cli_args("current-model", "--json"))
    assert listed.code == 0
    slots = {s["name"]: s for s in json.loads(listed.out)}
    assert set(slots) == {"fleet-a", "fleet-b"}
    assert all(s["status"] == "ready" and s["healthy"] is True and s["uptime_s"] >= 0 for s in slots.values())
    assert slots["fleet-b"]["port"] == b.port and slots["fleet-b"]["gpus"] == [0]
    table = cli(*fleet_rig.cli_args("current-model")).out.splitlines()
    assert table[0].split() == ["SLOT", "NODE", "GPUS", "PORT", "MODEL", "STATUS", "UPTIME"]
    assert any(line.split()[:6] == [a["slot_id"], "n2", "1", str(a["port"]), "fleet-a", "ready"] for line in table)

    # Activating what runs is a no-op; on another node it says where it runs.
    assert fleet.activate("fleet-a").slot_id == a["slot_id"]
    again = cli(*fleet_rig.cli_args("activate-model", "fleet-a", "--node", "head"))
    assert again.code == 6 and f"already ready on node n2 (slot {a['slot_id']})" in again.err

    stopped = cli(*fleet_rig.cli_args("activate-model", "--stop", "fleet/a"))
    assert stopped.code == 0
    assert stopped.out.startswith(f"stopped 'fleet-a' (slot {a['slot_id']} on node n2) in ")
    assert not backend.is_running()
    assert [s.name for s in fleet.slots()] == ["fleet-b"]
    assert not states[0].parent.exists()


def test_placement_refusals_exit_8_with_each_reason(fleet_rig: FleetRig, cli) -> None:
    result = cli(*fleet_rig.cli_args("activate-model", "fleet-a", "--node", "nowhere"))
    assert result.code == 8
    assert result.err.strip() == (
        "error: no alive node named 'nowhere' (alive: head, n2, n3); see `imageworks-models fleet`"
    )
    result = cli(*fleet_rig.cli_args("activate-model", "fleet-a", "--node", "n2", "--gpus", "3"))
    assert (result.code, result.err.strip()) == (
        8,
        "error: no node can take 'fleet-a': n2: 2 of 2 GPU(s) free, 3 needed",
    )
    assert marked_processes() == []


def test_the_lock_check_runs_on_the_serving_node(fleet_rig: FleetRig, cli) -> None:
    verification.lock_entry(fleet_rig.settings, "fleet-locked", set_expected=True)
    tampered = fleet_rig.roots["n2"] / "locked-weights" / "model.safetensors"
    original = tampered.read_bytes()
    tampered.write_bytes(b"the same bytes elsewhere!")  # same size, other content: only n2's copy drifted
    try:
        refused = cli(*fleet_rig.cli_args("activate-model", "fleet-locked", "--node", "n2"))
        assert refused.code == 2
        assert "'fleet-locked' is locked and its weights failed fast verification (drift" in refused.err
        assert "inspect with `imageworks-models verify fleet-locked --node n2`" in refused.err  # n2's copy drifted
        assert fleet_rig.fleet.slots() == []  # a refusal leaves no slot behind
        served = fleet_rig.fleet.activate("fleet-locked", node="head")
        assert (served.node_name, served.status) == ("head", "ready")
        audit = (fleet_rig.roots["n2"] / "logs" / "model_loader.log").read_text()
        assert '"event": "lock_violation"' in audit and "fleet-locked" in audit
    finally:
        tampered.write_bytes(original)


def test_requests_reach_a_loopback_backend_through_its_agent(fleet_rig: FleetRig) -> None:
    fleet = fleet_rig.fleet
    slot = fleet.activate("fleet-c", node="n2")
    assert fleet.route("fleet/c").slot_id == slot.slot_id
    models = fleet.forward(fleet.route("fleet-c"), "GET", "/v1/models")
    assert models.status == 200 and [m["id"] for m in json.loads(models.body)["data"]] == ["fleet/c"]
    body = json.dumps({"model": "fleet/c", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    parts = list(
        fleet.forward_stream(
            slot, "POST", "/v1/chat/completions", headers=[("content-type", "application/json")], body=body.encode()
        )
    )
    head, chunks = parts[0], b"".join(parts[1:])
    assert head.status == 200 and ("content-type", "text/event-stream") in head.headers
    assert chunks.startswith(b"data: {") and chunks.rstrip().endswith(b"data: [DONE]")
    assert fleet.slots()[0].last_used_at is not None
    with pytest.raises(Exception) as info:
        fleet.route("fleet-a")
    assert (type(info.value).__name__, info.value.exit_code) == ("UnknownModelError", 4)  # type: ignore[attr-defined]


def test_a_failed_start_is_listed_with_its_reason_until_stopped(fleet_rig: FleetRig, cli) -> None:
    result = cli(*fleet_rig.cli_args("activate-model", "fleet-broken", "--node", "head"))
    assert result.code == 6 and "backend exited with code 3 before it was ready" in result.err
    (failed,) = fleet_rig.fleet.slots()
    assert (failed.status, failed.node_name, failed.gpus) == ("failed", "head", [])
    assert "exited with code 3" in (failed.error or "")
    text = cli(*fleet_rig.cli_args("current-model")).out
    assert f"{failed.slot_id}: failed: " in text
    # A failed slot holds no room: the head still takes two models.
    assert fleet_rig.fleet.activate("fleet-a", node="head").status == "ready"
    assert fleet_rig.fleet.activate("fleet-c", node="head").status == "ready"
    stopped = cli(*fleet_rig.cli_args("activate-model", "--stop"))
    assert stopped.code == 0 and stopped.out.count("stopped '") == 3
    assert fleet_rig.fleet.slots() == []


def test_a_model_too_big_for_one_node_spans_nodes_with_vllms_ray_executor(fleet_rig: FleetRig, cli) -> None:
    fleet = fleet_rig.fleet
    plan = fleet.plan("fleet-span", gpus=4)
    assert {plan.node_name, plan.members[0].node_name} == {"n2", "n3"}
    assert (plan.gpus, plan.members[0].gpus) == ([0, 1], [0, 1])
    assert (plan.tensor_parallel_size, plan.pipeline_parallel_size) == (2, 2)
    assert plan.extra_args == [
        "--distributed-executor-backend",
        "ray",
        "--tensor-parallel-size",
        "2",
        "--pipeline-parallel-size",
        "2",
    ]
    assert plan.env == {"RAY_ADDRESS": fleet.gcs_address}
    # Started for real, the leader runs exactly that argv (the demo backend refuses vLLM's flags, as it should),
    # and the member node's reserved GPUs are released when the start fails.
    result = cli(*fleet_rig.cli_args("activate-model", "fleet-span", "--gpus", "4"))
    assert result.code == 6
    assert "unrecognized arguments: --distributed-executor-backend ray --tensor-parallel-size 2" in result.err
    nodes = {n.name: n for n in fleet.nodes()}
    assert nodes["n2"].gpus_used == 0 and nodes["n3"].gpus_used == 0


def test_stopping_everything_leaves_no_backend_on_any_node(fleet_rig: FleetRig, cli) -> None:
    fleet = fleet_rig.fleet
    started = [fleet.activate("fleet-a", node="head"), fleet.activate("fleet-b", node="n2"), fleet.activate("fleet-c")]
    assert {s.node_name for s in started} == {"head", "n2", "n3"}
    assert len(marked_processes()) == 3
    result = cli(*fleet_rig.cli_args("activate-model", "--stop", "--json"))
    assert result.code == 0
    assert sorted(r["name"] for r in json.loads(result.out)) == ["fleet-a", "fleet-b", "fleet-c"]
    assert marked_processes() == []
    for node_root in fleet_rig.roots.values():
        assert not list((node_root / "_staging" / "fleet").glob("*/*/active_vllm.json"))
    assert cli(*fleet_rig.cli_args("current-model")).out.strip() == "no model active in the fleet"
