"""Models → Registry: the merged registry table and each entry's detail, Verify Hash, Lock version, Edit metadata;
Import from Download History; registry History with rollback."""

from __future__ import annotations

import json
import typing

import jobs
import pandas as pd
import streamlit as st
import ui

from imageworks_core import dashboard_data as dd
from imageworks_core.download import DEFAULT_LOCATION
from imageworks_core.errors import HashDriftError, ImageWorksError, UsageError
from imageworks_core.hashing import DriftReport
from imageworks_core.registry import Registry, filter_entries
from imageworks_core.schema import CAPABILITY_NAMES, KNOWN_ROLES, Backend, ModelEntry
from imageworks_core.selection import endpoint_for
from imageworks_core.service import EntryStatus
from imageworks_core.settings import Settings
from imageworks_core.units import format_bytes

TABLE_COLUMNS = {
    "name": st.column_config.TextColumn("Name", pinned=True),
    "status": st.column_config.TextColumn(
        "Status",
        width="small",
        help="drift: a locked entry's last verification drifted; missing: download_path does not exist",
    ),
    "lock": st.column_config.TextColumn(
        "Lock", width="small", help="locked; pinned (expected hash kept, lock off); unlocked (no expected hash)"
    ),
    "weights": st.column_config.TextColumn(
        "Weights", width="small", help="present; missing (download_path does not exist); n/a (remote, Ollama)"
    ),
    "last_verification": st.column_config.TextColumn(
        "Last verification", help="ok, drift, or hashed with no lock to compare; and how long ago"
    ),
    "last_probe": st.column_config.TextColumn("Last probe", help="vision_ok or failed; and how long ago"),
    "backend": st.column_config.TextColumn("Backend", width="small"),
    "roles": st.column_config.ListColumn("Roles"),
    "capabilities": st.column_config.ListColumn("Capabilities"),
    "format": st.column_config.TextColumn("Format", width="small"),
    "quantization": st.column_config.TextColumn("Quant", width="small"),
    "size": st.column_config.TextColumn("Size", width="small"),
    "layer": st.column_config.TextColumn("Layer", width="small"),
    "flags": st.column_config.TextColumn("Flags", width="small"),
    "served_id": st.column_config.TextColumn("Served id"),
}


# Verify Hash --------------------------------------------------------------------------------------------------
def _verify_work(settings: Settings, name: str) -> jobs.Work:
    return lambda report: dd.service_for(settings).verify(name, progress=report)


def _lock_work(settings: Settings, name: str) -> jobs.Work:
    return lambda report: dd.service_for(settings).lock(name, set_expected=True, progress=report)


def _accept_work(settings: Settings, name: str, reason: str) -> jobs.Work:
    return lambda report: dd.service_for(settings).accept_new_weights(name, reason=reason, progress=report)


def _expected_hash(entry: ModelEntry) -> str | None:
    return entry.version_lock.expected_aggregate_sha256 if entry.version_lock else None


def render_hash_progress(job: jobs.Job) -> None:
    """Live progress of a verification: bytes, files, MB/s, current file."""
    if job.progress and len(job.progress) >= 4:
        current = str(job.progress[4]) if len(job.progress) > 4 and job.progress[4] else ""
        fraction, text = dd.verify_progress(*job.progress[:4], job.elapsed, current)
    else:
        fraction, text = 0.0, f"listing files… {job.elapsed:.1f} s"
    st.progress(fraction, text=f"{job.label}: {text}")


def render_drift(report: DriftReport) -> None:
    """A drift report: files modified / added / removed, then the unified diff of each changed text file."""
    tables = dd.drift_tables(report)
    for kind in ("modified", "added", "removed"):
        if tables[kind]:
            st.markdown(f"**Files {kind}** ({len(tables[kind])})")
            st.dataframe(pd.DataFrame(tables[kind]), hide_index=True, width="stretch")
    for path, diff in tables["text_diffs"].items():
        st.markdown(f"**Text diff: `{path}`**")
        st.code(diff, language="diff")


