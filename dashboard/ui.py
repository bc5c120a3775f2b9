"""Page scaffolding shared by the dashboard pages: settings, the registry with its last-good banner, errors, flashes.

Layout only; every value comes from ``imageworks_core`` (``dashboard_data`` and the modules the CLI uses).
"""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

from imageworks_core import dashboard_data as dd
from imageworks_core.registry import Registry
from imageworks_core.settings import Settings, get_settings

REGISTRY_FIX = (
    "Fix each problem listed (it names the file and the line and column, or the entry and field), or undo the "
    "last edit: Registry → **History** → roll back (or `imageworks-models rollback REV`); then press "
    "Settings → Backends → **Reload registry**."
)


def problem_list(lines: list[str]) -> str:
    """The registry's problems as a markdown list (each line names its file and line:col or entry and field)."""
    return "\n".join(f"- {line}" for line in lines)


def settings() -> Settings:
    """The deployment's settings (root from ``IMAGEWORKS_ROOT``, read on every run)."""
    return get_settings()


def registry(settings: Settings, *, force: bool = False, required: bool = True) -> Registry | None:
    """The registry to show. When the files are invalid: the last good registry under a warning banner, or
    (without one) every problem in an error and, when ``required``, the page stops there. A warning also names
    an active model that is no longer in the registry, with the fix."""
    view = dd.load_registry_view(settings, force=force)
    if view.error is not None and view.registry is not None:
        loaded = time.strftime("%H:%M:%S", time.localtime(view.loaded_at))
        problems = view.error.lines()
        st.warning(
            f"**The registry files are invalid** ({dd.count_text(len(problems), 'problem')}); showing the last good "
            f"registry, loaded at {loaded}.\n\n{problem_list(problems)}\n\n{REGISTRY_FIX}",
            icon="⚠️",
        )
    elif view.error is not None:
        st.error(f"**Registry failed to load:**\n\n{problem_list(view.error.lines())}\n\n{REGISTRY_FIX}")
        if required:
            st.stop()
    # Every page shows the registry through here: the banner for an active model that left it goes with it.
    active_gone = dd.active_model_gone(settings, view.registry)
    if active_gone:
        st.warning(active_gone, icon=":material/link_off:")
    return view.registry


def show_error(exc: BaseException, action: str) -> None:
    """An error as a readable ``st.error`` (the core's messages name the fault and the fix), never a traceback.

    Multi-line details (every registry problem, a backend's last log lines) follow in a code block.
    """
    lines = dd.error_lines(exc)
    first, *rest = "\n".join(lines).split("\n")
    st.error(f"**{action} failed:** {first}")
    if rest:
        st.code("\n".join(rest), language=None)


def flash(kind: str, message: str, detail: str | None = None) -> None:
    """Keep a message for the next run (shown by :func:`show_flash`), for actions followed by ``st.rerun()``."""
    st.session_state["flash"] = (kind, message, detail)


def show_flash() -> None:
    """Show and forget the pending flash message."""
    pending: Any = st.session_state.pop("flash", None)
    if not pending:
        return
    kind, message, detail = pending
    {"success": st.success, "info": st.info, "warning": st.warning, "error": st.error}[kind](message)
    if detail:
        st.code(detail, language="diff")
