"""``imageworks.model_loader.role_selection``: choose a model for a role, as older ImageWorks did.

``select_by_role(role, require_capabilities=..., preferred=...)`` is :meth:`ImageWorks.select` by role, so the
rule lives once, in :func:`imageworks_core.selection.select_model`: the first ``preferred`` name that has the
role, is usable and has the capabilities; else the highest ``role_priority`` for this role (a mapping's score,
0 when the role is missing, or an integer for every role). Caption, keywords, description and narration
require vision (:data:`DEFAULT_ROLE_CAPABILITIES`) on top of ``require_capabilities``; deprecated entries are
never chosen. Differences from older ImageWorks: testing entries and entries outside the active profile
(``IMAGEWORKS_PROFILE``) are not chosen either; equal priorities are broken by name, not by file order; the
selection reads the saved files (unsaved changes to loaded entries do not count); a locked entry whose last
verification drifted is refused (``LockViolationError``).
"""

from __future__ import annotations

from collections.abc import Iterable

from imageworks_core.errors import CapabilityError, UnknownModelError
from imageworks_core.registry import filter_entries
from imageworks_core.schema import ROLE_CAPABILITIES
from imageworks_core.selection import role_requirements

from .registry import service
from .service import our_capabilities

__all__ = ["DEFAULT_ROLE_CAPABILITIES", "list_models_for_role", "select_by_role"]

DEFAULT_ROLE_CAPABILITIES: dict[str, list[str]] = {role: list(caps) for role, caps in ROLE_CAPABILITIES.items()}
"""Capabilities each role requires by default (a copy of :data:`imageworks_core.schema.ROLE_CAPABILITIES`)."""


def list_models_for_role(role: str) -> list[str]:
    """Logical names of the usable entries with ``role`` (not deprecated, not testing, in the active profile),
    sorted by name."""
    svc = service()
    entries = filter_entries(svc.registry, role=role, profile=svc.settings.profile)
    return sorted(entry.name for entry in entries)


def select_by_role(
    role: str,
    *,
    require_capabilities: list[str] | None = None,
    preferred: Iterable[str] | None = None,
) -> str:
    """The logical name to use for ``role``; CapabilityError when no usable entry has the role and the
    capabilities (the role's own and ``require_capabilities``)."""
    required = our_capabilities(require_capabilities)
    try:
        return service().select(role=role, require_capabilities=required, preferred=list(preferred or ())).name
    except UnknownModelError as exc:
        wanted = role_requirements(role, required)
        raise CapabilityError(f"No model found for role {role!r} meeting capabilities {wanted}: {exc}") from exc
