"""Ray, imported on use: the one module that turns "fleet mode" into a connection to a Ray cluster.

``import imageworks_core`` and every single-box path never import Ray; fleet code calls :func:`import_ray`, which
says how to install the ``fleet`` extra when Ray is missing (:class:`~imageworks_core.errors.FleetUnavailable`,
exit 8). :func:`connect` joins an existing cluster (never starts one), after checking that something answers at
an explicit ``host:port`` at all (Ray itself retries an unreachable address for a long time).

Names: every actor of ours lives in the Ray namespace :data:`NAMESPACE`; a node's agent is named from its Ray
node id (:func:`agent_name`), which is unique for the life of that node's raylet.
"""

from __future__ import annotations

import logging
import os
import socket
from types import ModuleType
from typing import Any

from ..errors import FleetUnavailable

NAMESPACE = "imageworks"
"""The Ray namespace of our actors."""
AGENT_PREFIX = "imageworks-agent-"
DIRECTORY_NAME = "imageworks-directory"
"""The detached actor on the head node that keeps each node's last published slot table."""
CONNECT_CHECK_TIMEOUT_S = 3.0
"""How long an explicit ``host:port`` gets to accept a TCP connection before we call it unreachable."""
UV_HOOK_ENV = "RAY_ENABLE_UV_RUN_RUNTIME_ENV"
"""Ray's switch for shipping a ``uv run`` driver's project to every worker; we keep it off (see :func:`import_ray`)."""
INSTALL_HINT = (
    "fleet mode needs the optional extra: uv sync --extra fleet (or pip install 'imageworks-model-loader[fleet]')"
)


def import_ray() -> ModuleType:
    """The ``ray`` module; FleetUnavailable naming the extra when it is not installed.

    A driver started under ``uv run`` (``make test``, ``uv run imageworks-models fleet``) would otherwise have Ray
    package the current directory and start every worker with ``uv run`` in a copy of it: a fresh environment
    synced per node, which fails or times out offline. A node's agent runs in the installation its ``ray start``
    came from, so the hook stays off unless the operator sets :data:`UV_HOOK_ENV` themselves."""
    os.environ.setdefault(UV_HOOK_ENV, "0")
    try:
        import ray
        from ray._private import ray_constants
    except ImportError as exc:
        raise FleetUnavailable(f"{INSTALL_HINT} ({exc})") from exc
    # Ray reads the switch when it is first imported; a process that imported it earlier follows the variable too.
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = os.environ[UV_HOOK_ENV].lower() in ("1", "true")
    return ray


def agent_name(node_id: str) -> str:
    """The name of the agent actor of the node with Ray id ``node_id``."""
    return AGENT_PREFIX + node_id


def _reachable(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "ray://…" and other forms: Ray resolves and reports them itself
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=CONNECT_CHECK_TIMEOUT_S):
            pass
    except OSError as exc:
        raise FleetUnavailable(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with `ray start --head` and "
            "set IMAGEWORKS_RAY_ADDRESS (or --ray-address) to its address"
        ) from exc


def connect(address: str) -> tuple[ModuleType, bool]:
    """Join the Ray cluster at ``address`` in our namespace; returns (ray, whether this call connected).

    A process already connected (the API server, a test) keeps its connection."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    _reachable(address)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FleetUnavailable(
            f"cannot join the Ray cluster at {address!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "check `ray status` there and IMAGEWORKS_RAY_ADDRESS"
        ) from exc
    return ray, True


def node_table(ray: ModuleType) -> list[dict[str, Any]]:
    """Ray's view of every node it knows (alive and dead), as ``ray.nodes()`` gives it."""
    return list(ray.nodes())


def is_head(node: dict[str, Any]) -> bool:
    """Whether a ``ray.nodes()`` row is the head node."""
    return "node:__internal_head__" in (node.get("Resources") or {})
