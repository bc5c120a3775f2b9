"""The Settings page's data: paths, environment, backend targets and their connection check, the audit log."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pandas as pd

from .. import audit
from ..registry import Registry
from ..schema import PROCESS_BACKENDS
from ..selection import endpoint_for
from ..settings import Settings
from ..upstream import key_env_headers

AUDIT_EVENTS: tuple[str, ...] = (
    "lock_violation",
    "probe_failure",
    "activation",
    "activation_failed",
    "stop",
    "verify",
    "lock",
    "unlock",
    "probe",
    "download",
    "registry_write",
    "rollback",
)


# Settings page --------------------------------------------------------------------------------------------
def path_rows(settings: Settings) -> list[dict[str, Any]]:
    """Every resolved path under the root, and whether it exists."""
    paths = {
        "root": settings.root,
        "curated registry": settings.curated_path,
        "discovered overlay": settings.discovered_path,
        "merged snapshot": settings.snapshot_path,
        "lock manifests": settings.locks_dir,
        "active state": settings.active_state_path,
        "activation lock": settings.activation_lock_path,
        "audit log": settings.audit_log_path,
        "backend logs": settings.backend_logs_dir,
        "history DB": settings.history_db_path,
    }
    return [{"what": what, "path": str(path), "exists": path.exists()} for what, path in paths.items()]


def env_rows(settings: Settings) -> list[dict[str, str]]:
    """Every ``IMAGEWORKS_*`` / ``CHAT_PROXY_VLLM_*`` setting with its effective value and source (secrets masked)."""
    rows = []
    for variable, value, source in settings.env_sources():
        if ("TOKEN" in variable or "KEY" in variable) and value:
            value = "••••••"
        rows.append({"variable": variable, "value": value, "source": source})
    return rows


@dataclass
class BackendTarget:
    """One endpoint the registry points at, and the entries that use it."""

    endpoint: str
    kind: str
    entries: list[str]
    api_key_env: str | None = None


def backend_targets(registry: Registry, settings: Settings) -> list[BackendTarget]:
    """Distinct endpoints: the single port (process backends), remote base URLs, Ollama hosts."""
    targets: dict[str, BackendTarget] = {}
    for entry in registry:
        if not entry.backend:
            continue
        endpoint = endpoint_for(entry, settings)
        kind = "single port (vllm/lmdeploy)" if entry.backend in PROCESS_BACKENDS else entry.backend
        target = targets.setdefault(endpoint, BackendTarget(endpoint, kind, [], entry.backend_config.api_key_env))
        target.entries.append(entry.name)
    return list(targets.values())


@dataclass
class ConnectionResult:
    """The outcome of ``GET {endpoint}/models``."""

    ok: bool
    message: str
    status_code: int | None = None
    latency_ms: float | None = None
    models: list[str] = field(default_factory=list)


def check_connection(endpoint: str, *, key_env: str | None = None, timeout_s: float = 3.0) -> ConnectionResult:
    """Ask an OpenAI-compatible endpoint for its models (short timeout; never raises); the key in ``key_env``
    goes along by the same rule as the proxy's and the probe's."""
    url = endpoint.rstrip("/") + "/models"
    headers = key_env_headers(key_env)
    started = time.perf_counter()
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
        return ConnectionResult(False, f"{url}: no answer within {timeout_s:.0f} s (is the backend up and reachable?)")
    except httpx.HTTPError as exc:
        return ConnectionResult(
            False, f"{url}: cannot connect ({exc}); start the backend (Active Model page) or fix the base URL"
        )
    latency = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        hint = " (set the API key env var)" if response.status_code in (401, 403) else ""
        return ConnectionResult(False, f"{url}: HTTP {response.status_code}{hint}", response.status_code, latency)
    try:
        models = [str(m.get("id")) for m in response.json().get("data", []) if isinstance(m, dict)]
    except (ValueError, AttributeError):
        return ConnectionResult(False, f"{url}: answered 200 but not with an OpenAI model list", 200, latency)
    return ConnectionResult(True, f"{url}: OK, {len(models)} model(s) in {latency:.0f} ms", 200, latency, models)


def audit_frame(settings: Settings, event: str | None = None, limit: int = 500) -> pd.DataFrame:
    """Audit-log events, newest first, with ts/event/actor first and the remaining fields as JSON."""
    rows = []
    for record in audit.read_events(settings, event=event, limit=limit):
        rest = {k: v for k, v in record.items() if k not in ("ts", "event", "actor")}
        rows.append(
            {
                "ts": record.get("ts"),
                "event": record.get("event"),
                "actor": record.get("actor"),
                "name": rest.get("name", ""),
                "details": json.dumps(rest, ensure_ascii=False, default=str),
            }
        )
    return pd.DataFrame(rows, columns=["ts", "event", "actor", "name", "details"])