def render_verify_outcome(job: jobs.Job, action: str) -> None:
    """The result of Verify Hash / Verify and lock."""
    if job.error is not None:
        ui.show_error(job.error, action)
        if isinstance(job.error, HashDriftError) and isinstance(job.error.report, DriftReport):
            render_drift(job.error.report)
        return
    result = job.result
    summary = dd.verify_summary(result)
    figures = f"{summary['files']} files · {summary['size']} in {summary['duration']} ({summary['rate']})"
    for note in summary["notes"]:
        st.caption(note)
    if action in ("Verify and lock", "Accept new weights"):
        st.success(f"Locked: expected hash set to `{summary['aggregate']}` from a full verification · {figures}")
    elif result.result == "ok":
        st.success(f"Verify Hash: **ok** — matches the expected hash `{summary['aggregate']}` · {figures}")
    elif result.result == "unlocked":
        st.info(
            f"Verify Hash: hash `{summary['aggregate']}` · {figures}. Nothing is expected yet: toggle **Lock version**"
            " to pin it."
        )
    else:
        st.error(
            f"Verify Hash: **drift** — expected `{summary['expected']}`, found `{summary['aggregate']}` · {figures}. "
            "If expected (new quant, patch release), re-lock with a fresh verification; if not, re-download with "
            "`--force` and file an incident report (runbook §3)."
        )
        if result.report is not None:
            render_drift(result.report)


def verify_section(settings: Settings, entry: ModelEntry, status: EntryStatus) -> None:
    """The **Verify Hash** button with its live progress and the last result (while the lock is unchanged)."""
    name = entry.name
    key = f"verify:{name}"
    blocker = dd.hash_action_blocker(entry, status)
    st.button(
        "Verify Hash",
        key="verify_hash",
        type="primary",
        icon=":material/fingerprint:",
        disabled=jobs.busy() or blocker is not None,
        on_click=jobs.start,
        args=(key, f"Verifying {name}", _verify_work(settings, name)),
        help="Reads every byte under download_path and compares the aggregate hash with the locked one "
        "(`imageworks-models verify`).",
    )
    if blocker:
        st.caption(blocker)
    other = jobs.running()
    if other is not None and other.key not in (key, f"lock:{name}"):
        st.caption(f"{other.label} is running ({other.elapsed:.0f} s); long actions wait until it finishes.")
    finished = jobs.wait(key, render_hash_progress)
    if finished is not None:
        st.session_state[f"outcome:{key}"] = (finished, _expected_hash(entry))
        st.rerun()  # the buttons render enabled again and the table shows the new verification
    stored = st.session_state.get(f"outcome:{key}")
    if stored is not None:
        outcome, expected_then = stored
        if expected_then == _expected_hash(entry):
            render_verify_outcome(outcome, "Verify Hash")
        else:  # locked, re-pinned or unlocked since (here or in another session): the result no longer applies
            del st.session_state[f"outcome:{key}"]


# Lock version -------------------------------------------------------------------------------------------------
def _unlock(settings: Settings, name: str, reason: str) -> None:
    try:
        dd.service_for(settings).unlock(name, reason=reason)
    except ImageWorksError as exc:
        st.session_state[f"outcome:lock:{name}"] = ("error", exc)
        return
    st.session_state[f"outcome:lock:{name}"] = ("success", f"Unlocked {name}; reason recorded: “{reason}”")


def _reason_form(key: str, label: str, submit: str, *, disabled: bool, cancel_key: str | None = None) -> tuple:
    """A reason and its button in one form (one click submits both: no Enter needed). Returns (reason, submitted,
    cancelled)."""
    with st.form(key=key, border=False):
        reason = st.text_input(label, key=f"{key}:reason", placeholder="incident / ticket reference")
        left, right = st.columns(2)
        submitted = left.form_submit_button(submit, type="primary", disabled=disabled)
        cancelled = right.form_submit_button("Cancel", key=cancel_key) if cancel_key else False
    return str(reason or "").strip(), submitted, cancelled


