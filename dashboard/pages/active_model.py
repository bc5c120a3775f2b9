"""Models → Active Model: the single-port backend's status, start / switch / stop / cancel, GPUs, host, history, log.

In fleet mode (``IMAGEWORKS_RAY_ADDRESS`` set for the dashboard) the page shows the fleet instead: nodes (GPUs,
per-GPU memory, slots / max_models) and slots (node, GPUs, port, model, status, uptime) with Stop per slot, and a
Start with an entry, an optional node and GPU count (``dashboard_data.fleet``), refreshed by its own fragment.

Every control and banner derives from the current state (``dashboard_data.active.active_view``: the state file,
the activation in progress, health), re-read each second by the live fragment; when it changes, the whole page
re-renders, so a page left open follows the CLI, the API and other operators. A start runs in the background
(the runtime's, one per root), so the page stays live while a backend loads, and Cancel stops it.
"""

from __future__ import annotations

import streamlit as st
import ui

from imageworks_core import dashboard_data as dd
from imageworks_core.dashboard_data import active, fleet
from imageworks_core.settings import Settings

SIGNATURE_KEY = "active_signature"
FLEET_SIGNATURE_KEY = "fleet_signature"
FLEET_MESSAGE_KEY = "fleet_message"


# Live panels ----------------------------------------------------------------------------------------------------
def gpu_panel() -> None:
    cards, message = dd.gpu_cards()
    if message:
        st.info(message, icon=":material/memory:")
        return
    for column, card in zip(st.columns(min(len(cards), 4)), cards, strict=False):
        with column.container(border=True):
            st.markdown(f"**GPU {card['index']}: {card['name']}**")
            st.progress(min(card["memory_fraction"], 1.0), text=f"Memory {card['memory']}")
            util = "—" if card["utilization"] is None else f"{card['utilization']} %"
            temp = "—" if card["temperature"] is None else f"{card['temperature']} °C"
            st.caption(f"Utilisation {util} · Temperature {temp}")


def host_panel() -> None:
    stats = dd.system_stats()
    ram, cpu, load = st.columns(3)
    ram.metric("Host RAM", stats["ram"], f"{stats['ram_percent']:.0f} % used", delta_color="off")
    cpu.metric("CPU", f"{stats['cpu_percent']:.0f} %", f"{stats['cpus']} cores", delta_color="off")
    load.metric("Load average", stats["load"])


def banner(view: active.ActiveView) -> None:
    """The one banner the state calls for."""
    status = view.status
    if view.phase == "error":
        st.error(f"**Reading the active model failed:** {view.error}")
    elif view.phase == "starting":
        progress = view.progress
        if progress is not None:
            detail = f" — {progress.detail}" if progress.detail else ""
            who = f" (started by {progress.activated_by})" if progress.activated_by else ""
            st.info(
                f"**Starting {progress.name}**{who} · {progress.elapsed_s:.0f} s · {progress.phase}{detail}", icon="⏳"
            )
        else:
            st.info(f"**Starting {view.name}**", icon="⏳")
    elif view.phase == "failed" and status is not None:
        st.error(f"**Starting {status.name} failed:** {status.error or 'see the log below'}")
        if status.log_tail:
            st.code(
                "\n".join([f"--- last {len(status.log_tail)} lines of {status.log_path} ---", *status.log_tail]),
                language=None,
            )
    elif view.phase == "stale" and status is not None:
        st.warning(f"The recorded backend was stale and has been cleaned up: {status.stale_reason}")
    elif view.phase == "unhealthy" and status is not None:
        st.warning(f"The backend does not answer its health check: {status.health_detail}")
    elif view.phase == "ready" and status is not None:
        ready = ""
        if status.ready_at is not None:
            ready = f" in {(status.ready_at - status.started_at).total_seconds():.1f} s"
        st.success(f"{status.name} is ready at `{status.base_url}`{ready}.")
    outcome = view.outcome
    if outcome is not None and outcome.error and view.phase in ("idle", "ready", "unhealthy"):
        # A refusal (lock violation, GPU fit, port held) changes no state: only this outcome says it.
        st.error(f"**Starting {outcome.name} failed:** {outcome.error}")


