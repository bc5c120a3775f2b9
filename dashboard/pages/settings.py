"""Settings: resolved paths, environment settings with their source, Backends (Test connection, Reload registry),
and the audit log."""

from __future__ import annotations

import pandas as pd
import streamlit as st
import ui

from imageworks_core import dashboard_data as dd
from imageworks_core.registry import Registry
from imageworks_core.settings import Settings


def _request_reload() -> None:
    st.session_state["reload_requested"] = True


def _test(index: int, target: dd.BackendTarget) -> None:
    st.session_state[f"connection:{index}"] = dd.check_connection(
        target.endpoint, key_env=target.api_key_env, remote=target.remote
    )


def backends_tab(settings: Settings, registry: Registry | None, reloaded: dd.RegistryView | None) -> None:
    st.button(
        "Reload registry",
        type="primary",
        icon=":material/refresh:",
        on_click=_request_reload,
        help="Force-reload both registry files (the same as `load_registry(force=True)`).",
    )
    if reloaded is not None:
        if reloaded.error is None and reloaded.registry is not None:
            st.success(f"Registry reloaded: {dd.count_text(len(reloaded.registry), 'entry', 'entries')}, valid.")
        elif reloaded.error is not None:
            problems = reloaded.error.lines()
            st.error(
                f"**Registry reload failed — {dd.count_text(len(problems), 'problem')}:**\n\n"
                f"{ui.problem_list(problems)}\n\n{ui.REGISTRY_FIX}"
            )
    if registry is None:
        return
    st.markdown("**Backends the registry points at**")
    for index, target in enumerate(dd.backend_targets(registry, settings)):
        with st.container(border=True):
            info, action = st.columns([5, 1], vertical_alignment="center")
            key = f" · key from `${target.api_key_env}`" if target.api_key_env else ""
            info.markdown(f"`{target.endpoint}` · {target.kind}{key}  \n{', '.join(target.entries)}")
            action.button(
                "Test connection",
                key=f"test:{index}",
                on_click=_test,
                args=(index, target),
            )
            result = st.session_state.get(f"connection:{index}")
            if result is not None:
                (st.success if result.ok else st.error)(result.message)
                if result.models:
                    st.caption("Models served: " + ", ".join(result.models))


def audit_tab(settings: Settings) -> None:
    choice, limit_col = st.columns([3, 1])
    event = choice.selectbox("Event", ["All", *dd.AUDIT_EVENTS], key="audit_event")
    limit = limit_col.number_input("Newest", min_value=10, max_value=5000, value=200, step=50, key="audit_limit")
    frame = dd.audit_frame(settings, None if event == "All" else event, int(limit))
    if frame.empty:
        st.caption(f"No {'' if event == 'All' else event + ' '}events in {settings.audit_log_path}.")
        return
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        column_config={
            "time": st.column_config.TextColumn("time", width="medium"),
            "details": st.column_config.JsonColumn("details", help="Click a cell to expand every field"),
        },
    )
    st.caption(f"{dd.count_text(len(frame), 'event')}, newest first; click a details cell to expand it.")


settings = ui.settings()
st.title("Settings")
reload_requested = bool(st.session_state.pop("reload_requested", False))
reloaded = dd.load_registry_view(settings, force=True) if reload_requested else None
registry = ui.registry(settings, required=False)
# Stateful tabs: the open tab survives reruns (Reload registry keeps Backends open); ?settings_tab=Backends links it.
paths_tab, env_tab, backends, audit = st.tabs(
    ["Paths", "Environment", "Backends", "Audit log"], key="settings_tab", bind="query-params"
)
if paths_tab.open:
    with paths_tab:
        st.dataframe(pd.DataFrame(dd.path_rows(settings)), hide_index=True, width="stretch")
if env_tab.open:
    with env_tab:
        served_port = int(st.get_option("server.port"))
        st.caption(
            "Environment settings as this run reads them; 'default' means the variable is unset. This dashboard "
            f"serves on port **{served_port}** (the IMAGEWORKS_DASHBOARD_PORT row shows it)."
        )
        rows = dd.env_rows(settings, served_port=served_port)
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
if backends.open:
    with backends:
        backends_tab(settings, registry, reloaded)
if audit.open:
    with audit:
        audit_tab(settings)