def lock_section(settings: Settings, entry: ModelEntry, status: EntryStatus) -> None:
    """The **Lock version** toggle: locking runs a fresh full verification; unlocking asks for a reason; after
    drift, **Accept new weights** re-locks at the new hash. Every control derives from the entry as read now."""
    name = entry.name
    locked = entry.locked
    lock = entry.version_lock
    state = status.lock
    if state == "locked" and lock is not None:
        st.markdown(
            f":material/lock: **Locked** · `{lock.algorithm}` `{lock.expected_aggregate_sha256}`  \n"
            f"since {lock.locked_at or '?'} by {lock.locked_by or '?'}"
        )
    elif state == "pinned" and lock is not None:
        st.markdown(f":material/lock_open: **Unlocked** (expected hash kept: `{lock.expected_aggregate_sha256}`)")
        if lock.unlock_reason:
            st.caption(f"Unlocked {lock.unlocked_at or ''} by {lock.unlocked_by or '?'}: {lock.unlock_reason}")
    else:
        st.markdown(":material/lock_open: **Unlocked** (no expected hash yet)")
    blocker = dd.hash_action_blocker(entry, status)
    # The key carries the lock state, whether the weights allow locking, and a generation bumped after every
    # action (done, failed or cancelled), so the toggle always starts from the file's state.
    generation_key = f"lock_generation:{name}"
    generation = st.session_state.get(generation_key, 0)
    toggle_key = f"lock_toggle:{name}:{locked}:{blocker is None}:{generation}"

    def reset() -> None:
        st.session_state[generation_key] = st.session_state.get(generation_key, 0) + 1

    want = st.toggle(
        "Lock version",
        value=locked,
        key=toggle_key,
        disabled=jobs.busy() or (blocker is not None and not locked),  # unlocking needs no weights
        help=blocker,
    )
    job_key = f"lock:{name}"
    action_key = f"lock_action:{name}"
    if want and not locked:
        st.info("Locking requires a fresh full verification: every byte is read and that hash becomes the lock.")
        left, right = st.columns(2)
        if left.button("Verify and lock", type="primary", disabled=jobs.busy() or blocker is not None):
            st.session_state[action_key] = "Verify and lock"
            jobs.start(job_key, f"Verifying {name} to lock it", _lock_work(settings, name))
            st.rerun()
        right.button("Cancel", key="lock_cancel", on_click=reset)
    elif locked and not want:
        reason, submitted, cancelled = _reason_form(
            f"unlock:{name}",
            "Reason for unlocking (recorded in the audit log)",
            "Unlock",
            disabled=jobs.busy(),
            cancel_key="unlock_cancel",
        )
        st.caption("The runbook asks for an incident report before unlocking in production: give its reference.")
        if cancelled:
            reset()
            st.rerun()
        if submitted and not reason:
            st.error("**Unlock refused:** give the reason (incident or ticket reference); nothing changed.")
        elif submitted:
            _unlock(settings, name, reason)
            reset()
            st.rerun()
    if status.new_weights_to_accept:
        st.markdown("**Accept new weights**")
        st.caption(
            "The weights changed on purpose (new quant, patch release)? Unlock with a reason and re-lock at the hash "
            "of a fresh full read; both steps go to the audit log. If not, re-download instead (runbook §3)."
        )
        reason, submitted, _ = _reason_form(
            f"accept:{name}",
            "Reason for accepting the new weights (recorded in the audit log)",
            "Accept new weights",
            disabled=jobs.busy() or blocker is not None,
        )
        if submitted and not reason:
            st.error("**Accept new weights refused:** give the reason (change or ticket reference); nothing changed.")
        elif submitted:
            st.session_state[action_key] = "Accept new weights"
            jobs.start(job_key, f"Accepting the new weights of {name}", _accept_work(settings, name, reason))
            st.rerun()
    finished = jobs.wait(job_key, render_hash_progress)
    if finished is not None:
        st.session_state[f"outcome:{job_key}"] = ("job", finished)
        reset()  # after a failure too: the toggle shows the file's state again
        st.rerun()
    outcome = st.session_state.get(f"outcome:{job_key}")
    if outcome is not None:
        kind, value = outcome
        if kind == "job":
            render_verify_outcome(value, st.session_state.get(action_key, "Verify and lock"))
        elif kind == "error":
            ui.show_error(value, "Unlock")
        else:
            st.success(value)


# Edit metadata ------------------------------------------------------------------------------------------------
# Widget key suffix of each form field (``edit_<suffix>:<name>``, ``import_<suffix>:<key>``).
_FIELD_KEYS = {
    "served_model_id": "served",
    "role_priority": "priority",
    "role_priorities": "priorities",
    "generation_defaults": "generation",
}
_ARGV_HELP = (
    "One argument per line, or a JSON list of strings. Never a shell string. Placeholders: {model_path} {host} "
    "{port} {served_model_id} {name} {python}."
)


