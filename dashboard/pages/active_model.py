"""Models → Active Model: the single-port backend's status, start / switch / stop, GPUs, host, history, log."""

from __future__ import annotations

import jobs
import streamlit as st
import ui

from imageworks_core import dashboard_data as dd
from imageworks_core import runtime
from imageworks_core.settings import Settings

REFRESH_S = 3.0
JOB_KEY = "activation"


# Status panel (auto-refreshing fragment) ----------------------------------------------------------------------
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


def status_panel(settings: Settings) -> None:
    """Current model, endpoint, status, uptime, health; GPU cards; host figures; log tail."""
    try:
        status = dd.service_for(settings).current()
    except Exception as exc:  # an unreadable state must not take the page down
        ui.show_error(exc, "Reading the active model")
        status = None
    view = dd.status_view(status)
    model, state, uptime, health = st.columns([2, 1, 1, 1])
    model.metric("Active model", view["name"] or "none")
    state.metric("Status", view["status"])
    uptime.metric("Uptime", view["uptime"] or "—")
    health.metric("Health", {True: "healthy", False: "unhealthy", None: "—"}[view["healthy"]])
    if status is not None:
        st.markdown(f"**Endpoint:** `{view['endpoint']}` · pid {view['pid']}")
        if status.status == "stale":
            st.warning(f"The recorded backend was stale and has been cleaned up: {status.stale_reason}")
        elif status.status == "failed":
            st.error(f"The last activation of {status.name} failed: {status.error or 'see the log below'}")
        elif status.healthy is False:
            st.warning(f"The backend does not answer its health check: {status.health_detail}")
    else:
        st.caption("No model is active on the single port. Pick one below and start it.")
    gpu_panel()
    host_panel()
    log_name = view["name"] or st.session_state.get("activation_target")
    if log_name:
        with st.expander(f"Backend log: {log_name} (last 30 lines)"):
            lines = runtime.tail_backend_log(settings, log_name, lines=30)
            st.code("\n".join(lines) or "(empty)", language=None)


@st.fragment(run_every=REFRESH_S)
def live_status(settings: Settings) -> None:
    status_panel(settings)


# Start / switch / stop ----------------------------------------------------------------------------------------
def _activate_work(settings: Settings, name: str, force: bool) -> jobs.Work:
    return lambda report: dd.service_for(settings).activate(name, force=force, on_progress=report)


def _stop_work(settings: Settings) -> jobs.Work:
    return lambda report: dd.service_for(settings).stop(reason="stopped from the dashboard")


def _ask(action: str, current: str | None) -> None:
    # The widgets' current values, not those of the last render: a click may come with other changes.
    name = current if action == "stop" else st.session_state.get("active_model_target")
    st.session_state["active_confirm"] = (action, name, bool(st.session_state.get("active_force")))


def _close_confirm() -> None:
    st.session_state.pop("active_confirm", None)


def confirm_action(settings: Settings, action: str, name: str | None, force: bool) -> None:
    """The confirmation's body: what will happen, then Confirm / Cancel (Confirm starts the job)."""
    current = active_name(settings)
    if action == "stop":
        st.markdown(
            f"Stop **{current or 'the active backend'}**? Requests to the single port fail until a model is started."
        )
    elif current and current != name:
        st.markdown(f"Switch from **{current}** to **{name}**? {current} is stopped first.")
    else:
        st.markdown(f"Start **{name}** on the single port?")
    if force and action != "stop":
        st.warning("Force: a locked entry whose weights drifted starts anyway; the lock violation is audit-logged.")
    left, right = st.columns(2)
    if left.button("Confirm", type="primary", key="active_confirm_ok"):
        if action == "stop":
            jobs.start(JOB_KEY, "Stopping the backend", _stop_work(settings))
        else:
            st.session_state["activation_target"] = name
            jobs.start(JOB_KEY, f"Starting {name}", _activate_work(settings, str(name), force))
        _close_confirm()
        st.rerun()
    if right.button("Cancel", key="active_confirm_cancel"):
        _close_confirm()
        st.rerun()


@st.dialog("Confirm", on_dismiss=_close_confirm)
def confirm_dialog(settings: Settings, action: str, name: str | None, force: bool) -> None:
    confirm_action(settings, action, name, force)


def render_activation_progress(settings: Settings, job: jobs.Job) -> None:
    """Elapsed time, the runtime's phase and the backend's last log lines while it starts."""
    phase, detail = "", ""
    if job.progress:
        phase = str(job.progress[0])
        detail = str(job.progress[2]) if len(job.progress) > 2 else ""
    st.info(f"**{job.label}** · {job.elapsed:.1f} s · {phase} {('— ' + detail) if detail else ''}", icon="⏳")
    name = st.session_state.get("activation_target")
    if name and job.label.startswith("Starting"):
        lines = runtime.tail_backend_log(settings, name, lines=8)
        if lines:
            st.code("\n".join(lines), language=None)


def render_activation_outcome(job: jobs.Job) -> None:
    if job.error is not None:
        ui.show_error(job.error, job.label)
        return
    result = job.result
    if job.label.startswith("Stopping"):
        if result is None:
            st.info("Nothing was running.")
        else:
            st.success(f"Stopped {result.name} in {result.stop_s:.1f} s ({result.signal or 'already gone'}).")
            for warning in result.warnings or []:
                st.warning(warning)
        return
    ready = ""
    if result.ready_at is not None:
        ready = f" in {(result.ready_at - result.started_at).total_seconds():.1f} s"
    st.success(f"{result.name} is ready at `{result.base_url}`{ready}.")


def active_name(settings: Settings) -> str | None:
    """The model serving (or starting on) the single port, from the state file (no health request)."""
    try:
        status = dd.service_for(settings).current(check_health=False)
    except Exception:  # the status panel shows the error; controls just assume nothing runs
        return None
    return status.name if status is not None and status.status in ("ready", "starting") else None


def controls(names: list[str] | None, current: str | None) -> None:
    """Model picker, Start / Switch and Stop (Stop works even when the registry cannot be read: ``names`` None)."""
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
            disabled=jobs.busy() or current == target,
            on_click=_ask,
            args=("start", current),
        )
    right.button("Stop", icon=":material/stop:", disabled=jobs.busy(), on_click=_ask, args=("stop", current))


settings = ui.settings()
st.title("Active Model")
registry = ui.registry(settings, required=False)
controls(dd.process_entries(registry) if registry is not None else None, active_name(settings))
finished = jobs.wait(JOB_KEY, lambda job: render_activation_progress(settings, job))
if finished is not None:
    st.session_state["active_outcome"] = finished
    st.rerun()  # re-render the controls enabled and the status with the new backend
if st.session_state.get("active_outcome") is not None:
    render_activation_outcome(st.session_state["active_outcome"])
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
