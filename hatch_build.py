"""Build hook: the wheel ships the Streamlit app ``dashboard/`` as the ``imageworks_dashboard/`` folder.

Only the standard wheel: an editable install runs the app from the checkout's ``dashboard/`` (where
``imageworks_core.dashboard_launcher`` looks when the core itself is the checkout's), so copying it there would
leave a stale snapshot in the environment. ``force-include`` in ``pyproject.toml`` cannot make that distinction.
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class DashboardInWheel(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"]["dashboard"] = "imageworks_dashboard"