def curated_fields(prefix: str, key: str, defaults: dict[str, typing.Any], role_options: list[str]) -> dict:
    """The curated-field widgets the edit and import forms share (inside a form): values by field name.

    ``defaults`` holds each field's initial value; a field absent from it is not on the form.
    """

    def k(field: str) -> str:
        return f"{prefix}_{_FIELD_KEYS.get(field, field)}:{key}"

    v: dict[str, typing.Any] = {}
    v["display_name"] = st.text_input("Display name", value=defaults["display_name"], key=k("display_name"))
    if "served_model_id" in defaults:
        v["served_model_id"] = st.text_input(
            "Served model id", value=defaults["served_model_id"], key=k("served_model_id")
        )
    v["download_path"] = st.text_input(
        "download_path",
        value=defaults["download_path"],
        key=k("download_path"),
        help="Where the weights are (absolute, or relative to the root). Fix it here when the folder moved; "
        "the curated value overrides the discovered one.",
    )
    v["aliases"] = st.text_area("Aliases (one per line)", value=defaults["aliases"], height=68, key=k("aliases"))
    v["roles"] = st.multiselect("Roles", role_options, default=defaults["roles"], key=k("roles"))
    v["role_priority"] = st.number_input(
        "Role priority, every role (higher wins)", value=int(defaults["role_priority"]), step=1, key=k("role_priority")
    )
    if "role_priorities" in defaults:
        v["role_priorities"] = st.text_area(
            "Per-role priorities (role=score per line; replaces the number above)",
            value=defaults["role_priorities"],
            height=90,
            key=k("role_priorities"),
            help="Selection by role ranks by the score for the role asked (higher wins); a role not listed scores "
            "0. Leave empty to use the one number above for every role.",
        )
    v["capabilities"] = st.multiselect(
        "Capabilities", list(CAPABILITY_NAMES), default=defaults["capabilities"], key=k("capabilities")
    )
    v["launch"] = st.text_area(
        "Launch argv (empty: the backend's default)", value=defaults["launch"], key=k("launch"), help=_ARGV_HELP
    )
    v["extra_args"] = st.text_area(
        "Extra args (appended to the launch argv)",
        value=defaults["extra_args"],
        height=68,
        key=k("extra_args"),
        help=_ARGV_HELP,
    )
    v["env"] = st.text_area(
        "Environment (KEY=VALUE per line, or a JSON object)", value=defaults["env"], height=68, key=k("env")
    )
    if "backend_config" in defaults:
        v["backend_config"] = st.text_area(
            "Other backend_config (JSON)",
            value=defaults["backend_config"],
            height=120,
            key=k("backend_config"),
            help="base_url, host, port, health_path, startup_timeout_s, api_key_env.",
        )
    if "generation_defaults" in defaults:
        v["generation_defaults"] = st.text_area(
            "generation_defaults (JSON)", value=defaults["generation_defaults"], key=k("generation_defaults")
        )
    v["profiles"] = st.text_input(
        "Profiles (comma-separated; empty: every profile)", value=defaults["profiles"], key=k("profiles")
    )
    left, right = st.columns(2)
    v["testing"] = left.checkbox("Testing (hidden by default)", value=defaults["testing"], key=k("testing"))
    v["deprecated"] = right.checkbox("Deprecated", value=defaults["deprecated"], key=k("deprecated"))
    v["notes"] = st.text_area("Notes", value=defaults["notes"], key=k("notes"))
    return v


def edit_metadata_section(settings: Settings, registry: Registry, entry: ModelEntry) -> None:
    """A form over the curated fields an operator owns; shows the diff, validates, saves atomically."""
    name = entry.name
    defaults = dd.metadata_defaults(registry, name)
    role_options = sorted(set(KNOWN_ROLES) | {r for e in registry for r in e.roles})
    with st.form(key=f"edit:{name}"):
        values = curated_fields("edit", name, defaults, role_options)
        left, right = st.columns(2)
        preview = left.form_submit_button("Preview diff", disabled=jobs.busy(), key=f"edit_preview:{name}")
        save = right.form_submit_button("Save", type="primary", disabled=jobs.busy(), key=f"edit_save:{name}")
    if not (preview or save):
        return
    try:
        changes = dd.metadata_changes(registry, name, **values)
    except UsageError as exc:
        ui.show_error(exc, "Edit metadata (nothing saved)")
        return
    if not changes:
        st.info("No changes: the form matches the registry.")
        return
    diff = _preview_or_save(settings, name, changes, create=False, preview=preview)
    if diff is None:
        return
    ui.flash("success", f"Saved {name} to {settings.curated_path.name} (previous content kept as a revision).", diff)
    st.rerun()


