"""Verification, activation and probe views: progress text, summaries, drift tables, history frames, errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from .. import history
from ..errors import ImageWorksError, ProbeError
from ..probe import activate_command
from ..registry import Registry
from ..settings import Settings
from ..units import format_bytes
from .registry_view import duration_text


# Verification ---------------------------------------------------------------------------------------------
def verify_progress(
    bytes_done: int, bytes_total: int, files_done: int, files_total: int, elapsed_s: float, current_path: str = ""
) -> tuple[float, str]:
    """(fraction 0..1, 'text') for a progress bar: MB done/total, files, MB/s, current file."""
    fraction = bytes_done / bytes_total if bytes_total else (files_done / files_total if files_total else 0.0)
    rate = bytes_done / elapsed_s / 1e6 if elapsed_s > 0 else 0.0
    text = (
        f"{bytes_done / 1e6:,.1f} / {bytes_total / 1e6:,.1f} MB · {files_done}/{files_total} files · {rate:,.1f} MB/s"
    )
    if current_path:
        text += f" · {current_path}"
    return min(max(fraction, 0.0), 1.0), text


def verify_summary(result: Any) -> dict[str, Any]:
    """Key figures of a :class:`~imageworks_core.verification.VerifyResult` for display."""
    duration = result.duration_s or 0.0
    read = result.bytes_read
    return {
        "result": result.result,
        "aggregate": result.aggregate,
        "expected": result.expected,
        "files": result.file_count,
        "size": format_bytes(result.total_bytes),
        "read": format_bytes(read),
        "duration": duration_text(duration),
        "rate": f"{format_bytes(read / duration)}/s" if duration else "",
        "rehashed": len(result.rehashed),
        "notes": list(result.notes),
    }


def drift_tables(report: Any) -> dict[str, Any]:
    """A DriftReport as tables: modified / added / removed rows and the text diffs by path."""
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report or {})

    def rows(items: Any) -> list[dict[str, Any]]:
        if isinstance(items, dict):
            return [{"path": k, **(v if isinstance(v, dict) else {"detail": v})} for k, v in items.items()]
        return [i if isinstance(i, dict) else {"path": str(i)} for i in items or []]

    diffs = data.get("text_diffs") or {}
    if isinstance(diffs, list):
        diffs = {str(d.get("path")): str(d.get("diff", "")) for d in diffs if isinstance(d, dict)}
    return {
        "modified": rows(data.get("modified")),
        "added": rows(data.get("added")),
        "removed": rows(data.get("removed")),
        "text_diffs": {str(k): str(v) for k, v in diffs.items()},
    }


# Active model ---------------------------------------------------------------------------------------------
def process_entries(registry: Registry) -> list[str]:
    """Entries the single-port runtime can activate."""
    return [entry.name for entry in registry if entry.is_process_backend]


def active_model_gone(settings: Settings, registry: Registry | None) -> str | None:
    """The banner (markdown, with the fix) when the model running on the single port is not an entry of
    ``registry`` any more (renamed or removed); None when it is, when nothing runs, or when there is no registry.

    Reads the state file only (no health request, no signal): every page calls it on every run.
    """
    from ..runtime.state import read_state

    if registry is None:
        return None
    try:
        state = read_state(settings)
    except ImageWorksError:  # an unreadable state file is the Active Model page's error to show
        return None
    if state is None or state.status not in ("starting", "ready") or state.name in registry.entries:
        return None
    stop = "Active Model → **Stop** (or `imageworks-models activate-model --stop`)"
    try:
        renamed = registry.get(state.name).name  # the old name kept as an alias, or the served id
    except ImageWorksError:
        renamed = None
    if renamed is not None:
        return (
            f"**The active model {state.name!r} is now {renamed!r} in the registry** (renamed); it still runs "
            f"({state.status}) under its old name. Fix: {stop}, then start {renamed!r} on the Active Model page."
        )
    return (
        f"**The active model {state.name!r} is no longer in the registry** (renamed or removed); it still runs "
        f"({state.status}) but cannot be started, switched to or probed by that name. Fix: {stop}, then start the "
        "entry under its current name; or restore the entry: Registry → **History** → roll back the edit."
    )


def activation_frame(settings: Settings, *, name: str | None = None, limit: int = 50) -> pd.DataFrame:
    """Activation history, newest first, with readable durations."""
    columns = ["at", "name", "action", "result", "start_to_ready", "stop", "pid", "actor", "detail"]
    if not settings.history_db_path.exists():
        return pd.DataFrame(columns=columns)
    rows = [
        {
            "at": row.get("at"),
            "name": row.get("name"),
            "action": row.get("action"),
            "result": row.get("result"),
            "start_to_ready": duration_text(row.get("start_to_ready_s")),
            "stop": duration_text(row.get("stop_s")),
            "pid": row.get("pid"),
            "actor": row.get("actor"),
            "detail": row.get("detail") or "",
        }
        for row in history.list_activations(settings, name, limit)
    ]
    return pd.DataFrame(rows, columns=columns)


def _field(obj: Any, *names: str) -> Any:
    for name in names:
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def status_view(status: Any) -> dict[str, Any]:
    """An ActiveStatus (or None) as display values."""
    if status is None:
        return {"name": None, "status": "idle", "endpoint": "", "uptime": "", "healthy": None, "pid": None}
    return {
        "name": _field(status, "name"),
        "status": str(_field(status, "status") or ""),
        "endpoint": _field(status, "base_url", "endpoint") or "",
        "uptime": duration_text(_field(status, "uptime_s")),
        "healthy": _field(status, "healthy"),
        "pid": _field(status, "pid"),
    }


# Vision probe ---------------------------------------------------------------------------------------------
def vision_entries(registry: Registry) -> list[str]:
    """Entries that claim vision (the probe checks the claim)."""
    return [entry.name for entry in registry if entry.capabilities.vision]


def probe_entries(registry: Registry, *, include_text_only: bool = False) -> list[str]:
    """The Vision Probe page's choices: entries that claim vision, or (``include_text_only``) every entry with a
    backend, vision ones first: probing a text-only entry shows what a failing probe looks like."""
    vision = vision_entries(registry)
    if not include_text_only:
        return vision
    return vision + [e.name for e in registry if e.backend is not None and not e.capabilities.vision]


@dataclass(frozen=True)
class ProbeTarget:
    """Where a probe of the entry would go right now: ``ready`` when it can be probed as it is; ``activate``
    when activating it first (the page's checkbox) is the way to get there."""

    ready: bool
    label: str
    detail: str
    activate: bool = False


def probe_target(settings: Settings, registry: Registry, name: str) -> ProbeTarget:
    """Whether ``name`` can be probed as it is (the active, ready backend, or a remote entry), from the state file
    (no health request)."""
    from ..runtime.state import read_state

    entry = registry.entries[name]
    if entry.backend is None:
        return ProbeTarget(False, "no backend", "set backend and backend_config first (Registry → Edit metadata)")
    if not entry.is_process_backend:
        return ProbeTarget(True, f"remote · {entry.backend}", "probed at its URL; no activation needed")
    try:
        state = read_state(settings)
    except ImageWorksError as exc:
        return ProbeTarget(False, "state unreadable", exc.message)
    if state is not None and state.name == name and state.status == "ready":
        return ProbeTarget(True, "active · ready", f"serving at {state.base_url}")
    if state is not None and state.name == name and state.status == "starting":
        return ProbeTarget(False, "active · starting", "not ready yet: wait, or see the Active Model page")
    if state is not None and state.name == name:
        return ProbeTarget(False, f"active · {state.status}", "see the Active Model page", activate=True)
    running = f"{state.name} runs on the single port" if state is not None else "nothing runs on the single port"
    return ProbeTarget(False, "not active", running, activate=True)


def inactive_probe_message(error: ProbeError, control: str) -> str:
    """The page's wording of 'not the active backend': the page's own control, and the Active Model page."""
    name = error.inactive or ""
    return (
        f"{error.summary}. Tick **{control}** and run the probe again, or start it on the Active Model page "
        f"(`{activate_command(name)}`)."
    )


def grounded_text(result: dict[str, Any]) -> str:
    """'true', 'false', or why it is null: only the canonical image's content is known, and only an answer can
    name it."""
    grounded = result.get("grounded")
    if grounded is not None:
        return str(bool(grounded)).lower()
    return "not checked (no answer)" if result.get("expected") else "not checked (custom image)"


def probe_view(result: dict[str, Any]) -> dict[str, Any]:
    """A probe result (``ProbeResult.to_dict()``) as the modal's fields."""
    image = result.get("image") or {}
    return {
        "vision_ok": bool(result.get("vision_ok")),
        "grounded": result.get("grounded"),
        "grounded_text": grounded_text(result),
        "answer": result.get("answer") or "",
        "reasoning": result.get("reasoning") or "",
        "latency": f"{result['latency_ms']:.0f} ms" if result.get("latency_ms") is not None else "",
        "prompt_tokens": result.get("prompt_tokens"),
        "model": result.get("model") or "",
        "endpoint": result.get("endpoint") or "",
        "image": image.get("name") or "",
        "matched": result.get("matched") or result.get("matched_words") or [],
        "error": result.get("error") or "",
    }


def probe_frame(settings: Settings, name: str | None = None, limit: int = 50) -> pd.DataFrame:
    """Past probe results, newest first."""
    columns = ["at", "name", "vision_ok", "grounded", "latency_ms", "prompt_tokens", "image_name"]
    if not settings.history_db_path.exists():
        return pd.DataFrame(columns=columns)
    rows = [{c: row.get(c) for c in columns} for row in history.list_probes(settings, name, limit)]
    for row in rows:
        row["vision_ok"] = bool(row["vision_ok"])
        row["grounded"] = None if row["grounded"] is None else bool(row["grounded"])
    return pd.DataFrame(rows, columns=columns)


def error_lines(exc: BaseException) -> list[str]:
    """An exception as operator-facing lines (every problem of a RegistryError; one line otherwise)."""
    if isinstance(exc, ImageWorksError):
        return exc.lines()
    return [f"unexpected {type(exc).__name__}: {exc} (see logs/model_loader.log; set IMAGEWORKS_DEBUG=1 for details)"]


def entry_history(settings: Settings, name: str, limit: int = 20) -> dict[str, pd.DataFrame]:
    """The entry's verifications, probes and activations, newest first."""
    if not settings.history_db_path.exists():
        return {"verifications": pd.DataFrame(), "probes": pd.DataFrame(), "activations": pd.DataFrame()}
    probes = [
        {k: row[k] for k in ("id", "at", "vision_ok", "grounded", "latency_ms", "prompt_tokens", "image_name")}
        for row in history.list_probes(settings, name, limit)
    ]
    return {
        "verifications": pd.DataFrame(history.list_verifications(settings, name, limit)),
        "probes": pd.DataFrame(probes),
        "activations": activation_frame(settings, name=name, limit=limit),
    }
