"""Data shaping for the dashboard: every value a page shows, computed from the core without Streamlit.

The pages under ``dashboard/`` hold layout only; what they display (the registry table, badges, the curated diff
an edit would write, import candidates, backend targets, progress text, …) comes from these functions, which take
settings and core objects and return plain data or DataFrames, so tests call them directly.

One module per concern: ``registry_view`` (the Registry table, badges, entry detail), ``edits`` (edit and import
previews, revisions), ``runs`` (verification, activation and probe views), ``settings_view`` (paths, environment,
backend targets, audit log) and ``host`` (GPU and system panels).
"""

from __future__ import annotations

from .edits import (
    CuratedPreview,
    ImportCandidate,
    capability_changes,
    import_candidates,
    import_changes,
    metadata_changes,
    metadata_defaults,
    preview_curated_change,
    revision_rows,
    save_curated_change,
    suggest_name,
)
from .host import (
    gpu_cards,
    system_stats,
)
from .registry_view import (
    CAPABILITY_ICONS,
    REGISTRY_COLUMNS,
    RegistryView,
    age_text,
    badge_markdown,
    capability_icons,
    duration_text,
    field_rows,
    filter_options,
    launch_argv,
    load_registry_view,
    probe_text,
    registry_frame,
    service_for,
    verification_text,
)
from .runs import (
    activation_frame,
    drift_tables,
    entry_history,
    error_lines,
    probe_frame,
    probe_view,
    process_entries,
    status_view,
    verify_progress,
    verify_summary,
    vision_entries,
)
from .settings_view import (
    AUDIT_EVENTS,
    BackendTarget,
    ConnectionResult,
    audit_frame,
    backend_targets,
    check_connection,
    env_rows,
    path_rows,
)

__all__ = [
    "AUDIT_EVENTS",
    "BackendTarget",
    "CAPABILITY_ICONS",
    "ConnectionResult",
    "CuratedPreview",
    "ImportCandidate",
    "REGISTRY_COLUMNS",
    "RegistryView",
    "activation_frame",
    "age_text",
    "audit_frame",
    "backend_targets",
    "badge_markdown",
    "capability_changes",
    "capability_icons",
    "check_connection",
    "drift_tables",
    "duration_text",
    "entry_history",
    "env_rows",
    "error_lines",
    "field_rows",
    "filter_options",
    "gpu_cards",
    "import_candidates",
    "import_changes",
    "launch_argv",
    "load_registry_view",
    "metadata_changes",
    "metadata_defaults",
    "path_rows",
    "preview_curated_change",
    "probe_frame",
    "probe_text",
    "probe_view",
    "process_entries",
    "registry_frame",
    "revision_rows",
    "save_curated_change",
    "service_for",
    "status_view",
    "suggest_name",
    "system_stats",
    "verification_text",
    "verify_progress",
    "verify_summary",
    "vision_entries",
]