def _preview_or_save(
    settings: Settings, name: str, changes: dict[str, typing.Any], *, create: bool, preview: bool
) -> str | None:
    """The steps the edit form and the import form (``create``) share: refuse a change that would make the
    registry invalid, show its diff when previewing, else save it. Returns the saved diff; None if nothing was."""
    verb, action = ("added", "import") if create else ("saved", "edit")
    change_preview = dd.preview_curated_change(settings, name, changes, create=create)
    if not change_preview.ok:
        st.error(
            f"**Not {verb} — the registry would be invalid:**\n\n{ui.problem_list(change_preview.problems)}"
            "\n\nFix the field named above and try again."
        )
        return None
    if preview:
        st.markdown(f"**Diff of `{settings.curated_path.name}` if {verb}:**")
        st.code(change_preview.diff, language="diff")
        return None
    try:
        dd.save_curated_change(settings, name, changes, create=create, command=f"dashboard: {action} {name}")
    except ImageWorksError as exc:
        ui.show_error(exc, "Import" if create else "Save")
        return None
    return change_preview.diff


# Entry detail -------------------------------------------------------------------------------------------------
def provenance_section(entry: ModelEntry) -> None:
    """Licence, family and the free-form provenance object: shown for the operator, never used for decisions."""
    if not (entry.license or entry.family or entry.metadata):
        return
    st.markdown("**Provenance** (kept from the source; informational, never used for decisions)")
    st.markdown(f"Licence: `{entry.license or '—'}` · Family: `{entry.family or '—'}`")
    if entry.metadata:
        with st.expander(f"metadata ({len(entry.metadata)} key{'s' if len(entry.metadata) != 1 else ''})"):
            st.json(entry.metadata, expanded=True)


def entry_detail(settings: Settings, registry: Registry, entry: ModelEntry, status: EntryStatus) -> None:
    name = entry.name
    badges = status.badges
    st.subheader(f"{entry.display_name or name}")
    st.markdown(" ".join([f"`{name}`", f"· layer **{registry.layer_of(name)}**", dd.badge_markdown(badges)]))
    if "drift" in badges:
        st.error(
            "Hash drift on a locked entry: inspect download_path for unexpected changes; if expected, re-lock from a "
            "fresh verification; if not, re-download with `--force` (runbook §3)."
        )
    if "missing" in badges:
        st.warning(
            f"Weights missing: `{settings.resolve_path(entry.download_path or '')}` does not exist. Fix download_path "
            "or run the downloader's `normalize-formats --rebuild`."
        )
    left, right = st.columns([3, 2], gap="large")
    with left:
        if entry.backend:
            st.markdown(f"**Endpoint:** `{endpoint_for(entry, settings)}`")
        argv = dd.launch_argv(entry, settings)
        if argv:
            st.markdown("**Launch argv** (exactly what activation runs)")
            st.code(json.dumps(argv, ensure_ascii=False), language="json", wrap_lines=True)
        st.markdown("**Fields** (and the layer each came from)")
        st.dataframe(pd.DataFrame(dd.field_rows(registry, name)), hide_index=True, width="stretch")
        provenance_section(entry)
        st.markdown("**History**")
        past = dd.entry_history(settings, name)
        for tab, kind in zip(st.tabs(["Verifications", "Probes", "Activations"]), past, strict=True):
            with tab:
                if past[kind].empty:
                    st.caption(f"No {kind} recorded yet.")
                else:
                    st.dataframe(past[kind], hide_index=True, width="stretch")
    with right:
        verify_section(settings, entry, status)
        st.divider()
        lock_section(settings, entry, status)
        st.divider()
        with st.expander("Edit metadata"):
            edit_metadata_section(settings, registry, entry)


# Import from Download History ---------------------------------------------------------------------------------
_DOWNLOAD = "download"


def _start_download(settings: Settings) -> None:
    """The Download form's submit (a callback, so the job starts before the page reruns)."""
    repo_id = str(st.session_state.get("download_repo") or "").strip()
    revision = str(st.session_state.get("download_revision") or "").strip() or None
    location = str(st.session_state.get("download_location") or "").strip() or DEFAULT_LOCATION
    tracker = dd.DownloadTracker()
    st.session_state["download_tracker"] = tracker
    st.session_state.pop("outcome:download", None)
    jobs.start(
        _DOWNLOAD,
        f"Downloading {repo_id}",
        lambda report: dd.service_for(settings).download(
            repo_id, location=location, revision=revision, progress=tracker
        ),
    )


