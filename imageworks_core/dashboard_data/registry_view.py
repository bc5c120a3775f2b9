"""The Registry page's data: the service's registry view, the table, badges and time texts, entry detail."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from ..errors import RegistryError
from ..launch import preview_launch
from ..registry import Registry
from ..schema import CAPABILITY_NAMES, KNOWN_ROLES, ModelEntry
from ..service import EntryStatus, ImageWorks
from ..settings import Settings
from ..units import format_bytes

CAPABILITY_ICONS: dict[str, str] = {
    "text": "📝",
    "vision": "👁️",
    "tools": "🛠️",
    "embeddings": "🧭",
    "reasoning": "🧠",
    "audio": "🔊",
}


# Registry loading with a last-good fallback ---------------------------------------------------------------
@dataclass
class RegistryView:
    """What the pages show: the registry (possibly the last good one) and the error that made it stale."""

    registry: Registry | None
    error: RegistryError | None = None
    loaded_at: float = 0.0

    @property
    def stale(self) -> bool:
        """True when the files on disk are invalid and ``registry`` is the last good load."""
        return self.error is not None and self.registry is not None


_SERVICES: dict[str, ImageWorks] = {}


_SERVICES_LOCK = threading.Lock()


def service_for(settings: Settings) -> ImageWorks:
    """The one service object of this process for these settings (every session of the dashboard shares it)."""
    key = settings.model_dump_json()
    with _SERVICES_LOCK:
        service = _SERVICES.get(key)
        if service is None:
            service = _SERVICES[key] = ImageWorks(settings)
    return service


def load_registry_view(settings: Settings, *, force: bool = False) -> RegistryView:
    """The service's registry (the last good one when the files are invalid) with the error beside it."""
    service = service_for(settings)
    if force:
        service.reload()
    else:
        service.refresh()
    registry, error, status = service.snapshot()
    loaded_at = datetime.fromisoformat(status.loaded_at).timestamp() if status.loaded_at else 0.0
    return RegistryView(registry, error, loaded_at)


def badge_markdown(badges: Iterable[str]) -> str:
    """Streamlit badge markup: red for drift, orange for missing weights."""
    colors = {"drift": "red", "missing": "orange"}
    return " ".join(f":{colors.get(b, 'gray')}-badge[{b}]" for b in badges)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def age_text(timestamp: str | None, now: datetime | None = None) -> str:
    """'just now', '5 min ago', '3 h ago', '2 d ago' (or '' when unknown)."""
    moment = _parse_time(timestamp)
    if moment is None:
        return ""
    seconds = max(((now or datetime.now(UTC)) - moment).total_seconds(), 0.0)
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


