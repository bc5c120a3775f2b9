"""The Active Model page's fleet view: the nodes and slots of a Ray cluster, and starts running in the background.

Fleet mode is on when the service has a Ray address (``IMAGEWORKS_RAY_ADDRESS`` in the dashboard's environment);
reading that never imports Ray, so the single-box page pays nothing for it. Every figure comes from
:meth:`Fleet.nodes` (one call per refresh: each node's agent describes its GPUs and slots; a dead node's slots come
from the directory as ``lost``), so the page, ``imageworks-models fleet`` and ``current-model`` agree.

A start runs :meth:`Fleet.activate` in a thread of the dashboard process, recorded per deployment root (every
session sees it, as the single port's background activation): a page left open shows its phase, and a refusal
(no node can take the model) stays visible for :data:`OUTCOME_SHOW_S` after it ended. A start never blocks the
page; a second start of the same model while one runs is refused here, and the fleet refuses one already placed.
Adversary: the dashboard process dying mid-start leaves the slot to its node's agent, which finishes or fails it
on its own (the slot table shows which); the record here is only the page's progress line.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BackendError, ImageWorksError
from ..settings import Settings
from .registry_view import count_text, duration_text, service_for
from .runs import error_lines

if TYPE_CHECKING:
    from ..fleet import Fleet, NodeInfo, SlotInfo

FLEET_REFRESH_S = 2.0
"""How often the fleet view re-reads the nodes (one describe call per node's agent; a lost node is noticed
within the agents' call timeout, well inside the 10 s the issue asks for)."""
OUTCOME_SHOW_S = 120.0
"""How long a finished start stays on the page (a refusal leaves no slot behind: only this line says why)."""
ANY_NODE = "any node (least loaded)"
"""The node picker's first choice: let placement choose."""
NOTICE_S = 30.0
"""How long the outcome of a Stop or Forget (or a Start that could not be asked for) stays on the page: the next
fragment run, or the whole page re-rendering because a node joined or died, must not take it away unread."""


@dataclass(frozen=True)
class Notice:
    """The outcome of an action on the fleet page, shown until :attr:`until` (a monotonic time)."""

    kind: str  # 'success' or 'error'
    body: object  # the text, or the exception (shown as an error, never a traceback)
    until: float

    @classmethod
    def of(cls, kind: str, body: object) -> Notice:
        return cls(kind, body, time.monotonic() + NOTICE_S)

    @property
    def showing(self) -> bool:
        return time.monotonic() < self.until


_GIB = 2**30


@dataclass(frozen=True)
class FleetView:
    """The fleet as the page shows it now: its nodes (each with its slots), or why it could not be read."""

    address: str
    nodes: list[NodeInfo] = field(default_factory=list)
    error: str | None = None

    @property
    def slots(self) -> list[SlotInfo]:
        """Every slot of every node (lost ones of dead nodes included), by node name then slot id."""
        return sorted((s for n in self.nodes for s in n.slots), key=lambda s: (s.node_name, s.slot_id))

    @property
    def alive_nodes(self) -> list[str]:
        """Names of the alive nodes (the node picker's choices after :data:`ANY_NODE`)."""
        return [n.name for n in self.nodes if n.alive]

    @property
    def signature(self) -> tuple[object, ...]:
        """Changes exactly when the page's controls must change (the node picker's choices)."""
        return (self.error is None, tuple(self.alive_nodes))


def fleet_address(settings: Settings) -> str | None:
    """The Ray address the dashboard's service runs models on; None in single-box mode (Ray is not imported)."""
    return service_for(settings).fleet_address


def fleet_of(settings: Settings) -> Fleet:
    """The service's fleet (joined on first use); FleetError when fleet mode is off or Ray is unreachable."""
    fleet = service_for(settings).fleet
    if fleet is None:
        from ..errors import FleetError

        raise FleetError("fleet mode is off: set IMAGEWORKS_RAY_ADDRESS for the dashboard, e.g. 'auto'")
    return fleet


def fleet_view(settings: Settings) -> FleetView:
    """The nodes and slots now; an unreachable cluster or a missing extra is the view's ``error``, never raised
    (nor is Ray's own error when the head goes away under a joined dashboard: the page says it and retries)."""
    address = fleet_address(settings) or ""
    try:
        return FleetView(address, fleet_of(settings).nodes())
    except ImageWorksError as exc:
        return FleetView(address, error=exc.message)
    except Exception as exc:  # Ray's errors (connection lost, GCS gone) are not ours; the page must not break
        return FleetView(address, error=f"{type(exc).__name__}: {exc}".splitlines()[0])


# Text and rows ---------------------------------------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / _GIB:.1f}"


def gpu_memory_text(node: NodeInfo) -> str:
    """Per GPU, memory used/total ('GPU 0: 4.0/24.0 GiB · GPU 1: 2.0/24.0 GiB'); without NVML on the node its
    GPUs are counted with memory unknown."""
    if not node.gpus:
        return "no GPU" if node.gpus_total == 0 else f"{count_text(node.gpus_total, 'GPU')}, memory unknown"
    parts = []
    for gpu in node.gpus:
        if gpu.memory_total_bytes is None:
            parts.append(f"GPU {gpu.index}: memory unknown")
            continue
        used = gpu.memory_total_bytes - (gpu.memory_free_bytes or 0)
        parts.append(f"GPU {gpu.index}: {_gib(used)}/{_gib(gpu.memory_total_bytes)} GiB")
    return " · ".join(parts)


def node_rows(nodes: list[NodeInfo]) -> list[dict[str, str]]:
    """The node table: name, address, alive, GPUs used/total, per-GPU memory used/total, slots / max_models."""
    rows = []
    for node in nodes:
        live = [s for s in node.slots if s.status not in ("failed", "lost")]
        rows.append(
            {
                "Node": node.name + (" (head)" if node.is_head else ""),
                "Address": node.address,
                "Alive": "yes" if node.alive else "no",
                "GPUs used": f"{node.gpus_used}/{node.gpus_total}",
                "GPU memory used": gpu_memory_text(node),
                "Slots": f"{len(live)}/{node.max_models}",
                "Agent": node.agent,
            }
        )
    return rows


def slot_status_text(slot: SlotInfo) -> str:
    """'ready', 'starting (waiting)', 'failed: <why>', 'lost: <node ... is dead>'."""
    if slot.status == "starting" and slot.phase:
        return f"starting ({slot.phase})"
    if slot.status == "failed":
        reason = (slot.error or "").strip().splitlines()
        return f"failed: {reason[0] if reason else 'see the log'}"
    if slot.status == "lost":
        return f"lost: {slot.detail}" if slot.detail else "lost"
    return slot.status


def slot_gpus_text(slot: SlotInfo) -> str:
    """'1', '0,1', '0,1 +n3:0,1' (GPUs held on other nodes by a model spanning them), '—' for none."""
    text = ",".join(map(str, slot.gpus)) or "—"
    for node, held in slot.members.items():
        text += f" +{node}:{','.join(map(str, held))}"
    return text


def slot_action(slot: SlotInfo) -> str:
    """The per-slot button: 'Forget' for a lost slot (nothing can be signalled on a dead node), else 'Stop'."""
    return "Forget" if slot.status == "lost" else "Stop"


def slot_row(slot: SlotInfo) -> dict[str, str]:
    """One slot as the page shows it."""
    return {
        "Slot": slot.slot_id,
        "Node": slot.node_name,
        "GPUs": slot_gpus_text(slot),
        "Port": str(slot.port),
        "Model": slot.name,
        "Status": slot_status_text(slot),
        "Uptime": duration_text(slot.uptime_s) or "—",
    }


# Starts and stops ------------------------------------------------------------------------------------------------
@dataclass
class FleetStart:
    """A start the page asked for: its progress while it runs, then its slot or its error."""

    name: str
    node: str | None
    gpus: int | None
    started: float = field(default_factory=time.monotonic)
    phase: str = "placement"
    detail: str = ""
    finished: float | None = None
    slot: SlotInfo | None = None
    error: str | None = None
    error_detail: list[str] = field(default_factory=list)
    """After ``error`` (its first line): the rest, e.g. the backend's last log lines (shown as a code block)."""

    @property
    def running(self) -> bool:
        return self.finished is None

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def text(self) -> str:
        """The page's line for it."""
        where = f" on {self.node}" if self.node else ""
        if self.running:
            detail = f" — {self.detail}" if self.detail else ""
            return f"Starting {self.name}{where} · {self.elapsed_s:.0f} s · {self.phase}{detail}"
        if self.error is not None:
            return f"Starting {self.name}{where} failed: {self.error}"
        slot = self.slot
        assert slot is not None
        gpus = slot_gpus_text(slot)
        return f"{self.name} is ready on node {slot.node_name} (slot {slot.slot_id}, GPU(s) {gpus}) in {self.elapsed_s:.1f} s"


_starts_guard = threading.Lock()
_starts: dict[Path, dict[str, FleetStart]] = {}


def start_in_fleet(settings: Settings, name: str, *, node: str | None = None, gpus: int | None = None) -> FleetStart:
    """Start ``name`` in the fleet in the background (``node`` None or :data:`ANY_NODE`: placement chooses;
    ``gpus`` None: as the launch asks). BackendError while a start of the same model runs from this dashboard."""
    fleet = fleet_of(settings)
    chosen = None if node in (None, "", ANY_NODE) else node
    start = FleetStart(name, chosen, gpus)
    with _starts_guard:
        mine = _starts.setdefault(settings.root, {})
        running = mine.get(name)
        if running is not None and running.running:
            raise BackendError(f"{name!r} is already being started from the dashboard ({running.elapsed_s:.0f} s)")
        mine[name] = start

    def progress(phase: str, _elapsed: float, detail: str) -> None:
        start.phase, start.detail = phase, detail

    def work() -> None:
        try:
            start.slot = fleet.activate(name, node=chosen, gpus=gpus, on_progress=progress)
        except Exception as exc:  # shown on the page; the node's agent keeps the slot's own record
            first, *rest = "\n".join(error_lines(exc)).splitlines() or [type(exc).__name__]
            start.error, start.error_detail = first, rest
        finally:
            start.finished = time.monotonic()

    threading.Thread(target=work, name=f"fleet-start-{name}", daemon=True).start()
    return start


def fleet_starts(settings: Settings) -> list[FleetStart]:
    """Starts of this root running now or ended within :data:`OUTCOME_SHOW_S`, oldest first."""
    now = time.monotonic()
    with _starts_guard:
        mine = _starts.get(settings.root, {})
        for name in [n for n, s in mine.items() if s.finished is not None and now - s.finished > OUTCOME_SHOW_S]:
            del mine[name]
        return sorted(mine.values(), key=lambda s: s.started)


def stop_slot(settings: Settings, slot_id: str) -> str:
    """Stop one slot (a lost one is forgotten) and say what happened; the fleet's errors are raised."""
    results = fleet_of(settings).stop(slot_id, reason="stopped from the dashboard")
    if not results:
        return f"Slot {slot_id} was not running any more."
    lines = []
    for done in results:
        where = f"slot {done['slot_id']} on node {done['node_name']}"
        if done.get("lost"):
            lines.append(f"Forgot {done['name']} ({where}): its node is lost, nothing could be signalled there.")
            continue
        stop = done.get("stop") or {}
        lines.append(f"Stopped {done['name']} ({where}) in {stop.get('stop_s', 0):.1f} s.")
    return " ".join(lines)
