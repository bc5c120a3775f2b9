"""Fleet mode: several GPUs and several boxes behind one registry and one port, on a Ray cluster.

With no Ray address configured (``IMAGEWORKS_RAY_ADDRESS`` / ``--ray-address``) nothing here runs and nothing
imports Ray: single-box behaviour is exactly as without this package. With one, the controller (whichever
process holds the registry: a CLI run, the API, the dashboard) joins the cluster the operator started with
``ray start --head`` / ``ray start --address=…`` and works through one agent per node.

One concept per module:

- :mod:`.config`: ``IMAGEWORKS_RAY_ADDRESS`` and ``configs/fleet.json`` (per node: root, ``max_models``,
  ``idle_ttl_s``, download-location paths); :func:`~.config.node_download_path` maps an entry's weights to a node.
- :mod:`.cluster`: Ray imported on use (exit 8 naming the ``fleet`` extra when missing), joining a cluster,
  actor names (namespace ``imageworks``).
- :mod:`.agent`: :class:`~.agent.NodeAgent`, the detached named actor per node that runs
  :mod:`imageworks_core.runtime` for each slot (:mod:`imageworks_core.runtime.slot`: own state file, lock, logs,
  loopback port), with ``CUDA_VISIBLE_DEVICES`` set to the slot's GPUs and the lock check on the serving node;
  it records each slot's last use and requests in flight, and stops a slot idle past its node's ``idle_ttl_s``.
- :mod:`.slotdirs` and :mod:`.reaper`: a slot's files on its node; a backend never outlives its agent.
- :mod:`.directory`: each node's last slot table on the head node, so a dead node's slots show ``lost``.
- :mod:`.placement`: pure placement rules (explicit node, else least loaded node holding the weights; GPUs by
  free memory; vLLM's Ray executor across nodes when one node has too few GPUs; for autoswitch without room,
  the least recently used idle slot to evict).
- :mod:`.forward`: HTTP to a backend on its node's loopback, through its agent.
- :mod:`.controller`: :class:`Fleet`, the object front ends call (through ``ImageWorks.fleet``).

The public API (front ends format these; the rules live here)::

    fleet = Fleet.connect(settings, address=None, registry=lambda: service.registry)
    fleet.nodes() -> list[NodeInfo]        # id, name, address, alive, GPUs total/used, VRAM, slots, max_models
    fleet.slots(check_health=False) -> list[SlotInfo]   # node, GPUs, port, model, status, uptime, last_used_at
    fleet.plan(name, node=None, gpus=None) -> Placement  # dry run: node, GPUs, members, extra argv/env
    fleet.activate(name, node=None, gpus=None, timeout_s=None, force=False, on_progress=None) -> SlotInfo
    fleet.stop(target=None, reason="") -> list[dict]     # target: slot id or model name/alias/served id; None: all
    fleet.route(model) -> SlotInfo                       # the ready slot; SlotLost (503, names the node) /
                                                         # SwitchInProgress (starting) / UnknownModelError
    fleet.autoswitch(name) -> SlotInfo                   # the API proxy's start: ready slot, else start it beside
                                                         # the others, else evict the LRU idle slot (audited)
    fleet.forward(slot, method, path, headers=, body=, timeout_s=) -> ForwardResponse
    fleet.forward_stream(slot, method, path, ...) -> Iterator[ForwardResponse | bytes]   # head, then chunks
    fleet.shutdown()                                     # stop all, end agents and the directory
    fleet.close()                                        # leave the cluster (agents keep running)

The API (:mod:`imageworks_core.api`, :class:`imageworks_core.proxy.FleetProxy`) serves the whole fleet on its one
port: the OpenAI proxy routes by model to the slot serving it, through that slot's agent.

Slot status: ``starting`` (``phase``), ``ready``, ``failed`` (``error``, ``log_tail``), ``stopping``, ``lost``
(``detail`` names the node). Errors: :class:`~imageworks_core.errors.FleetError` (exit 8, HTTP 503) and its
``FleetUnavailable``, ``PlacementError`` (409) and ``SlotLost`` (503); a node's own errors (lock violation,
weights missing, failed start) reach the controller with their class and exit code.

Trust: Ray has no authentication of its own. Whoever can reach the cluster's ports can run code on every node,
so the Ray ports must be reachable only by the fleet's boxes (a private network or firewall). Backends listen on
their node's loopback only; requests reach them through the agent (:mod:`.forward`), i.e. through the API's own
checks (Host, Origin, token, body limits) — nothing on the network talks to a backend directly.
"""

from __future__ import annotations

from .config import FleetConfig, NodeConfig, load_fleet_config, ray_address
from .controller import AGENT_CALL_TIMEOUT_S, Fleet
from .forward import ForwardResponse
from .placement import Placement, ray_executor_args
from .slots import NodeInfo, SlotInfo, SlotStatus

__all__ = [
    "AGENT_CALL_TIMEOUT_S",
    "Fleet",
    "FleetConfig",
    "ForwardResponse",
    "NodeConfig",
    "NodeInfo",
    "Placement",
    "SlotInfo",
    "SlotStatus",
    "load_fleet_config",
    "ray_address",
    "ray_executor_args",
]
