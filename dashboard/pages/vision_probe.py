"""Models → Vision Probe: prove that a model really sees (the same probe as `imageworks-models probe-vision`)."""

from __future__ import annotations

import jobs
import streamlit as st
import ui

from imageworks_core import dashboard_data as dd
from imageworks_core import probe
from imageworks_core.errors import ProbeError
from imageworks_core.settings import Settings

JOB_KEY = "probe"
CANONICAL = "Canonical probe image (red circle and the digits 42)"
UPLOAD = "Upload an image"
IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"]
ACTIVATE = "Activate the model first if it is not the active backend"


def _probe_work(
    settings: Settings, name: str, image: bytes | None, image_name: str | None, activate: bool
) -> jobs.Work:
    return lambda report: dd.service_for(settings).probe(
        name, image_bytes=image, image_name=image_name, activate=activate
    )


def _start_probe(settings: Settings) -> None:
    # Read the widgets' current values (not those of the last render): a click may come with other changes.
    name = st.session_state["probe_model"]
    activate = bool(st.session_state.get("probe_activate"))
    upload = st.session_state.get("probe_upload") if st.session_state.get("probe_source") == UPLOAD else None
    data = upload.getvalue() if upload is not None else None
    image_name = upload.name if upload is not None else None
    jobs.start(JOB_KEY, f"Probing {name}", _probe_work(settings, name, data, image_name, activate))


def _open_result() -> None:
    st.session_state["probe_dialog"] = True


def _close_result() -> None:
    st.session_state.pop("probe_dialog", None)


def probe_result(result: dict) -> None:
    """The modal's body: vision_ok, grounded, answer, reasoning, latency (as the CLI prints them)."""
    view = dd.probe_view(result)
    ok, grounded, latency = st.columns(3)
    icon = ":green[:material/check_circle:]" if view["vision_ok"] else ":red[:material/cancel:]"
    ok.markdown(f"{icon} `vision_ok: {str(view['vision_ok']).lower()}`")
    grounded.markdown(f"`grounded: {view['grounded_text']}`")
    latency.markdown(f"`latency: {view['latency'] or '—'}`")
    if view["error"]:
        st.error(view["error"])
    if view["matched"]:
        st.caption(f"Matched: {', '.join(view['matched'])}")
    st.markdown("**Answer**")
    st.text(view["answer"] or "(empty)")
    st.markdown("**Reasoning**")
    st.text(view["reasoning"] or "(none reported)")
    st.caption(
        f"model `{view['model']}` · endpoint `{view['endpoint']}` · image {view['image']} · "
        f"prompt tokens {view['prompt_tokens'] if view['prompt_tokens'] is not None else '—'}"
    )
    if st.button("Done", key="probe_close"):
        _close_result()
        st.rerun()


@st.dialog("Vision probe result", width="large", on_dismiss=_close_result)
def result_dialog(result: dict) -> None:
    probe_result(result)


def render_probe_progress(job: jobs.Job) -> None:
    st.info(f"**{job.label}** · {job.elapsed:.1f} s (activating the model first can take a while)", icon="⏳")


settings = ui.settings()
st.title("Vision Probe")
registry = ui.registry(settings)
include_text_only = st.toggle(
    "Include text-only entries",
    key="probe_text_only",
    help="A text-only model must fail the probe: run one to see what a failure looks like.",
)
names = dd.probe_entries(registry, include_text_only=include_text_only)
if not names:
    st.info("No entry declares the vision capability. Edit an entry's capabilities on the Registry page.")
    st.stop()
picker, target_col = st.columns([3, 2], vertical_alignment="bottom")
label = "Model (every entry with a backend)" if include_text_only else "Model (entries declaring vision)"
name = picker.selectbox(label, names, key="probe_model")
target = dd.probe_target(settings, registry, name)
target_col.markdown(
    f":{'green' if target.ready else 'orange'}-badge[{target.label}] {target.detail}"
    + (f" · tick **{ACTIVATE}** below" if target.activate else "")
)
source = st.radio("Image", [CANONICAL, UPLOAD], horizontal=True, key="probe_source")
left, right = st.columns([2, 1])
with left:
    image_bytes: bytes | None = None
    if source == UPLOAD:
        upload = st.file_uploader(
            "Image file (validated before sending; max 20 MiB)", type=IMAGE_TYPES, key="probe_upload"
        )
        image_bytes = upload.getvalue() if upload is not None else None
    else:
        image_bytes = probe.canonical_image_bytes()
    st.checkbox(
        ACTIVATE,
        key="probe_activate",
        help="Process-backed entries must be active on the single port; remote entries are probed at their URL.",
    )
    st.button(
        "Run probe",
        type="primary",
        icon=":material/visibility:",
        disabled=jobs.busy() or image_bytes is None,
        on_click=_start_probe,
        args=(settings,),
    )
with right:
    if image_bytes is not None:
        try:
            st.image(image_bytes, caption="Preview", width=260)
        except Exception:  # an invalid upload is reported by the probe itself, with the reason
            st.caption("No preview: this file is not an image Pillow can open.")
finished = jobs.wait(JOB_KEY, render_probe_progress)
if finished is not None:
    if finished.error is not None:
        st.session_state["probe_error"] = finished.error
        st.session_state.pop("probe_last", None)
    else:
        st.session_state["probe_last"] = finished.result.to_dict()
        st.session_state.pop("probe_error", None)
        st.session_state["probe_dialog"] = True
    st.rerun()
probe_error = st.session_state.get("probe_error")
if isinstance(probe_error, ProbeError) and probe_error.inactive:
    st.error(f"**Vision probe failed:** {dd.inactive_probe_message(probe_error, ACTIVATE)}")
elif probe_error is not None:
    ui.show_error(probe_error, "Vision probe")
elif st.session_state.get("probe_last"):
    last = st.session_state["probe_last"]
    verdict = "vision_ok: true" if last.get("vision_ok") else "vision_ok: false"
    st.caption(f"Last run: {last.get('name')} · {verdict} · open the result again:")
    st.button("Show result", on_click=_open_result)
st.subheader(f"Past probe results: {name}")
past = dd.probe_frame(settings, name)
if past.empty:
    st.caption("No probe recorded for this model yet.")
else:
    st.dataframe(past, hide_index=True, width="stretch")
if st.session_state.get("probe_dialog") and st.session_state.get("probe_last"):
    result_dialog(st.session_state["probe_last"])
