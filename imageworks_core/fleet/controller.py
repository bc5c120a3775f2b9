"""The controller: :class:`Fleet`, the one object front ends use in fleet mode (through ``ImageWorks.fleet``).

It holds the registry (the service's last good one), decides placement (:mod:`.placement`) from the agents'
offers, and asks the chosen node's agent to start, stop or forward. It keeps no state of its own: what runs is
what the agents report, and what a dead node served is what the directory kept (:mod:`.directory`), so a CLI
run, the API and the dashboard all see the same fleet.

Liveness: a slot is ``lost`` when Ray reports its node dead, when its agent is dead, or when its agent does not
answer within :data:`AGENT_CALL_TIMEOUT_S` (a killed node's agent stops answering at once, long before Ray's
health checks declare the node dead), so a dead node's slots show ``lost`` within a few seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..audit import log_event
from ..errors import (
    BackendError,
    FleetError,
    ImageWorksError,
    PlacementError,
    ProbeError,
    SlotLost,
    SwitchInProgress,
    UnknownModelError,
)
from ..registry import Registry, load_registry, lock_file_path
from ..schema import ModelEntry
from ..settings import Settings
from ..upstream import endpoint_for
from . import cluster
from .config import FleetConfig, load_fleet_config, node_download_path, ray_address
from .forward import FORWARD_TIMEOUT_S, AgentTransport, ForwardResponse
from .placement import NodeOffer, Placement, place, place_evicting, verifier
from .slots import GpuSlotView, NodeInfo, SlotInfo

if TYPE_CHECKING:  # httpx, Pillow: imported on use
    from ..probe import ProbeRoute
    from ..verification import VerifyResult

AGENT_CALL_TIMEOUT_S = 3.0
"""A status, offer or stop-of-nothing call to an agent; no answer within it means the node is lost."""
AGENT_START_TIMEOUT_S = 60.0
"""A node's agent just created: how long its worker gets to start and answer its first call (a Python process
importing our package, on a busy box)."""
AGENT_CONCURRENCY = 32
"""Calls one agent serves at once (starts run for minutes; status and traffic must not wait behind them)."""
ACTIVATE_MARGIN_S = 120.0
"""Beyond the start timeout: the lock check, waiting for the slot's lock, stopping a failed predecessor."""
STOP_CALL_TIMEOUT_S = 300.0
"""A stop call: each slot's SIGTERM grace, SIGKILL and GPU release, possibly for several slots."""
SILENT_MEMORY_S = 10.0
"""An agent that did not answer is taken as lost, without asking it again, for this long (so one dead node costs
one timeout, not one per call)."""
VERIFY_CALL_TIMEOUT_S = 6 * 3600.0
"""A verification on a node: a full read of the largest weights at disk speed (a node that dies meanwhile is
SlotLost at once, not after this)."""
PROGRESS_POLL_S = 0.5
"""While a start runs: how often the leader's slot is asked for its phase (for ``on_progress``)."""

ProgressCallback = Callable[[str, float, str], None]


