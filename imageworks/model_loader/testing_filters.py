"""``imageworks.model_loader.testing_filters``: is this a test model?

An entry is a test model when its ``testing`` flag is set (what selection and listings use) or when older
ImageWorks would have called it one: its name follows the test-model naming convention, matches a pattern
in ``IMAGEWORKS_TEST_MODEL_PATTERNS``, or its ``metadata.testing`` is true. The convention lives in
:func:`imageworks_core.legacy.legacy_testing_reason`, which ``import-legacy`` also uses to set ``testing`` on
such entries, so an imported registry and this function agree.
"""

from __future__ import annotations

from imageworks_core.legacy import legacy_testing_reason
from imageworks_core.schema import ModelEntry
from imageworks_core.settings import get_settings

from .models import RegistryEntry

__all__ = ["is_testing_entry", "is_testing_name"]


def is_testing_name(name: str) -> bool:
    """Whether older ImageWorks treated ``name`` as a test model by its name alone."""
    return legacy_testing_reason(name, None, get_settings()) is not None


def is_testing_entry(name: str, entry: RegistryEntry | ModelEntry | None) -> bool:
    """Whether ``entry`` (named ``name``) is a test model: its testing flag, or the legacy convention."""
    testing = bool(entry.testing) if entry is not None else False
    metadata = entry.metadata if entry is not None else None
    return testing or legacy_testing_reason(name, metadata, get_settings()) is not None
