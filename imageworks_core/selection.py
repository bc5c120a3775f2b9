"""Model selection: what every consumer (CLI, API, proxy, tools) calls to turn a name or role into an endpoint."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CapabilityError, FilteredModelError, UnknownModelError
from .registry import Registry, load_registry
from .schema import CAPABILITY_NAMES, ModelEntry
from .settings import Settings, get_settings
from .upstream import endpoint_for as endpoint_for
from .upstream import single_port_endpoint as single_port_endpoint


@dataclass(frozen=True)
class Selection:
    """The answer to "which model, and where do I send requests?"."""

    name: str
    endpoint: str
    backend: str | None
    served_model_id: str
    capabilities: list[str] = field(default_factory=list)
    locked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_capabilities(entry: ModelEntry, required: Iterable[str]) -> None:
    required = [c.strip() for c in required if c and c.strip()]
    unknown = [c for c in required if c not in CAPABILITY_NAMES]
    if unknown:
        raise CapabilityError(
            f"unknown capability {', '.join(unknown)}; valid: {', '.join(CAPABILITY_NAMES)}", name=entry.name
        )
    missing = [c for c in required if not getattr(entry.capabilities, c)]
    if missing:
        raise CapabilityError(
            f"{entry.name!r} lacks capability {', '.join(missing)} (has: {', '.join(entry.capabilities.enabled())}); "
            "pick another model or fix the entry's capabilities",
            name=entry.name,
            missing=missing,
        )


def _filter_reason(entry: ModelEntry, profile: str | None) -> str | None:
    if entry.deprecated:
        return "deprecated"
    if entry.testing:
        return "testing"
    if profile and entry.profiles and profile not in entry.profiles:
        return "profile"
    return None


def _selection(entry: ModelEntry, settings: Settings) -> Selection:
    return Selection(
        name=entry.name,
        endpoint=endpoint_for(entry, settings),
        backend=entry.backend,
        served_model_id=entry.effective_served_id,
        capabilities=entry.capabilities.enabled(),
        locked=entry.locked,
    )


def select_model(
    name: str | None = None,
    role: str | None = None,
    require_capabilities: Iterable[str] = (),
    profile: str | None = None,
    *,
    registry: Registry | None = None,
    settings: Settings | None = None,
    allow_hidden: bool = False,
) -> Selection:
    """Select by name (logical name, alias, served id) or by role (highest role_priority, then name).

    Raises UnknownModelError (with close matches), FilteredModelError (why: profile / testing / deprecated)
    or CapabilityError (which capabilities are missing).
    """
    settings = settings or (registry.settings if registry else get_settings())
    registry = registry or load_registry(settings=settings)
    profile = profile if profile is not None else settings.profile
    required = list(require_capabilities)
    if (name is None) == (role is None):
        raise ValueError("select_model needs exactly one of name or role")
    if name is not None:
        entry = registry.get(name)
        reason = None if allow_hidden else _filter_reason(entry, profile)
        if reason:
            detail = {
                "deprecated": "it is marked deprecated",
                "testing": "it is marked testing (use --include-testing / include_testing)",
                "profile": f"its profiles {entry.profiles} exclude the active profile {profile!r}",
            }[reason]
            raise FilteredModelError(f"{entry.name!r} is filtered out: {detail}", name=entry.name, reason=reason)
        _check_capabilities(entry, required)
        return _selection(entry, settings)
    candidates = [e for e in registry if role in e.roles and _filter_reason(e, profile) is None]
    if not candidates:
        hidden = [e.name for e in registry if role in e.roles]
        why = f" ({len(hidden)} hidden by profile/testing/deprecated: {', '.join(hidden)})" if hidden else ""
        raise UnknownModelError(f"no model has role {role!r}{why}", name=str(role))
    capable = [e for e in candidates if all(getattr(e.capabilities, c, False) for c in required)]
    if not capable:
        best = sorted(candidates, key=lambda e: (-e.role_priority, e.name))[0]
        _check_capabilities(best, required)
    best = sorted(capable, key=lambda e: (-e.role_priority, e.name))[0]
    return _selection(best, settings)
