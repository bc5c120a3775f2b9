"""ImageWorks Model Loader core: layered registry, verification, single-port runtime, probe, downloader, API.

The public surface is re-exported here; modules with a leading underscore and names with one are private.
"""

from .errors import (
    BackendError,
    CapabilityError,
    FilteredModelError,
    HashDriftError,
    ImageWorksError,
    LockViolationError,
    ProbeError,
    RegistryError,
    UnknownModelError,
    UsageError,
    ValidationError,
    WeightsError,
)
from .registry import Registry, load_registry
from .schema import ModelEntry
from .selection import Selection, select_model
from .settings import Settings, get_settings

__all__ = [
    "BackendError",
    "CapabilityError",
    "FilteredModelError",
    "HashDriftError",
    "ImageWorksError",
    "LockViolationError",
    "ModelEntry",
    "ProbeError",
    "Registry",
    "RegistryError",
    "Selection",
    "Settings",
    "UnknownModelError",
    "UsageError",
    "ValidationError",
    "WeightsError",
    "get_settings",
    "load_registry",
    "select_model",
]
