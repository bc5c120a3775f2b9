"""Model selection: what every consumer (CLI, API, proxy, tools) calls to turn a name or role into an endpoint."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CapabilityError, FilteredModelError, UnknownModelError
from .registry import Registry, load_registry
from .schema import CAPABILITY_NAMES, ROLE_CAPABILITIES, ModelEntry, rank_for_role
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


def check_capabilities(entry: ModelEntry, required: Iterable[str]) -> None:
    """CapabilityError naming what ``entry`` lacks of ``required`` (or an unknown capability name)."""
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


def role_requirements(role: str, require_capabilities: Iterable[str] = ()) -> list[str]:
    """The capabilities selection for ``role`` requires: the role's own (:data:`ROLE_CAPABILITIES`: vision for
    caption, keywords, description and narration) and then the caller's, each once."""
    required = [*ROLE_CAPABILITIES.get(role, ()), *(c.strip() for c in require_capabilities if c and c.strip())]
    return list(dict.fromkeys(required))


def select_model(
    name: str | None = None,
    role: str | None = None,
    require_capabilities: Iterable[str] = (),
    profile: str | None = None,
    *,
    registry: Registry | None = None,
    settings: Settings | None = None,
    allow_hidden: bool = False,
    preferred: Iterable[str] = (),
) -> Selection:
    """Select by name (logical name, alias, served id) or by role.

    By role: the first of ``preferred`` (names, aliases or served ids; unknown ones skipped) that has the role,
    is not filtered out and has the capabilities; else the best of the rest by :func:`rank_for_role` (the
    entry's priority for this role, then name). Role selection always requires the role's own capabilities
    (:func:`role_requirements`). ``allow_hidden`` lets a name select a deprecated, testing or other-profile
    entry. Raises UnknownModelError (with close matches), FilteredModelError (why: profile / testing /
    deprecated) or CapabilityError (which capabilities are missing).
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
        check_capabilities(entry, required)
        return _selection(entry, settings)
    assert role is not None
    required = role_requirements(role, required)

    def capable(entry: ModelEntry) -> bool:
        return all(getattr(entry.capabilities, c, False) for c in required)

    for wanted in preferred:
        try:
            entry = registry.get(wanted)
        except UnknownModelError:
            continue
        if role in entry.roles and _filter_reason(entry, profile) is None and capable(entry):
            return _selection(entry, settings)
    candidates = [e for e in registry if role in e.roles and _filter_reason(e, profile) is None]
    if not candidates:
        hidden = [e.name for e in registry if role in e.roles]
        why = f" ({len(hidden)} hidden by profile/testing/deprecated: {', '.join(hidden)})" if hidden else ""
        raise UnknownModelError(f"no model has role {role!r}{why}", name=str(role))
    able = [e for e in candidates if capable(e)]
    if not able:
        check_capabilities(rank_for_role(candidates, role)[0], required)
    return _selection(rank_for_role(able, role)[0], settings)
