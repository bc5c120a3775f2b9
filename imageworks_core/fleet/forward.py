"""HTTP to a slot's backend through its node agent: the backend listens on its node's loopback only.

The controller (the API's proxy) never opens a connection to a backend: it asks the node's agent, over Ray,
to make the request on that node's loopback and hand back the answer (:func:`request`, whole) or its chunks
as they come (:func:`stream`, for ``stream: true``). So no backend port is ever reachable from the network,
and every request the fleet serves has passed the API's own checks (Host, Origin, token, body limits) first.

On the controller's side, :class:`AgentTransport` lets an ordinary ``httpx.Client`` (the vision probe's) talk to
a slot's backend this way.

Adversary: whoever can call Ray in the cluster can call the agent, and so every backend (see the package
docstring: the Ray cluster itself is the trust boundary). Hop-by-hop headers and ``Host`` are not forwarded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

import httpx
from pydantic import BaseModel, Field

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
"""Headers that describe one connection, not the request: never forwarded in either direction."""
FORWARD_TIMEOUT_S = 600.0
"""Default bound on one forwarded request (a long generation); the caller may give its own."""


class ForwardResponse(BaseModel):
    """A backend's answer (``body`` empty for the head of a stream)."""

    status: int
    headers: list[tuple[str, str]] = Field(default_factory=list)
    body: bytes = b""


def _clean(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


_shared: httpx.Client | None = None
_shared_guard = threading.Lock()


def _client() -> httpx.Client:
    """One pooled client per process (the agent's threads share it: building one costs more than a loopback
    request). Loopback only, plain HTTP: no proxy from the environment, no TLS."""
    global _shared
    with _shared_guard:
        if _shared is None:
            _shared = httpx.Client(trust_env=False, verify=False, limits=httpx.Limits(max_connections=64))
        return _shared


def _timeout(timeout_s: float) -> httpx.Timeout:
    return httpx.Timeout(timeout_s, connect=5.0)


def _url(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}/{path.lstrip('/')}"


def request(
    port: int,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    timeout_s: float = FORWARD_TIMEOUT_S,
) -> ForwardResponse:
    """Make the request on this machine's loopback and return the whole answer (502 when the backend does not
    answer: the body says why)."""
    try:
        answer = _client().request(
            method, _url(port, path), headers=_clean(headers), content=body, timeout=_timeout(timeout_s)
        )
    except httpx.HTTPError as exc:
        return ForwardResponse(status=502, body=f"backend on port {port} did not answer: {exc}".encode())
    return ForwardResponse(status=answer.status_code, headers=_clean(answer.headers.multi_items()), body=answer.content)


def stream(
    port: int,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    timeout_s: float = FORWARD_TIMEOUT_S,
) -> Iterator[ForwardResponse | bytes]:
    """Make the request and yield its head (a :class:`ForwardResponse` without body), then its body's chunks."""
    try:
        with _client().stream(
            method, _url(port, path), headers=_clean(headers), content=body, timeout=_timeout(timeout_s)
        ) as answer:
            yield ForwardResponse(status=answer.status_code, headers=_clean(answer.headers.multi_items()))
            # No chunk size: httpx would hold bytes back until it has that many; an SSE event must go at once.
            yield from answer.iter_raw()
    except httpx.HTTPError as exc:
        yield ForwardResponse(status=502, body=f"backend on port {port} did not answer: {exc}".encode())


Send = Callable[[str, str, list[tuple[str, str]], bytes, float], ForwardResponse]
"""(method, path with query, headers, body, timeout in seconds) -> the backend's answer: a slot's forward."""


class AgentTransport(httpx.BaseTransport):
    """An httpx transport whose requests are made by a slot's node agent (``send``: the controller's
    ``Fleet.forward`` bound to the slot), so a client on the controller reaches a backend on its node's loopback.

    The request's host and port are not used (the agent knows its slot's port). ``Accept-Encoding`` is not sent:
    the agent hands back decoded bodies. A backend that does not answer (the agent's 502 without headers) is an
    ``httpx.ConnectError``, as a direct connection would be; a lost node is the controller's SlotLost."""

    def __init__(self, send: Send) -> None:
        self._send = send

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {}).get("read") or FORWARD_TIMEOUT_S
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "accept-encoding"]
        path = request.url.raw_path.decode("ascii")
        answer = self._send(request.method, path, headers, request.read(), float(timeout))
        if answer.status == 502 and not answer.headers:
            raise httpx.ConnectError(answer.body.decode("utf-8", "replace"), request=request)
        return httpx.Response(answer.status, headers=answer.headers, content=answer.body, request=request)
