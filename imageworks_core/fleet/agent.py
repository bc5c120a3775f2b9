"""The node agent: one detached, named Ray actor per node that runs our runtime on its node.

The controller creates it (:func:`~.controller.Fleet.agents`) pinned to its node with a hard node-affinity
strategy, in the namespace :data:`~.cluster.NAMESPACE`, named from the node id. It holds no registry: each call
brings the entry (its ``download_path`` already mapped for this node) and, for a pinned entry, the lock manifest.
Every start, stop, status and health check is the single-port runtime's own (:mod:`imageworks_core.runtime`),
run per slot with the slot's own state file, activation lock, logs and port (:mod:`imageworks_core.runtime.slot`)
under this node's root: the lock check hashes this node's files, so the bytes that load are the bytes verified.

Verification (:meth:`NodeAgent.verify`) hashes this node's copy of an entry's weights against the manifest the
controller sends and returns the report; the controller records it (this node's history keeps only the stat
cache of fast mode). Probes need nothing of their own here: they are requests forwarded to a slot.

Slots and GPUs are allocated under one lock, so two controllers placing at once can never give one GPU or one
slot of room twice; the start itself runs outside it (the actor is threaded), so status calls answer while a
model loads. ``max_models`` is checked here, with the value the controller's config gives for this node.

Idle slots: a slot started with ``idle_ttl_s`` (the node's ``configs/fleet.json`` value, sent by the controller)
is stopped by the agent's idle watcher once no request has passed through it for that long (reason "idle for N s",
audit event ``fleet_idle_stop`` in this node's audit log). A slot with a request in flight is never idle: the
check and the switch to ``stopping`` happen under the slot lock, and a request arriving after that is refused
(the proxy then starts the model again).

Crash safety: the agent's backends die with it. Its reaper (:mod:`.reaper`) watches the agent's pid and stops
every slot it recorded when the agent is gone; a new agent on the same root stops what an agent without a
reaper left (:func:`~.slotdirs.stale_agent_dirs`). Each slot change is published to the directory
(:mod:`.directory`), so a controller still knows what a dead node served.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import audit, gpu
from ..errors import BackendError, PlacementError
from ..registry import Registry
from ..runtime.gpu_fit import tensor_parallel_size
from ..runtime.slot import SlotSettings, slot_settings
from ..schema import ModelEntry
from ..settings import get_settings, slugify
from . import forward as relay
from . import reaper
from .cluster import DIRECTORY_NAME, NAMESPACE
from .placement import GpuFree, NodeOffer
from .slotdirs import (
    AGENT_FILE,
    SLOT_FILE,
    agent_dir,
    process_record,
    slot_logs_dir,
    stale_agent_dirs,
    stop_agent_dir,
    write_json,
)
from .slots import SlotInfo, free_port

IDLE_CHECK_S = 0.5
"""How often the idle watcher looks for slots past their ``idle_ttl_s`` (a slot stops at most this late)."""
STOP_LOCK_WAIT_S = 60.0
"""A stop waits this long for the slot's activation lock (a start in progress is cancelled first)."""
LOCK_MANIFEST_FILE = "lock.manifest.json"
"""Where a pinned entry's lock manifest, sent by the controller, is kept in its slot directory."""


@dataclass
class _Slot:
    slot_id: str
    entry: ModelEntry
    settings: SlotSettings
    gpus: list[int]
    members: dict[str, list[int]]
    status: str = "starting"
    phase: str | None = "preflight"
    detail: str = ""
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    ready_at: datetime | None = None
    last_used_at: datetime | None = None
    in_flight: int = 0
    idle_ttl_s: float | None = None
    pid: int = 0

    @property
    def holds_resources(self) -> bool:
        """Counts against ``max_models`` and holds its GPUs (a failed slot holds neither)."""
        return self.status in ("starting", "ready", "stopping")

    def idle_for(self, now: datetime) -> float | None:
        """Seconds since its last request ended (or since it became ready); None while busy or not ready."""
        if self.status != "ready" or self.in_flight:
            return None
        since = self.last_used_at or self.ready_at or self.started_at
        return (now - since).total_seconds()


