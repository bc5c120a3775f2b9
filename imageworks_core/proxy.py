"""The single-port OpenAI-compatible proxy: route by ``model``, autostart process backends, stream through.

Switching policy (one GPU, one port): one switch at a time. Requests for the model being started wait for that
same activation; requests for a *different* process-backed model while a switch is under way get
``503 Service Unavailable`` with ``Retry-After`` (we do not queue: a queue of alternating models would thrash
the GPU, and the client's retry makes the wait visible). Remote and ollama entries never switch anything.

Fleet mode (:class:`FleetProxy`): the same port fronts every slot of a Ray cluster. A request goes to the slot
serving its model through that slot's node agent (backends listen on their node's loopback only); a model that
runs nowhere is started by :meth:`~imageworks_core.fleet.Fleet.autoswitch` (beside the others while a node has
room under ``max_models``, else in place of the least recently used slot). Starts of different models run side
by side; requests for a model being started wait for that start. A model whose node is lost answers 503 naming
the node.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpcore

from . import history
from .errors import RETRY_AFTER_S as RETRY_AFTER_S
from .errors import BackendError, CapabilityError, ImageWorksError, SlotLost, SwitchInProgress, UsageError
from .registry import Registry
from .schema import ModelEntry
from .selection import endpoint_for
from .settings import Settings
from .upstream import auth_headers

if TYPE_CHECKING:  # fleet mode only: single-box never imports the fleet package
    from .fleet import Fleet, ForwardResponse, SlotInfo

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
        entry = resolve_entry(self.settings, registry, body)
        if entry.is_process_backend:
            await self.coordinator.ensure_active(entry.name)
        return entry, endpoint_for(entry, self.settings)

    async def send(
        self, entry: ModelEntry, base_url: str, path: str, raw: bytes, body: dict[str, Any]
    ) -> httpcore.Response:
        """Send upstream with ``model`` rewritten to the served id (raw bytes reused when already equal).

        The response body is not read yet: the caller streams it and must close the response.
        """
        headers = [(k.encode(), v.encode()) for k, v in upstream_headers(entry)]
        raw = upstream_body(entry, raw, body)
        url = httpcore.URL(f"{base_url}/{path}")
        # httpcore sends exactly the headers it is given: framing and Host are ours to set.
        headers.append((b"host", url.host + (b":%d" % url.port if url.port else b"")))
        headers.append((b"content-length", str(len(raw)).encode()))
        request = httpcore.Request("POST", url, headers=headers, content=raw, extensions={"timeout": _TIMEOUTS})
        try:
            return await self.pool.handle_async_request(request)
        except (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError) as exc:
            raise BackendError(f"{entry.name!r} at {base_url} unreachable: {type(exc).__name__}: {exc}") from exc


def resolve_entry(settings: Settings, registry: Registry, body: dict[str, Any]) -> ModelEntry:
    """The entry a request's ``model`` names (UnknownModelError with close matches otherwise), with the vision
    rule enforced before any backend sees the request."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ImageWorksError("request body needs a 'model' (logical name, alias or served id)")
    entry = registry.get(model)
    if carries_image(body):
        check_vision_allowed(settings, entry)
    return entry


def upstream_headers(entry: ModelEntry) -> list[tuple[str, str]]:
    """The headers a backend gets: JSON in, JSON or SSE out, no compression, the entry's key where it has one."""
    headers = [("content-type", "application/json"), ("accept", "application/json, text/event-stream")]
    return headers + [(k.lower(), v) for k, v in auth_headers(entry).items()]


def upstream_body(entry: ModelEntry, raw: bytes, body: dict[str, Any]) -> bytes:
    """The request body with ``model`` rewritten to the served id (``raw`` itself when it already names it)."""
    if body.get("model") != entry.effective_served_id:
        return json.dumps({**body, "model": entry.effective_served_id}).encode()
    return raw


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


FLEET_THREADS = 64
"""Threads the fleet proxy blocks in on Ray calls (a stream holds one while it waits for its next chunk): its own
pool, so many streams never starve the API's other blocking work."""
ROUTE_TTL_S = 1.0
"""How long a model's slot is reused without asking the fleet again (a stale route costs one retry, never an
error: the node's agent refuses a slot that no longer serves, and the request is routed afresh)."""
STREAM_CLOSE_WAIT_S = 30.0
"""How long closing a fleet stream waits for a reader thread still inside ``next`` (until the backend's next
chunk, which a generating model sends within moments)."""


