"""The dashboard's operator moments, through Streamlit's AppTest (real files, real processes, real HTTP).

An invalid registry at start (History and rollback stay usable; every problem is listed), an active model that
left the registry, the Vision Probe page's target and its hints, the Settings page's environment, audit log and
Test connection hints.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from apptest_pages import joined, open_page, run, widget
from conftest import free_port
from streamlit.testing.v1 import AppTest

from imageworks_core import audit, dashboard_data, runtime
from imageworks_core.errors import BackendError
from imageworks_core.registry import edit_layer, load_registry, update_entry
from imageworks_core.settings import Settings, get_settings

DEMO = "demo-vision_(CPU)"
DEMO_TEXT = "demo-text_(CPU)"
REMOTE = "gpt-4o-mini_(remote)"
pytestmark = pytest.mark.usefixtures("fresh_home")


# Item 13: an invalid registry at dashboard start --------------------------------------------------------------
ROLLBACK = re.compile(r"roll ?back|undo|restore", re.IGNORECASE)


def test_an_invalid_registry_at_start_keeps_history_and_rollback_and_lists_every_problem(root: Settings) -> None:
    original = root.curated_path.read_text(encoding="utf-8")
    update_entry(root, DEMO, {"notes": "the last edit"}, command="test edit")
    root.curated_path.write_text('[\n  {"name": "x",}\n]\n', encoding="utf-8")  # a hand edit gone wrong
    at = open_page()
    error = joined(at.error)
    assert f"{root.curated_path}:2:16: invalid JSON" in error, "the problem names its file:line:col"
    assert "named above" not in error and "History" in error and "Reload registry" in error
    assert "Unavailable until the registry loads" in joined(at.info)

    at.session_state["registry_tab"] = "History"
    run(at)
    widget(at.button, ROLLBACK).click()
    run(at)
    confirm = [b for b in at.button if ROLLBACK.search(b.label) and b.label.lower().startswith("confirm")]
    assert confirm, [b.label for b in at.button]
    confirm[0].click()
    run(at)
    assert root.curated_path.read_text(encoding="utf-8") == original, "the state before the last edit is back"
    assert not at.error, "the registry loads again"


def test_a_stale_registry_banner_lists_the_problems_it_refers_to(root: Settings) -> None:
    at = open_page()
    root.curated_path.write_text('[\n  {"name": "x",}\n]\n', encoding="utf-8")
    at.switch_page("pages/settings.py")
    run(at)
    warning = joined(at.warning)
    assert "showing the last good registry" in warning
    assert f"- {root.curated_path}:2:16: invalid JSON" in warning and "named above" not in warning


def test_active_model_with_an_invalid_registry_says_why_nothing_can_start(root: Settings) -> None:
    root.curated_path.write_text("[{", encoding="utf-8")
    at = open_page("active_model")
    info = joined(at.info)
    assert "registry cannot be read" in info and "Stop still works" in info
    assert "No process-backed entry" not in info, "entries exist; the registry just cannot be read"
    assert "Stop" in [b.label for b in at.button]


# Item 12: the active model left the registry -----------------------------------------------------------------
def rename_entry(settings: Settings, old: str, new: str, *, keep_alias: bool) -> None:
    def mutate(entries: list[dict[str, Any]]) -> None:
        raw = next(e for e in entries if e.get("name") == old)
        raw["name"] = new
        if keep_alias:
            raw["model_aliases"] = [*raw.get("model_aliases", []), old]

    edit_layer(settings, "curated", mutate, command="test rename")


@pytest.mark.parametrize("keep_alias", [False, True], ids=["removed", "renamed-with-alias"])
def test_every_page_warns_when_the_active_model_left_the_registry(single_port: Settings, keep_alias: bool) -> None:
    runtime.activate(single_port, DEMO_TEXT)
    at = open_page()
    assert "active model" not in joined(at.warning).lower(), "no banner while the entry exists"
    rename_entry(single_port, DEMO_TEXT, "demo-text-renamed", keep_alias=keep_alias)
    for page in ("registry", "active_model", "vision_probe", "settings"):
        at.switch_page(f"pages/{page}.py")
        run(at)
        warning = joined(at.warning)
        assert f"The active model '{DEMO_TEXT}'" in warning, page
        assert "activate-model --stop" in warning and "Stop" in warning, "the fix is named"
        if keep_alias:
            assert "'demo-text-renamed'" in warning, "the new name is given"
        else:
            assert "History" in warning
    runtime.stop(single_port, reason="test")
    run(at)
    assert "active model" not in joined(at.warning).lower(), "no model runs, no banner"


def test_active_model_gone_reads_only_the_state_file(root: Settings) -> None:
    assert dashboard_data.active_model_gone(root, None) is None, "no registry, nothing to compare"
    registry = load_registry(settings=root)
    assert dashboard_data.active_model_gone(root, registry) is None, "nothing runs"
    root.active_state_path.parent.mkdir(parents=True, exist_ok=True)
    root.active_state_path.write_text("{not json", encoding="utf-8")
    assert dashboard_data.active_model_gone(root, registry) is None, "an unreadable state is Active Model's to show"


# Item 10: Vision Probe ----------------------------------------------------------------------------------------
ACTIVATE = "Activate the model first if it is not the active backend"


def target_text(at: AppTest) -> str:
    return next(m.value for m in at.markdown if "-badge[" in m.value)


def test_vision_probe_shows_whether_the_chosen_model_is_active(single_port: Settings) -> None:
    at = open_page("vision_probe")
    widget(at.selectbox, "Model (entries declaring vision)").set_value(DEMO)
    run(at)
    shown = target_text(at)
    assert ":orange-badge[not active]" in shown and "nothing runs on the single port" in shown
    assert f"tick **{ACTIVATE}**" in shown
    runtime.activate(single_port, DEMO)
    run(at)
    assert ":green-badge[active · ready]" in target_text(at)
    widget(at.selectbox, "Model (entries declaring vision)").set_value(REMOTE)
    run(at)
    assert ":green-badge[remote · openai]" in target_text(at) and "no activation needed" in target_text(at)


def test_vision_probe_of_an_inactive_model_names_the_pages_checkbox(root: Settings) -> None:
    at = open_page("vision_probe")
    widget(at.selectbox, "Model (entries declaring vision)").set_value(DEMO)
    widget(at.button, "Run probe").click()
    run(at)
    error = joined(at.error)
    assert f"Tick **{ACTIVATE}**" in error and "Active Model page" in error
    assert "--activate" not in error, "the CLI's flag means nothing on this page"


def test_vision_probe_of_a_text_only_entry_fails_as_the_demo_shows(single_port: Settings) -> None:
    at = open_page("vision_probe")
    assert DEMO_TEXT not in widget(at.selectbox, "Model (entries declaring vision)").options
    widget(at.toggle, "Include text-only entries").set_value(True)
    run(at)
    widget(at.selectbox, "Model (every entry with a backend)").set_value(DEMO_TEXT)
    widget(at.checkbox, ACTIVATE).check()
    widget(at.button, "Run probe").click()
    run(at)
    assert ":red[:material/cancel:] `vision_ok: false`" in joined(at.markdown)
    assert runtime.read_state(single_port).name == DEMO_TEXT


def test_vision_probe_with_a_custom_image_says_grounded_was_not_checked(single_port: Settings) -> None:
    runtime.activate(single_port, DEMO)
    at = open_page("vision_probe")
    widget(at.selectbox, "Model (entries declaring vision)").set_value(DEMO)
    widget(at.radio, "Image").set_value("Upload an image")
    run(at)
    at.file_uploader(key="probe_upload").set_value(("probe.png", probe_png(), "image/png"))
    run(at)
    widget(at.button, "Run probe").click()
    run(at)
    shown = joined(at.markdown)
    assert "`grounded: not checked (custom image)`" in shown and "null" not in shown


def probe_png() -> bytes:
    from imageworks_core import probe

    return probe.canonical_image_bytes()


def test_grounded_text_says_why_it_is_null() -> None:
    assert dashboard_data.grounded_text({"grounded": True}) == "true"
    assert dashboard_data.grounded_text({"grounded": False, "expected": ["red"]}) == "false"
    assert dashboard_data.grounded_text({"grounded": None, "expected": []}) == "not checked (custom image)"
    assert dashboard_data.grounded_text({"grounded": None, "expected": ["red"]}) == "not checked (no answer)"


# Item 11: Settings ---------------------------------------------------------------------------------------------
def test_environment_shows_the_port_this_dashboard_serves(root: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEWORKS_DASHBOARD_PORT", "8600")
    settings = get_settings(root.root)
    rows = {r["variable"]: r for r in dashboard_data.env_rows(settings, served_port=8777)}
    assert rows["IMAGEWORKS_DASHBOARD_PORT"]["value"] == "8777"
    assert rows["IMAGEWORKS_DASHBOARD_PORT"]["source"] == "served (the variable says 8600)"
    rows = {r["variable"]: r for r in dashboard_data.env_rows(settings, served_port=8600)}
    assert (rows["IMAGEWORKS_DASHBOARD_PORT"]["value"], rows["IMAGEWORKS_DASHBOARD_PORT"]["source"]) == ("8600", "env")
    at = open_page("settings", "Environment")
    env = at.dataframe[0].value.set_index("variable")
    from streamlit import config

    served = str(config.get_option("server.port"))
    assert env.loc["IMAGEWORKS_DASHBOARD_PORT", "value"] == served, "the served port, not the variable"


def test_audit_log_reads_time_actor_event_entry_outcome(root: Settings) -> None:
    audit.log_event(root, "lock_violation", name=DEMO, action="activate", forced=True, verify_result="drift")
    audit.log_event(root, "registry_write", file="x", command="edit", names=[DEMO, DEMO_TEXT])
    audit.log_event(root, "download", repo_id="acme/tiny", status="failed", error="HTTP 404")
    audit.log_event(root, "probe", name=DEMO, vision_ok=True, grounded=True)
    at = open_page("settings", "Audit log")
    frame = at.dataframe[0].value
    assert list(frame.columns) == ["time", "actor", "event", "entry", "outcome", "details"]
    assert list(frame["event"]) == ["probe", "download", "registry_write", "lock_violation"]
    assert list(frame["entry"]) == [DEMO, "acme/tiny", f"{DEMO}, {DEMO_TEXT}", DEMO]
    assert list(frame["outcome"]) == ["vision_ok", "failed", "ok", "forced"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", frame["time"][0]), "local time, no ISO noise"
    assert "click a details cell to expand it" in joined(at.caption)


def test_test_connection_of_a_remote_backend_hints_at_its_url_and_key(
    root: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.delenv("REMOTE_TEST_KEY", raising=False)
    unreachable = dashboard_data.check_connection(f"http://127.0.0.1:{port}/v1", key_env="REMOTE_TEST_KEY", remote=True)
    assert "base_url" in unreachable.message and "Active Model" not in unreachable.message
    at = open_page("settings", "Backends")
    remote = next(
        i
        for i, t in enumerate(dashboard_data.backend_targets(load_registry(settings=root), root))
        if REMOTE in t.entries
    )
    at.button(key=f"test:{remote}").click()
    run(at)
    error = joined(at.error)
    assert error and "Active Model" not in error, "a remote endpoint is not started on the Active Model page"
    assert "key from `$" in joined(at.markdown), "the key's variable is named beside the endpoint"


# Rules the pages used to hold, now in the core ----------------------------------------------------------------
def test_after_a_failed_start_starting_another_model_is_a_start_not_a_switch(single_port: Settings) -> None:
    """A failed record holds no port: the button and the confirmation agree that the next start is a Start."""
    from imageworks_core.dashboard_data import active

    update_entry(
        single_port, DEMO_TEXT, {"backend_config": {"launch": ["no-such-vllm-binary", "serve"]}}, command="test"
    )
    with pytest.raises(BackendError):
        runtime.activate(single_port, DEMO_TEXT)
    view = active.active_view(single_port)
    assert (view.phase, view.name, view.occupant, view.status_text) == ("failed", DEMO_TEXT, None, "failed")
    at = open_page("active_model")
    widget(at.selectbox, "Model to run on the single port").set_value(DEMO)
    run(at)
    assert "Switch" not in [b.label for b in at.button]
    widget(at.button, "Start").click()
    run(at)
    shown = joined(at.markdown)
    assert f"Start **{DEMO}** on the single port?" in shown and "Switch from" not in shown, shown
    at.button(key="active_confirm_cancel").click()
    run(at)
    widget(at.button, "Stop").click()
    run(at)
    assert f"Stop **{DEMO_TEXT}**?" in joined(at.markdown), "Stop still names the failed record it clears"
    runtime.stop(single_port, reason="test")


def test_active_view_figures_while_starting_and_idle(root: Settings) -> None:
    from imageworks_core.dashboard_data.active import ActiveView

    idle = ActiveView("idle", None, None, None)
    assert (idle.occupant, idle.status_text, idle.health_text) == (None, "idle", "—")
    progress = runtime.ActivationProgress(
        name=DEMO, phase="verify", started_at=datetime.now(UTC), updated_at=datetime.now(UTC), pid=1
    )
    starting = ActiveView("starting", None, progress, None)
    assert (starting.occupant, starting.status_text, starting.health_text) == (DEMO, "starting", "starting")
    assert starting.can_cancel and not starting.can_start and not starting.can_stop


def test_stop_result_says_when_it_only_cancelled_a_start() -> None:
    from imageworks_core.runtime import StopResult

    assert StopResult(DEMO, 0, 0.1, None, [], cancelled=DEMO).cancelled_only
    assert not StopResult(DEMO, 4242, 0.1, "SIGTERM", [4242], cancelled=DEMO).cancelled_only, "it stopped one too"
    assert not StopResult(DEMO, 4242, 0.1, "SIGTERM", [4242]).cancelled_only


@pytest.mark.parametrize(
    ("lock", "result", "offered"),
    [
        ("locked", "drift", True),
        ("pinned", "drift", True),
        ("unlocked", "drift", False),
        ("locked", "ok", False),
        ("locked", None, False),
    ],
)
def test_accept_new_weights_is_offered_for_a_pinned_entry_that_drifted(
    lock: str, result: str | None, offered: bool
) -> None:
    from imageworks_core.service import EntryStatus

    last = {"result": result, "at": "2026-01-01T00:00:00+00:00"} if result else None
    status = EntryStatus(DEMO, lock, "present", last, None)  # type: ignore[arg-type]
    assert status.new_weights_to_accept is offered


def test_counts_read_right_in_every_page_text() -> None:
    count = dashboard_data.count_text
    assert [count(1, "event"), count(3, "event"), count(0, "problem")] == ["1 event", "3 events", "0 problems"]
    assert [count(1, "entry", "entries"), count(2, "entry", "entries")] == ["1 entry", "2 entries"]
    assert dashboard_data.entries_caption(5, 1) == "5 entries shown (1 hidden by filters)"


def test_import_candidates_read_the_download_history_without_creating_it(root: Settings, tmp_path: Any) -> None:
    from imageworks_core import history

    registry = load_registry(settings=root)
    before = dashboard_data.import_candidates(registry)
    assert not root.history_db_path.exists(), "listing never creates the history DB"
    assert all(c.origin == "discovered" for c in before)
    folder = tmp_path / "weights" / "acme" / "tiny"
    folder.mkdir(parents=True)
    common = {"repo_id": "acme/tiny", "location": "test", "path": str(folder), "actor": "test"}
    history.record_download(root, **common, status="cancelled", detail="download cancelled by the operator")
    history.record_download(root, **common, status="ok", format="safetensors", total_bytes=2048, detail="done")
    rows = dashboard_data.candidate_rows(
        [c for c in dashboard_data.import_candidates(registry) if c.origin == "download"]
    )
    assert [(r["repo"], r["path"], r["format"], r["size"]) for r in rows] == [
        ("acme/tiny", str(folder), "safetensors", "2.0 KiB")
    ], "the ok run only; a cancelled one is no candidate"
