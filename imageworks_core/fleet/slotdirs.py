"""A node agent's slots on disk, and stopping them when the agent is gone.

Layout under the node's root (the agent's instance id is random per agent, so two agents sharing a root, or an
agent and its successor, never share a directory)::

    _staging/fleet/<instance>/agent.json          pid + create time of the agent process
    _staging/fleet/<instance>/reaper.json         pid + create time of its reaper
    _staging/fleet/<instance>/<slot id>/slot.json the slot's port, GPUs, model and log directory
    _staging/fleet/<instance>/<slot id>/…         the runtime's own files for the slot (state, lock, progress)
    logs/fleet/<slot id>/                         the slot's backend logs

:func:`stop_agent_dir` stops every slot of an agent directory with the runtime's own stop (which signals only
processes proven to be ours: pid + create time, launch id) and removes the directory when all are gone. The
reaper calls it when the agent dies; a new agent calls it for directories whose agent is dead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import psutil

from ..errors import ImageWorksError
from ..registry_file import atomic_write_text
from ..runtime.process import CREATE_TIME_TOLERANCE_S
from ..runtime.slot import SlotSettings, slot_settings
from ..settings import Settings

AGENT_FILE = "agent.json"
REAPER_FILE = "reaper.json"
SLOT_FILE = "slot.json"
STOP_LOCK_WAIT_S = 30.0
"""How long a stop of a dead agent's slot waits for the slot's activation lock (a start it was making is
cancelled first and gives the lock up within one health poll)."""


def fleet_staging(settings: Settings) -> Path:
    """``_staging/fleet`` under the node's root."""
    return settings.staging_dir / "fleet"


def agent_dir(settings: Settings, instance: str) -> Path:
    return fleet_staging(settings) / instance


def slot_logs_dir(settings: Settings, slot_id: str) -> Path:
    return settings.logs_dir / "fleet" / slot_id


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, default=str) + "\n", durable=False)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def process_record() -> dict[str, Any]:
    """pid and create time of this process: what proves later that a pid is still this process."""
    return {"pid": os.getpid(), "create_time": psutil.Process().create_time()}


def record_alive(record: dict[str, Any] | None) -> bool:
    """Whether the process a :func:`process_record` describes still runs (same pid *and* create time)."""
    if not record:
        return False
    try:
        proc = psutil.Process(int(record["pid"]))
        return (
            abs(proc.create_time() - float(record["create_time"])) <= CREATE_TIME_TOLERANCE_S
            and proc.status() != psutil.STATUS_ZOMBIE
        )
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def settings_for_slot(settings: Settings, directory: Path) -> SlotSettings | None:
    """The runtime settings of the slot in ``directory`` (None when its ``slot.json`` is unreadable)."""
    record = read_json(directory / SLOT_FILE)
    if record is None or "port" not in record:
        return None
    logs = Path(record.get("logs_dir") or slot_logs_dir(settings, directory.name))
    return slot_settings(settings, directory, logs, int(record["port"]))


def stop_agent_dir(settings: Settings, directory: Path, reason: str) -> list[str]:
    """Stop every slot under an agent's directory and remove it; returns the problems (the directory is kept
    when a slot could not be stopped, so a later attempt retries)."""
    from .. import runtime  # imported here: the reaper imports this module before it needs the runtime

    problems = []
    for child in sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []:
        slot = settings_for_slot(settings, child)
        if slot is None:
            shutil.rmtree(child, ignore_errors=True)
            continue
        try:
            runtime.stop(slot, reason=reason, lock_timeout_s=STOP_LOCK_WAIT_S)
        except ImageWorksError as exc:
            problems.append(f"{child.name}: {exc.message}")
            continue
        shutil.rmtree(child, ignore_errors=True)
    if not problems:
        shutil.rmtree(directory, ignore_errors=True)
    return problems


def stale_agent_dirs(settings: Settings, own: str) -> list[Path]:
    """Agent directories under the root whose agent no longer runs (not ``own``)."""
    base = fleet_staging(settings)
    if not base.is_dir():
        return []
    return [d for d in base.iterdir() if d.is_dir() and d.name != own and not record_alive(read_json(d / AGENT_FILE))]