class FleetProxy:
    """The OpenAI proxy in fleet mode: routes a process-backed entry to its slot, starting it when needed.

    Adversaries: a slot stopped or evicted between routing and forwarding (its agent refuses the request before
    any byte reaches a backend: routed again once); its node dying meanwhile (503 naming the node); a client
    dropping a stream (the chunk iterator is closed, the agent's request ends with it).
    """

    def __init__(self, fleet: Fleet, executor: ThreadPoolExecutor) -> None:
        self.fleet = fleet
        self.executor = executor
        self._routes: dict[str, tuple[float, SlotInfo]] = {}
        self._starts: dict[str, asyncio.Future[SlotInfo]] = {}

    @property
    def switching_to(self) -> list[str]:
        """The models this server is starting for requests now."""
        return sorted(name for name, task in self._starts.items() if not task.done())

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    async def slot_for(self, entry: ModelEntry, *, fresh: bool = False) -> SlotInfo:
        """The ready slot serving ``entry``, started (autoswitch) when it runs nowhere."""
        cached = self._routes.get(entry.name)
        if cached and not fresh and time.monotonic() - cached[0] < ROUTE_TTL_S:
            return cached[1]
        self._routes.pop(entry.name, None)
        task = self._starts.get(entry.name)
        if task is None or task.done():
            # No await between the check and here: one start per model, whatever the number of requests.
            task = asyncio.ensure_future(self._run(self.fleet.autoswitch, entry.name))
            self._starts[entry.name] = task
            task.add_done_callback(lambda _t, name=entry.name: self._forget_start(name, _t))
        slot = await asyncio.shield(task)
        self._routes[entry.name] = (time.monotonic(), slot)
        return slot

    def _forget_start(self, name: str, task: asyncio.Future[SlotInfo]) -> None:
        if self._starts.get(name) is task:
            del self._starts[name]
        if not task.cancelled():
            task.exception()  # retrieved: a failed start is reported to its waiters, not logged as unhandled

    def forget(self, name: str) -> None:
        """Drop the cached route of ``name`` (after a stop through this API)."""
        self._routes.pop(name, None)

    async def forward(self, entry: ModelEntry, path: str, raw: bytes, body: dict[str, Any]) -> Any:
        """Forward the request to the entry's slot; returns a Starlette response (streamed for ``stream: true``)."""
        from fastapi.responses import Response, StreamingResponse
        from starlette.background import BackgroundTask

        headers = [*upstream_headers(entry), ("accept-encoding", "identity")]
        payload = upstream_body(entry, raw, body)
        target = f"/v1/{path}"
        for attempt in (0, 1):
            slot = await self.slot_for(entry, fresh=attempt == 1)
            try:
                if body.get("stream"):
                    chunks = self.fleet.forward_stream(slot, "POST", target, headers=headers, body=payload)
                    head = await self._run(next, chunks, None)
                    if head is None:
                        raise BackendError(f"the agent on node {slot.node_name} sent no answer for {entry.name!r}")
                    if head.body:  # the agent could not reach the backend: the whole answer is in the head
                        return Response(head.body, status_code=head.status, headers=_forwarded_headers(head))
                    return StreamingResponse(
                        self._rest(chunks),
                        status_code=head.status,
                        headers=_forwarded_headers(head),
                        background=BackgroundTask(self._run, _close, chunks),
                    )
                answer = await self._run(self.fleet.forward, slot, "POST", target, headers=headers, body=payload)
                return Response(answer.body, status_code=answer.status, headers=_forwarded_headers(answer))
            except (SlotLost, BackendError):
                # The slot stopped, was evicted or lost its node after it was routed: ask the fleet again once
                # (it names a lost node, or the model starts again); nothing reached a backend yet.
                self._routes.pop(entry.name, None)
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    async def _rest(self, chunks: Iterator[ForwardResponse | bytes]) -> AsyncIterator[bytes]:
        done = object()
        while True:
            chunk = await self._run(next, chunks, done)
            if chunk is done:
                return
            if isinstance(chunk, bytes):
                yield chunk


def _close(chunks: Iterator[Any]) -> None:
    """Close a fleet stream once its response ended (its close cancels the agent's call, which then stops
    reading the backend). A client gone mid-stream can leave a thread inside ``next`` until the next chunk
    arrives: wait for it (at most :data:`STREAM_CLOSE_WAIT_S`) rather than leave the close to the collector."""
    deadline = time.monotonic() + STREAM_CLOSE_WAIT_S
    while True:
        try:
            chunks.close()  # type: ignore[attr-defined]
            return
        except ValueError:  # "generator already executing"
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


def _forwarded_headers(answer: ForwardResponse) -> dict[str, str]:
    """A backend's headers as the client gets them (framing is the server's own)."""
    return {k: v for k, v in answer.headers if k.lower() not in _HOP_HEADERS}