def status_panel(settings: Settings, view: active.ActiveView) -> None:
    """Current model, status, uptime, health; banner; GPU cards; host figures; log tail."""
    status = view.status
    shown = dd.status_view(status if view.phase != "stale" else None)
    model, state, uptime, health = st.columns([2, 1, 1, 1])
    model.metric("Active model", view.name or "none")
    state.metric("Status", view.status_text)
    uptime.metric("Uptime", shown["uptime"] or "—")
    health.metric("Health", view.health_text)
    banner(view)
    if status is not None and view.phase != "stale":
        st.markdown(f"**Endpoint:** `{shown['endpoint']}` · pid {shown['pid'] or '—'}")
    elif view.phase == "idle":
        st.caption("No model is active on the single port. Pick one below and start it.")
    gpu_panel()
    host_panel()
    log_name = view.name
    if log_name:
        with st.expander(f"Backend log: {log_name}", expanded=view.phase in ("starting", "failed")):
            show_polls = st.toggle("Show health checks", key="active_show_polls")
            lines = active.log_lines(settings, log_name, show_polls=show_polls)
            st.code("\n".join(lines) or "(empty)", language=None)
            hidden = 0 if show_polls else active.hidden_polls(settings, log_name)
            if hidden:
                st.caption(f"{dd.count_text(hidden, 'health-check line')} hidden")


@st.fragment(run_every=active.REFRESH_S)
def live_status(settings: Settings) -> None:
    view = active.active_view(settings)
    if view.signature != st.session_state.get(SIGNATURE_KEY):
        st.rerun(scope="app")  # the controls must change too
    status_panel(settings, view)
    if view.can_cancel:
        st.button("Cancel start", icon=":material/cancel:", key="active_cancel", on_click=_cancel, args=(settings,))


# Start / switch / stop / cancel -------------------------------------------------------------------------------
def _ask(action: str, current: str | None) -> None:
    # The widgets' current values, not those of the last render: a click may come with other changes.
    name = current if action == "stop" else st.session_state.get("active_model_target")
    st.session_state["active_confirm"] = (action, name, bool(st.session_state.get("active_force")))


def _close_confirm() -> None:
    st.session_state.pop("active_confirm", None)


def _stop(settings: Settings, reason: str) -> None:
    try:
        result = dd.service_for(settings).stop(reason=reason)
    except Exception as exc:  # shown as an error, never a traceback
        st.session_state["active_error"] = ("Stopping", exc)
        return
    if result is None:
        ui.flash("info", "Nothing was running.")
    elif result.cancelled_only:
        ui.flash("info", f"Cancelled the start of {result.cancelled} ({result.stop_s:.1f} s).")
    else:
        warnings = "\n".join(result.warnings or []) or None
        ui.flash("success", f"Stopped {result.name} in {result.stop_s:.1f} s ({result.signal or 'already gone'}).")
        if warnings:
            st.session_state["active_stop_warnings"] = warnings


def _cancel(settings: Settings) -> None:
    _stop(settings, "start cancelled from the dashboard")


