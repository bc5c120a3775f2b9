"""The loader's HTTP API (FastAPI): registry queries, selection, verification, probes, activation, proxy.

Blocking work (hashing, probes, activation) runs in worker threads, never on the event loop. Errors map to
HTTP statuses in one place (:data:`errors.STATUS_FOR`), with a JSON body that says *why*.

Fleet mode (a Ray address: ``IMAGEWORKS_RAY_ADDRESS`` or ``create_app(ray_address=)``): the same routes front
the whole fleet on this one port. The proxy routes to the slot serving the model (:class:`~.proxy.FleetProxy`),
``/v1/models`` says where each model runs (``node``, ``slot``, ``status``), ``/v1/active`` lists the slots,
``/v1/activate`` and ``/v1/deactivate`` start and stop slots. Single-box responses are unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.background import BackgroundTask

from .api_security import RequestGuard, check_bind, check_json_values
from .errors import (
    STATUS_FOR,
    CapabilityError,
    FilteredModelError,
    ImageWorksError,
    LockViolationError,
    RegistryError,
    UnknownModelError,
    UsageError,
)
from .proxy import (
    FLEET_THREADS,
    RETRY_AFTER_S,
    FleetProxy,
    Proxy,
    SwitchCoordinator,
    SwitchInProgress,
    check_request_body,
    new_pool,
    resolve_entry,
    response_headers,
)
from .registry import filter_entries
from .reload import RegistryWatcher
from .schema import ModelEntry
from .selection import endpoint_for
from .service import EntryStatus, ImageWorks
from .settings import Settings

ACTIVE_CHECK_TTL_S = 1.0


class SelectRequest(BaseModel):
    name: str | None = None
    role: str | None = None
    require_capabilities: list[str] = Field(default_factory=list)
    profile: str | None = None


class VerifyRequest(BaseModel):
    """``/v1/verify``: the model; in fleet mode optionally the node whose copy to hash (as ``verify --node``)."""

    name: str
    fast: bool = False
    node: str | None = None


class ActivateRequest(BaseModel):
    """``/v1/activate``: the model; in fleet mode optionally its node and GPU count (as ``activate-model``)."""

    name: str
    node: str | None = None
    gpus: int | None = None


class FleetStopRequest(BaseModel):
    """``/v1/deactivate`` in fleet mode: a slot id or model name; none stops every slot."""

    name: str | None = None


def error_body(exc: ImageWorksError) -> dict[str, Any]:
    """The JSON error body: type, message and the structured reason where there is one."""
    body: dict[str, Any] = {"type": type(exc).__name__, "message": exc.message}
    if isinstance(exc, FilteredModelError):
        body["reason"] = exc.reason
    elif isinstance(exc, UnknownModelError):
        body["reason"] = "unknown_name"
        body["close_matches"] = exc.close_matches
    elif isinstance(exc, LockViolationError):
        body["reason"] = exc.reason
    if isinstance(exc, CapabilityError):
        body["missing"] = exc.missing
    if isinstance(exc, RegistryError):
        body["problems"] = exc.problems
    report = getattr(exc, "report", None)
    if report is not None:
        body["report"] = report.to_dict() if hasattr(report, "to_dict") else report
    return {"error": body}


def model_card(entry: ModelEntry, status: EntryStatus) -> dict[str, Any]:
    """One ``/v1/models`` item: the OpenAI fields plus ours."""
    verification, probe = status.last_verification, status.last_probe
    return {
        "id": entry.name,
        "object": "model",
        "owned_by": entry.source.provider or entry.backend or "imageworks",
        "served_model_id": entry.effective_served_id,
        "aliases": entry.model_aliases,
        "backend": entry.backend,
        "roles": entry.roles,
        "capabilities": entry.capabilities.enabled(),
        "locked": entry.locked,
        "last_verification": (
            {"result": verification["result"], "at": verification["at"], "mode": verification["mode"]}
            if verification
            else None
        ),
        "last_probe": (
            {"vision_ok": bool(probe["vision_ok"]), "grounded": probe["grounded"], "at": probe["at"]} if probe else None
        ),
        "testing": entry.testing,
        "deprecated": entry.deprecated,
    }


def fleet_card(card: dict[str, Any], slots: list[Any]) -> dict[str, Any]:
    """A ``/v1/models`` item in fleet mode: where the model runs (``node``, ``slot``, ``status``; None when it
    runs nowhere: a request starts it). Of several records (a lost one beside a new start), the liveliest."""
    order = ("ready", "starting", "stopping", "lost", "failed")
    mine = sorted((s for s in slots if s.name == card["id"]), key=lambda s: order.index(s.status))
    slot = mine[0] if mine else None
    return {
        **card,
        "node": slot.node_name if slot else None,
        "slot": slot.slot_id if slot else None,
        "status": slot.status if slot else None,
        "gpus": slot.gpus if slot else [],
    }


def create_app(
    settings: Settings, *, bind_host: str = "127.0.0.1", watch: bool = True, ray_address: str | None = None
) -> FastAPI:
    """Build the API for one deployment root.

    ``bind_host`` decides the token policy (UsageError when it is not loopback-only and no token is set) and
    the Host names answered to; see :mod:`imageworks_core.api_security` for the request guard. ``ray_address``
    (else ``IMAGEWORKS_RAY_ADDRESS``) turns fleet mode on: the cluster is joined here, so a server that cannot
    reach it fails at start (FleetUnavailable, exit 8), not on its first request.
    """
    check_bind(settings, bind_host)
    service = ImageWorks(settings, ray_address=ray_address)
    service.reload()  # load now (a failure is audited), not on the first request
    fleet = service.fleet

    # The proxy asks "is this model serving?" on every request: answer from a 1 s cache keyed by the state
    # file's stat, so the hot path costs one stat() instead of a JSON parse and a process lookup.
    serving_cache: dict[str, Any] = {"stamp": None, "until": 0.0, "answers": {}}

    def is_active(name: str) -> bool:
        from . import runtime

        try:
            st = os.stat(settings.active_state_path)
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        now = time.monotonic()
        if serving_cache["stamp"] != stamp or now > serving_cache["until"]:
            serving_cache.update(stamp=stamp, until=now + ACTIVE_CHECK_TTL_S, answers={})
        answers = serving_cache["answers"]
        if name not in answers:
            answers[name] = runtime.is_serving(settings, name)
        return answers[name]

    def activate(name: str) -> Any:
        return service.activate(name)

    coordinator = SwitchCoordinator(settings, activate, is_active)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = RegistryWatcher(service) if watch else None
        if watcher:
            watcher.start()
        executor = ThreadPoolExecutor(FLEET_THREADS, thread_name_prefix="fleet-proxy") if fleet else None
        app.state.fleet_proxy = FleetProxy(fleet, executor) if fleet and executor else None
        try:
            async with new_pool() as pool:
                app.state.proxy = Proxy(settings, coordinator, pool)
                yield
        finally:
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
            if fleet is not None:
                fleet.close()  # leaves the cluster only if this server joined it; slots keep running
            if watcher:
                watcher.stop()

    app = FastAPI(title="ImageWorks Model Loader API", version="1", lifespan=lifespan)
    app.state.service = service
    app.state.coordinator = coordinator

    @app.exception_handler(ImageWorksError)
    async def _imageworks_error(_request: Request, exc: ImageWorksError) -> JSONResponse:
        return error_response(exc)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        status = service.registry_status
        return {"status": "ok", "registry_ok": status.ok, "entries": status.entries}

    @app.get("/v1/models")
    async def models(include_testing: bool = False, profile: str | None = None) -> dict[str, Any]:
        registry = service.registry
        entries = filter_entries(
            registry, include_testing=include_testing, profile=profile if profile is not None else settings.profile
        )
        if fleet is not None:  # what runs is listed even when the filter would hide it
            slots = await asyncio.to_thread(fleet.slots)
            running = {s.name for s in slots}
            listed = {e.name for e in entries}
            entries = [*entries, *(registry.get(n) for n in sorted(running - listed) if n in registry.entries)]
        statuses = await asyncio.to_thread(service.statuses, entries)
        cards = [model_card(e, statuses[e.name]) for e in entries]
        if fleet is not None:
            cards = [fleet_card(card, slots) for card in cards]
        listing: dict[str, Any] = {"object": "list", "data": cards}
        if not service.registry_status.ok:
            listing["registry"] = service.registry_status.to_dict()  # served from the last good registry: say why
        return listing

    @app.post("/v1/select")
    async def select(request: SelectRequest, http: Request) -> dict[str, Any]:
        if (request.name is None) == (request.role is None):
            raise UsageError("give exactly one of 'name' or 'role'")
        selection = await asyncio.to_thread(
            service.select,
            name=request.name,
            role=request.role,
            require_capabilities=request.require_capabilities,
            profile=request.profile,
        )
        entry = service.registry.get(selection.name)
        if not entry.is_process_backend:
            active = True
        elif fleet is not None:
            slots = await asyncio.to_thread(fleet.slots)
            active = any(s.name == entry.name and s.status == "ready" for s in slots)
            # Its backend listens on its node's loopback: clients reach it through this port's proxy.
            return {**selection.to_dict(), "endpoint": f"{str(http.base_url).rstrip('/')}/v1", "active": active}
        else:
            active = await asyncio.to_thread(is_active, entry.name)
        return {**selection.to_dict(), "active": active}

    @app.post("/v1/verify")
    async def verify(request: VerifyRequest) -> JSONResponse:
        result = await asyncio.to_thread(service.verify, request.name, fast=request.fast, node=request.node)
        data = result.to_dict()
        return JSONResponse(data, status_code=409 if result.result == "drift" else 200)

    @app.post("/v1/probe/vision")
    async def probe_vision(request: Request) -> JSONResponse:
        from .probe import MAX_IMAGE_BYTES

        content_type = request.headers.get("content-type", "")
        image_bytes, image_name = None, None
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            name = str(form.get("name") or "")
            upload = form.get("image")
            if upload is not None and hasattr(upload, "read"):
                # One byte past the limit is enough for prepare_image to refuse it; never read more.
                image_bytes = await upload.read(MAX_IMAGE_BYTES + 1)
                image_name = getattr(upload, "filename", None) or "upload"
        else:
            try:
                name = str((await request.json()).get("name") or "")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise UsageError('send JSON {"name": ...} or multipart form fields name (+ image)') from exc
        if not name:
            raise UsageError("'name' is required")
        result = await asyncio.to_thread(service.probe, name, image_bytes=image_bytes, image_name=image_name)
        return JSONResponse(result.to_dict())

    @app.post("/v1/activate")
    async def activate_endpoint(request: ActivateRequest) -> dict[str, Any]:
        if fleet is not None:
            slot = await asyncio.to_thread(fleet.activate, request.name, node=request.node, gpus=request.gpus)
            return slot.model_dump(mode="json")
        if request.node is not None or request.gpus is not None:
            raise UsageError("'node' and 'gpus' need fleet mode: serve with IMAGEWORKS_RAY_ADDRESS set")
        entry = service.registry.get(request.name)
        if not entry.is_process_backend:
            raise UsageError(
                f"{entry.name!r} uses backend {entry.backend!r}, which ImageWorks does not start: nothing to activate; "
                f"requests go to {endpoint_for(entry, settings) if entry.backend else 'its endpoint once configured'}"
            )
        await coordinator.ensure_active(entry.name)
        from . import runtime

        state = await asyncio.to_thread(runtime.read_state, settings)
        return state.model_dump(mode="json") if state else {}

    @app.post("/v1/deactivate")
    async def deactivate(request: Request) -> dict[str, Any]:
        if fleet is not None:
            raw = await request.body()
            try:
                target = FleetStopRequest.model_validate_json(raw or b"{}").name
            except ValidationError as exc:
                raise UsageError(f'send no body (stop every slot) or JSON {{"name": SLOT_OR_MODEL}}: {exc}') from exc
            stopped = await asyncio.to_thread(fleet.stop, target, reason="api deactivate")
            fleet_proxy: FleetProxy = request.app.state.fleet_proxy
            for record in stopped:
                fleet_proxy.forget(record["name"])
            return {"stopped": stopped}
        if coordinator.switching_to:
            raise SwitchInProgress(coordinator.switching_to)
        result = await asyncio.to_thread(service.stop, reason="api deactivate")
        return {"stopped": result is not None}

    @app.get("/v1/active")
    async def active() -> dict[str, Any]:
        """What serves on the single port (``active``), the start in progress if any (``starting``: name, phase,
        detail, elapsed_s, as ``current-model`` shows it) and the switch this server is making (``switching_to``).

        Fleet mode: ``slots`` (every slot: node, GPUs, port, model, status, uptime, last use, as ``current-model
        --json`` lists them; lost and failed ones say why) and ``switching_to`` (the models this server is
        starting for requests)."""
        if fleet is not None:
            slots = await asyncio.to_thread(fleet.slots, check_health=True)
            return {
                "slots": [slot.model_dump(mode="json") for slot in slots],
                "switching_to": request_fleet_proxy(app).switching_to,
            }
        status = await asyncio.to_thread(service.current)
        starting = await asyncio.to_thread(service.activation)
        return {
            "active": status.model_dump(mode="json") if status else None,
            "starting": starting.to_dict() if starting else None,
            "switching_to": coordinator.switching_to,
        }

    @app.get("/v1/registry/status")
    async def registry_status() -> dict[str, Any]:
        return service.registry_status.to_dict()

    @app.post("/v1/registry/reload")
    async def registry_reload() -> JSONResponse:
        status = await asyncio.to_thread(service.reload)
        return JSONResponse(status.to_dict(), status_code=200 if status.ok else 422)

    async def _forward(request: Request, path: str) -> Response:
        raw = await request.body()
        check_json_values(raw)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"request body is not JSON: {getattr(exc, 'msg', exc)}") from exc
        check_request_body(path, body)
        proxy: Proxy = request.app.state.proxy
        if fleet is not None:
            entry = resolve_entry(settings, service.registry, body)
            if entry.is_process_backend:
                return await request_fleet_proxy(request.app).forward(entry, path, raw, body)
            base_url = endpoint_for(entry, settings)  # remote and ollama entries: as on a single box
        else:
            entry, base_url = await proxy.route(service.registry, body)
        upstream = await proxy.send(entry, base_url, path, raw, body)
        if body.get("stream"):
            return StreamingResponse(
                upstream.aiter_stream(),
                status_code=upstream.status,
                headers=response_headers(upstream),
                background=BackgroundTask(upstream.aclose),
            )
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
        return Response(content, status_code=upstream.status, headers=response_headers(upstream))

    # The proxy is the one hot path: a pure ASGI middleware serves it ahead of routing and dependency injection.
    app.add_middleware(ProxyFastPath, forward=_forward, service=service)
    # Added last, so it runs first: nothing (proxy, docs, streaming) is reached without passing the guard.
    app.add_middleware(RequestGuard, settings=settings, bind_host=bind_host)
    return app


def request_fleet_proxy(app: FastAPI) -> FleetProxy:
    """The app's fleet proxy (set by the lifespan in fleet mode)."""
    return app.state.fleet_proxy


