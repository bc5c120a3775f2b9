"""The API's request guard: who may drive the loader over HTTP, and how big a request may be.

Adversaries, and the answer to each (checked in this order, on every route: proxy, streaming and docs included):

- **A web page the operator opens** can send "simple" cross-origin requests (form posts, ``text/plain``
  bodies) and rebind a DNS name it owns to 127.0.0.1 (CVE-2024-28224 in Ollama). The ``Host`` header must be
  a loopback name or address, the bind address, or listed in ``IMAGEWORKS_ALLOWED_HOSTS`` (a rebound name is
  none of these); a request carrying an ``Origin`` must name one listed in ``IMAGEWORKS_ALLOWED_ORIGINS``
  (default: none; curl, SDKs and our own server-side callers send no ``Origin``); request bodies must be
  ``application/json`` (a browser cannot send that cross-origin without a CORS preflight, which we never
  grant), except the probe's multipart upload, which the ``Origin`` rule covers.
- **Anyone on the network** when the bind is not provably loopback: every route needs
  ``IMAGEWORKS_API_TOKEN`` as a bearer token (compared in constant time), and :func:`check_bind` refuses to
  build such an app without one.
- **Oversized input**: a declared ``Content-Length`` over ``IMAGEWORKS_MAX_BODY_MB`` is refused before any
  byte is read; an undeclared (chunked) body is counted as it arrives and refused once over. Bodies over
  1 MiB held at once share a byte budget of one limit (larger requests wait for their turn), so concurrent
  uploads cannot add up past it; routes that carry no images take at most 1 MiB; a JSON body may hold at most
  :data:`MAX_JSON_VALUES` values, counted before it is parsed.

Not defended here: a local user or process that can read the token or talk to loopback directly (root on the
box owns it anyway), and TLS (put a TLS-terminating proxy in front for a non-loopback bind).

Starlette's ``TrustedHostMiddleware`` answers 400 with a bare text line; this guard answers 403 with a JSON
error that says which header was refused and which variable allows it, so an operator can fix it.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from .errors import UsageError
from .settings import Settings

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "*"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
MULTIPART_PATHS = frozenset({"/v1/probe/vision"})
"""Routes that take a multipart upload besides JSON (the Origin check is what protects them)."""
BODYLESS_PATHS = frozenset({"/v1/deactivate", "/v1/registry/reload"})
"""Action routes that take no body: a POST without a content type is fine there."""
_SMALL_BODY = 1 << 20
"""Bodies up to this size skip the shared budget (the server's connection limit bounds their number); it is
also the limit for every route but :data:`LARGE_BODY_PATHS` (a selection or verify request is a few bytes)."""
LARGE_BODY_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/probe/vision"})
"""Routes whose bodies may carry images, up to ``IMAGEWORKS_MAX_BODY_MB``."""
MAX_JSON_VALUES = 1_000_000
"""Most values a JSON body may hold: parsed, each costs ~60 bytes, so 32 MiB of ``["ab","ab",…]`` would
otherwise become ~450 MiB of Python objects. A chat request with images has a few hundred."""


def check_json_values(raw: bytes) -> None:
    """UsageError when ``raw`` could hold more than :data:`MAX_JSON_VALUES` values (counted before parsing).

    Every value but the first follows a ``,`` or opens with ``[``/``{``; commas inside strings only overcount.
    """
    count = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if count > MAX_JSON_VALUES:
        raise UsageError(f"request body holds up to {count} JSON values; the limit is {MAX_JSON_VALUES}")


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def is_loopback_bind(host: str) -> bool:
    """Whether a bind address provably listens on loopback only (every address the name resolves to)."""
    if host.strip() in WILDCARD_BINDS:
        return False
    addresses = _addresses(host.strip())
    return bool(addresses) and all(address.is_loopback for address in addresses)


def check_bind(settings: Settings, bind_host: str) -> None:
    """Refuse (UsageError, exit 64) a bind beyond loopback without ``IMAGEWORKS_API_TOKEN``."""
    if settings.api_token or is_loopback_bind(bind_host):
        return
    shown = repr(bind_host) if bind_host.strip() in WILDCARD_BINDS else bind_host
    raise UsageError(
        f"bind address {shown} is not loopback-only: set IMAGEWORKS_API_TOKEN (every route then needs "
        "'Authorization: Bearer <token>') or serve on --host 127.0.0.1"
    )


def _split_list(value: str) -> list[str]:
    return [item.strip().lower().rstrip("/") for item in value.split(",") if item.strip()]


def _host_name(header: str) -> str:
    """``Host`` header without port, brackets or trailing dot, lowercased."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


class HostPolicy:
    """Which ``Host`` names this server answers to."""

    def __init__(self, settings: Settings, bind_host: str) -> None:
        names = set(_LOOPBACK_NAMES)
        bind = bind_host.strip().lower()
        if bind in WILDCARD_BINDS:
            # Listening everywhere: the box's own addresses and host name are legitimate ways to reach it.
            names.update(
                str(a.address).split("%")[0].lower() for addrs in psutil.net_if_addrs().values() for a in addrs
            )
            names.add(socket.gethostname().lower())
        elif bind:
            names.add(_host_name(bind))
        self.exact: set[str] = set()
        self.suffixes: list[str] = []
        for name in [*names, *_split_list(settings.allowed_hosts)]:
            if name.startswith("*."):
                self.suffixes.append(name[1:])
            else:
                self.exact.add(_host_name(name))

    def allows(self, host: str) -> bool:
        if host in self.exact or any(host.endswith(suffix) for suffix in self.suffixes):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


class _ByteBudget:
    """An async counting limit on the body bytes held at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + n <= self.capacity)
            self.used += n

    async def release(self, n: int) -> None:
        async with self._changed:
            self.used -= n
            self._changed.notify_all()


def refusal(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The pieces of a JSON refusal (status, headers, body) in the API's error shape."""
    body = json.dumps({"error": {"type": "RequestRefused", "reason": reason, "message": message}}).encode()
    return {"status": status, "headers": headers or {}, "body": body}


async def _send_refusal(send: Send, refused: dict[str, Any]) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(refused["body"])).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in refused["headers"].items()]
    await send({"type": "http.response.start", "status": refused["status"], "headers": headers})
    await send({"type": "http.response.body", "body": refused["body"]})


class RequestGuard:
    """ASGI middleware in front of everything: Host, Origin, token, content type and body size."""

    def __init__(self, app: Any, settings: Settings, bind_host: str) -> None:
        self.app = app
        self.token = (settings.api_token or "").encode()
        self.hosts = HostPolicy(settings, bind_host)
        self.origins = set(_split_list(settings.allowed_origins))
        self.max_body = int(settings.max_body_mb * (1 << 20))
        self.budget = _ByteBudget(self.max_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = self._check(scope, headers)
        if refused is not None:
            await _send_refusal(send, refused)
            return
        declared = headers.get("content-length")
        if declared is None and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        reserve = limit if declared is None else int(declared)
        if reserve <= _SMALL_BODY:
            await self._bounded(scope, receive, send, limit)
            return
        await self.budget.acquire(reserve)
        try:
            await self._bounded(scope, receive, send, limit)
        finally:
            await self.budget.release(reserve)

    def _check(self, scope: Scope, headers: dict[str, str]) -> dict[str, Any] | None:
        """The refusal for this request, or None when it may proceed."""
        host = _host_name(headers.get("host", ""))
        if not self.hosts.allows(host):
            return refusal(
                403,
                "host",
                f"Host {host or '(none)'!r} is not a name this server answers to (DNS-rebinding guard); "
                "add it to IMAGEWORKS_ALLOWED_HOSTS if it is yours",
            )
        origin = headers.get("origin")
        if origin is not None and origin.strip().lower().rstrip("/") not in self.origins:
            return refusal(
                403,
                "origin",
                f"Origin {origin!r} may not drive this API (cross-site request guard); "
                "add it to IMAGEWORKS_ALLOWED_ORIGINS if that page is yours",
            )
        if self.token and not self._token_ok(headers.get("authorization", "")):
            return refusal(
                401,
                "token",
                "missing or wrong bearer token: send 'Authorization: Bearer <IMAGEWORKS_API_TOKEN>'",
                {"WWW-Authenticate": "Bearer"},
            )
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            refused = self._check_content_type(scope["path"], headers)
            if refused is not None:
                return refused
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return refusal(400, "body_size", f"Content-Length {declared!r} is not a byte count")
            limit = self._limit(scope["path"])
            if int(declared) > limit:
                return self._too_large(int(declared), limit)
        return None

    def _token_ok(self, authorization: str) -> bool:
        scheme, _, credentials = authorization.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token)

    def _check_content_type(self, path: str, headers: dict[str, str]) -> dict[str, Any] | None:
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media == "application/json":
            return None
        if media == "multipart/form-data" and path in MULTIPART_PATHS:
            return None
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        if not media and path in BODYLESS_PATHS and not has_body:
            return None
        shown = media or "none"
        return refusal(415, "content_type", f"{path} takes Content-Type: application/json (got {shown})")

    def _limit(self, path: str) -> int:
        return self.max_body if path in LARGE_BODY_PATHS else min(self.max_body, _SMALL_BODY)

    def _too_large(self, size: int | None, limit: int) -> dict[str, Any]:
        got = f"{size} bytes" if size is not None else "the body"
        return refusal(
            413,
            "body_size",
            f"{got} is over this route's request body limit of {limit} bytes"
            + (" (IMAGEWORKS_MAX_BODY_MB)" if limit == self.max_body else ""),
        )

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app with a receive that stops at the body limit and answers 413 itself.

        Once over the limit the app is told the client went away (``http.disconnect``) and whatever it tries to
        send afterwards is dropped: the refusal is the response, whatever layer the app's error handling has.
        """
        received = 0
        started = refused = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received, started, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        started = True
                        await _send_refusal(send, self._too_large(None, limit))
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not refused:  # the app's failure to read a refused body (client disconnect) is no error of ours
                raise