class Fleet:
    """The fleet of one Ray cluster, seen from one deployment root (its registry and ``configs/fleet.json``).

    ``registry`` returns the registry to take entries from (the service passes its last good one); by default
    the files on disk are loaded. Create it with :meth:`connect`.
    """

    def __init__(self, settings: Settings, address: str, *, registry: Callable[[], Registry] | None = None) -> None:
        self.settings = settings
        self.address = address
        self._registry = registry or (lambda: load_registry(settings=settings))
        self._ray: ModuleType | None = None
        self._connected_here = False
        self._agent_class: Any = None
        self._guard = threading.Lock()
        self._silent: dict[str, tuple[float, str]] = {}  # node id -> (when, why) its agent last failed to answer
        self._deciding = threading.Lock()  # autoswitch: one placement decision (and eviction) at a time

    @classmethod
    def connect(
        cls, settings: Settings, address: str | None = None, *, registry: Callable[[], Registry] | None = None
    ) -> Fleet:
        """Join the cluster at ``address`` (else ``IMAGEWORKS_RAY_ADDRESS``); FleetUnavailable when fleet mode is
        off, Ray is not installed, or no cluster answers."""
        resolved = ray_address(address)
        if resolved is None:
            raise FleetError("fleet mode is off: set IMAGEWORKS_RAY_ADDRESS (or pass --ray-address), e.g. 'auto'")
        fleet = cls(settings, resolved, registry=registry)
        fleet._ray, fleet._connected_here = cluster.connect(resolved)
        return fleet

    def close(self) -> None:
        """Leave the cluster (only if :meth:`connect` joined it; agents and their slots keep running)."""
        if self._connected_here and self._ray is not None:
            self._ray.shutdown()
            self._connected_here = False

    @property
    def ray(self) -> ModuleType:
        if self._ray is None:
            self._ray, self._connected_here = cluster.connect(self.address)
        return self._ray

    @property
    def gcs_address(self) -> str:
        """The cluster's own address (what a backend spanning nodes is told in ``RAY_ADDRESS``)."""
        return str(self.ray.get_runtime_context().gcs_address)

    def config(self) -> FleetConfig:
        return load_fleet_config(self.settings)

    # Ray plumbing ----------------------------------------------------------------------------------------
    def _rows(self) -> list[dict[str, Any]]:
        return cluster.node_table(self.ray)

    def _call(self, ref: Any, timeout_s: float, node: str) -> Any:
        """The result of an agent call; our own errors come back as they were raised on the node."""
        ray = self.ray
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ImageWorksError):
                raise cause from None
            raise FleetError(f"the agent on node {node} failed: {cause!r}") from None
        except ray.exceptions.GetTimeoutError:
            raise SlotLost(f"the agent on node {node} did not answer within {timeout_s:g}s", node=node) from None
        except ray.exceptions.RayActorError as exc:
            raise SlotLost(f"the agent on node {node} is gone ({type(exc).__name__})", node=node) from None

    def _silence(self, node_id: str) -> str | None:
        """Why the node's agent counts as lost without being asked (it failed to answer just now), else None."""
        with self._guard:
            when, why = self._silent.get(node_id, (0.0, ""))
            if time.monotonic() - when < SILENT_MEMORY_S:
                return why
            self._silent.pop(node_id, None)
            return None

    def _silenced(self, node_id: str, why: str) -> None:
        with self._guard:
            self._silent[node_id] = (time.monotonic(), why)

    def _existing_agent(self, node_id: str) -> Any | None:
        try:
            return self.ray.get_actor(cluster.agent_name(node_id), namespace=cluster.NAMESPACE)
        except ValueError:
            return None

    def _agent(self, row: dict[str, Any], config: FleetConfig) -> Any:
        """The node's agent, created (detached, pinned to the node) when it has none."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .agent import NodeAgent

        with self._guard:
            if self._agent_class is None:
                self._agent_class = self.ray.remote(NodeAgent)
        node_id, name = row["NodeID"], row.get("NodeName") or row["NodeManagerAddress"]
        node = config.for_node(name, self.settings.root)
        return self._agent_class.options(
            name=cluster.agent_name(node_id),
            namespace=cluster.NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=AGENT_CONCURRENCY,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(node_id, name, node.root, int((row.get("Resources") or {}).get("GPU", 0)))

    def _agents(self, rows: Sequence[dict[str, Any]], config: FleetConfig) -> dict[str, Any]:
        """The agents of the alive, answering ``rows`` by node id; agents created here are waited for until they
        answer (up to :data:`AGENT_START_TIMEOUT_S`), so their first real call is not mistaken for a lost node."""
        agents, created = {}, []
        for row in rows:
            if not row.get("Alive") or self._silence(row["NodeID"]):
                continue
            agent = self._existing_agent(row["NodeID"])
            if agent is None:
                agent = self._agent(row, config)
                created.append((row, agent.ping.remote()))
            agents[row["NodeID"]] = agent
        for row, ref in created:
            try:
                self._call(ref, AGENT_START_TIMEOUT_S, self._name(row))
            except SlotLost as exc:
                self._silenced(row["NodeID"], exc.message)
                agents.pop(row["NodeID"], None)
        return agents

    def _directory(self, rows: Sequence[dict[str, Any]]) -> Any:
        """The directory actor on the head node (created on first use)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .directory import FleetDirectory

        head = next((r for r in rows if cluster.is_head(r) and r.get("Alive")), None)
        strategy = NodeAffinitySchedulingStrategy(head["NodeID"], soft=False) if head else "DEFAULT"
        return (
            self.ray.remote(FleetDirectory)
            .options(
                name=cluster.DIRECTORY_NAME,
                namespace=cluster.NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=8,
                scheduling_strategy=strategy,
            )
            .remote()
        )

    def _tables(self, rows: Sequence[dict[str, Any]]) -> tuple[Any, dict[str, dict[str, Any]]]:
        directory = self._directory(rows)
        try:
            return directory, self.ray.get(directory.tables.remote(), timeout=AGENT_CALL_TIMEOUT_S)
        except Exception:  # without the head's directory, only live agents can be listed
            return directory, {}

    @staticmethod
    def _name(row: dict[str, Any]) -> str:
        return str(row.get("NodeName") or row.get("NodeManagerAddress") or row["NodeID"][:12])

    def ensure_agents(self) -> dict[str, Any]:
        """An agent on every alive node (created where missing); returns them by node id."""
        config = self.config()
        rows = self._rows()
        self._directory(rows)
        return self._agents(rows, config)

    # What runs -------------------------------------------------------------------------------------------
    def slots(self, *, check_health: bool = False) -> list[SlotInfo]:
        """Every slot in the fleet: live ones from their agents, a dead node's (or silent agent's) as ``lost``."""
        rows = self._rows()
        _directory, tables = self._tables(rows)
        return self._slots(rows, tables, check_health)

    def _slots(
        self, rows: Sequence[dict[str, Any]], tables: dict[str, dict[str, Any]], check_health: bool
    ) -> list[SlotInfo]:
        pending = []
        result: list[SlotInfo] = []
        for row in rows:
            node_id = row["NodeID"]
            if not row.get("Alive"):
                result += _lost(tables.get(node_id), f"node {self._name(row)} ({node_id[:12]}) is dead")
                continue
            silent = self._silence(node_id)
            agent = None if silent else self._existing_agent(node_id)
            if agent is None:
                why = silent or f"the agent on node {self._name(row)} is gone (its reaper stopped its backends)"
                result += _lost(tables.get(node_id), why)
                continue
            pending.append((row, agent.slots.remote(check_health)))
        deadline = time.monotonic() + AGENT_CALL_TIMEOUT_S + (5.0 if check_health else 0.0)
        for row, ref in pending:
            try:
                found = self._call(ref, max(0.1, deadline - time.monotonic()), self._name(row))
            except SlotLost as exc:
                self._silenced(row["NodeID"], exc.message)
                result += _lost(tables.get(row["NodeID"]), exc.message)
                continue
            result += [SlotInfo.model_validate(s) for s in found]
        return sorted(result, key=lambda s: (s.node_name, s.slot_id))

    def nodes(self) -> list[NodeInfo]:
        """Every node: alive ones (with their agent's GPUs and slots), dead ones that still have lost slots."""
        config = self.config()
        rows = self._rows()
        _directory, tables = self._tables(rows)
        agents = self._agents(rows, config)
        asked = []
        for row in rows:
            if row.get("Alive"):
                agent = agents.get(row["NodeID"])
                why = self._silence(row["NodeID"]) or f"the agent on node {self._name(row)} did not start"
                asked.append((row, why if agent is None else agent.describe.remote()))
        infos: list[NodeInfo] = []
        deadline = time.monotonic() + AGENT_CALL_TIMEOUT_S
        for row, ref in asked:
            name = self._name(row)
            node = config.for_node(name, self.settings.root)
            base = {
                "node_id": row["NodeID"],
                "name": name,
                "address": row.get("NodeManagerAddress", ""),
                "alive": True,
                "is_head": cluster.is_head(row),
                "max_models": node.max_models,
            }
            try:
                if isinstance(ref, str):
                    raise SlotLost(ref, node=name)
                described = self._call(ref, max(0.1, deadline - time.monotonic()), name)
            except SlotLost as exc:
                self._silenced(row["NodeID"], exc.message)
                lost = _lost(tables.get(row["NodeID"]), exc.message)
                gpus = int((row.get("Resources") or {}).get("GPU", 0))
                infos.append(NodeInfo(**base, gpus_total=gpus, gpus_used=0, slots=lost, agent=exc.message))
                continue
            infos.append(_node_info(base, described, node.root))
        for row in rows:
            table = tables.get(row["NodeID"])
            if not row.get("Alive") and table is not None:
                name = self._name(row)
                infos.append(
                    NodeInfo(
                        node_id=row["NodeID"],
                        name=name,
                        address=row.get("NodeManagerAddress", ""),
                        alive=False,
                        is_head=cluster.is_head(row),
                        max_models=config.for_node(name, self.settings.root).max_models,
                        gpus_total=int((row.get("Resources") or {}).get("GPU", 0)),
                        gpus_used=0,
                        slots=_lost(table, f"node {name} ({row['NodeID'][:12]}) is dead"),
                        agent="node is dead",
                    )
                )
        return sorted(infos, key=lambda n: (not n.alive, n.name, n.node_id))

    # Placement and start ---------------------------------------------------------------------------------
    def _entry(self, name: str) -> ModelEntry:
        entry = self._registry().get(name)
        if not entry.is_process_backend:
            where = endpoint_for(entry, self.settings) if entry.backend else "nowhere (no backend set)"
            raise BackendError(
                f"{entry.name!r} uses backend {entry.backend!r}, which ImageWorks does not start: there is nothing "
                f"to activate; requests go to {where}"
            )
        return entry

    def _node_entry(self, entry: ModelEntry, node_name: str, config: FleetConfig) -> dict[str, Any]:
        """The entry as node ``node_name`` must run it (its weights path mapped for that node)."""
        node = config.for_node(node_name, self.settings.root)
        mapped = entry.model_copy(update={"download_path": node_download_path(entry, self.settings, node)})
        return mapped.model_dump(mode="json")

    def _offers(self, entry: ModelEntry, config: FleetConfig) -> tuple[list[NodeOffer], dict[str, Any]]:
        rows = self._rows()
        agents = self._agents(rows, config)
        rows = [r for r in rows if r["NodeID"] in agents]
        asked = []
        for row in rows:
            name = self._name(row)
            max_models = config.for_node(name, self.settings.root).max_models
            ref = agents[row["NodeID"]].offer.remote(self._node_entry(entry, name, config), max_models)
            asked.append((row["NodeID"], name, ref))
        offers = []
        deadline = time.monotonic() + AGENT_CALL_TIMEOUT_S
        for node_id, name, ref in asked:
            try:
                offers.append(NodeOffer.model_validate(self._call(ref, max(0.1, deadline - time.monotonic()), name)))
            except SlotLost as exc:
                self._silenced(node_id, exc.message)  # a node that does not answer cannot take a model
        return offers, agents

    def plan(self, name: str, *, node: str | None = None, gpus: int | None = None) -> Placement:
        """Where :meth:`activate` would start ``name`` and how (argv and env for a model spanning nodes); starts
        nothing. PlacementError with each node's reason when no node can take it."""
        entry = self._entry(name)
        offers, _agents = self._offers(entry, self.config())
        return place(entry.name, entry.backend, offers, node=node, gpus=gpus, ray_address=self.gcs_address)

    def activate(
        self,
        name: str,
        *,
        node: str | None = None,
        gpus: int | None = None,
        timeout_s: float | None = None,
        force: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> SlotInfo:
        """Start ``name`` in a new slot (placed by :func:`~.placement.place`) and return it once ready.

        A model runs once in the fleet: already ready, its slot is returned (on another node than ``node``, a
        BackendError says where it runs). Errors from the node keep their class and exit code (lock violation 2,
        weights missing 7, failed start 6 with the log tail); the node dying meanwhile is SlotLost."""
        from ..runtime.activate import start_timeout_for

        entry = self._entry(name)
        config = self.config()
        started = time.monotonic()
        for slot in self.slots():
            if slot.name != entry.name or slot.status not in ("ready", "starting", "stopping"):
                continue
            here = node is None or node in (slot.node_name, slot.node_id) or slot.node_id.startswith(node)
            if slot.status == "ready" and here:
                return slot
            raise BackendError(
                f"{entry.name!r} is already {slot.status} on node {slot.node_name} (slot {slot.slot_id}); stop it "
                f"first: imageworks-models activate-model --stop {slot.slot_id}"
            )
        offers, agents = self._offers(entry, config)
        placement = place(entry.name, entry.backend, offers, node=node, gpus=gpus, ray_address=self.gcs_address)
        if on_progress is not None:
            on_progress("placement", time.monotonic() - started, _describe(placement))
        manifest = _manifest_text(self.settings, entry)
        node_config = config.for_node(placement.node_name, self.settings.root)
        reserved = []
        try:
            for member in placement.members:
                self._call(
                    agents[member.node_id].reserve.remote(entry.name, entry.name, placement.node_name, member.gpus),
                    AGENT_CALL_TIMEOUT_S,
                    member.node_name,
                )
                reserved.append(member)
            leader = agents[placement.node_id]
            ref = leader.activate.remote(
                self._node_entry(entry, placement.node_name, config),
                gpus=placement.gpus,
                max_models=node_config.max_models,
                idle_ttl_s=node_config.idle_ttl_s,
                members={m.node_name: m.gpus for m in placement.members},
                extra_args=placement.extra_args,
                env=placement.env,
                manifest=manifest,
                timeout_s=timeout_s,
                force=force,
            )
            limit = start_timeout_for(self.settings, entry, timeout_s) + ACTIVATE_MARGIN_S
            self._wait(ref, leader, entry.name, placement.node_name, started, limit, on_progress)
            slot = SlotInfo.model_validate(self._call(ref, limit, placement.node_name))
        except BaseException as exc:
            for member in reserved:
                self._release(agents[member.node_id], entry.name, member.node_name)
            if isinstance(exc, SlotLost):
                raise SlotLost(
                    f"node {placement.node_name} was lost while starting {entry.name!r}: {exc.message}",
                    node=placement.node_name,
                ) from None
            raise
        self._forget_lost(entry.name)
        log_event(
            self.settings,
            "fleet_activation",
            name=entry.name,
            node=slot.node_name,
            slot=slot.slot_id,
            gpus=slot.gpus,
            members=slot.members,
        )
        return slot

    def _wait(
        self,
        ref: Any,
        leader: Any,
        name: str,
        node: str,
        started: float,
        limit: float,
        on_progress: ProgressCallback | None,
    ) -> None:
        """Wait for a start, reporting the slot's phase while it runs (without a callback: just wait)."""
        if on_progress is None:
            return
        last = None
        while time.monotonic() - started < limit:
            ready, _ = self.ray.wait([ref], timeout=PROGRESS_POLL_S)
            if ready:
                return
            try:
                slots = self._call(leader.slots.remote(False), AGENT_CALL_TIMEOUT_S, node)
            except SlotLost:
                return  # the result call reports it
            for slot in slots:
                if slot["name"] == name and slot["status"] == "starting":
                    now = (slot.get("phase"), slot.get("detail"))
                    if now != last or now[0] == "waiting":
                        on_progress(str(now[0] or "starting"), time.monotonic() - started, str(now[1] or ""))
                    last = now

    def _release(self, agent: Any, name: str, node: str) -> None:
        try:
            self._call(agent.release.remote(name), AGENT_CALL_TIMEOUT_S, node)
        except FleetError:
            pass  # a lost member node holds nothing any more

    def _forget_lost(self, name: str) -> None:
        """Drop the ``lost`` records of ``name`` (it now runs elsewhere)."""
        rows = self._rows()
        directory, tables = self._tables(rows)
        for slot in self._slots(rows, tables, False):
            if slot.name == name and slot.status == "lost":
                directory.forget.remote(slot.node_id, [slot.slot_id])

    # Verify and probe ------------------------------------------------------------------------------------
    def verify(
        self, name: str, *, node: str | None = None, fast: bool = False, algorithm: str | None = None
    ) -> VerifyResult:
        """Verify a node's copy of ``name``'s weights (its path mapped through the node's ``download_location``)
        against this root's lock manifest, and record the result here (history and audit, naming the node).

        ``node``: a node name or id; None: the node serving ``name``, else the least loaded node holding its
        weights (:func:`~.placement.verifier`). Never raises on drift (``result`` says it, as on one box);
        PlacementError for an unknown node, WeightsError when the weights are not there, SlotLost when the node
        is lost meanwhile."""
        from ..verification import VerifyResult, record_verification

        entry = self._registry().get(name)
        config = self.config()
        offers, agents = self._offers(entry, config)
        chosen = verifier(entry.name, offers, node=node)
        pinned = entry.version_lock is not None and bool(entry.version_lock.expected_aggregate_sha256)
        ref = agents[chosen.node_id].verify.remote(
            self._node_entry(entry, chosen.node_name, config),
            manifest=_manifest_text(self.settings, entry),
            manifest_label=str(lock_file_path(self.settings, entry)) if pinned else None,
            fast=fast,
            algorithm=algorithm,
        )
        result = VerifyResult.model_validate(self._call(ref, VERIFY_CALL_TIMEOUT_S, chosen.node_name))
        record_verification(self.settings, result)
        return result

    def probe_route(self, name: str, *, activate: bool = False) -> ProbeRoute:
        """Where a vision probe of ``name`` goes: the slot serving it, through its node's agent (activated first,
        placed as :meth:`activate` places, when ``activate``). ProbeError when it runs nowhere; SlotLost (naming
        the node) when its node is lost; SwitchInProgress while it starts or stops."""
        from ..probe import ProbeRoute, activate_command

        entry = self._entry(name)
        slot = self.activate(entry.name) if activate else _serving(entry.name, self.slots())
        if slot is None:
            summary = f"{entry.name!r} runs nowhere in the fleet"
            raise ProbeError(
                f"{summary}; activate it first: {activate_command(entry.name)} (or rerun the probe with --activate)",
                inactive=entry.name,
                summary=summary,
            )
        served = slot

        def send(method: str, path: str, headers: list[tuple[str, str]], body: bytes, timeout_s: float) -> Any:
            return self.forward(served, method, path, headers=headers, body=body, timeout_s=timeout_s)

        return ProbeRoute(
            endpoint=f"http://127.0.0.1:{slot.port}/v1", transport=AgentTransport(send), node=slot.node_name
        )

    # Autoswitch -------------------------------------------------------------------------------------------
    def autoswitch(self, name: str, *, timeout_s: float | None = None) -> SlotInfo:
        """The ready slot serving ``name``, started if it runs nowhere: what the API's proxy does for a request.

        Beside the others while a node has room under its ``max_models`` (placed as :meth:`activate` places);
        else the least recently used idle slot whose eviction makes room is stopped first (see
        :func:`~.placement.place_evicting`; audit event ``fleet_eviction``). SlotLost (naming the node) when the
        model's slot is lost: its node died, and only an explicit activation moves it; SwitchInProgress while it
        starts or stops elsewhere; PlacementError when nothing can be evicted to make room.

        Concurrent callers (threads of one API server) decide one at a time: the decision lock is held until the
        new slot is allocated on its node, so two requests never evict for, or fill, the same room.
        """
        entry = self._entry(name)
        serving = _serving(entry.name, self.slots())  # the common case answers without waiting for a decision
        if serving is not None:
            return serving
        decided = threading.Event()

        def allocated(phase: str, _elapsed: float, _detail: str) -> None:
            if phase != "placement" and not decided.is_set():
                decided.set()
                self._deciding.release()

        self._deciding.acquire()
        try:
            slots = self.slots()
            serving = _serving(entry.name, slots)
            if serving is not None:
                return serving
            offers, _agents = self._offers(entry, self.config())
            try:
                placement = place(entry.name, entry.backend, offers, ray_address=self.gcs_address)
            except PlacementError as refused:
                placement, victim = place_evicting(entry.name, entry.backend, offers, slots, refused=refused)
                self._evict(victim, entry.name)
            return self.activate(entry.name, node=placement.node_id, timeout_s=timeout_s, on_progress=allocated)
        finally:
            if not decided.is_set():
                self._deciding.release()

    def _evict(self, victim: SlotInfo, name: str) -> None:
        """Stop ``victim`` to make room for ``name`` on its node (audited, with when it was last used)."""
        reason = f"evicted for {name!r}: least recently used on node {victim.node_name}"
        log_event(
            self.settings,
            "fleet_eviction",
            name=victim.name,
            slot=victim.slot_id,
            node=victim.node_name,
            last_used_at=victim.last_used_at,
            evicted_for=name,
        )
        self.stop(victim.slot_id, reason=reason)

    # Stop ------------------------------------------------------------------------------------------------
    def stop(self, target: str | None = None, *, reason: str = "") -> list[dict[str, Any]]:
        """Stop one slot (``target``: a slot id, or a model's name, alias or served id) or all (None).

        Returns one record per slot: ``slot_id``, ``node_name``, ``name``, ``lost`` (a lost slot is only
        forgotten: its node is gone) and the runtime's ``stop`` result. Stopping what does not run is no error
        ([]); a target that is neither a slot nor a registry name is UnknownModelError."""
        rows = self._rows()
        directory, tables = self._tables(rows)
        slots = self._slots(rows, tables, False)
        if target is not None:
            chosen = [s for s in slots if s.slot_id == target or s.matches(target)]
            if not chosen:
                entry_name = self._registry().get(target).name  # UnknownModelError when it names nothing
                chosen = [s for s in slots if s.name == entry_name]
        else:
            chosen = slots
        results: list[dict[str, Any]] = []
        agents = {}
        for slot in chosen:
            if slot.status == "lost":
                directory.forget.remote(slot.node_id, [slot.slot_id])
                results.append({**_record(slot), "lost": True, "stop": None})
                continue
            agent = agents.setdefault(slot.node_id, self._existing_agent(slot.node_id))
            if agent is None:
                continue
            done = self._call(
                agent.stop.remote([slot.slot_id], reason=reason or "fleet stop"), STOP_CALL_TIMEOUT_S, slot.node_name
            )
            results += [{**d, "node_id": slot.node_id, "lost": False} for d in done]
            for member_name in slot.members:
                member = next((r for r in rows if self._name(r) == member_name and r.get("Alive")), None)
                member_agent = self._existing_agent(member["NodeID"]) if member else None
                if member_agent is not None:
                    self._release(member_agent, slot.name, member_name)
        if target is None:
            for row in rows:  # reservations without a leader, and dead nodes' empty tables
                if row.get("Alive"):
                    agent = None if self._silence(row["NodeID"]) else self._existing_agent(row["NodeID"])
                    if agent is None:
                        continue
                    try:
                        self._call(
                            agent.stop.remote(None, reason=reason or "fleet stop"), STOP_CALL_TIMEOUT_S, self._name(row)
                        )
                    except SlotLost as exc:  # its slots were listed as lost above and are forgotten
                        self._silenced(row["NodeID"], exc.message)
                elif row["NodeID"] in tables:
                    directory.drop.remote(row["NodeID"])
        for record in results:
            log_event(self.settings, "fleet_stop", **{k: record[k] for k in ("slot_id", "node_name", "name", "lost")})
        return results

    # Routing and traffic ---------------------------------------------------------------------------------
    def route(self, model: str) -> SlotInfo:
        """The ready slot serving ``model`` (name, alias or served id). SlotLost (naming the node) when its node
        is lost, SwitchInProgress while it starts, UnknownModelError when nothing in the fleet serves it."""
        slots = [s for s in self.slots() if s.matches(model)]
        if not slots:
            try:
                name = self._registry().get(model).name
            except UnknownModelError:
                name = None
            slots = [s for s in self.slots() if s.name == name] if name else []
        for wanted in ("ready", "starting", "stopping", "lost"):
            for slot in slots:
                if slot.status != wanted:
                    continue
                if wanted == "ready":
                    return slot
                if wanted == "lost":
                    raise SlotLost(
                        f"{model!r} was served by node {slot.node_name}, which is lost: {slot.detail}",
                        node=slot.node_name,
                    )
                raise SwitchInProgress(slot.name, f"slot {slot.slot_id} on node {slot.node_name}")
        raise UnknownModelError(f"no slot in the fleet serves {model!r}; activate it first", name=model)

    def _slot_agent(self, slot: SlotInfo | str) -> tuple[SlotInfo, Any]:
        info = slot if isinstance(slot, SlotInfo) else next((s for s in self.slots() if s.slot_id == slot), None)
        if info is None:
            raise UnknownModelError(f"no slot {slot!r} in the fleet", name=str(slot))
        agent = self._existing_agent(info.node_id)
        if agent is None:
            raise SlotLost(f"the agent on node {info.node_name} is gone", node=info.node_name)
        return info, agent

    def forward(
        self,
        slot: SlotInfo | str,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout_s: float = FORWARD_TIMEOUT_S,
    ) -> ForwardResponse:
        """Send an HTTP request to a slot's backend through its node's agent (see :mod:`.forward`)."""
        info, agent = self._slot_agent(slot)
        ref = agent.forward.remote(info.slot_id, method, path, list(headers), body, timeout_s)
        return self._call(ref, timeout_s + AGENT_CALL_TIMEOUT_S, info.node_name)

    def forward_stream(
        self,
        slot: SlotInfo | str,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout_s: float = FORWARD_TIMEOUT_S,
    ) -> Iterator[ForwardResponse | bytes]:
        """Like :meth:`forward`; yields the head (a ForwardResponse without body), then body chunks."""
        info, agent = self._slot_agent(slot)
        chunks = agent.forward_stream.options(num_returns="streaming").remote(
            info.slot_id, method, path, list(headers), body, timeout_s
        )
        finished = False
        try:
            for ref in chunks:
                yield self._call(ref, timeout_s + AGENT_CALL_TIMEOUT_S, info.node_name)
            finished = True
        finally:
            if not finished:  # closed early (the client went away) or failed: the agent stops reading the backend
                self.ray.cancel(chunks)

    # Shutdown --------------------------------------------------------------------------------------------
    def shutdown(self) -> list[dict[str, Any]]:
        """Stop every slot, then end every agent (their reapers exit) and the directory."""
        results = self.stop(None, reason="fleet shutdown")
        for row in self._rows():
            agent = self._existing_agent(row["NodeID"]) if row.get("Alive") else None
            if agent is not None:
                try:
                    self.ray.kill(agent, no_restart=True)
                except Exception:  # an agent already gone has nothing left to end
                    continue
        try:
            self.ray.kill(self.ray.get_actor(cluster.DIRECTORY_NAME, namespace=cluster.NAMESPACE), no_restart=True)
        except ValueError:
            pass
        return results


def _serving(name: str, slots: Sequence[SlotInfo]) -> SlotInfo | None:
    """The ready slot of entry ``name``; None when it runs nowhere (or only failed). SlotLost when its slot is
    lost (only an explicit activation moves it), SwitchInProgress while it starts or stops."""
    for wanted in ("ready", "starting", "stopping", "lost"):
        for slot in slots:
            if slot.name != name or slot.status != wanted:
                continue
            if wanted == "ready":
                return slot
            if wanted == "lost":
                raise SlotLost(
                    f"{name!r} was served by node {slot.node_name}, which is lost: {slot.detail}; "
                    "activate it again to place it elsewhere",
                    node=slot.node_name,
                )
            raise SwitchInProgress(name, f"slot {slot.slot_id} on node {slot.node_name}")
    return None


def _lost(table: dict[str, Any] | None, why: str) -> list[SlotInfo]:
    """A node's last published slots, as ``lost`` (failed ones stay failed: nothing of them ran)."""
    if not table:
        return []
    lost = []
    for data in table["slots"]:
        slot = SlotInfo.model_validate(data)
        if slot.status == "failed":
            continue
        lost.append(slot.model_copy(update={"status": "lost", "detail": why, "healthy": False, "uptime_s": None}))
    return lost


def _record(slot: SlotInfo) -> dict[str, Any]:
    return {"slot_id": slot.slot_id, "node_id": slot.node_id, "node_name": slot.node_name, "name": slot.name}


def _describe(placement: Placement) -> str:
    gpus = ",".join(map(str, placement.gpus)) or "none"
    text = f"node {placement.node_name}, GPU(s) {gpus}"
    if placement.members:
        text += "; " + placement.note
    return text


def _manifest_text(settings: Settings, entry: ModelEntry) -> str | None:
    """The lock manifest of a pinned entry, sent to the serving node with the entry (None when unpinned or
    missing: the node's lock check then reports the missing manifest as drift, as the single port does)."""
    if entry.version_lock is None or not entry.version_lock.expected_aggregate_sha256:
        return None
    try:
        return lock_file_path(settings, entry).read_text(encoding="utf-8")
    except OSError:
        return None


def _node_info(base: dict[str, Any], described: dict[str, Any], root: str) -> NodeInfo:
    gpus = [GpuSlotView.model_validate(g) for g in described["gpus"]]
    slots = [SlotInfo.model_validate(s) for s in described["slots"]]
    known = [g for g in gpus if g.memory_total_bytes is not None]
    return NodeInfo(
        **base,
        root=described.get("root") or root,
        gpus_total=len(gpus),
        gpus_used=sum(1 for g in gpus if g.slot_id),
        gpus=gpus,
        vram_total_bytes=sum(g.memory_total_bytes or 0 for g in known) if known else None,
        vram_free_bytes=sum(g.memory_free_bytes or 0 for g in known) if known else None,
        gpu_note=described.get("gpu_note"),
        slots=slots,
    )
