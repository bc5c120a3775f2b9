"""The API's one public port in fleet mode: the OpenAI proxy routes to slots on other nodes through their agents,
autoswitch starts a model beside the others or evicts the least recently used one, idle slots stop themselves,
and ``/v1/models`` / ``/v1/active`` describe the fleet.

One module cluster on loopback: the head (``idle_ttl_s`` 2), ``n2`` (fake NVML, ``max_models`` 2, the only node
holding the ``lru-*`` weights), ``n3`` (Ray GPU resources) and ``n4`` (the node the last test kills; it holds only
its own model's weights). The API runs in this process (uvicorn in a thread) on a free 127.0.0.1 port and joins
the same cluster. The eviction rule itself is also checked without a cluster (:func:`place_evicting`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_server import api_server
from conftest import REPO, free_port, seed_root, wait_until
from fleet_rig import (
    FleetRig,
    api_in_thread,
    demo_entry,
    fake_nvml_node,
    fleet_on_loopback,
    marked_processes,
)

from imageworks_core.errors import PlacementError
from imageworks_core.fleet.config import load_fleet_config
from imageworks_core.fleet.placement import GpuFree, NodeOffer, place_evicting
from imageworks_core.fleet.slots import SlotInfo
from imageworks_core.settings import Settings, get_settings

IDLE_TTL_S = 2
STREAM_DELAY_MS = 300  # the demo's 40 events for the prompt below then take ~12 s


# The eviction rule, without a cluster ------------------------------------------------------------------------
def _offer(name: str, *, slots: int, max_models: int, gpus: int = 0, taken: tuple[int, ...] = ()) -> NodeOffer:
    return NodeOffer(
        node_id=f"{name}-id-0123456789",
        node_name=name,
        slots_used=slots,
        max_models=max_models,
        gpus=[GpuFree(index=i) for i in range(gpus)],
        gpus_taken=list(taken),
        default_gpus=1 if gpus else 0,
        weights_path=f"/{name}/w",
        weights_present=True,
    )


def _slot(slot_id: str, node: str, used_minutes_ago: float | None, **fields: Any) -> SlotInfo:
    now = datetime.now(UTC)
    return SlotInfo(
        slot_id=slot_id,
        node_id=f"{node}-id-0123456789",
        node_name=node,
        name=f"model-{slot_id}",
        served_model_id=f"served/{slot_id}",
        port=1,
        status=fields.pop("status", "ready"),
        ready_at=now - timedelta(hours=1),
        last_used_at=None if used_minutes_ago is None else now - timedelta(minutes=used_minutes_ago),
        **fields,
    )


def test_eviction_takes_the_least_recently_used_idle_slot_whose_node_then_fits() -> None:
    offers = [_offer("a", slots=2, max_models=2, gpus=2, taken=(0, 1)), _offer("b", slots=1, max_models=1)]
    slots = [
        _slot("a-1", "a", 1, gpus=[0]),
        _slot("a-2", "a", 30, gpus=[1]),
        _slot("b-1", "b", 50, requests_in_flight=1),  # the oldest, but busy
        _slot("a-3", "a", 90, status="starting"),  # not ready: never evicted
    ]
    refused = PlacementError("no node can take 'm'")
    placement, victim = place_evicting("m", "vllm", offers, slots, refused=refused)
    assert (victim.slot_id, placement.node_name, placement.gpus) == ("a-2", "a", [1])
    # Never used: its ready time counts, which is older than any use.
    slots.append(_slot("b-2", "b", None))
    offers[1] = _offer("b", slots=2, max_models=2)
    assert place_evicting("m", "vllm", offers, slots, refused=refused)[1].slot_id == "b-2"
    # Nothing idle to evict: the refusal says both why no node fits and why nothing was evicted.
    with pytest.raises(PlacementError) as info:
        place_evicting("m", "vllm", offers, [slots[2]], refused=refused)
    assert info.value.message == "no node can take 'm'; and no idle ready slot can be evicted to make room"


def test_idle_ttl_s_is_read_per_node_and_a_bad_value_names_the_field(tmp_path: Path) -> None:
    settings = seed_root(tmp_path / "root")
    path = settings.configs_dir / "fleet.json"
    path.write_text(json.dumps({"defaults": {"idle_ttl_s": 600}, "nodes": {"b": {"idle_ttl_s": 30}}}))
    config = load_fleet_config(settings)
    assert [config.for_node(n, settings.root).idle_ttl_s for n in ("a", "b")] == [600, 30]
    assert load_fleet_config(get_settings(tmp_path / "none")).for_node("a", tmp_path).idle_ttl_s is None
    path.write_text(json.dumps({"nodes": {"b": {"idle_ttl_s": 0}}}))
    from imageworks_core.errors import UsageError

    with pytest.raises(UsageError) as info:
        load_fleet_config(settings)
    assert "nodes.b.idle_ttl_s: Input should be greater than 0 (value 0)" in info.value.message
    assert "leave it out to never stop an idle model" in info.value.message


def test_single_box_api_refuses_node_and_gpus_and_a_fleet_api_without_its_cluster_fails_at_start(
    root: Settings,
) -> None:
    with api_server(root.root) as base:
        reply = httpx.post(f"{base}/v1/activate", json={"name": "demo-vision", "node": "n2"}, timeout=30)
        assert reply.status_code == 400
        assert reply.json()["error"]["message"] == (
            "'node' and 'gpus' need fleet mode: serve with IMAGEWORKS_RAY_ADDRESS set"
        )
        assert httpx.get(f"{base}/v1/active").json() == {"active": None, "starting": None, "switching_to": None}
    # Fleet mode whose cluster does not answer: the server exits 8 at start instead of failing every request.
    nobody = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "IMAGEWORKS_ROOT": str(root.root), "IMAGEWORKS_RAY_ADDRESS": nobody}
    started = subprocess.run(
        [sys.executable, "-m", "imageworks_core.cli", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 8, started.stderr
    assert f"no Ray cluster answers at {nobody}" in started.stderr or "uv sync --extra fleet" in started.stderr
    # The same with --ray-address, as every other fleet command takes it.
    env.pop("IMAGEWORKS_RAY_ADDRESS")
    started = subprocess.run(
        [sys.executable, "-m", "imageworks_core.cli", "serve", "--port", str(free_port()), "--ray-address", nobody],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 8, started.stderr
    assert f"no Ray cluster answers at {nobody}" in started.stderr


# A real cluster and the API in this process ---------------------------------------------------------------------
class Api:
    """The API server of the module (uvicorn in a thread) and the cluster under it."""

    def __init__(self, rig: FleetRig, cluster: Any, base: str) -> None:
        self.rig, self.cluster, self.base = rig, cluster, base

    def chat(self, model: str, text: str = "hello", **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
        return httpx.post(f"{self.base}/v1/chat/completions", json=body, timeout=90)

    def slots(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in httpx.get(f"{self.base}/v1/active", timeout=30).json()["slots"]}

    def audit(self, root: Path) -> list[dict[str, Any]]:
        path = root / "logs" / "model_loader.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    from imageworks_core.api import create_app

    tmp = tmp_path_factory.mktemp("fleet-api")
    settings = seed_root(tmp / "controller")
    roots = {name: tmp / name for name in ("head", "n2", "n3", "n4")}
    for name, node_root in roots.items():
        node_root.mkdir()
        if name in ("n2", "n3"):
            shutil.copytree(REPO / "demo", node_root / "demo")
    for name, folder in (("n2", "lru-weights"), ("head", "idle-weights"), ("n4", "n4-weights")):
        (roots[name] / folder).mkdir()
        (roots[name] / folder / "model.safetensors").write_bytes(b"weights")
    entries = [
        demo_entry("fleet-a", "fleet/a"),
        demo_entry("fleet-b", "fleet/b", model_aliases=["bee"]),
        demo_entry("slow-stream", "fleet/slow", "--stream-delay-ms", str(STREAM_DELAY_MS)),
        *(demo_entry(f"lru-{i}", f"fleet/lru-{i}", download_path="lru-weights") for i in (1, 2, 3)),
        demo_entry("idle-a", "fleet/idle-a", download_path="idle-weights"),
        demo_entry("doomed", "fleet/doomed", download_path="n4-weights"),
    ]
    settings.curated_path.write_text(json.dumps(entries, indent=2))
    nodes_config: dict[str, dict[str, Any]] = {name: {"root": str(path)} for name, path in roots.items()}
    nodes_config["head"]["idle_ttl_s"] = IDLE_TTL_S
    nodes_config["n2"]["max_models"] = 2
    (settings.configs_dir / "fleet.json").write_text(json.dumps({"nodes": nodes_config}))
    nodes = {
        "n2": fake_nvml_node(tmp / "fake-nvml"),
        "n3": {"num_gpus": 2},
        "n4": {},
    }
    with fleet_on_loopback(settings, roots, nodes) as (rig, cluster):
        with api_in_thread(create_app(settings, watch=False, ray_address=rig.address)) as base:
            yield Api(rig, cluster, base)


@pytest.fixture
def api(served: Api) -> Iterator[Api]:
    """The module's API; every slot is stopped after the test and no backend may be left running."""
    yield served
    served.rig.fleet.stop(None, reason="test teardown")
    wait_until(lambda: not marked_processes(), 10, "every backend of the test to exit")