@dataclass
class _Reservation:
    """GPUs of this node held by a model whose leader runs on another node (vLLM's Ray executor)."""

    slot_id: str
    name: str
    leader: str
    gpus: list[int]


class NodeAgent:
    """Runs slots on this node (see the module docstring). Every public method is a Ray actor method."""

    def __init__(self, node_id: str, node_name: str, root: str, ray_gpus: int = 0) -> None:
        self.node_id, self.node_name = node_id, node_name
        self.settings = get_settings(root)
        self.instance = uuid.uuid4().hex[:12]
        self.dir = agent_dir(self.settings, self.instance)
        self._ray_gpus = ray_gpus
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._reserved: dict[str, _Reservation] = {}
        self._counter = 0
        self._directory: Any = None
        self._published = 0  # a sequence number: the directory ignores a table older than the one it holds
        self.cleanup_notes = [
            f"{d.name}: {'; '.join(problems) or 'stopped'}"
            for d in stale_agent_dirs(self.settings, self.instance)
            for problems in [stop_agent_dir(self.settings, d, "leftover of a node agent that is gone")]
        ]
        write_json(
            self.dir / AGENT_FILE,
            {**process_record(), "node_id": node_id, "node_name": node_name, "started_at": time.time()},
        )
        reaper.start(self.settings.root, self.dir, self.settings.logs_dir / "fleet" / f"reaper-{self.instance}.log")
        self._publish()
        threading.Thread(target=self._watch_idle, name="idle-watcher", daemon=True).start()

    # Inventory -------------------------------------------------------------------------------------------
    def _gpu_inventory(self) -> tuple[list[GpuFree], str | None]:
        """Every GPU of the node: NVML's figures, else Ray's GPU count without memory figures."""
        try:
            return [
                GpuFree(
                    index=g.index,
                    name=g.name,
                    memory_total_bytes=g.memory_total_bytes,
                    memory_free_bytes=g.memory_free_bytes,
                )
                for g in gpu.query_gpus()
            ], None
        except gpu.GpuUnavailable as exc:
            return [GpuFree(index=i) for i in range(self._ray_gpus)], exc.message

    def _taken(self) -> dict[int, str]:
        taken = {i: s.slot_id for s in self._slots.values() if s.holds_resources for i in s.gpus}
        taken.update({i: r.slot_id for r in self._reserved.values() for i in r.gpus})
        return taken

    def _active(self) -> list[_Slot]:
        return [s for s in self._slots.values() if s.holds_resources]

    def ping(self) -> dict[str, Any]:
        """Who answers: node, agent instance, pid and root."""
        return {
            "node_id": self.node_id,
            "node_name": self.node_name,
            "instance": self.instance,
            "root": str(self.settings.root),
            **process_record(),
            "cleanup_notes": self.cleanup_notes,
        }

    def describe(self) -> dict[str, Any]:
        """The node's GPUs (memory, which slot holds each) and slots, without health checks."""
        inventory, note = self._gpu_inventory()
        with self._lock:
            taken = self._taken()
            slots = [self._info(s).model_dump(mode="json") for s in self._slots.values()]
        return {
            "root": str(self.settings.root),
            "gpus": [{**g.model_dump(), "slot_id": taken.get(g.index)} for g in inventory],
            "gpu_note": note,
            "slots": slots,
            "reserved": [r.__dict__ for r in self._reserved.values()],
        }

    def offer(self, entry_data: dict[str, Any], max_models: int) -> dict[str, Any]:
        """What this node can do for the entry (:class:`~.placement.NodeOffer`): room, free GPUs, weights here."""
        entry = ModelEntry.model_validate(entry_data)
        inventory, _note = self._gpu_inventory()
        path = self.settings.resolve_path(entry.download_path) if entry.download_path else None
        present = bool(path and path.exists())
        with self._lock:
            taken = self._taken()
            active = self._active()
            serving = next((s.slot_id for s in active if s.entry.name == entry.name), None)
        return NodeOffer(
            node_id=self.node_id,
            node_name=self.node_name,
            slots_used=len(active),
            max_models=max_models,
            gpus=inventory,
            gpus_taken=sorted(taken),
            default_gpus=tensor_parallel_size(entry.launch_template() or []) if inventory else 0,
            weights_path=str(path) if path else None,
            weights_present=present,
            weights_bytes=gpu.weights_size_bytes(path) if present and path else 0,
            overhead_factor=self.settings.gpu_overhead_factor,
            serving=serving,
        ).model_dump(mode="json")

    def verify(
        self,
        entry_data: dict[str, Any],
        *,
        manifest: str | None = None,
        manifest_label: str | None = None,
        fast: bool = False,
        algorithm: str | None = None,
    ) -> dict[str, Any]:
        """Verify this node's copy of the entry's weights (its ``download_path`` already mapped for this node)
        against ``manifest`` (the controller's lock manifest text; None for a pinned entry whose manifest is
        missing there, which is drift, as on one box) and return the VerifyResult (a dict, ``node`` set).

        ``manifest_label`` (the controller's path of the manifest) replaces this node's copy's path in the notes.
        Concurrent verifications of one entry each get their own copy of the manifest."""
        from ..verification import verify_weights

        entry = ModelEntry.model_validate(entry_data)
        copy = self.dir / "verify" / f"{slugify(entry.name)}-{uuid.uuid4().hex[:8]}.manifest.json"
        if manifest is not None:
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(manifest, encoding="utf-8")
        try:
            result = verify_weights(
                self.settings,
                entry,
                fast=fast,
                algorithm=algorithm,  # type: ignore[arg-type]
                manifest_file=copy,
            )
        finally:
            copy.unlink(missing_ok=True)
        label = manifest_label or str(copy)
        notes = [n.replace(str(copy), label) for n in result.notes]
        report = result.report
        if report is not None:
            report = report.model_copy(update={"notes": [n.replace(str(copy), label) for n in report.notes]})
        lock_file = label if result.lock_file else None
        result = result.model_copy(
            update={"node": self.node_name, "notes": notes, "report": report, "lock_file": lock_file}
        )
        return result.to_dict()

    # Slots -----------------------------------------------------------------------------------------------
    def _allocate(self, entry: ModelEntry, gpus: list[int], members: dict[str, list[int]], max_models: int) -> _Slot:
        """Reserve room, GPUs and a port for a new slot (under the lock)."""
        active = self._active()
        if len(active) >= max_models:
            names = ", ".join(repr(s.entry.name) for s in active)
            raise PlacementError(
                f"node {self.node_name} serves {len(active)} of max_models {max_models} ({names}); stop one first"
            )
        inventory, _note = self._gpu_inventory()
        unknown = sorted(set(gpus) - {g.index for g in inventory})
        if unknown:
            raise PlacementError(f"node {self.node_name} has no GPU {unknown} (GPUs: {[g.index for g in inventory]})")
        taken = self._taken()
        clash = sorted(i for i in gpus if i in taken)
        if clash:
            raise PlacementError(
                f"GPU(s) {clash} of node {self.node_name} were taken meanwhile (by {taken[clash[0]]}); try again"
            )
        self._counter += 1
        slot_id = f"{self.node_id[:8]}-{self._counter}"
        directory = self.dir / slot_id
        logs = slot_logs_dir(self.settings, slot_id)
        port = free_port()
        write_json(
            directory / SLOT_FILE,
            {"slot_id": slot_id, "port": port, "gpus": gpus, "name": entry.name, "logs_dir": str(logs)},
        )
        slot = _Slot(slot_id, entry, slot_settings(self.settings, directory, logs, port, self.node_name), list(gpus), members)
        self._slots[slot_id] = slot
        return slot

    def _prepared(self, slot: _Slot, extra_args: Sequence[str], env: dict[str, str], manifest: str | None) -> Registry:
        """The entry as it runs in the slot (its GPUs, extra argv and env, the lock manifest), as a registry."""
        entry = slot.entry
        config = entry.backend_config
        run_env = {**config.env, **env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, slot.gpus))}
        config = config.model_copy(update={"env": run_env, "extra_args": [*config.extra_args, *extra_args]})
        update: dict[str, Any] = {"backend_config": config}
        if entry.version_lock is not None and manifest is not None:
            path = slot.settings.slot_dir / LOCK_MANIFEST_FILE
            path.write_text(manifest, encoding="utf-8")
            update["version_lock"] = entry.version_lock.model_copy(update={"manifest_path": str(path)})
        entry = entry.model_copy(update=update)
        slot.entry = entry
        return Registry(settings=slot.settings, entries={entry.name: entry}, curated={}, discovered={})

    def activate(
        self,
        entry_data: dict[str, Any],
        *,
        gpus: list[int],
        max_models: int,
        members: dict[str, list[int]] | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        manifest: str | None = None,
        timeout_s: float | None = None,
        force: bool = False,
        idle_ttl_s: float | None = None,
    ) -> dict[str, Any]:
        """Start the entry in a new slot on ``gpus`` of this node and return the ready slot (a SlotInfo dict);
        with ``idle_ttl_s``, the idle watcher stops it after that long without a request.

        The entry already ready here is returned as it is. Errors are the runtime's (exit codes kept across
        Ray): a failed start leaves the slot listed as ``failed`` with its reason until stopped or retried."""
        from .. import runtime

        entry = ModelEntry.model_validate(entry_data)
        with self._lock:  # one section: two starts of one model can never both pass the check
            same = [s for s in self._slots.values() if s.entry.name == entry.name]
            for slot in same:
                if slot.status == "ready":
                    return self._info(slot).model_dump(mode="json")
                if slot.status in ("starting", "stopping"):
                    raise BackendError(
                        f"{entry.name!r} is already {slot.status} on node {self.node_name} (slot {slot.slot_id})"
                    )
            for slot in same:  # failed earlier: this start replaces it
                self._slots.pop(slot.slot_id, None)
            slot = self._allocate(entry, gpus, members or {}, max_models)
            slot.idle_ttl_s = idle_ttl_s
        for old in same:  # their processes are gone already; this clears their failed state
            runtime.stop(old.settings, reason="started again", lock_timeout_s=STOP_LOCK_WAIT_S)
            shutil.rmtree(old.settings.slot_dir, ignore_errors=True)
        self._publish()
        registry = self._prepared(slot, extra_args, env or {}, manifest)

        def progress(phase: str, _elapsed: float, detail: str) -> None:
            slot.phase, slot.detail = phase, detail

        try:
            state = runtime.activate(
                slot.settings, entry.name, timeout_s=timeout_s, force=force, on_progress=progress, registry=registry
            )
        except BaseException as exc:
            self._after_failure(slot, exc)
            raise
        with self._lock:
            slot.status, slot.phase, slot.detail = "ready", None, ""
            slot.ready_at, slot.pid = state.ready_at, state.pid
        self._publish()
        return self._info(slot).model_dump(mode="json")

    def _after_failure(self, slot: _Slot, exc: BaseException) -> None:
        """Keep a failed start listed (``failed``, with the runtime's reason) when the runtime recorded one; a
        refusal or a cancelled start leaves nothing behind."""
        from .. import runtime

        state, _problem = runtime.state.read_state_lenient(slot.settings)
        with self._lock:
            if state is not None and state.status == "failed" and slot.slot_id in self._slots:
                slot.status, slot.phase = "failed", None
                slot.error = state.error or getattr(exc, "summary", None) or str(exc)
                slot.log_tail = state.log_tail
            else:
                self._slots.pop(slot.slot_id, None)
                shutil.rmtree(slot.settings.slot_dir, ignore_errors=True)
        self._publish()

    def stop(self, slot_ids: list[str] | None = None, *, reason: str = "") -> list[dict[str, Any]]:
        """Stop the given slots (all, reservations included, when None); returns what each stop did."""
        with self._lock:
            targets = [
                self._slots[i] for i in (slot_ids if slot_ids is not None else list(self._slots)) if i in self._slots
            ]
            for slot in targets:
                if slot.status != "failed":
                    slot.status = "stopping"
            if slot_ids is None:
                self._reserved.clear()
        return self._stop_marked(targets, reason)

    def _stop_marked(self, targets: list[_Slot], reason: str) -> list[dict[str, Any]]:
        """Stop slots already marked ``stopping`` (no request reaches them any more)."""
        from .. import runtime

        self._publish()
        results = []
        for slot in targets:
            result = runtime.stop(slot.settings, reason=reason or "fleet stop", lock_timeout_s=STOP_LOCK_WAIT_S)
            with self._lock:
                self._slots.pop(slot.slot_id, None)
            shutil.rmtree(slot.settings.slot_dir, ignore_errors=True)
            results.append(
                {
                    "slot_id": slot.slot_id,
                    "node_name": self.node_name,
                    "name": slot.entry.name,
                    "stop": result.to_dict() if result else None,
                }
            )
        self._publish()
        return results

    def _watch_idle(self) -> None:
        """Stop every slot past its ``idle_ttl_s`` (runs for the agent's life, in its own thread)."""
        while True:
            time.sleep(IDLE_CHECK_S)
            try:
                self.stop_idle()
            except Exception as exc:  # a failed stop must not end the watcher: log it and look again
                audit.log_event(self.settings, "fleet_idle_stop_failed", node=self.node_name, error=repr(exc))

    def stop_idle(self) -> list[dict[str, Any]]:
        """Stop the slots idle for at least their ``idle_ttl_s`` now; returns what each stop did."""
        now = datetime.now(UTC)
        with self._lock:  # checked and marked in one section: a request arriving later is refused, not cut off
            idle = []
            for slot in self._slots.values():
                idle_s = slot.idle_for(now)
                if slot.idle_ttl_s is not None and idle_s is not None and idle_s >= slot.idle_ttl_s:
                    slot.status = "stopping"
                    idle.append((slot, idle_s))
        results = []
        for slot, idle_s in idle:
            reason = f"idle for {slot.idle_ttl_s:g} s"
            audit.log_event(
                self.settings,
                "fleet_idle_stop",
                node=self.node_name,
                slot=slot.slot_id,
                name=slot.entry.name,
                idle_ttl_s=slot.idle_ttl_s,
                idle_s=round(idle_s, 1),
                last_used_at=slot.last_used_at,
                reason=reason,
            )
            results += self._stop_marked([slot], reason)
        return results

    def reserve(self, slot_id: str, name: str, leader: str, gpus: list[int]) -> None:
        """Hold ``gpus`` of this node for a model led from another node (PlacementError when taken)."""
        with self._lock:
            taken = self._taken()
            clash = sorted(i for i in gpus if i in taken)
            if clash:
                raise PlacementError(f"GPU(s) {clash} of node {self.node_name} were taken meanwhile; try again")
            self._reserved[slot_id] = _Reservation(slot_id, name, leader, list(gpus))

    def release(self, slot_id: str) -> bool:
        """Drop a reservation (True when there was one)."""
        with self._lock:
            return self._reserved.pop(slot_id, None) is not None

    def slots(self, check_health: bool = False) -> list[dict[str, Any]]:
        """Every slot of this node with its status (health asked of ready backends when ``check_health``)."""
        with self._lock:
            slots = list(self._slots.values())
        return [self._status(slot, check_health).model_dump(mode="json") for slot in slots]

    def _status(self, slot: _Slot, check_health: bool) -> SlotInfo:
        from .. import runtime
        from ..errors import ImageWorksError

        if slot.status != "ready":
            return self._info(slot)
        try:
            status = runtime.current(slot.settings, check_health=check_health, registry=self._registry(slot))
        except ImageWorksError as exc:
            status, error = None, exc.message
        else:
            error = None if status is None else status.error or status.stale_reason
        if status is not None and status.status == "ready" and status.alive:
            info = self._info(slot)
            info.healthy, info.detail = status.healthy, status.health_detail
            info.uptime_s = status.uptime_s
            return info
        # The backend exited (or its state is gone): the slot says so until it is stopped or started again.
        with self._lock:
            slot.status = "failed"
            slot.error = f"the backend is gone: {error or 'its state file disappeared'}"
            slot.log_tail = runtime.tail_backend_log(slot.settings, slot.entry.name)
        self._publish()
        return self._info(slot)

    def _registry(self, slot: _Slot) -> Registry:
        return Registry(settings=slot.settings, entries={slot.entry.name: slot.entry}, curated={}, discovered={})

    def _info(self, slot: _Slot) -> SlotInfo:
        uptime = (datetime.now(UTC) - slot.started_at).total_seconds() if slot.status == "ready" else None
        return SlotInfo(
            slot_id=slot.slot_id,
            node_id=self.node_id,
            node_name=self.node_name,
            name=slot.entry.name,
            served_model_id=slot.entry.effective_served_id,
            aliases=list(slot.entry.model_aliases),
            gpus=slot.gpus,
            members=slot.members,
            port=slot.settings.vllm_port,
            status=slot.status,  # type: ignore[arg-type]
            phase=slot.phase if slot.status == "starting" else None,
            detail=slot.detail,
            error=slot.error,
            pid=slot.pid,
            started_at=slot.started_at,
            ready_at=slot.ready_at,
            uptime_s=round(uptime, 1) if uptime is not None else None,
            last_used_at=slot.last_used_at,
            requests_in_flight=slot.in_flight,
            idle_ttl_s=slot.idle_ttl_s,
            log_path=str(slot.settings.backend_logs_dir),
            log_tail=slot.log_tail,
        )

    # Traffic ---------------------------------------------------------------------------------------------
    def _begin(self, slot_id: str) -> _Slot:
        """A request to the slot starts: it counts as in use (never idle, never evicted) until :meth:`_end`."""
        with self._lock:
            slot = self._slots.get(slot_id)
            if slot is None or slot.status != "ready":
                what = "gone" if slot is None else slot.status
                raise BackendError(f"slot {slot_id} on node {self.node_name} is {what}; it serves no requests")
            slot.last_used_at = datetime.now(UTC)
            slot.in_flight += 1
            return slot

    def _end(self, slot: _Slot) -> None:
        with self._lock:
            slot.in_flight -= 1
            slot.last_used_at = datetime.now(UTC)

    def forward(
        self,
        slot_id: str,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout_s: float = relay.FORWARD_TIMEOUT_S,
    ) -> relay.ForwardResponse:
        """Make an HTTP request to the slot's backend on this node's loopback (see :mod:`.forward`)."""
        slot = self._begin(slot_id)
        try:
            return relay.request(slot.settings.vllm_port, method, path, headers, body, timeout_s)
        finally:
            self._end(slot)

    def forward_stream(
        self,
        slot_id: str,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout_s: float = relay.FORWARD_TIMEOUT_S,
    ) -> Iterator[relay.ForwardResponse | bytes]:
        """Like :meth:`forward`, yielding the head, then the body's chunks as they come.

        A reader that went away (the controller cancels this call when its client disconnects) ends the request to
        the backend at the next chunk, so the backend stops generating for nobody and the slot is idle again."""
        slot = self._begin(slot_id)
        parts = relay.stream(slot.settings.vllm_port, method, path, headers, body, timeout_s)
        try:
            for part in parts:
                yield part
                if _cancelled():
                    break
        finally:
            parts.close()  # closes the backend connection now, not when the generator is collected
            self._end(slot)

    # The directory ---------------------------------------------------------------------------------------
    def _publish(self) -> None:
        """Send this node's slot table to the directory (best effort: without one, nothing to keep it in)."""
        import ray

        if self._directory is None:
            try:
                self._directory = ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
            except ValueError:
                return
        with self._lock:
            table = [self._info(s).model_dump(mode="json") for s in self._slots.values()]
            self._published += 1
            sequence = self._published
        try:
            self._directory.publish.remote(self.node_id, self.node_name, table, f"{self.instance}:{sequence:012d}")
        except Exception:  # the directory died with the head: the cluster is going away
            self._directory = None


def _cancelled() -> bool:
    """Whether Ray was asked to cancel the call running in this thread (False outside a Ray worker)."""
    import ray

    try:
        return bool(ray.get_runtime_context().is_canceled())
    except RuntimeError:
        return False