def confirm_action(settings: Settings, action: str, name: str | None, force: bool) -> None:
    """The confirmation's body: what will happen, then Confirm / Cancel (Confirm acts, then the page re-reads)."""
    view = active.active_view(settings)
    current = view.occupant
    if action == "stop":
        st.markdown(
            f"Stop **{view.name or 'the active backend'}**? Requests to the single port fail until a model is started."
        )
    elif current and current != name:
        st.markdown(f"Switch from **{current}** to **{name}**? {current} is stopped first.")
    else:
        st.markdown(f"Start **{name}** on the single port?")
    if force and action != "stop":
        st.warning("Force: a locked entry whose weights drifted starts anyway; the lock violation is audit-logged.")
    left, right = st.columns(2)
    if left.button("Confirm", type="primary", key="active_confirm_ok"):
        _close_confirm()
        if action == "stop":
            _stop(settings, "stopped from the dashboard")
        else:
            try:
                dd.service_for(settings).start_activation(str(name), force=force)
            except Exception as exc:  # already starting: shown as an error
                st.session_state["active_error"] = (f"Starting {name}", exc)
        st.rerun()
    if right.button("Cancel", key="active_confirm_cancel"):
        _close_confirm()
        st.rerun()


@st.dialog("Confirm", on_dismiss=_close_confirm)
def confirm_dialog(settings: Settings, action: str, name: str | None, force: bool) -> None:
    confirm_action(settings, action, name, force)


def controls(names: list[str] | None, view: active.ActiveView) -> None:
    """Model picker, Start / Switch and Stop, enabled as the current state allows (Stop works even when the
    registry cannot be read: ``names`` None)."""
    current = view.occupant
    target = None
    if names:
        default = names.index(current) if current in names else 0
        target = st.selectbox("Model to run on the single port", names, index=default, key="active_model_target")
        st.checkbox(
            "Force (start a locked entry even if its weights drifted; recorded as a lock violation)",
            key="active_force",
        )
    elif names is None:
        st.info("No model can be started while the registry cannot be read (problems above); Stop still works.")
    else:
        st.info("No process-backed entry (vllm / lmdeploy) to start: remote entries need no activation.")
    left, right, _ = st.columns([1, 1, 4])
    if target is not None:
        left.button(
            "Switch" if current and current != target else "Start",
            type="primary",
            icon=":material/play_arrow:",
            disabled=not view.can_start or current == target,
            on_click=_ask,
            args=("start", current),
        )
    right.button("Stop", icon=":material/stop:", disabled=not view.can_stop, on_click=_ask, args=("stop", view.name))


# Fleet mode ------------------------------------------------------------------------------------------------------
def _stop_slot(settings: Settings, slot_id: str) -> None:
    try:
        st.session_state[FLEET_MESSAGE_KEY] = fleet.Notice.of("success", fleet.stop_slot(settings, slot_id))
    except Exception as exc:  # shown as an error, never a traceback
        st.session_state[FLEET_MESSAGE_KEY] = fleet.Notice.of("error", exc)


def _start_in_fleet(settings: Settings) -> None:
    name = st.session_state.get("fleet_model_target")
    gpus = st.session_state.get("fleet_gpus")
    try:
        fleet.start_in_fleet(
            settings,
            str(name),
            node=st.session_state.get("fleet_node_target"),
            gpus=None if gpus is None else int(gpus),
        )
    except Exception as exc:  # already starting, or the cluster cannot be reached
        st.session_state[FLEET_MESSAGE_KEY] = fleet.Notice.of("error", exc)


def fleet_controls(settings: Settings, names: list[str] | None, view: fleet.FleetView) -> None:
    """Entry picker, node picker and GPU count, and Start (in the background: the live view shows its phase)."""
    if names is None:
        st.info("No model can be started while the registry cannot be read (problems above); Stop still works.")
        return
    if not names:
        st.info("No process-backed entry (vllm / lmdeploy) to start: remote entries need no activation.")
        return
    model, node, gpus = st.columns([3, 2, 1])
    model.selectbox("Model to start in the fleet", names, key="fleet_model_target")
    node.selectbox("Node", [fleet.ANY_NODE, *view.alive_nodes], key="fleet_node_target")
    gpus.number_input("GPUs", min_value=0, step=1, value=None, placeholder="as launched", key="fleet_gpus")
    st.button(
        "Start",
        type="primary",
        icon=":material/play_arrow:",
        disabled=view.error is not None,
        on_click=_start_in_fleet,
        args=(settings,),
        key="fleet_start",
    )