def _download_progress() -> None:
    """The running download's bar and Cancel; once it ends, its outcome is kept and the whole page reruns."""
    job = jobs.get(_DOWNLOAD)
    tracker = st.session_state.get("download_tracker")
    if job is None or tracker is None:
        return
    if job.done:
        finished = jobs.wait(_DOWNLOAD, lambda _: None)
        st.session_state["outcome:download"] = finished
        if finished is not None and finished.error is None:
            st.session_state["import_pick_next"] = f"discovered:{finished.result.update.name}"
        st.rerun()  # the candidates and the history table show the new run
    progress = tracker.snapshot()
    st.progress(progress.fraction, text=f"{job.label}: {progress.text} · {job.elapsed:.0f} s")
    st.button(
        "Cancel download",
        key="download_cancel",
        icon=":material/cancel:",
        on_click=tracker.cancel,
        disabled=progress.cancelling,
        help="Stops at the next received chunk; the partial bytes stay for a resume, no marker is written.",
    )


def render_download_outcome(job: jobs.Job) -> None:
    if isinstance(job.error, dd.DownloadCancelled):
        st.warning(
            f"{job.label} cancelled: partial bytes kept (Download again to resume); no download marker written, "
            "nothing added to the registry."
        )
    elif job.error is not None:
        ui.show_error(job.error, "Download")
    else:
        outcome = job.result
        result = outcome.result
        st.success(
            f"Downloaded {result.repo_id}@{result.commit_sha[:12]} into `{result.target}`: "
            f"{dd.count_text(len(result.files), 'file')}, {format_bytes(result.total_bytes)}, verified. Discovered "
            f"entry **{outcome.update.name}** ({outcome.update.status}): import it below."
        )


def fetch_section(settings: Settings) -> None:
    """Scan a folder already on disk (offline) or download owner/repo from the Hub, with progress and Cancel."""
    scan_col, download_col = st.columns(2, gap="large")
    with scan_col, st.form("scan_form"):
        st.markdown("**Scan a folder** (offline; nothing copied, nothing written inside it)")
        directory = st.text_input("Folder", key="scan_dir", placeholder="/srv/models/owner/repo")
        scan_name = st.text_input("Logical name (optional)", key="scan_name")
        scan = st.form_submit_button("Scan", icon=":material/folder_open:", disabled=jobs.busy())
    with download_col, st.form("download_form"):
        st.markdown("**Download from the Hugging Face Hub** (verified, resumable)")
        st.text_input("Repository", key="download_repo", placeholder="owner/repo")
        st.text_input("Revision (optional)", key="download_revision", placeholder="main")
        st.text_input(
            "Location",
            key="download_location",
            value=DEFAULT_LOCATION,
            help="A location name from configs/locations.json, or a directory; files land in <location>/<owner>/<repo>.",
        )
        st.form_submit_button(
            "Download",
            type="primary",
            icon=":material/download:",
            disabled=jobs.busy(),
            on_click=_start_download,
            args=(settings,),
        )
    if scan:
        if not directory.strip():
            st.error("Give the folder to scan.")
        else:
            try:
                with st.spinner(f"Scanning {directory.strip()}…"):
                    update = dd.service_for(settings).scan(directory.strip(), name=scan_name.strip() or None)
            except ImageWorksError as exc:
                ui.show_error(exc, "Scan")
            else:
                entry = update.entry
                files = len(entry.get("download_files") or [])
                ui.flash(
                    "success",
                    f"Scanned `{entry['download_path']}`: {dd.count_text(files, 'file')}, "
                    f"{format_bytes(entry.get('download_size_bytes'))}, format {entry.get('download_format')}. "
                    f"Discovered entry **{update.name}** ({update.status}): import it below.",
                )
                st.session_state["import_pick_next"] = f"discovered:{update.name}"
                st.rerun()
    running = jobs.get(_DOWNLOAD)
    st.fragment(_download_progress, run_every=1.0 if running is not None and not running.done else None)()
    outcome = st.session_state.get("outcome:download")
    if outcome is not None:
        render_download_outcome(outcome)
    rows = dd.download_history_rows(settings)
    with st.expander(f"Download History ({dd.count_text(len(rows), 'run')})", expanded=bool(outcome)):
        if rows:
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="download_history")
        else:
            st.caption("No downloads recorded yet.")


