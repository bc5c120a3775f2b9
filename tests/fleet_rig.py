"""Helpers of the fleet tests: a Ray cluster on loopback, a fake NVML binding for one node, demo entries whose
backends carry a marker, and the processes that carry it."""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from conftest import free_port, require, wait_until

from imageworks_core.fleet.cluster import import_ray
from imageworks_core.settings import Settings
from imageworks_demo.launch import demo_launch

MARKER = "IMAGEWORKS_FLEET_TEST"
GIB = 2**30
FAKE_GPUS = [
    {"name": "Fake A100", "total": 24 * GIB, "used": 4 * GIB},
    {"name": "Fake A100", "total": 24 * GIB, "used": 2 * GIB},
]
# The fake NVML binding: a test double the n2 node's workers import instead of nvidia-ml-py's pynvml.
FAKE_PYNVML = """
import json, os
from types import SimpleNamespace

NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    pass


def _devices():
    return json.loads(os.environ["IMAGEWORKS_TEST_FAKE_NVML"])


def nvmlInit():
    pass


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return len(_devices())


def nvmlDeviceGetHandleByIndex(index):
    return _devices()[index]


def nvmlDeviceGetName(handle):
    return handle["name"]


def nvmlDeviceGetMemoryInfo(handle):
    return SimpleNamespace(total=handle["total"], used=handle["used"], free=handle["total"] - handle["used"])


def nvmlDeviceGetUtilizationRates(handle):
    return SimpleNamespace(gpu=0)


def nvmlDeviceGetTemperature(handle, sensor):
    return 40


def nvmlDeviceGetComputeRunningProcesses(handle):
    return []


def nvmlDeviceGetGraphicsRunningProcesses(handle):
    return []
"""


def fake_nvml_node(folder: Path) -> dict[str, Any]:
    """``add_node`` arguments for a node whose workers see two fake 24 GiB GPUs (:data:`FAKE_GPUS`) through the fake
    ``pynvml`` written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pynvml.py").write_text(FAKE_PYNVML)
    return {"env_vars": {"PYTHONPATH": str(folder), "IMAGEWORKS_TEST_FAKE_NVML": json.dumps(FAKE_GPUS)}}


@contextmanager
def api_in_thread(app: Any) -> Iterator[str]:
    """Serve the FastAPI ``app`` with uvicorn in a thread of this process (joined to the test's cluster) on a free
    loopback port; yields its base URL and stops it at exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the API server to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def demo_entry(name: str, served: str, *flags: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "vllm",
        "served_model_id": served,
        "capabilities": {"text": True},
        "download_path": "demo/models/imageworks-demo-vision",
        "backend_config": {"launch": demo_launch(*flags), "startup_timeout_s": 30, "env": {MARKER: "1"}},
        **fields,
    }


def marked_processes() -> list[psutil.Process]:
    """Every live process started for these tests (by the marker in its environment)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@contextmanager
def fleet_on_loopback(
    settings: Settings, roots: dict[str, Path], nodes: dict[str, dict[str, Any]]
) -> Iterator[tuple[FleetRig, Any]]:
    """A Ray cluster on loopback (the head plus ``nodes``: name -> add_node arguments) and a Fleet on it for the
    controller root ``settings``; at exit every slot and agent is stopped, the cluster shut down, and whatever
    still carries the marker killed (a failing test leaks nothing)."""
    require(importlib.util.find_spec("ray") is not None, "ray is not installed (make bootstrap: uv sync --extra fleet)")
    saved = {key: os.environ.get(key) for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "IMAGEWORKS_RAY_ADDRESS")}
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # else Ray rewrites 127.0.0.1 to the machine's address
    os.environ.pop("IMAGEWORKS_RAY_ADDRESS", None)
    ray = import_ray()  # as the product does: a `uv run` driver (make test) must not ship the checkout to workers
    from ray.cluster_utils import Cluster

    common = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**common, "node_name": "head"})
    try:
        for name, extra in nodes.items():
            cluster.add_node(**common, node_name=name, **extra)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="imageworks", log_to_driver=False, logging_level="WARNING")
        rig = FleetRig(cluster.address, settings, roots)
        try:
            yield rig, cluster
        finally:
            rig.fleet.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
        for proc in marked_processes():
            proc.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class FleetRig:
    """The module's cluster: its address, the controller root, each node's root, and a Fleet."""

    def __init__(self, address: str, settings: Settings, roots: dict[str, Path]) -> None:
        from imageworks_core.fleet import Fleet

        self.address = address
        self.settings = settings
        self.roots = roots
        self.fleet = Fleet.connect(settings, address)

    def cli_args(self, *args: str) -> list[str]:
        return [*args, "--ray-address", self.address, "--root", str(self.settings.root)]
