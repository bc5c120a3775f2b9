"""The Settings page's data: paths, environment, backend targets and their connection check, the audit log."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
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


DASHBOARD_PORT_VARIABLE = "IMAGEWORKS_DASHBOARD_PORT"


def env_rows(settings: Settings, *, served_port: int | None = None) -> list[dict[str, str]]:
    """Every ``IMAGEWORKS_*`` / ``CHAT_PROXY_VLLM_*`` setting with its effective value and source (secrets masked).

    ``served_port`` is the port this dashboard really serves on (Streamlit's ``server.port``): the launcher's
    ``--port`` or ``streamlit run --server.port`` override the variable, so its value alone would mislead.
    """
    rows = []
    for variable, value, source in settings.env_sources():
        if ("TOKEN" in variable or "KEY" in variable) and value:
            value = "••••••"
        if variable == DASHBOARD_PORT_VARIABLE and served_port is not None and str(served_port) != value:
            value, source = str(served_port), f"served (the variable says {value})"
        rows.append({"variable": variable, "value": value, "source": source})
    return rows


SINGLE_PORT_KIND = "single port (vllm/lmdeploy)"


@dataclass
class BackendTarget:
    """One endpoint the registry points at, and the entries that use it."""

    endpoint: str
    kind: str
    entries: list[str]
    api_key_env: str | None = None

    @property
    def remote(self) -> bool:
        """An openai / ollama endpoint (not the single port the runtime starts)."""
        return self.kind != SINGLE_PORT_KIND


def backend_targets(registry: Registry, settings: Settings) -> list[BackendTarget]:
    """Distinct endpoints: the single port (process backends), remote base URLs, Ollama hosts."""
    targets: dict[str, BackendTarget] = {}
    for entry in registry:
        if not entry.backend:
            continue
        endpoint = endpoint_for(entry, settings)
        kind = SINGLE_PORT_KIND if entry.backend in PROCESS_BACKENDS else entry.backend
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


def _key_hint(key_env: str | None) -> str:
    if not key_env:
        return "the entries set no api_key_env: set backend_config.api_key_env to the variable holding the key"
    if not os.environ.get(key_env):
        return f"${key_env} (the entries' api_key_env) is not set in the dashboard's environment"
    return f"${key_env} (the entries' api_key_env) holds a key the server refuses"


def check_connection(
    endpoint: str, *, key_env: str | None = None, timeout_s: float = 3.0, remote: bool = False
) -> ConnectionResult:
    """Ask an OpenAI-compatible endpoint for its models (short timeout; never raises); the key in ``key_env``
    goes along by the same rule as the proxy's and the probe's. ``remote`` (openai / ollama entries): the hints
    point at the base URL and the key, not at the single port's Active Model page."""
    url = endpoint.rstrip("/") + "/models"
    headers = key_env_headers(key_env)
    fix = (
        "check the entries' backend_config.base_url and that this host reaches it"
        if remote
        else "start the backend (Active Model page) or fix the base URL"
    )
    started = time.perf_counter()
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
        return ConnectionResult(False, f"{url}: no answer within {timeout_s:.0f} s (is the backend up and reachable?)")
    except httpx.HTTPError as exc:
        return ConnectionResult(False, f"{url}: cannot connect ({exc}); {fix}")
    latency = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        hint = f" ({_key_hint(key_env)})" if response.status_code in (401, 403) else ""
        return ConnectionResult(False, f"{url}: HTTP {response.status_code}{hint}", response.status_code, latency)
    try:
        models = [str(m.get("id")) for m in response.json().get("data", []) if isinstance(m, dict)]
    except (ValueError, AttributeError):
        return ConnectionResult(False, f"{url}: answered 200 but not with an OpenAI model list", 200, latency)
    return ConnectionResult(True, f"{url}: OK, {len(models)} model(s) in {latency:.0f} ms", 200, latency, models)


AUDIT_COLUMNS: tuple[str, ...] = ("time", "actor", "event", "entry", "outcome", "details")


def audit_entry(record: dict[str, Any]) -> str:
    """The entry (or repository) an audit event is about: its name, the names a registry write touched, or the
    repo id of a download."""
    names = record.get("names")
    if isinstance(names, list) and names:
        return ", ".join(map(str, names))
    return str(record.get("name") or record.get("repo_id") or "")


def audit_outcome(record: dict[str, Any]) -> str:
    """One word for how an audit event ended: the recorded result or status, else what its kind implies."""
    event = str(record.get("event") or "")
    if event == "lock_violation":
        return "forced" if record.get("forced") else "drift"
    if event.endswith(("_failed", "_failure")):
        return "failed"
    if event == "probe":
        return "vision_ok" if record.get("vision_ok") else "failed"
    for key in ("result", "status"):
        if record.get(key):
            return str(record[key])
    return "recovered" if record.get("recovered") else "ok"


def _local_time(ts: Any) -> str:
    try:
        moment = datetime.fromisoformat(str(ts))
    except ValueError:
        return str(ts or "")
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def audit_frame(settings: Settings, event: str | None = None, limit: int = 500) -> pd.DataFrame:
    """Audit-log events, newest first: :data:`AUDIT_COLUMNS` (local time, who, what, which entry, how it ended)
    and every remaining field as a JSON object in ``details`` (the page shows it expandable)."""
    rows = []
    for record in audit.read_events(settings, event=event, limit=limit):
        rest = {k: v for k, v in record.items() if k not in ("ts", "event", "actor")}
        rows.append(
            {
                "time": _local_time(record.get("ts")),
                "actor": record.get("actor"),
                "event": record.get("event"),
                "entry": audit_entry(record),
                "outcome": audit_outcome(record),
                "details": json.dumps(rest, ensure_ascii=False, default=str),
            }
        )
    return pd.DataFrame(rows, columns=list(AUDIT_COLUMNS))