def import_section(settings: Settings, registry: Registry) -> None:
    fetch_section(settings)
    st.divider()
    candidates = dd.import_candidates(registry)
    st.caption(
        "Discovered entries (`model_registry.discovered.json`) and finished downloads that are not curated yet. "
        "Pick one, fill the metadata, preview the curated diff, add it."
    )
    if not candidates:
        st.info(
            "Nothing to import: every discovered entry and download is already curated. "
            "Scan a folder or download a repository above."
        )
        return
    st.dataframe(pd.DataFrame(dd.candidate_rows(candidates)), hide_index=True, width="stretch")
    by_key = {c.key: c for c in candidates}
    wanted = st.session_state.pop("import_pick_next", None)
    if wanted in by_key:
        st.session_state["import_pick"] = wanted
    key = st.selectbox("Entry to import", list(by_key), format_func=lambda k: by_key[k].label, key="import_pick")
    candidate = by_key[key]
    backends = list(typing.get_args(Backend))
    with st.form(key=f"import:{key}"):
        name = st.text_input(
            "Logical name",
            key=f"import_name:{key}",
            value=candidate.name,
            disabled=candidate.origin == "discovered",
            help="A discovered entry keeps its name so the discovered facts (path, size, files) merge into it.",
        )
        backend = st.selectbox("Backend", backends, index=0, key=f"import_backend:{key}")
        values = curated_fields("import", key, dd.import_defaults(candidate), list(KNOWN_ROLES))
        left, right = st.columns(2)
        preview = left.form_submit_button("Preview diff", key=f"import_preview:{key}")
        add = right.form_submit_button("Add to curated", type="primary", key=f"import_add:{key}")
    if not (preview or add):
        return
    name = candidate.name if candidate.origin == "discovered" else name.strip()
    try:
        changes = dd.import_changes(candidate, backend=backend, **values)
    except UsageError as exc:
        ui.show_error(exc, "Import (nothing saved)")
        return
    diff = _preview_or_save(settings, name, changes, create=True, preview=preview)
    if diff is None:
        return
    ui.flash("success", f"Added {name} to {settings.curated_path.name}. Next: Verify Hash, then Lock version.", diff)
    st.session_state["registry_entry_next"] = name
    st.rerun()


# History and rollback -----------------------------------------------------------------------------------------
def _open_rollback(rev: int) -> None:
    st.session_state["rollback_rev"] = rev


def _close_rollback() -> None:
    st.session_state.pop("rollback_rev", None)


def rollback_confirm(settings: Settings, rev: int) -> None:
    """The rollback confirmation's body: what will be restored (the file as it was *before* revision ``rev``, the
    CLI's ``rollback REV``), then Confirm / Cancel."""
    try:
        diff = dd.service_for(settings).revision_diff(rev)
    except ImageWorksError as exc:
        ui.show_error(exc, "Rollback")
        return
    st.markdown(
        f"Restore `{diff.file}` as it was **before** revision **{rev}**: that change and every later change to this "
        "file are undone (the diff below). The rollback is itself recorded as a new revision, so it can be undone "
        "the same way."
    )
    st.code(diff.rollback or "(the file already has this content)", language="diff")
    left, right = st.columns(2)
    if left.button("Confirm rollback", type="primary"):
        try:
            dd.service_for(settings).rollback(rev, command=f"dashboard: rollback {rev}")
        except ImageWorksError as exc:
            ui.show_error(exc, "Rollback")
            return
        _close_rollback()
        ui.flash("success", f"Rolled back {diff.file} to its content before revision {rev}.", diff.rollback)
        st.rerun()
    if right.button("Cancel", key="rollback_cancel"):
        _close_rollback()
        st.rerun()


@st.dialog("Undo this change?", width="large", on_dismiss=_close_rollback)
def rollback_dialog(settings: Settings, rev: int) -> None:
    rollback_confirm(settings, rev)


