"""Single-port runtime commands: ``activate-model NAME``, ``activate-model --stop``, ``current-model``."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import UsageError
from ..gpu import NO_GPU_MESSAGE
from .app import JsonOpt, RootOpt, app, echo_json
from .fleet_cmds import RayAddressOpt, duration, gpu_list, require_fleet, service_with_fleet, slot_lines, stop_lines

if TYPE_CHECKING:
    from .. import runtime
    from ..service import ImageWorks

SPINNER_FRAMES = "|/-\\"
SPINNER_INTERVAL_S = 0.1


class Spinner:
    """Progress of an activation on stderr: a redrawn spinner with elapsed time on a terminal, otherwise one
    line per phase change (logs and pipes stay readable)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.phase, self.detail, self.last_phase = "", "", ""
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True) if self.tty else None

    def __enter__(self) -> Spinner:
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        if self._thread:
            self._thread.join()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def __call__(self, phase: str, elapsed_s: float, detail: str) -> None:
        self.phase, self.detail = phase, detail
        # Off a terminal: one line per phase, except the health poll's repeats ("waiting" each 0.25 s).
        if not self.tty and (phase != self.last_phase or phase != "waiting"):
            sys.stderr.write(f"[{elapsed_s:6.2f}s] {phase}: {detail}\n")
            sys.stderr.flush()
        self.last_phase = phase

    def _spin(self) -> None:
        for frame in itertools.cycle(SPINNER_FRAMES):
            if self._done.wait(SPINNER_INTERVAL_S):
                return
            elapsed = time.monotonic() - self.started
            line = f"{frame} {self.label} {elapsed:5.1f}s {self.phase}: {self.detail}"
            sys.stderr.write("\r\033[K" + line[:200])
            sys.stderr.flush()


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


@app.command("activate-model")
def activate_model_cmd(
    name: Annotated[str | None, typer.Argument(help="Logical name, alias or served id to serve on the port.")] = None,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the active backend (idempotent).")] = False,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0.1, help="Seconds to wait for ready (default: entry, then CHAT_PROXY_VLLM_*)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Activate a locked entry whose weights drifted (audited).")
    ] = False,
    node: Annotated[
        str | None, typer.Option("--node", help="Fleet mode: the node to run on (name or id; default: least loaded).")
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option("--gpus", min=0, help="Fleet mode: GPUs to give the model (default: what its launch asks for)."),
    ] = None,
    as_json: JsonOpt = False,
    ray_address: RayAddressOpt = None,
    root: RootOpt = None,
) -> None:
    """Start NAME's backend on the single port (stopping the current one), or stop it with --stop.

    In fleet mode (--ray-address or IMAGEWORKS_RAY_ADDRESS) NAME starts in a new slot beside the others, on
    --node or the least loaded node holding its weights, with --gpus GPUs; --stop stops every slot, or
    --stop NAME (a model or slot id) one.

    Exit codes: 6 backend failure (log tail printed), 2 locked weights drifted, 7 weights missing, 4 unknown name,
    8 fleet mode unavailable or no node can take the model.
    """
    service = service_with_fleet(root, ray_address)
    if service.fleet_address is not None:
        _activate_in_fleet(service, name, stop, node, gpus, timeout, force, as_json)
        return
    if node is not None or gpus is not None:
        raise UsageError("--node and --gpus need fleet mode: set IMAGEWORKS_RAY_ADDRESS or pass --ray-address")
    if stop == (name is not None):
        raise UsageError("give a model NAME to activate, or --stop (not both)")
    if stop:
        result = service.stop(reason="activate-model --stop")
        if as_json:
            echo_json(result.to_dict() if result else None)
        elif result is None:
            typer.echo("no model active; nothing to stop")
        elif result.cancelled_only:
            typer.echo(f"cancelled the start of {result.cancelled!r} in {result.stop_s:.2f}s; nothing is running")
        elif result.stale:
            typer.echo(f"stale state for {result.name!r} cleaned ({result.stale_reason}); no process was signalled")
        else:
            how = f" ({result.signal})" if result.signal else ""
            pids = ", ".join(map(str, result.stopped_pids)) or "none left"
            typer.echo(f"stopped {result.name!r} in {result.stop_s:.2f}s{how}; pids: {pids}")
        for warning in (result.warnings or []) if result else []:
            typer.echo(f"warning: {warning}", err=True)
        return
    assert name is not None
    with Spinner(f"activating {name}") as spinner:
        state = service.activate(name, timeout_s=timeout, force=force, on_progress=spinner)
    if as_json:
        echo_json(state.model_dump(mode="json"))
        return
    ready_in = (state.ready_at - state.started_at).total_seconds() if state.ready_at else None
    typer.echo(
        f"{state.name} ready at {state.base_url} (served id {state.served_model_id}, pid {state.pid}"
        + (f", ready in {ready_in:.2f}s)" if ready_in is not None else ")")
    )
    typer.echo(f"log: {state.log_path}")