def slot_table(settings: Settings, view: fleet.FleetView) -> None:
    """One row per slot, each with its Stop (Forget for a lost slot)."""
    slots = view.slots
    if not slots:
        st.caption("No model runs in the fleet. Pick one above and start it.")
        return
    widths = [2, 1, 1, 1, 2, 3, 1.5, 1.5]
    for column, title in zip(st.columns(widths), [*fleet.slot_row(slots[0]), ""], strict=True):
        column.markdown(f"**{title}**")
    for slot in slots:
        with st.container(key=f"fleet_slot_{slot.slot_id}"):
            columns = st.columns(widths, vertical_alignment="center")
            for column, value in zip(columns, fleet.slot_row(slot).values(), strict=False):
                column.write(value)
            columns[-1].button(
                fleet.slot_action(slot),
                key=f"fleet_stop_{slot.slot_id}",
                on_click=_stop_slot,
                args=(settings, slot.slot_id),
            )


@st.fragment(run_every=fleet.FLEET_REFRESH_S)
def live_fleet(settings: Settings) -> None:
    view = fleet.fleet_view(settings)
    if view.signature != st.session_state.get(FLEET_SIGNATURE_KEY):
        st.rerun(scope="app")  # the node picker must change too
    notice = st.session_state.get(FLEET_MESSAGE_KEY)
    if notice is not None and notice.showing:  # kept for a while: a rerun in between must not swallow it
        if notice.kind == "error":
            ui.show_error(notice.body, "Fleet action")
        else:
            st.success(notice.body)
    for start in fleet.fleet_starts(settings):
        if start.running:
            st.info(start.text(), icon="⏳")
        elif start.error is not None:
            st.error(start.text())
            if start.error_detail:
                st.code("\n".join(start.error_detail), language=None)
        else:
            st.success(start.text())
    if view.error is not None:
        st.error(f"**The fleet cannot be read:** {view.error}")
        return
    st.subheader("Nodes")
    st.table(fleet.node_rows(view.nodes))
    st.subheader("Slots")
    slot_table(settings, view)


def fleet_page(settings: Settings) -> None:
    """Fleet mode: the nodes and slots of the Ray cluster with start and stop per slot (the single port is not
    used: the API routes each model to the slot serving it)."""
    registry = ui.registry(settings, required=False)
    view = fleet.fleet_view(settings)
    st.session_state[FLEET_SIGNATURE_KEY] = view.signature
    st.caption(f"Fleet mode: Ray cluster at `{view.address}`. Each model runs in a slot (node + GPUs + port).")
    fleet_controls(settings, dd.process_entries(registry) if registry is not None else None, view)
    st.divider()
    live_fleet(settings)


def single_port_page(settings: Settings) -> None:
    registry = ui.registry(settings, required=False)
    snapshot = active.active_view(settings)
    st.session_state[SIGNATURE_KEY] = snapshot.signature
    controls(dd.process_entries(registry) if registry is not None else None, snapshot)
    ui.show_flash()
    if st.session_state.get("active_stop_warnings"):
        st.warning(st.session_state.pop("active_stop_warnings"))
    if st.session_state.get("active_error") is not None:
        action, error = st.session_state.pop("active_error")
        ui.show_error(error, action)
    st.divider()
    live_status(settings)
    st.subheader("Activation history")
    history_frame = dd.activation_frame(settings)
    if history_frame.empty:
        st.caption("No activations recorded yet.")
    else:
        st.dataframe(history_frame, hide_index=True, width="stretch")
    if st.session_state.get("active_confirm"):
        confirm_dialog(settings, *st.session_state["active_confirm"])


settings = ui.settings()
st.title("Active Model")
if fleet.fleet_address(settings) is None:
    single_port_page(settings)
else:
    fleet_page(settings)
