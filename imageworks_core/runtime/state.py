"""The state file ``_staging/active_vllm.json``: what we started on the single port, and the status report.

Written atomically (temp file, rename), so a reader sees the old or the new state, never half of one, and an
activator killed at any point leaves one or the other. Not fsynced: the file describes processes, and none
survives the power cut or kernel crash that alone could lose an unsynced write (an empty or torn file then is
an unreadable state, removed once the port is free: see :mod:`.activate`). That saves two fsyncs on each of
the three writes of an activation.
The file is a record, not a proof: before anything is signalled on its account, :mod:`.process` checks the
recorded pid and create time against the live process. A file that does not parse is reported, never guessed
at (:func:`read_state` raises, :func:`read_state_lenient` returns the problem).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import BackendError
from ..registry_file import atomic_write_text
from ..settings import Settings

LAUNCH_ID_ENV = "IMAGEWORKS_LAUNCH_ID"
"""Set in every backend's environment to its launch id: how a process that left the group is known as ours."""


class ActiveState(BaseModel):
    """The content of ``_staging/active_vllm.json``: what we started on the single port."""

    model_config = ConfigDict(extra="ignore")

    name: str
    served_model_id: str
    pid: int = Field(description="the backend's leader; 0 while it is being spawned (not yet known)")
    create_time: float = Field(description="psutil create time of pid: proves the pid is still our process")
    pgid: int = Field(description="informational (the leader's own group); never used to choose whom to signal")
    launch_id: str | None = Field(
        default=None,
        description=f"random id set as {LAUNCH_ID_ENV} in the backend's environment; None in pre-marker states",
    )
    children: list[tuple[int, float]] = Field(
        default_factory=list, description="(pid, create time) of the leader's descendants when it became ready"
    )
    host: str
    port: int
    base_url: str = Field(description="OpenAI-compatible base URL (…/v1)")
    argv: list[str]
    started_at: datetime
    status: Literal["starting", "ready", "failed"]
    ready_at: datetime | None = None
    log_path: str
    activated_by: str | None = None
    error: str | None = Field(default=None, description="why the activation failed (status 'failed')")
    log_tail: list[str] = Field(
        default_factory=list, description="the backend log's last lines when the activation failed (status 'failed')"
    )


class ActiveStatus(BaseModel):
    """What ``current-model`` reports: the state plus liveness, health, uptime and GPU figures."""

    name: str
    served_model_id: str
    base_url: str
    status: Literal["starting", "ready", "failed", "stale"]
    pid: int
    pgid: int
    alive: bool = Field(description="pid is running and has the recorded create time")
    healthy: bool | None = Field(default=None, description="None when not checked")
    health_detail: str = ""
    uptime_s: float | None = None
    started_at: datetime
    ready_at: datetime | None = None
    log_path: str
    stale_reason: str | None = Field(default=None, description="why the state was stale (it has been cleaned)")
    error: str | None = None
    log_tail: list[str] = Field(default_factory=list, description="the log's last lines of a failed activation")
    leftover_pids: list[int] = Field(
        default_factory=list, description="processes of this launch still running although its leader is gone"
    )
    gpus: list[dict[str, Any]] = Field(default_factory=list)
    gpu_memory_bytes: int | None = Field(default=None, description="GPU memory held by the backend's processes")
    gpu_note: str | None = Field(default=None, description="why GPU figures are missing")
    state: ActiveState


def read_state(settings: Settings) -> ActiveState | None:
    """The recorded active backend, or None. Raises BackendError when the file exists but is unreadable."""
    path = settings.active_state_path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return ActiveState.model_validate_json(text)
    except ValueError as exc:
        raise BackendError(f"{path}: unreadable state file ({str(exc).splitlines()[0]})") from exc


def read_state_lenient(settings: Settings) -> tuple[ActiveState | None, str | None]:
    """(state, problem): an unreadable file is reported as a problem instead of raised."""
    try:
        return read_state(settings), None
    except BackendError as exc:
        return None, exc.message


def write_state(settings: Settings, state: ActiveState) -> None:
    """Replace the state file atomically (not durably: see the module docstring)."""
    atomic_write_text(settings.active_state_path, state.model_dump_json(indent=2) + "\n", durable=False)


def clear_state(settings: Settings) -> None:
    """Remove the state file (nothing of ours runs, or it has just been stopped)."""
    settings.active_state_path.unlink(missing_ok=True)
