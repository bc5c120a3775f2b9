"""The single-port OpenAI-compatible proxy: route by ``model``, autostart process backends, stream through.

Switching policy (one GPU, one port): one switch at a time. Requests for the model being started wait for that
same activation; requests for a *different* process-backed model while a switch is under way get
``503 Service Unavailable`` with ``Retry-After`` (we do not queue: a queue of alternating models would thrash
the GPU, and the client's retry makes the wait visible). Remote and ollama entries never switch anything.
"""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import Callable
from typing import Any

import httpx

from . import history
from .errors import BackendError, CapabilityError, ImageWorksError
from .registry import Registry
from .schema import ModelEntry
from .selection import endpoint_for
from .settings import Settings

RETRY_AFTER_S = 5
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


class SwitchInProgress(BackendError):
    """Another model is being activated on the single port; retry later."""

    def __init__(self, target: str) -> None:
        super().__init__(f"switching the single port to {target!r}; retry in {RETRY_AFTER_S} s")
        self.target = target


def carries_image(body: dict[str, Any]) -> bool:
    """Whether an OpenAI chat request contains an image part."""
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
                    return True
    return False


def check_vision_allowed(settings: Settings, entry: ModelEntry) -> None:
    """Refuse image requests to a model without ``vision`` or whose latest probe failed (409)."""
    if not entry.capabilities.vision:
        raise CapabilityError(
            f"{entry.name!r} lacks capability vision; the request carries an image", entry.name, ["vision"]
        )
    if settings.history_db_path.exists():
        probe = history.latest_probes(settings).get(entry.name)
        if probe is not None and not probe["vision_ok"]:
            raise CapabilityError(
                f"{entry.name!r} failed its last vision probe at {probe['at']}; re-run "
                f"`imageworks-models probe-vision {shlex.quote(entry.name)}` after fixing it",
                entry.name,
                ["vision"],
            )


class SwitchCoordinator:
    """Serialises activations of the single port inside one server process."""

    def __init__(self, settings: Settings, activate: Callable[[str], Any], is_active: Callable[[str], bool]) -> None:
        self.settings = settings
        self._activate = activate
        self._is_active = is_active
        self._target: str | None = None
        self._task: asyncio.Future[Any] | None = None

    @property
    def switching_to(self) -> str | None:
        return self._target if self._task is not None and not self._task.done() else None

    async def ensure_active(self, name: str) -> None:
        """Return once ``name`` is the active, ready backend; start it if needed (one switch at a time)."""
        if self._task is not None and not self._task.done():
            if self._target != name:
                raise SwitchInProgress(self._target or "?")
            await asyncio.shield(self._task)
            return
        if self._is_active(name):  # cached stat() check: cheap enough for the event loop
            return
        # No await between the check above and here: the task is installed atomically w.r.t. other requests.
        self._target = name
        self._task = asyncio.ensure_future(asyncio.to_thread(self._activate, name))
        await asyncio.shield(self._task)


class Proxy:
    """Forwards OpenAI requests to the endpoint of the entry named by ``model``."""

    def __init__(self, settings: Settings, coordinator: SwitchCoordinator, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.coordinator = coordinator
        self.client = client

    async def route(self, registry: Registry, body: dict[str, Any]) -> tuple[ModelEntry, str]:
        """Resolve the entry, enforce the vision rule, activate if needed; returns (entry, base URL)."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ImageWorksError("request body needs a 'model' (logical name, alias or served id)")
        entry = registry.get(model)
        if carries_image(body):
            check_vision_allowed(self.settings, entry)
        if entry.is_process_backend:
            await self.coordinator.ensure_active(entry.name)
        return entry, endpoint_for(entry, self.settings)

    def upstream_request(
        self, entry: ModelEntry, base_url: str, path: str, raw: bytes, body: dict[str, Any]
    ) -> httpx.Request:
        """The request to send upstream: ``model`` rewritten to the served id (raw bytes reused when equal)."""
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        if entry.backend == "openai" and entry.backend_config.api_key_env:
            import os

            key = os.environ.get(entry.backend_config.api_key_env)
            if key:
                headers["authorization"] = f"Bearer {key}"
        if body.get("model") != entry.effective_served_id:
            raw = json.dumps({**body, "model": entry.effective_served_id}).encode()
        return self.client.build_request("POST", f"{base_url}/{path}", content=raw, headers=headers)


def response_headers(upstream: httpx.Response) -> dict[str, str]:
    """Upstream headers minus hop-by-hop ones (the server sets its own framing)."""
    return {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
