"""Fleet mode in the CLI: ``imageworks-models fleet``, and the formatting ``activate-model`` and ``current-model``
use when a Ray address is set (``--ray-address`` or ``IMAGEWORKS_RAY_ADDRESS``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import FleetError
from .app import JsonOpt, RootOpt, app, echo_json, format_table, settings_for

if TYPE_CHECKING:
    from ..fleet import Fleet, NodeInfo, SlotInfo
    from ..service import ImageWorks

RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Fleet mode: the Ray cluster to run on ('auto' or HOST:PORT; default $IMAGEWORKS_RAY_ADDRESS; "
        "unset: this box only).",
    ),
]


def service_with_fleet(root: Path | None, ray_address: str | None) -> ImageWorks:
    """The service for a command's root and Ray address (joins no cluster until the fleet is used)."""
    from ..service import ImageWorks

    return ImageWorks(settings_for(root), ray_address=ray_address)


def require_fleet(service: ImageWorks) -> Fleet:
    """The service's fleet; FleetError (exit 8) saying how to turn fleet mode on when it is off."""
    fleet = service.fleet
    if fleet is None:
        raise FleetError("fleet mode is off: set IMAGEWORKS_RAY_ADDRESS (or pass --ray-address), e.g. 'auto'")
    return fleet


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def duration(seconds: float | None) -> str:
    """An uptime as ``current-model`` prints it (single port and slots alike): '2h 5m 3s', '4m 10s', '7s'."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m {secs}s" if hours else (f"{minutes}m {secs}s" if minutes else f"{secs}s")


def gpu_list(gpus: list[int], members: dict[str, list[int]] | None = None) -> str:
    text = ",".join(map(str, gpus)) or "-"
    for node, held in (members or {}).items():
        text += f" +{node}:{','.join(map(str, held))}"
    return text


def node_lines(nodes: list[NodeInfo]) -> list[str]:
    """``fleet``'s table: one row per node, then a line per node whose agent could not be asked."""
    rows = []
    for node in nodes:
        vram = (
            "-" if node.vram_total_bytes is None else f"{_gib(node.vram_free_bytes)}/{_gib(node.vram_total_bytes)} GiB"
        )
        live = [s for s in node.slots if s.status != "failed"]
        models = ", ".join(f"{s.name} ({s.status})" for s in node.slots) or "-"
        rows.append(
            [
                node.node_id[:12],
                node.name + (" (head)" if node.is_head else ""),
                node.address,
                "yes" if node.alive else "no",
                f"{node.gpus_used}/{node.gpus_total}",
                vram,
                f"{len(live)}/{node.max_models}",
                models,
            ]
        )
    headers = ["ID", "NAME", "ADDRESS", "ALIVE", "GPUS USED", "VRAM FREE", "SLOTS", "MODELS"]
    lines = [format_table(headers, rows)]
    lines += [f"{node.name}: {node.agent}" for node in nodes if node.agent != "ok" and node.alive]
    return lines


def slot_lines(slots: list[SlotInfo]) -> list[str]:
    """``current-model``'s table in fleet mode, then why each failed or lost slot is so."""
    if not slots:
        return ["no model active in the fleet"]
    rows = []
    for slot in slots:
        status = slot.status
        if slot.status == "starting" and slot.phase:
            status += f" ({slot.phase})"
        elif slot.status == "ready" and slot.healthy is not None:
            status += " (healthy)" if slot.healthy else " (unhealthy)"
        rows.append(
            [
                slot.slot_id,
                slot.node_name,
                gpu_list(slot.gpus, slot.members),
                slot.port,
                slot.name,
                status,
                duration(slot.uptime_s),
            ]
        )
    lines = [format_table(["SLOT", "NODE", "GPUS", "PORT", "MODEL", "STATUS", "UPTIME"], rows)]
    for slot in slots:
        if slot.status == "lost":
            lines.append(f"{slot.slot_id}: lost: {slot.detail}")
        elif slot.status == "failed":
            lines.append(f"{slot.slot_id}: failed: {slot.error}")
            lines += [f"  {line}" for line in slot.log_tail]
    return lines


def stop_lines(results: list[dict[str, Any]], target: str | None) -> list[str]:
    """What ``activate-model --stop`` did in fleet mode."""
    if not results:
        return [f"nothing of {target!r} runs in the fleet" if target else "nothing runs in the fleet; nothing to stop"]
    lines = []
    for done in results:
        where = f"slot {done['slot_id']} on node {done['node_name']}"
        if done.get("lost"):
            lines.append(f"forgot {done['name']!r} ({where}): its node is lost, nothing could be signalled there")
            continue
        stop = done.get("stop") or {}
        pids = ", ".join(map(str, stop.get("stopped_pids") or [])) or "none left"
        lines.append(f"stopped {done['name']!r} ({where}) in {stop.get('stop_s', 0):.2f}s; pids: {pids}")
    return lines


@app.command("fleet")
def fleet_cmd(as_json: JsonOpt = False, ray_address: RayAddressOpt = None, root: RootOpt = None) -> None:
    """List the fleet's nodes: id, name, address, alive, GPUs used/total, free VRAM, slots and their models.

    Needs fleet mode (--ray-address or IMAGEWORKS_RAY_ADDRESS); exit 8 when it is off or Ray is unreachable.
    """
    nodes = require_fleet(service_with_fleet(root, ray_address)).nodes()
    if as_json:
        echo_json([node.model_dump(mode="json") for node in nodes])
        return
    typer.echo("\n".join(node_lines(nodes)))