def history_section(settings: Settings) -> None:
    rows = dd.revision_rows(settings)
    if not rows:
        st.info("No revisions yet: every write (dashboard or CLI) keeps the file's previous content here.")
        return
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    by_rev = {row["rev"]: row for row in rows}
    rev = st.selectbox(
        "Revision",
        list(by_rev),
        format_func=lambda r: f"{r} · {by_rev[r]['at']} · {by_rev[r]['command']} · {by_rev[r]['entries']}",
        key="history_rev",
    )
    diff = dd.service_for(settings).revision_diff(rev)
    st.markdown(f"**Change made by revision {rev}** (`{by_rev[rev]['file']}`)")
    st.code(diff.change or "(no textual change)", language="diff")
    st.button(
        f"Undo this change (restore the file as it was before revision {rev})",
        key="rollback_open",
        disabled=jobs.busy(),
        on_click=_open_rollback,
        args=(rev,),
    )


# The page -----------------------------------------------------------------------------------------------------
def _select_from_table(names: list[str]) -> None:
    selection = st.session_state.get("registry_table")
    rows = selection.selection.rows if selection is not None else []
    if rows and rows[0] < len(names):
        st.session_state["registry_entry"] = names[rows[0]]


def entries_section(settings: Settings, registry: Registry) -> None:
    options = dd.filter_options(registry)
    search_col, role_col, cap_col, backend_col, hidden_col = st.columns([3, 2, 2, 2, 2], vertical_alignment="bottom")
    search = search_col.text_input("Search", key="registry_search", placeholder="name, display name or served id")
    role = role_col.selectbox("Role", ["All", *options["roles"]], key="registry_role")
    capability = cap_col.selectbox("Capability", ["All", *options["capabilities"]], key="registry_capability")
    backend = backend_col.selectbox("Backend", ["All", *options["backends"]], key="registry_backend")
    include_hidden = hidden_col.toggle("Show testing/deprecated", key="registry_hidden")
    entries = filter_entries(
        registry,
        role=None if role == "All" else role,
        capability=None if capability == "All" else capability,
        backend=None if backend == "All" else backend,
        include_testing=include_hidden,
        search=search or None,
    )
    statuses = dd.service_for(settings).statuses(entries)
    frame = dd.registry_frame(registry, entries, statuses)
    drifted = [entry.name for entry in entries if statuses[entry.name].drifted]
    if drifted:
        st.error(f"**Hash drift on locked entries:** {', '.join(drifted)} — see the entry below and runbook §3.")
    names = frame["name"].tolist()
    st.dataframe(
        frame,
        column_config=TABLE_COLUMNS,
        hide_index=True,
        width="stretch",
        on_select=lambda: _select_from_table(names),
        selection_mode="single-row",
        key="registry_table",
    )
    hidden = len(registry) - len(entries)
    st.caption(dd.entries_caption(len(entries), hidden))
    if role != "All":
        st.caption(
            f"Ranked for **{role}**: highest role priority for {role} first (then name), the order selection uses."
        )
    if not names:
        st.info("No entry matches the filters.")
        return
    wanted = st.session_state.pop("registry_entry_next", None)
    if wanted in names:
        st.session_state["registry_entry"] = wanted
    if st.session_state.get("registry_entry") not in names:
        st.session_state["registry_entry"] = names[0]
    name = st.selectbox("Entry", names, key="registry_entry")
    st.divider()
    entry_detail(settings, registry, registry.entries[name], statuses[name])


settings = ui.settings()
st.title("Registry")
ui.show_flash()
# An invalid registry (and no last good one) keeps History: rolling back the last edit is the runbook's fix.
registry = ui.registry(settings, required=False)
# Stateful tabs: the open tab survives reruns, only its content runs, and ?registry_tab=History links to it.
entries_tab, import_tab, history_tab = st.tabs(
    ["Entries", "Import from Download History", "History"], key="registry_tab", bind="query-params"
)
NO_REGISTRY = "Unavailable until the registry loads: fix the problems above, or undo the last edit in **History**."
if entries_tab.open:
    with entries_tab:
        if registry is None:
            st.info(NO_REGISTRY, icon=":material/history:")
        else:
            entries_section(settings, registry)
if import_tab.open:
    with import_tab:
        if registry is None:
            st.info(NO_REGISTRY, icon=":material/history:")
        else:
            import_section(settings, registry)
if history_tab.open:
    with history_tab:
        history_section(settings)
if st.session_state.get("rollback_rev") is not None:
    rollback_dialog(settings, st.session_state["rollback_rev"])
