"""ImageWorks Model Loader core: layered registry, verification, single-port runtime, probe, downloader, API.

The public surface is re-exported here lazily (PEP 562), so light entry points do not pay for pydantic and the
registry at start-up.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS: dict[str, str] = {
    "BackendError": "errors",
    "CapabilityError": "errors",
    "FilteredModelError": "errors",
    "HashDriftError": "errors",
    "ImageWorksError": "errors",
    "LockViolationError": "errors",
    "ProbeError": "errors",
    "RegistryError": "errors",
    "UnknownModelError": "errors",
    "UsageError": "errors",
    "ValidationError": "errors",
    "WeightsError": "errors",
    "Registry": "registry",
    "load_registry": "registry",
    "ModelEntry": "schema",
    "Selection": "selection",
    "select_model": "selection",
    "Settings": "settings",
    "get_settings": "settings",
    "VerifyResult": "verification",
    "verify_entry": "verification",
    "lock_entry": "verification",
    "unlock_entry": "verification",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'imageworks_core' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