def _activate_in_fleet(
    service: ImageWorks,
    name: str | None,
    stop: bool,
    node: str | None,
    gpus: int | None,
    timeout: float | None,
    force: bool,
    as_json: bool,
) -> None:
    fleet = require_fleet(service)
    if stop:
        results = fleet.stop(name, reason="activate-model --stop")
        if as_json:
            echo_json(results)
        else:
            typer.echo("\n".join(stop_lines(results, name)))
        return
    if name is None:
        raise UsageError("give a model NAME to activate, or --stop [NAME]")
    with Spinner(f"activating {name}") as spinner:
        slot = fleet.activate(name, node=node, gpus=gpus, timeout_s=timeout, force=force, on_progress=spinner)
    if as_json:
        echo_json(slot.model_dump(mode="json"))
        return
    ready_in = (slot.ready_at - slot.started_at).total_seconds() if slot.ready_at and slot.started_at else None
    typer.echo(
        f"{slot.name} ready on node {slot.node_name} (slot {slot.slot_id}, GPUs {gpu_list(slot.gpus, slot.members)}, "
        f"port {slot.port} on the node's loopback, served id {slot.served_model_id}"
        + (f", ready in {ready_in:.2f}s)" if ready_in is not None else ")")
    )
    typer.echo(f"log: {slot.log_path} (on node {slot.node_name})")


def _status_lines(status: runtime.ActiveStatus) -> list[str]:
    if status.status == "stale":
        return [
            f"stale state for {status.name!r} (pid {status.pid}): {status.stale_reason}",
            "the state file was removed; no model is active",
        ]
    health = {True: "healthy", False: "unhealthy", None: "health not checked"}[status.healthy]
    if status.healthy is False and status.health_detail:
        health += f": {status.health_detail}"
    rows: list[tuple[str, Any]] = [
        ("name", status.name),
        ("served id", status.served_model_id),
        ("status", f"{status.status} ({health})" if status.status != "failed" else "failed"),
        ("endpoint", status.base_url),
        ("pid", f"{status.pid} (process group {status.pgid})"),
        ("uptime", duration(status.uptime_s)),
        ("started", status.started_at.isoformat(timespec="seconds")),
        ("log", status.log_path),
    ]
    if status.error:
        rows.append(("error", status.error))
    if status.gpu_note:
        rows.append(("gpu", status.gpu_note))
    elif status.gpus:
        rows.append(("gpu memory", f"{_gib(status.gpu_memory_bytes)} held by this backend"))
        for card in status.gpus:
            util = "-" if card["utilization_percent"] is None else f"{card['utilization_percent']}%"
            rows.append(
                (
                    f"gpu {card['index']}",
                    f"{card['name']}: {_gib(card['memory_used_bytes'])} / {_gib(card['memory_total_bytes'])} used, "
                    f"utilisation {util}",
                )
            )
    else:
        rows.append(("gpu", NO_GPU_MESSAGE))
    width = max(len(key) for key, _ in rows)
    lines = [f"{key + ':':<{width + 1}} {value}" for key, value in rows]
    if status.log_tail:
        lines += [f"--- last {len(status.log_tail)} log lines ---", *status.log_tail]
    return lines


@app.command("current-model")
def current_model_cmd(
    no_health: Annotated[bool, typer.Option("--no-health", help="Skip the health request.")] = False,
    as_json: JsonOpt = False,
    ray_address: RayAddressOpt = None,
    root: RootOpt = None,
) -> None:
    """Show the active backend: name, endpoint, uptime, status, health and GPU memory (stale state is cleaned).

    In fleet mode: every slot (node, GPUs, port, model, status, uptime); lost and failed slots say why."""
    service = service_with_fleet(root, ray_address)
    if service.fleet_address is not None:
        slots = require_fleet(service).slots(check_health=not no_health)
        if as_json:
            echo_json([slot.model_dump(mode="json") for slot in slots])
        else:
            typer.echo("\n".join(slot_lines(slots)))
        return
    status = service.current(check_health=not no_health)
    if as_json:
        echo_json(status.model_dump(mode="json") if status else None)
        return
    starting = service.activation()
    if starting is not None:  # before the spawn the state still names the previous backend (or nothing)
        detail = f": {starting.detail}" if starting.detail else ""
        typer.echo(f"activating {starting.name!r} ({starting.phase}, {starting.elapsed_s:.0f}s{detail})")
        typer.echo("cancel with `imageworks-models activate-model --stop`")
    if status is None:
        if starting is None:
            typer.echo("no model active")
        return
    typer.echo("\n".join(_status_lines(status)))
