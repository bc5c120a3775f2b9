"""Slots and nodes as the fleet reports them: plain pydantic models, the same for the CLI, the API and the page.

A slot is node + GPU set + port: one backend, run by that node's agent with the runtime of
:mod:`imageworks_core.runtime` in its own slot directory (:mod:`imageworks_core.runtime.slot`). A model that
spans nodes (vLLM's Ray executor) is one slot on its leader node; the GPUs it holds on other nodes are its
``members``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

SlotStatus = Literal["starting", "ready", "failed", "stopping", "lost"]
"""``starting`` (being activated: ``phase`` says where), ``ready``, ``failed`` (``error`` says why; it holds no
GPU and no room until it is stopped or started again), ``stopping``, ``lost`` (its node died or its agent stopped
answering: ``detail`` names the node; nothing of it can be reached)."""


class SlotInfo(BaseModel):
    """One slot."""

    slot_id: str = Field(description="unique in the fleet: <node id prefix>-<n>")
    node_id: str
    node_name: str
    name: str = Field(description="the entry's logical name")
    served_model_id: str
    aliases: list[str] = Field(default_factory=list, description="the entry's aliases (routing matches them too)")
    gpus: list[int] = Field(default_factory=list, description="GPU indexes on the node (CUDA_VISIBLE_DEVICES)")
    members: dict[str, list[int]] = Field(
        default_factory=dict, description="node name -> GPU indexes held there too (a model spanning nodes)"
    )
    port: int = Field(description="the backend's port on the node's loopback")
    status: SlotStatus
    phase: str | None = Field(default=None, description="while starting: the activation's phase")
    detail: str = ""
    error: str | None = None
    healthy: bool | None = None
    pid: int = 0
    started_at: datetime | None = None
    ready_at: datetime | None = None
    uptime_s: float | None = None
    last_used_at: datetime | None = Field(
        default=None, description="when the last request forwarded to it started or ended (None: never used)"
    )
    requests_in_flight: int = Field(default=0, description="requests being forwarded to it now")
    idle_ttl_s: float | None = Field(default=None, description="its agent stops it after this long without a request")
    log_path: str = ""
    log_tail: list[str] = Field(default_factory=list)

    @property
    def last_use(self) -> datetime | None:
        """When it last served a request, else when it became ready (what least-recently-used and idle mean)."""
        return self.last_used_at or self.ready_at or self.started_at

    def matches(self, model: str) -> bool:
        """Whether ``model`` names this slot's model: its name, an alias or its served id."""
        return model in (self.name, self.served_model_id, *self.aliases)


class GpuSlotView(BaseModel):
    """One GPU of a node: memory (None without NVML on the node) and which slot holds it."""

    index: int
    name: str = ""
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None
    slot_id: str | None = None


class NodeInfo(BaseModel):
    """One node of the Ray cluster, as ``imageworks-models fleet`` lists it."""

    node_id: str
    name: str
    address: str
    alive: bool
    is_head: bool = False
    root: str | None = Field(default=None, description="the node's deployment root (its agent's)")
    max_models: int
    gpus_total: int
    gpus_used: int
    gpus: list[GpuSlotView] = Field(default_factory=list)
    vram_total_bytes: int | None = None
    vram_free_bytes: int | None = None
    gpu_note: str | None = Field(default=None, description="why per-GPU memory is unknown (no NVML there)")
    slots: list[SlotInfo] = Field(default_factory=list)
    agent: str = Field(default="ok", description="'ok', or why the node's agent could not be asked")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` right now, chosen by the kernel."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def choose_gpus(count: int, gpus: Sequence[dict[str, Any]], taken: Iterable[int]) -> list[int] | None:
    """``count`` GPU indexes not in ``taken``, those with the most free memory first (then the lowest index);
    None when fewer are free. ``gpus``: ``{"index", "memory_free_bytes" (None: unknown)}`` per GPU."""
    held = set(taken)
    free = [g for g in gpus if g["index"] not in held]
    if len(free) < count:
        return None
    free.sort(key=lambda g: (-(g.get("memory_free_bytes") or 0), g["index"]))
    return sorted(g["index"] for g in free[:count])