@pytest.mark.fleet
def test_the_proxy_reaches_slots_on_two_nodes_and_streams_through_the_agent(api: Api) -> None:
    a = httpx.post(f"{api.base}/v1/activate", json={"name": "fleet-a", "node": "n2"}, timeout=90).json()
    b = api.rig.fleet.activate("bee", node="n3")
    assert (a["node_name"], a["status"], b.node_name) == ("n2", "ready", "n3")
    for model, slot_id in (("fleet-a", a["slot_id"]), ("fleet/b", b.slot_id), ("bee", b.slot_id)):
        reply = api.chat(model)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == ("fleet/a" if model == "fleet-a" else "fleet/b")
        assert reply.json()["choices"][0]["message"]["content"]
        used = {s["slot_id"]: s for s in api.slots().values()}[slot_id]
        assert used["last_used_at"] is not None and used["requests_in_flight"] == 0

    # Streaming: through n3's agent chunk by chunk, the same events the backend sends on its own loopback.
    body = {"model": "bee", "stream": True, "messages": [{"role": "user", "content": "say hello to the operator"}]}
    with httpx.stream("POST", f"{api.base}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        proxied = [line for line in r.iter_lines() if line]
    direct_body = {**body, "model": "fleet/b"}
    with httpx.stream("POST", f"http://127.0.0.1:{b.port}/v1/chat/completions", json=direct_body, timeout=30) as r:
        direct = [line for line in r.iter_lines() if line]
    assert proxied[-1] == "data: [DONE]" and len(proxied) > 3
    assert [json.loads(x[6:])["choices"] for x in proxied[:-1]] == [json.loads(x[6:])["choices"] for x in direct[:-1]]
    completion = httpx.post(f"{api.base}/v1/completions", json={"model": "fleet-a", "prompt": "hi"}, timeout=30)
    assert completion.status_code == 200 and completion.json()["model"] == "fleet/a"

    # /v1/active: every slot with node, GPUs, port, model, status and uptime.
    slots = api.slots()
    assert set(slots) == {"fleet-a", "fleet-b"}
    assert (slots["fleet-a"]["node_name"], slots["fleet-a"]["gpus"], slots["fleet-a"]["port"]) == ("n2", [1], a["port"])
    assert (slots["fleet-b"]["node_name"], slots["fleet-b"]["gpus"]) == ("n3", [0])
    assert all(s["status"] == "ready" and s["healthy"] and s["uptime_s"] >= 0 for s in slots.values())
    # /v1/models: every entry, and where each runs.
    cards = {m["id"]: m for m in httpx.get(f"{api.base}/v1/models", timeout=30).json()["data"]}
    assert (cards["fleet-a"]["node"], cards["fleet-a"]["slot"], cards["fleet-a"]["status"]) == (
        "n2",
        a["slot_id"],
        "ready",
    )
    assert (cards["fleet-b"]["node"], cards["fleet-b"]["status"]) == ("n3", "ready")
    assert (cards["lru-1"]["node"], cards["lru-1"]["status"]) == (None, None)
    assert cards["fleet-b"]["served_model_id"] == "fleet/b"  # the single-box fields stay
    # /v1/select points at this port (the backend itself is on n3's loopback).
    selected = httpx.post(f"{api.base}/v1/select", json={"name": "bee"}, timeout=30).json()
    assert (selected["name"], selected["endpoint"], selected["active"]) == ("fleet-b", f"{api.base}/v1", True)

    # An unknown model: the single-box proxy's error (404, close matches); nothing starts.
    unknown = api.chat("fleet-aa")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["reason"] == "unknown_name" and "fleet-a" in unknown.json()["error"]["close_matches"]
    # The security guard still runs first.
    refused = httpx.post(f"{api.base}/v1/chat/completions", json={"model": "fleet-a"}, headers={"Host": "evil.example"})
    assert (refused.status_code, refused.json()["error"]["reason"]) == (403, "host")
    assert set(api.slots()) == {"fleet-a", "fleet-b"}

    stopped = httpx.post(f"{api.base}/v1/deactivate", json={"name": "fleet-a"}, timeout=60).json()["stopped"]
    assert [(s["name"], s["node_name"]) for s in stopped] == [("fleet-a", "n2")]
    assert set(api.slots()) == {"fleet-b"}


@pytest.mark.fleet
def test_a_client_that_drops_a_stream_ends_the_backends_request(api: Api) -> None:
    slot = api.rig.fleet.activate("slow-stream", node="n3")
    body = {"model": "slow-stream", "stream": True, "messages": [{"role": "user", "content": "say hello to the operator"}]}
    with httpx.stream("POST", f"{api.base}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert next(line for line in r.iter_lines() if line).startswith("data: ")
        assert api.slots()["slow-stream"]["requests_in_flight"] == 1
    # The client went away after one event, ~12 s before the backend would finish: the API closes its stream,
    # the controller cancels the agent's call, the agent closes the backend's request at its next chunk.
    wait_until(lambda: api.slots()["slow-stream"]["requests_in_flight"] == 0, 5, "the slot to serve nothing")
    logs = Path(slot.log_path)

    def abandoned() -> str:
        text = "".join(f.read_text(errors="replace") for f in logs.iterdir() if f.is_file())
        return next((line for line in text.splitlines() if "stream abandoned by the client" in line), "")

    wait_until(abandoned, 5, "the backend to see its client go")
    sent = int(abandoned().rsplit("after ", 1)[1].split()[0])
    assert sent < 20, abandoned()  # of 40: it stopped generating for nobody
    # The slot serves the next request as usual.
    assert api.chat("slow-stream").status_code == 200


@pytest.mark.fleet
def test_autoswitch_starts_beside_the_others_then_evicts_the_least_recently_used(api: Api) -> None:
    first = api.chat("lru-1")
    assert first.status_code == 200, first.text
    second = api.chat("fleet/lru-2")
    assert second.status_code == 200, second.text
    slots = api.slots()
    assert {n: s["node_name"] for n, s in slots.items()} == {"lru-1": "n2", "lru-2": "n2"}  # beside: n2 has room
    evicted_pid = slots["lru-2"]["pid"]
    time.sleep(0.05)
    assert api.chat("lru-1").status_code == 200  # lru-1 is now the more recently used

    third = api.chat("lru-3")  # n2 is full (max_models 2) and the only node with the weights: lru-2 goes
    assert third.status_code == 200, third.text
    slots = api.slots()
    assert set(slots) == {"lru-1", "lru-3"} and slots["lru-3"]["node_name"] == "n2"
    assert evicted_pid not in {p.pid for p in marked_processes()}
    (eviction,) = [e for e in api.audit(api.rig.settings.root) if e["event"] == "fleet_eviction"]
    assert (eviction["name"], eviction["node"], eviction["evicted_for"]) == ("lru-2", "n2", "lru-3")
    stops = [e for e in api.audit(api.rig.roots["n2"]) if e["event"] == "stop"]
    assert stops[-1]["reason"] == "evicted for 'lru-3': least recently used on node n2"

    # Two requests at once for the evicted model: one start, both answered, and lru-1 (used last) stays.
    time.sleep(0.05)
    assert api.chat("lru-3").status_code == 200
    replies: list[int] = []
    threads = [threading.Thread(target=lambda: replies.append(api.chat("lru-2").status_code)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert replies == [200, 200]
    assert set(api.slots()) == {"lru-2", "lru-3"}
    assert len([e for e in api.audit(api.rig.settings.root) if e["event"] == "fleet_eviction"]) == 2


@pytest.mark.fleet
def test_idle_ttl_stops_a_slot_nobody_uses_and_spares_a_busy_one(api: Api) -> None:
    assert api.chat("idle-a").status_code == 200  # autoswitch: only the head holds its weights
    slot = api.slots()["idle-a"]
    assert (slot["node_name"], slot["idle_ttl_s"]) == ("head", IDLE_TTL_S)
    busy_until = time.monotonic() + IDLE_TTL_S * 1.5
    while time.monotonic() < busy_until:  # used every 0.5 s: never idle for 2 s
        assert api.chat("idle-a").status_code == 200
        time.sleep(0.5)
    assert api.slots()["idle-a"]["slot_id"] == slot["slot_id"]
    idle_since = time.monotonic()
    wait_until(lambda: "idle-a" not in api.slots(), IDLE_TTL_S + 5, "the idle slot to be stopped")
    assert time.monotonic() - idle_since >= IDLE_TTL_S - 0.5
    assert marked_processes() == []
    events = api.audit(api.rig.roots["head"])
    (idle,) = [e for e in events if e["event"] == "fleet_idle_stop"]
    assert (idle["slot"], idle["name"], idle["reason"]) == (slot["slot_id"], "idle-a", f"idle for {IDLE_TTL_S} s")
    assert idle["idle_s"] >= IDLE_TTL_S
    assert [e["reason"] for e in events if e["event"] == "stop"] == [f"idle for {IDLE_TTL_S} s"]
    # The next request starts it again.
    assert api.chat("idle-a").status_code == 200 and "idle-a" in api.slots()


@pytest.mark.fleet
def test_a_model_on_a_dead_node_answers_503_naming_the_node(api: Api) -> None:
    assert api.chat("doomed").status_code == 200
    assert api.slots()["doomed"]["node_name"] == "n4"
    n4_id = api.slots()["doomed"]["node_id"]
    n4 = next(node for node in api.cluster.worker_nodes if node.node_id == n4_id)
    api.cluster.remove_node(n4, allow_graceful=False)

    answers: list[httpx.Response] = []
    wait_until(lambda: answers.append(api.chat("doomed")) or answers[-1].status_code == 503, 15, "a 503")
    error = answers[-1].json()["error"]
    assert error["type"] == "SlotLost"
    assert "'doomed' was served by node n4, which is lost" in error["message"]
    lost = api.slots()["doomed"]
    assert (lost["status"], lost["node_name"]) == ("lost", "n4")
    card = next(m for m in httpx.get(f"{api.base}/v1/models", timeout=30).json()["data"] if m["id"] == "doomed")
    assert (card["node"], card["status"]) == ("n4", "lost")
    # Other models keep being served on the same port.
    assert api.chat("lru-1").status_code == 200
