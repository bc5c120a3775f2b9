"""``imageworks.model_loader.service``: ``select_model`` and ``CapabilityError`` of older ImageWorks.

``select_model(name, require_capabilities=[...])`` resolves a logical name (an alias or served id works too)
through :meth:`imageworks_core.service.ImageWorks.select` and answers in the older shape
(:class:`~imageworks.model_loader.models.SelectedModel`). As before, naming a model selects it even when it is
deprecated or testing; what the service adds: a vllm / lmdeploy entry's endpoint is the single port, legacy
capability names are understood (``vl``, ``embedding``, ``thinking``, ...), and a locked entry whose last
verification drifted is refused (``LockViolationError``, exit 2).
"""

from __future__ import annotations

from collections.abc import Iterable

from imageworks_core.errors import CapabilityError, UnknownModelError
from imageworks_core.legacy import capability_for

from .models import SelectedModel
from .registry import get_entry, load_registry, service

__all__ = ["CapabilityError", "SelectedModel", "load_registry", "select_model"]


def our_capabilities(names: Iterable[str] | None) -> list[str]:
    """Legacy capability names as ours (``embedding`` -> embeddings); an unknown name passes through, so the
    selection's CapabilityError names it."""
    return [capability_for(name) or name.strip() for name in names or () if name and name.strip()]


def select_model(name: str, *, require_capabilities: list[str] | None = None) -> SelectedModel:
    """Where to send requests for ``name``: KeyError when it is unknown, CapabilityError when it lacks a
    required capability."""
    try:
        selection = service().select(
            name=name, require_capabilities=our_capabilities(require_capabilities), allow_hidden=True
        )
    except UnknownModelError as exc:
        raise KeyError(f"Model '{name}' not found in registry ({exc})") from exc
    entry = get_entry(selection.name)
    return SelectedModel(
        logical_name=selection.name,
        endpoint_url=selection.endpoint,
        internal_model_id=selection.served_model_id,
        backend=entry.backend,
        capabilities=entry.capabilities,
    )
