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
import socket
from collections.abc import Callable
from typing import Any

import httpcore

from . import history
from .errors import RETRY_AFTER_S as RETRY_AFTER_S
from .errors import BackendError, CapabilityError, ImageWorksError, SwitchInProgress, UsageError
from .registry import Registry
from .schema import ModelEntry
from .selection import endpoint_for
from .settings import Settings
from .upstream import auth_headers

# Connect fast; reads may take long (a big model's first token, a long stream).
_TIMEOUTS = {"connect": 5.0, "read": 600.0, "write": 60.0, "pool": 60.0}
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


def check_request_body(path: str, body: Any) -> None:
    """UsageError (400) for a body whose shape the proxy relies on is wrong; the backend judges the rest."""
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise UsageError(f"'stream' must be true or false, got {json.dumps(body['stream'])[:40]}")
    if path == "chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise UsageError("'messages' must be a list of message objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise UsageError(f"messages[{i}] must be an object with 'role' and 'content'")
            content = message.get("content")
            if not isinstance(content, str | list | None):
                raise UsageError(f"messages[{i}].content must be a string or a list of content parts")
            if isinstance(content, list) and not all(isinstance(part, dict) for part in content):
                raise UsageError(f"messages[{i}].content parts must be objects")
    elif path == "completions" and not isinstance(body.get("prompt"), str | list | None):
        raise UsageError("'prompt' must be a string or a list")


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
    """Forwards OpenAI requests to the endpoint of the entry named by ``model``.

    Upstream calls go through an ``httpcore`` connection pool (the transport under httpx) with TCP_NODELAY:
    on this hot path httpx's request/response model layer costs more than the proxy's own work.
    """

    def __init__(self, settings: Settings, coordinator: SwitchCoordinator, pool: httpcore.AsyncConnectionPool) -> None:
        self.settings = settings
        self.coordinator = coordinator
        self.pool = pool

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

    async def send(
        self, entry: ModelEntry, base_url: str, path: str, raw: bytes, body: dict[str, Any]
    ) -> httpcore.Response:
        """Send upstream with ``model`` rewritten to the served id (raw bytes reused when already equal).

        The response body is not read yet: the caller streams it and must close the response.
        """
        headers = [(b"content-type", b"application/json"), (b"accept", b"application/json, text/event-stream")]
        headers += [(k.lower().encode(), v.encode()) for k, v in auth_headers(entry).items()]
        if body.get("model") != entry.effective_served_id:
            raw = json.dumps({**body, "model": entry.effective_served_id}).encode()
        url = httpcore.URL(f"{base_url}/{path}")
        # httpcore sends exactly the headers it is given: framing and Host are ours to set.
        headers.append((b"host", url.host + (b":%d" % url.port if url.port else b"")))
        headers.append((b"content-length", str(len(raw)).encode()))
        request = httpcore.Request("POST", url, headers=headers, content=raw, extensions={"timeout": _TIMEOUTS})
        try:
            return await self.pool.handle_async_request(request)
        except (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError) as exc:
            raise BackendError(f"{entry.name!r} at {base_url} unreachable: {type(exc).__name__}: {exc}") from exc


def new_pool() -> httpcore.AsyncConnectionPool:
    """The proxy's upstream pool. TCP_NODELAY: header and body writes must not wait on a delayed ACK (~40 ms)."""
    return httpcore.AsyncConnectionPool(
        max_connections=64, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    )


def response_headers(upstream: httpcore.Response) -> dict[str, str]:
    """Upstream headers minus hop-by-hop ones (the server sets its own framing)."""
    return {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in upstream.headers
        if k.decode("latin-1").lower() not in _HOP_HEADERS
    }