def duration_text(seconds: float | None) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min' (or '' when unknown)."""
    if seconds is None:
        return ""
    seconds = max(float(seconds), 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def capability_icons(capabilities: Iterable[str]) -> str:
    """'📝 👁️ 🧠' for text, vision, reasoning."""
    return " ".join(CAPABILITY_ICONS.get(c, c) for c in capabilities)


# A verification's result in words: "unlocked" means the hash was taken with nothing pinned to compare it with.
VERIFICATION_WORDS = {"ok": "ok", "drift": "drift", "unlocked": "hashed, no lock"}


def verification_text(verification: dict[str, Any] | None, now: datetime | None = None) -> str:
    """'ok · 5 min ago', 'drift · 1 d ago', 'hashed, no lock · just now', 'drift on n2 · 1 min ago' (a fleet
    node's copy) or 'never'."""
    if not verification:
        return "never"
    result = VERIFICATION_WORDS.get(str(verification["result"]), str(verification["result"]))
    result += f" on {verification['node']}" if verification.get("node") else ""
    age = age_text(verification.get("at"), now)
    return f"{result} · {age}" if age else result


def probe_text(probe: dict[str, Any] | None, now: datetime | None = None) -> str:
    """'vision_ok · 2 h ago', 'failed · …', 'vision_ok on n2 · …' (through a fleet node) or 'never'."""
    if not probe:
        return "never"
    outcome = "vision_ok" if probe.get("vision_ok") else "failed"
    outcome += f" on {probe['node']}" if probe.get("node") else ""
    age = age_text(probe.get("at"), now)
    return f"{outcome} · {age}" if age else outcome


# What an operator checks first (is it usable: badges, lock, weights, last verification and probe; what serves it)
# comes first, so it stays on screen at 1400 px; long text (served id) comes last.
REGISTRY_COLUMNS: tuple[str, ...] = (
    "name",
    "status",
    "lock",
    "weights",
    "last_verification",
    "last_probe",
    "backend",
    "roles",
    "capabilities",
    "format",
    "quantization",
    "size",
    "layer",
    "flags",
    "served_id",
)


def count_text(count: int, singular: str, plural: str | None = None) -> str:
    """'1 event', '3 events', '2 entries' (``plural`` when adding an s is wrong): every count a page shows."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def entries_caption(shown: int, hidden: int) -> str:
    """'1 entry shown', '5 entries shown (1 hidden by filters)'."""
    text = f"{count_text(shown, 'entry', 'entries')} shown"
    return text + (f" ({hidden} hidden by filters)" if hidden else "")


def registry_frame(
    registry: Registry,
    entries: Iterable[ModelEntry],
    statuses: dict[str, EntryStatus],
    now: datetime | None = None,
) -> pd.DataFrame:
    """One row per entry with the columns of :data:`REGISTRY_COLUMNS` (the Registry page's table): text only, so
    the table reads the same without an emoji font (badges carry their word; capabilities are names)."""
    now = now or datetime.now(UTC)
    rows = []
    for entry in entries:
        status = statuses[entry.name]
        flags = [flag for flag, on in (("testing", entry.testing), ("deprecated", entry.deprecated)) if on]
        badges = status.badges
        rows.append(
            {
                "name": entry.name,
                "status": " ".join(f"🔴 {b}" if b == "drift" else f"🟠 {b}" for b in badges),
                "lock": status.lock,
                "weights": status.weights,
                "last_verification": verification_text(status.last_verification, now),
                "last_probe": probe_text(status.last_probe, now),
                "backend": entry.backend or "—",
                "roles": list(entry.roles),
                "capabilities": list(entry.capabilities.enabled()),
                "format": entry.download_format or "—",
                "quantization": entry.quantization or "—",
                "size": format_bytes(entry.download_size_bytes, missing="—"),
                "layer": registry.layer_of(entry.name),
                "flags": ", ".join(flags),
                "served_id": entry.effective_served_id or "—",
            }
        )
    return pd.DataFrame(rows, columns=list(REGISTRY_COLUMNS))


def hash_action_blocker(entry: ModelEntry, status: EntryStatus) -> str | None:
    """Why Verify Hash, Lock version and Accept new weights cannot run on the entry now (None when they can)."""
    if not entry.download_path:
        return "No download_path: nothing to verify (remote or Ollama entry)."
    if status.weights == "missing":
        return (
            "Weights missing: download_path does not exist, so there is nothing to verify or lock. "
            "Fix download_path (Edit metadata) first."
        )
    return None


def filter_options(registry: Registry) -> dict[str, list[str]]:
    """Choices for the filter widgets: roles and backends in use, every capability."""
    roles = sorted({role for entry in registry for role in entry.roles} | set(KNOWN_ROLES))
    backends = sorted({entry.backend for entry in registry if entry.backend})
    return {"roles": roles, "capabilities": list(CAPABILITY_NAMES), "backends": backends}


# Entry detail ---------------------------------------------------------------------------------------------
def field_rows(registry: Registry, name: str) -> list[dict[str, str]]:
    """Every set field of the merged entry with the layer it came from (defaults left out)."""
    entry = registry.entries[name]
    data = entry.model_dump(mode="json")
    rows = []
    for path, layer in registry.provenance(name).items():
        value: Any = data
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if layer == "default" and value in (None, [], {}, False):
            continue
        rows.append({"field": path, "value": json.dumps(value, ensure_ascii=False, default=str), "from": layer})
    return rows


def launch_argv(entry: ModelEntry, settings: Settings) -> list[str] | None:
    """The exact argv activation would run (None for remote / ollama entries)."""
    return preview_launch(entry, settings)
