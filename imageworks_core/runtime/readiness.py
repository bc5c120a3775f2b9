"""Is a backend ready, and who holds the port: the health checks and the readiness poll.

A backend is "ready" only when its health path answers 200 *and* ``/v1/models`` lists the entry's served id,
so a stranger on the port is never taken for ours. Health requests carry the entry's API key when it has one
(:func:`imageworks_core.upstream.auth_headers`: a vLLM started with ``--api-key`` refuses ``/v1/models``
without it), go to loopback for a wildcard bind, and never use a proxy from the environment.

Readiness is polled fast at first and backs off (:func:`poll_delay`): the pause is a tenth of the time waited
so far, between 10 ms and 0.5 s, so readiness is seen at most ~10 % (or 10 ms) after it happens: a demo backend
up in 80 ms is seen within 10 ms, a vLLM loading for minutes is asked twice a second.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx
import psutil

from ..schema import ModelEntry
from ..settings import Settings
from ..upstream import auth_headers

HEALTH_REQUEST_TIMEOUT_S = 2.0
"""One health or /v1/models request; a backend busy loading may answer slowly."""
READY_POLL_MIN_S = 0.01
"""The shortest pause between readiness checks of a starting backend (the first ones)."""
READY_POLL_MAX_S = 0.5
"""The longest pause between readiness checks (a backend loading for minutes is asked twice a second)."""
READY_POLL_BACKOFF = 0.1
"""Between the two bounds, the pause is this fraction of the time waited so far."""
PORT_CHECK_TIMEOUT_S = 0.5
"""Connecting to the single port to see whether anything listens there."""


def connect_host(host: str) -> str:
    """Where to connect to reach a server bound to ``host`` (a wildcard bind is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def server_root(host: str, port: int) -> str:
    """``http://host:port`` of a server bound to ``host`` (IPv6 literals bracketed)."""
    host = connect_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def health_path(settings: Settings, entry: ModelEntry | None) -> str:
    """The entry's health path, else ``CHAT_PROXY_VLLM_HEALTH_PATH``, else ``/health``."""
    path = (entry.backend_config.health_path if entry else None) or settings.vllm_health_path or "/health"
    return path if path.startswith("/") else "/" + path


def health_client(entry: ModelEntry | None) -> httpx.Client:
    """An HTTP client for health checks of ``entry``'s backend (its API key, no proxy from the environment).

    Health checks go to :func:`server_root`, always plain ``http://`` on the single port, so no TLS context is
    built (``verify=False`` has nothing to verify; building one loads the CA bundle, ~20 ms per client).
    """
    return httpx.Client(timeout=HEALTH_REQUEST_TIMEOUT_S, trust_env=False, verify=False, headers=auth_headers(entry))


def check_ready(client: httpx.Client, root: str, health_path: str, served_id: str) -> tuple[bool, str]:
    """(ready, detail): health answers 200 (a 404 health path falls back to /v1/models) and /v1/models lists
    ``served_id``."""
    try:
        if health_path != "/v1/models":
            health = client.get(root + health_path)
            if health.status_code != 200 and health.status_code != 404:
                return False, f"{health_path} answered {health.status_code}"
        models = client.get(root + "/v1/models")
        if models.status_code != 200:
            return False, f"/v1/models answered {models.status_code}"
        ids = [str(m.get("id")) for m in models.json().get("data", []) if isinstance(m, dict)]
    except httpx.ConnectError:
        return False, "not listening yet"
    except httpx.TimeoutException:
        return False, "health request timed out"
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return False, f"bad answer: {type(exc).__name__}: {exc}"
    if served_id not in ids:
        return False, f"/v1/models lists {ids}, not {served_id!r}"
    return True, "healthy"


def poll_delay(waited_s: float, low_s: float = READY_POLL_MIN_S, high_s: float = READY_POLL_MAX_S) -> float:
    """The pause before the next check, ``waited_s`` into a wait: ``READY_POLL_BACKOFF`` of the time waited,
    between ``low_s`` and ``high_s`` (by default the readiness poll's bounds; see the module docstring)."""
    return min(high_s, max(low_s, waited_s * READY_POLL_BACKOFF))


def wait_ready(
    proc: subprocess.Popen[bytes],
    entry: ModelEntry,
    root: str,
    path: str,
    timeout_s: float,
    on_poll: Callable[[str], None],
    started: float,
) -> str:
    """Poll until ``proc``'s server is ready (returns ""), exits, or is not ready ``timeout_s`` after ``started``
    (a ``time.monotonic()`` value) (returns why).

    ``on_poll(detail)`` is called after every check that was not ready yet; an exception from it propagates.
    """
    with health_client(entry) as client:
        while True:
            code = proc.poll()
            if code is not None:
                return f"{entry.name!r}: backend exited with code {code} before it was ready"
            ready, detail = check_ready(client, root, path, entry.effective_served_id)
            if ready and proc.poll() is None:
                return ""
            waited = time.monotonic() - started
            if waited >= timeout_s:
                return f"{entry.name!r}: not ready after {timeout_s:g}s ({detail})"
            on_poll(detail)
            time.sleep(min(poll_delay(waited), max(0.0, timeout_s - waited)))


def port_holder(host: str, port: int) -> str | None:
    """None when nothing accepts connections on host:port, else who holds it (pid and command when visible)."""
    try:
        with socket.create_connection((connect_host(host), port), timeout=PORT_CHECK_TIMEOUT_S):
            pass
    except OSError:
        return None
    try:
        listeners = [
            c
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        ]
    except (psutil.AccessDenied, PermissionError):
        listeners = []
    for conn in listeners:
        try:
            proc = psutil.Process(conn.pid)
            command = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            command = "?"
        return f"pid {conn.pid} ({command[:160]})"
    return f"a process this user cannot see (try `ss -ltnp 'sport = :{port}'` as root)"