PROXY_PATHS = {"/v1/chat/completions": "chat/completions", "/v1/completions": "completions"}


def error_response(exc: ImageWorksError) -> JSONResponse:
    """The JSON error response for one of our errors (status from :data:`STATUS_FOR`)."""
    status = next(code for cls, code in STATUS_FOR if isinstance(exc, cls))
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, SwitchInProgress) else None
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


REGISTRY_ERROR_HEADER = (
    b"x-imageworks-registry-error",
    b"invalid; serving the last good registry, see /v1/registry/status",
)


class ProxyFastPath:
    """ASGI middleware: ``POST`` to the proxy paths goes straight to the forwarder; all else to the app.

    While the registry on disk is invalid, every response carries :data:`REGISTRY_ERROR_HEADER`: answers come
    from the last good registry, and the header says so.
    """

    def __init__(self, app: Any, forward: Any, service: ImageWorks) -> None:
        self.app = app
        self.forward = forward
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.service.registry_status.ok:
            send = _with_header(send, REGISTRY_ERROR_HEADER)
        path = PROXY_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if path is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await self.forward(request, path)
        except ImageWorksError as exc:
            response = error_response(exc)
        await response(scope, receive, send)


def _with_header(send: Any, header: tuple[bytes, bytes]) -> Any:
    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return sending
