"""The operator dashboard, page by page, through Streamlit's AppTest (real files, real processes, real HTTP).

Each test drives ``dashboard/app.py`` the way an operator would (the runbook's GUI steps: Models → Registry,
Import from Download History, Verify Hash, Lock version, Active Model, Vision Probe, Settings → Backends →
Reload registry) and checks what the page shows and what changed on disk. The data-shaping functions the pages
call (``imageworks_core.dashboard_data``) are specified directly at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from apptest_pages import TIMEOUT_S, joined, open_page, open_tab, run, table, texts, widget
from conftest import demo_argv, demo_launch, free_port
from streamlit.testing.v1 import AppTest

from imageworks_core import audit, dashboard_data, gpu, history, runtime
from imageworks_core.dashboard_data import active
from imageworks_core.errors import BackendError
from imageworks_core.registry import edit_layer, load_registry, update_entry
from imageworks_core.registry_file import read_registry_text
from imageworks_core.runtime import background
from imageworks_core.settings import Settings
from imageworks_core.units import format_bytes
from imageworks_core.verification import lock_entry, verify_entry

DEMO = "demo-vision_(CPU)"
DEMO_TEXT = "demo-text_(CPU)"
QWEN = "qwen2.5-vl-7b-instruct_(AWQ)"
pytestmark = pytest.mark.usefixtures("fresh_home")


# Helpers ------------------------------------------------------------------------------------------------------
def run_until_settled(at: AppTest, settings: Settings) -> AppTest:
    """Run (a confirmed start goes on in the background), wait until the background start has ended, and run
    again, as the page's live panel does by itself each second."""
    run(at)
    deadline = time.monotonic() + TIMEOUT_S
    while background.running(settings) is not None:
        assert time.monotonic() < deadline, "the start never finished"
        time.sleep(0.05)
    return run(at)


def entry_text(settings: Settings, name: str) -> str:
    parsed = read_registry_text(settings.curated_path)
    for (start, end), raw in zip(parsed.spans, parsed.entries, strict=True):
        if raw.get("name") == name:
            return parsed.text[start:end]
    raise AssertionError(f"{name} not in the curated file")


def other_entries_text(settings: Settings, name: str) -> list[str]:
    parsed = read_registry_text(settings.curated_path)
    return [
        parsed.text[start:end]
        for (start, end), raw in zip(parsed.spans, parsed.entries, strict=True)
        if raw.get("name") != name
    ]


def select_entry(at: AppTest, name: str) -> AppTest:
    widget(at.selectbox, "Entry").set_value(name)
    return run(at)


@pytest.fixture
def demo_backend() -> Iterator[Callable[[int], None]]:
    """Start the demo backend on a given port (own process group, killed at teardown)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> None:
        proc = subprocess.Popen(
            demo_argv(port, "--served-model-name", "imageworks/demo-vision"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError("demo backend did not become healthy")

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def tamper_license(settings: Settings) -> Path:
    path = settings.root / "demo" / "models" / "imageworks-demo-vision" / "LICENSE"
    path.write_text(path.read_text(encoding="utf-8") + "Additional restriction: no commercial use.\n", encoding="utf-8")
    return path


# Navigation ---------------------------------------------------------------------------------------------------
def test_every_page_opens_under_its_runbook_name(root: Settings) -> None:
    at = open_page()
    assert texts(at.title) == ["Registry"], "the Models → Registry page is the default"
    assert {"Entries", "Import from Download History", "History"} <= {t.label for t in at.tabs}
    for page, title in (("active_model", "Active Model"), ("vision_probe", "Vision Probe"), ("settings", "Settings")):
        at.switch_page(f"pages/{page}.py")
        run(at)
        assert texts(at.title) == [title]
    assert [t.label for t in at.tabs] == ["Paths", "Environment", "Backends", "Audit log"]
    assert "Reload registry" in [b.label for b in open_tab(at, "settings_tab", "Backends").button]


# Registry table -----------------------------------------------------------------------------------------------
def test_registry_table_shows_the_merged_registry_with_status(root: Settings) -> None:
    at = open_page()
    frame = table(at)
    assert list(frame.columns) == list(dashboard_data.REGISTRY_COLUMNS)
    rows = frame.set_index("name")
    assert QWEN in rows.index and "qwen3-vl-8b-instruct_(FP8)" not in rows.index, "testing entries hidden by default"
    demo = rows.loc[DEMO]
    assert demo["backend"] == "vllm" and demo["served_id"] == "imageworks/demo-vision"
    assert list(demo["roles"]) == ["caption", "description", "keywords", "chat"]
    assert list(demo["capabilities"]) == ["text", "vision", "reasoning"], "names, readable without an emoji font"
    assert (demo["weights"], demo["lock"], demo["last_verification"], demo["last_probe"]) == (
        "present",
        "unlocked",
        "never",
        "never",
    )
    assert demo["status"] == ""
    assert rows.loc[QWEN, "weights"] == "missing" and rows.loc[QWEN, "status"] == "🟠 missing"
    assert rows.loc["gpt-4o-mini_(remote)", "weights"] == "n/a"
    assert "5 entries shown (1 hidden by filters)" in joined(at.caption)


def test_registry_table_puts_operator_columns_first_and_shows_no_raw_none(root: Settings) -> None:
    update_entry(root, DEMO, {"download_size_bytes": 3 * 2**30}, command="test size")
    at = open_page()
    frame = table(at)
    assert list(frame.columns[:8]) == [
        "name",
        "status",
        "lock",
        "weights",
        "last_verification",
        "last_probe",
        "backend",
        "roles",
    ], "what an operator checks stays on screen"
    assert frame.columns[-1] == "served_id", "long text last"
    rows = frame.set_index("name")
    assert rows.loc[DEMO, "size"] == "3.0 GiB" and rows.loc[QWEN, "size"] == "—"
    cells = [str(v) for v in frame.drop(columns=["roles", "capabilities"]).to_numpy().ravel()]
    assert not [c for c in cells if c in ("None", "nan", "NaN")], cells
    widget(at.text_input, "Search").input("demo-text")
    assert "1 entry shown (5 hidden by filters)" in joined(run(at).caption)


def test_registry_filters_search_role_capability_backend_and_hidden(root: Settings) -> None:
    at = open_page()
    widget(at.text_input, "Search").input("demo")
    assert sorted(table(run(at))["name"]) == [DEMO_TEXT, DEMO]
    widget(at.text_input, "Search").input("")
    widget(at.selectbox, "Role").set_value("narration")
    assert list(table(run(at))["name"]) == [DEMO_TEXT]
    widget(at.toggle, "Show testing/deprecated").set_value(True)
    # A role filter ranks by that role's priority (qwen3's 5 over demo-text's 0), as selection does.
    assert list(table(run(at))["name"]) == ["qwen3-vl-8b-instruct_(FP8)", DEMO_TEXT]
    widget(at.selectbox, "Role").set_value("All")
    widget(at.selectbox, "Capability").set_value("tools")
    widget(at.selectbox, "Backend").set_value("openai")
    assert list(table(run(at))["name"]) == ["gpt-4o-mini_(remote)"]
    widget(at.selectbox, "Capability").set_value("audio")
    widget(at.selectbox, "Backend").set_value("All")
    run(at)
    assert table(at).empty and "No entry matches the filters." in joined(at.info)


def test_drift_on_a_locked_entry_shows_a_red_badge_and_the_fix(root: Settings) -> None:
    lock_entry(root, DEMO, set_expected=True)
    tamper_license(root)
    assert verify_entry(root, DEMO).result == "drift"
    at = open_page()
    rows = table(at).set_index("name")
    assert rows.loc[DEMO, "status"] == "🔴 drift"
    assert rows.loc[DEMO, "last_verification"] == "drift · just now"
    assert rows.loc[DEMO_TEXT, "status"] == "", "the badge needs a lock: the unlocked twin has no drift badge"
    assert f"**Hash drift on locked entries:** {DEMO}" in joined(at.error)
    assert "runbook §3" in joined(at.error)
    assert any(":red-badge[drift]" in m for m in texts(at.markdown))


def test_entry_detail_shows_every_field_with_its_layer_and_the_exact_launch_argv(single_port: Settings) -> None:
    edit_layer(
        single_port,
        "discovered",
        lambda entries: entries.append({"name": DEMO, "download_size_bytes": 1234, "quantization": "int8"}),
        command="test",
    )
    at = select_entry(open_page(), DEMO)
    fields = table(at, 1).set_index("field")
    assert fields.loc["backend", "from"] == "curated" and fields.loc["backend", "value"] == '"vllm"'
    assert (
        fields.loc["download_size_bytes", "from"] == "discovered"
        and fields.loc["download_size_bytes", "value"] == "1234"
    )
    assert fields.loc["quantization", "from"] == "curated", "curated wins over discovered"
    assert fields.loc["backend_config.startup_timeout_s", "value"] == "30.0"
    assert "layer **curated+discovered**" in joined(at.markdown)
    argv = json.loads(at.code[0].value)
    assert argv == [
        sys.executable,
        "-m",
        "imageworks_demo.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(single_port.vllm_port),
        "--served-model-name",
        "imageworks/demo-vision",
    ]
    assert f"`http://127.0.0.1:{single_port.vllm_port}/v1`" in joined(at.markdown)


def test_remote_entry_detail_has_no_launch_argv_and_no_verify(root: Settings) -> None:
    at = select_entry(open_page(), "gpt-4o-mini_(remote)")
    assert "`https://api.openai.com/v1`" in joined(at.markdown)
    assert all("imageworks_demo" not in c for c in texts(at.code))
    assert widget(at.button, "Verify Hash").disabled
    assert widget(at.toggle, "Lock version").disabled
    assert "No download_path: nothing to verify" in joined(at.caption)


# Verify Hash --------------------------------------------------------------------------------------------------
def test_verify_hash_runs_the_core_verification_and_records_it(root: Settings) -> None:
    at = select_entry(open_page(), DEMO)
    at.button(key="verify_hash").click()
    run(at)
    expected = verify_entry(root, DEMO).aggregate
    shown = joined(at.info)
    assert f"Verify Hash: hash `{expected}` · 5 files" in shown
    assert "toggle **Lock version** to pin it" in shown
    rows = history.list_verifications(root, DEMO)
    assert [r["result"] for r in rows] == ["unlocked", "unlocked"], "the dashboard's run and ours, both recorded"
    assert rows[1]["aggregate"] == expected
    assert table(run(at)).set_index("name").loc[DEMO, "last_verification"] == "hashed, no lock · just now"


def test_verify_hash_on_a_locked_entry_reports_ok(root: Settings) -> None:
    expected = lock_entry(root, DEMO, set_expected=True).aggregate
    at = select_entry(open_page(), DEMO)
    at.button(key="verify_hash").click()
    run(at)
    assert f"Verify Hash: **ok** — matches the expected hash `{expected}`" in joined(at.success)


def test_verify_hash_on_drift_shows_the_per_file_report_and_the_text_diff(root: Settings) -> None:
    expected = lock_entry(root, DEMO, set_expected=True).aggregate
    tamper_license(root)
    at = select_entry(open_page(), DEMO)
    at.button(key="verify_hash").click()
    run(at)
    errors = joined(at.error)
    assert f"Verify Hash: **drift** — expected `{expected}`" in errors
    assert "re-download with `--force`" in errors
    modified = [t for t in at.dataframe if "old_digest" in t.value.columns]
    assert len(modified) == 1 and list(modified[0].value["path"]) == ["LICENSE"]
    diffs = [c for c in texts(at.code) if "+Additional restriction: no commercial use." in c]
    assert diffs, "the changed LICENSE is shown as a unified diff"
    assert "**Text diff: `LICENSE`**" in joined(at.markdown)


def test_verify_hash_cannot_be_double_submitted(root: Settings) -> None:
    at = select_entry(open_page(), DEMO)
    release = __import__("threading").Event()
    at.session_state["job::verify:held"] = _HeldJob(release)
    run(at)
    assert widget(at.button, "Verify Hash").disabled, "a running job disables every long action"
    assert widget(at.toggle, "Lock version").disabled
    assert "Verifying another entry is running (12 s); long actions wait until it finishes." in joined(at.caption)
    release.set()
    assert not widget(run(at).button, "Verify Hash").disabled, "enabled again once the job is done"


class _HeldJob:
    """Stands in for a running job of another entry (``done`` false until released)."""

    key = "verify:held"
    label = "Verifying another entry"
    elapsed = 12.0

    def __init__(self, release: Any) -> None:
        self.release = release

    @property
    def done(self) -> bool:
        return self.release.is_set()


# Lock version -------------------------------------------------------------------------------------------------
def test_lock_version_requires_a_fresh_full_verification(root: Settings) -> None:
    before_others = other_entries_text(root, DEMO)
    at = select_entry(open_page(), DEMO)
    widget(at.toggle, "Lock version").set_value(True)
    run(at)
    assert "Locking requires a fresh full verification" in joined(at.info)
    assert load_registry(force=True, settings=root).get(DEMO).locked is False, "toggling alone changes nothing"
    widget(at.button, "Verify and lock").click()
    run(at)
    entry = load_registry(force=True, settings=root).get(DEMO)
    assert entry.locked and entry.version_lock is not None
    aggregate = entry.version_lock.expected_aggregate_sha256
    assert aggregate == verify_entry(root, DEMO).aggregate
    assert (root.root / entry.version_lock.manifest_path).is_file()
    assert f"Locked: expected hash set to `{aggregate}` from a full verification" in joined(at.success)
    assert widget(at.toggle, "Lock version").value is True
    assert other_entries_text(root, DEMO) == before_others, "the rest of the curated file is byte-for-byte unchanged"
    assert [e["event"] for e in audit.read_events(root, "lock")] == ["lock"]


def test_lock_version_cancel_leaves_the_entry_unlocked(root: Settings) -> None:
    at = select_entry(open_page(), DEMO)
    widget(at.toggle, "Lock version").set_value(True)
    run(at)
    at.button(key="lock_cancel").click()
    run(at)
    assert widget(at.toggle, "Lock version").value is False
    assert "Verify and lock" not in [b.label for b in at.button]
    assert load_registry(force=True, settings=root).get(DEMO).locked is False


def test_unlocking_asks_for_the_reason_and_records_it(root: Settings) -> None:
    expected = lock_entry(root, DEMO, set_expected=True).aggregate
    at = select_entry(open_page(), DEMO)
    widget(at.toggle, "Lock version").set_value(False)
    run(at)
    widget(at.button, "Unlock").click()
    run(at)
    assert "**Unlock refused:** give the reason" in joined(at.error), "no reason, no unlock"
    assert load_registry(force=True, settings=root).get(DEMO).locked, "nothing changed"
    # The reason and the button submit together (one form): typing then clicking works without Enter.
    widget(at.text_input, "Reason for unlocking (recorded in the audit log)").input("INC-42: planned re-quantisation")
    widget(at.button, "Unlock").click()
    run(at)
    lock = load_registry(force=True, settings=root).get(DEMO).version_lock
    assert lock is not None and lock.locked is False
    assert lock.unlock_reason == "INC-42: planned re-quantisation"
    assert lock.expected_aggregate_sha256 == expected, "unlocking keeps the expected hash"
    assert audit.read_events(root, "unlock")[0]["reason"] == "INC-42: planned re-quantisation"
    assert "Unlocked demo-vision_(CPU); reason recorded" in joined(at.success)
    assert widget(at.toggle, "Lock version").value is False


def test_verify_and_lock_replaces_the_stale_unlocked_result(root: Settings) -> None:
    at = select_entry(open_page(), DEMO)
    at.button(key="verify_hash").click()
    run(at)
    assert "Nothing is expected yet" in joined(at.info)
    widget(at.toggle, "Lock version").set_value(True)
    run(at)
    widget(at.button, "Verify and lock").click()
    run(at)
    assert "Locked: expected hash set to" in joined(at.success)
    assert "Nothing is expected yet" not in joined(at.info), "the result from before the lock is gone"
    assert widget(at.toggle, "Lock version").value is True


def test_missing_weights_disable_verify_and_lock_with_the_reason(root: Settings) -> None:
    at = select_entry(open_page(), QWEN)
    assert widget(at.button, "Verify Hash").disabled
    toggle = widget(at.toggle, "Lock version")
    assert toggle.disabled and "Weights missing" in (toggle.help or "")
    assert "Weights missing: download_path does not exist" in joined(at.caption)


def test_a_failed_lock_turns_the_toggle_back_off(root: Settings) -> None:
    weights = root.root / "demo" / "models" / "imageworks-demo-vision"
    at = select_entry(open_page(), DEMO)
    widget(at.toggle, "Lock version").set_value(True)
    run(at)
    (weights / "broken").symlink_to(weights / "gone")  # the read fails half-way
    widget(at.button, "Verify and lock").click()
    run(at)
    assert "Verify and lock failed" in joined(at.error) and "broken symlink" in joined(at.error)
    assert widget(at.toggle, "Lock version").value is False, "the toggle shows the file's state again"
    assert load_registry(force=True, settings=root).get(DEMO).locked is False
    widget(at.toggle, "Lock version").set_value(True)
    run(at)
    (weights / "broken").unlink()
    for child in weights.iterdir():
        child.unlink()  # now the weights vanish while the toggle is on: it turns off, disabled, with the reason
    weights.rmdir()
    run(at)
    toggle = widget(at.toggle, "Lock version")
    assert toggle.value is False and toggle.disabled and "Weights missing" in (toggle.help or "")


def test_accept_new_weights_after_drift_relocks_at_the_new_hash(root: Settings) -> None:
    old = lock_entry(root, DEMO, set_expected=True).aggregate
    tamper_license(root)
    assert verify_entry(root, DEMO).result == "drift"
    at = select_entry(open_page(), DEMO)
    assert "Accept new weights" in [b.label for b in at.button], "offered after drift"
    widget(at.button, "Accept new weights").click()
    run(at)
    assert "**Accept new weights refused:** give the reason" in joined(at.error)
    assert load_registry(force=True, settings=root).get(DEMO).version_lock.expected_aggregate_sha256 == old
    reason = "CHG-7: licence updated upstream"
    widget(at.text_input, "Reason for accepting the new weights (recorded in the audit log)").input(reason)
    widget(at.button, "Accept new weights").click()
    run(at)
    lock = load_registry(force=True, settings=root).get(DEMO).version_lock
    assert lock is not None and lock.locked and lock.expected_aggregate_sha256 != old
    assert f"Locked: expected hash set to `{lock.expected_aggregate_sha256}`" in joined(at.success)
    assert [e["reason"] for e in audit.read_events(root, "unlock")] == [reason]
    assert audit.read_events(root, "lock")[0]["reason"] == reason, "the newest lock event: the re-lock"
    assert table(at).set_index("name").loc[DEMO, "status"] == "", "no drift badge: the new lock verified ok"
    assert "Accept new weights" not in [b.label for b in at.button], "offered only while the last result is drift"


# Edit metadata ------------------------------------------------------------------------------------------------
def test_edit_metadata_preview_shows_the_curated_diff_and_writes_nothing(root: Settings) -> None:
    before = root.curated_path.read_text(encoding="utf-8")
    at = select_entry(open_page(), DEMO)
    at.multiselect(key=f"edit_roles:{DEMO}").unselect("chat")
    at.text_area(key=f"edit_notes:{DEMO}").input("Reviewed by ops.")
    at.button(key=f"edit_preview:{DEMO}").click()
    run(at)
    diff = next(c for c in texts(at.code) if c.startswith("--- a/model_registry.curated.json"))
    assert '-    "roles": ["caption", "description", "keywords", "chat"],' in diff
    assert '+    "notes": "Reviewed by ops."' in diff
    assert root.curated_path.read_text(encoding="utf-8") == before
    assert not root.history_db_path.exists() or not history.list_revisions(root)


def test_edit_metadata_save_writes_only_that_entry_and_keeps_a_revision(root: Settings) -> None:
    others = other_entries_text(root, DEMO)
    at = select_entry(open_page(), DEMO)
    at.multiselect(key=f"edit_capabilities:{DEMO}").select("tools")
    at.number_input(key=f"edit_priority:{DEMO}").set_value(7)
    at.text_area(key=f"edit_generation:{DEMO}").input('{"temperature": 0.1, "max_tokens": 128}')
    at.button(key=f"edit_save:{DEMO}").click()
    run(at)
    entry = load_registry(force=True, settings=root).get(DEMO)
    assert entry.capabilities.enabled() == ["text", "vision", "tools", "reasoning"]
    assert entry.role_priority == 7 and entry.generation_defaults == {"temperature": 0.1, "max_tokens": 128}
    assert other_entries_text(root, DEMO) == others
    assert json.loads(entry_text(root, DEMO))["capabilities"] == {
        "text": True,
        "vision": True,
        "tools": True,
        "reasoning": True,
    }
    revisions = history.list_revisions(root)
    assert len(revisions) == 1 and revisions[0]["command"] == f"dashboard: edit {DEMO}"
    assert f"Saved {DEMO} to model_registry.curated.json" in joined(at.success)


def test_edit_metadata_invalid_json_shows_the_field_error_and_saves_nothing(root: Settings) -> None:
    before = root.curated_path.read_text(encoding="utf-8")
    at = select_entry(open_page(), DEMO)
    at.text_area(key=f"edit_backend_config:{DEMO}").input('{"health_path": "/health",}')
    at.button(key=f"edit_save:{DEMO}").click()
    run(at)
    error = joined(at.error)
    assert "Edit metadata (nothing saved) failed:** backend_config: invalid JSON at line 1" in error
    assert root.curated_path.read_text(encoding="utf-8") == before


def test_edit_metadata_schema_violation_names_the_field_and_saves_nothing(root: Settings) -> None:
    before = root.curated_path.read_text(encoding="utf-8")
    at = select_entry(open_page(), DEMO)
    at.text_area(key=f"edit_backend_config:{DEMO}").input('{"port": 70000, "launch": ["{python}", "{gpu}"]}')
    at.button(key=f"edit_save:{DEMO}").click()
    run(at)
    error = joined(at.error)
    assert "Not saved — the registry would be invalid" in error
    assert "field 'backend_config.port'" in error and "less than or equal to 65535" in error
    assert "unknown placeholder {gpu}" in error
    assert root.curated_path.read_text(encoding="utf-8") == before
    assert not root.history_db_path.exists() or not history.list_revisions(root)


# Import from Download History ---------------------------------------------------------------------------------
def test_import_from_download_history_adds_a_curated_entry(root: Settings) -> None:
    weights = root.root / "models" / "acme" / "tiny-vl-AWQ"
    weights.mkdir(parents=True)
    (weights / "model.safetensors").write_bytes(b"\0" * 64)
    history.record_download(
        root,
        repo_id="acme/tiny-vl-AWQ",
        status="complete",
        commit_sha="abc123",
        location="linux_wsl",
        path=str(weights),
        total_bytes=64,
        format="awq",
        quantization="awq-4bit",
    )
    history.record_download(root, repo_id="acme/broken", status="failed", path=str(root.root / "models" / "broken"))
    edit_layer(
        root,
        "discovered",
        lambda entries: entries.append(
            {"name": "found-on-disk", "download_path": "models/found", "download_format": "gguf"}
        ),
        command="test",
    )
    at = open_page(tab="Import from Download History")
    candidates = next(t.value for t in at.dataframe if "origin" in t.value.columns)
    assert list(candidates["origin"]) == ["discovered", "download"], "the failed download is not offered"
    assert list(candidates["format"]) == ["gguf", "awq"]
    labels = widget(at.selectbox, "Entry to import").options
    assert labels == ["found-on-disk (discovered)", "tiny-vl_(AWQ) — acme/tiny-vl-AWQ (download)"]
    widget(at.selectbox, "Entry to import").set_value("download:1")
    run(at)
    key = "download:1"
    at.text_input(key=f"import_name:{key}").input("tiny-vl_(AWQ)")
    at.multiselect(key=f"import_roles:{key}").set_value(["caption", "keywords"])
    at.multiselect(key=f"import_capabilities:{key}").set_value(["text", "vision"])
    at.button(key=f"import_preview:{key}").click()
    run(at)
    diff = next(c for c in texts(at.code) if c.startswith("--- a/model_registry.curated.json"))
    assert '+    "name": "tiny-vl_(AWQ)",' in diff and f'+    "download_path": "{weights}",' in diff
    assert "tiny-vl_(AWQ)" not in load_registry(force=True, settings=root).curated
    at.button(key=f"import_add:{key}").click()
    run(at)
    entry = load_registry(force=True, settings=root).get("tiny-vl_(AWQ)")
    assert (entry.backend, entry.served_model_id, entry.roles) == ("vllm", "acme/tiny-vl-AWQ", ["caption", "keywords"])
    assert entry.capabilities.enabled() == ["text", "vision"]
    assert (entry.download_format, entry.quantization, entry.download_size_bytes) == ("awq", "awq-4bit", 64)
    assert (entry.source.repo_id, entry.source.revision) == ("acme/tiny-vl-AWQ", "abc123")
    assert "Added tiny-vl_(AWQ) to model_registry.curated.json" in joined(at.success)
    assert widget(at.selectbox, "Entry to import").options == ["found-on-disk (discovered)"]


def test_import_of_a_discovered_entry_keeps_its_name_so_the_overlay_merges(root: Settings) -> None:
    edit_layer(
        root,
        "discovered",
        lambda entries: entries.append(
            {"name": "found-on-disk", "download_path": "models/found", "download_format": "gguf"}
        ),
        command="test",
    )
    at = open_page(tab="Import from Download History")
    key = "discovered:found-on-disk"
    assert at.text_input(key=f"import_name:{key}").disabled
    at.selectbox(key=f"import_backend:{key}").set_value("ollama")
    at.text_input(key=f"import_served:{key}").input("found:latest")
    at.button(key=f"import_add:{key}").click()
    run(at)
    registry = load_registry(force=True, settings=root)
    assert registry.layer_of("found-on-disk") == "curated+discovered"
    entry = registry.get("found-on-disk")
    assert (entry.backend, entry.served_model_id, entry.download_path) == ("ollama", "found:latest", "models/found")
    assert "download_path" not in registry.curated["found-on-disk"], "machine facts stay in the discovered layer"


# History and rollback -----------------------------------------------------------------------------------------
def test_history_rollback_asks_for_confirmation_then_restores_the_revision(root: Settings) -> None:
    original = root.curated_path.read_text(encoding="utf-8")
    update_entry(root, DEMO, {"notes": "first edit"}, command="test edit")
    edited = root.curated_path.read_text(encoding="utf-8")
    at = open_page(tab="History")
    assert widget(at.selectbox, "Revision").value == 1
    change = next(c for c in texts(at.code) if c.startswith("--- before rev 1"))
    assert '+    "notes": "first edit"' in change
    widget(at.button, "Undo this change (restore the file as it was before revision 1)").click()
    run(at)
    assert root.curated_path.read_text(encoding="utf-8") == edited, "nothing happens before the confirmation"
    assert "Restore `" in joined(at.markdown) and "revision **1**" in joined(at.markdown)
    assert "as it was **before** revision **1**" in joined(at.markdown), "named for what it does: undo revision 1"
    assert any(c.startswith("--- current") and '-    "notes": "first edit"' in c for c in texts(at.code))
    widget(at.button, "Confirm rollback").click()
    run(at)
    assert root.curated_path.read_text(encoding="utf-8") == original
    assert "Rolled back" in joined(at.success)
    assert "Confirm rollback" not in [b.label for b in at.button], "the dialog closed"
    assert [r["command"] for r in history.list_revisions(root)] == ["dashboard: rollback 1", "test edit"]


def test_history_rollback_cancel_changes_nothing(root: Settings) -> None:
    update_entry(root, DEMO, {"notes": "keep me"}, command="test edit")
    edited = root.curated_path.read_text(encoding="utf-8")
    at = open_page(tab="History")
    widget(at.button, "Undo this change (restore the file as it was before revision 1)").click()
    run(at)
    at.button(key="rollback_cancel").click()
    run(at)
    assert root.curated_path.read_text(encoding="utf-8") == edited
    assert "Confirm rollback" not in [b.label for b in at.button]


# Settings -----------------------------------------------------------------------------------------------------
def test_settings_shows_resolved_paths_and_every_setting_with_its_source(
    root: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHAT_PROXY_VLLM_PORT", "25001")
    monkeypatch.setenv("IMAGEWORKS_API_TOKEN", "s3cret")
    at = open_page("settings")
    paths = table(at, 0).set_index("what")
    assert paths.loc["root", "path"] == str(root.root)
    assert paths.loc["curated registry", "path"] == str(root.curated_path) and paths.loc["curated registry", "exists"]
    assert paths.loc["active state", "path"] == str(root.active_state_path)
    env = table(open_tab(at, "settings_tab", "Environment")).set_index("variable")
    assert (env.loc["CHAT_PROXY_VLLM_PORT", "value"], env.loc["CHAT_PROXY_VLLM_PORT", "source"]) == ("25001", "env")
    assert (env.loc["CHAT_PROXY_VLLM_HOST", "value"], env.loc["CHAT_PROXY_VLLM_HOST", "source"]) == (
        "127.0.0.1",
        "default",
    )
    assert env.loc["IMAGEWORKS_API_TOKEN", "value"] == "••••••", "secrets are never shown"
    assert "IMAGEWORKS_ROOT" in env.index and "CHAT_PROXY_VLLM_EXTRA_ARGS" in env.index


def test_reload_registry_lists_every_problem_and_keeps_the_last_good_registry(root: Settings) -> None:
    at = open_page("settings", "Backends")
    text = root.curated_path.read_text(encoding="utf-8")
    broken = text.replace('"role_priority": 1,', '"role_priorty": 1,').replace(
        '"backend": "openai"', '"backend": "openia"'
    )
    root.curated_path.write_text(broken, encoding="utf-8")
    widget(at.button, "Reload registry").click()
    run(at)
    error = joined(at.error)
    assert "Registry reload failed — 2 problems" in error
    assert "unknown key 'role_priorty' — did you mean 'role_priority'?" in error
    assert "entry 'gpt-4o-mini_(remote)': field 'backend'" in error
    assert "Reload registry" in error, "the fix is named"
    assert "showing the last good registry" in joined(at.warning)
    at.switch_page("pages/registry.py")
    run(at)
    assert "showing the last good registry" in joined(at.warning)
    assert DEMO in list(table(at)["name"]), "the last good registry is still shown"
    root.curated_path.write_text(text, encoding="utf-8")
    at.switch_page("pages/settings.py")
    open_tab(at, "settings_tab", "Backends")
    widget(at.button, "Reload registry").click()
    run(at)
    assert "Registry reloaded: 6 entries, valid." in joined(at.success)
    assert not any("last good" in w for w in texts(at.warning))


def test_reload_registry_reports_a_json_syntax_error_with_line_and_column(root: Settings) -> None:
    at = open_page("settings", "Backends")
    root.curated_path.write_text('[\n  {"name": "x",}\n]\n', encoding="utf-8")
    widget(at.button, "Reload registry").click()
    run(at)
    assert f"{root.curated_path}:2:16: invalid JSON" in joined(at.error)


def test_a_registry_that_never_loaded_shows_the_problems_instead_of_a_page(root: Settings) -> None:
    root.curated_path.write_text('[{"name": "bad", "backend": "nope"}]', encoding="utf-8")
    at = open_page()
    assert "Registry failed to load" in joined(at.error) and "field 'backend'" in joined(at.error)
    assert not at.dataframe
    at.switch_page("pages/settings.py")
    open_tab(at, "settings_tab", "Backends")
    assert "Reload registry" in [b.label for b in at.button], "Settings stays usable to fix it"


def test_test_connection_reports_unreachable_then_the_served_models(
    single_port: Settings, demo_backend: Callable[[int], None]
) -> None:
    at = open_page("settings", "Backends")
    targets = dashboard_data.backend_targets(load_registry(settings=single_port), single_port)
    index = next(i for i, t in enumerate(targets) if t.endpoint == f"http://127.0.0.1:{single_port.vllm_port}/v1")
    at.button(key=f"test:{index}").click()
    run(at)
    assert f"http://127.0.0.1:{single_port.vllm_port}/v1/models: cannot connect" in joined(at.error)
    demo_backend(single_port.vllm_port)
    at.button(key=f"test:{index}").click()
    run(at)
    assert f"http://127.0.0.1:{single_port.vllm_port}/v1/models: OK, 1 model(s)" in joined(at.success)
    assert "Models served: imageworks/demo-vision" in joined(at.caption)


def test_audit_log_viewer_filters_by_event(root: Settings) -> None:
    audit.log_event(root, "lock_violation", name=DEMO, files=["LICENSE"])
    audit.log_event(root, "probe_failure", name=DEMO_TEXT, error="image refused")
    audit.log_event(root, "activation", name=DEMO, pid=123)
    at = open_page("settings", "Audit log")
    assert list(table(at)["event"]) == ["activation", "probe_failure", "lock_violation"]
    widget(at.selectbox, "Event").set_value("lock_violation")
    run(at)
    events = table(at)
    assert list(events["event"]) == ["lock_violation"] and list(events["entry"]) == [DEMO]
    assert json.loads(events["details"][0]) == {"name": DEMO, "files": ["LICENSE"]}


# Active Model -------------------------------------------------------------------------------------------------
def test_active_model_without_nvml_says_no_gpu_visible(root: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> list[gpu.GpuInfo]:
        raise gpu.GpuUnavailable("NVML could not initialise: driver not loaded")

    monkeypatch.setattr(gpu, "query_gpus", unavailable)
    at = open_page("active_model")
    assert "No NVIDIA GPU visible (NVML could not initialise: driver not loaded)" in joined(at.info)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Active model"] == "none" and metrics["Status"] == "idle"
    assert metrics["Host RAM"].endswith("GiB") and "CPU" in metrics
    assert "No activations recorded yet." in joined(at.caption)


def test_active_model_shows_gpu_cards_from_nvml(root: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    card = gpu.GpuInfo(
        index=0,
        name="NVIDIA RTX 4090",
        memory_total_bytes=24 * 2**30,
        memory_used_bytes=6 * 2**30,
        memory_free_bytes=18 * 2**30,
        utilization_percent=37,
        temperature_c=61,
    )
    monkeypatch.setattr(gpu, "query_gpus", lambda: [card])
    at = open_page("active_model")
    assert "**GPU 0: NVIDIA RTX 4090**" in joined(at.markdown)
    assert "Utilisation 37 % · Temperature 61 °C" in joined(at.caption)
    assert not any("No NVIDIA GPU visible" in i for i in texts(at.info))


def test_active_model_start_switch_and_stop_with_confirmation(single_port: Settings) -> None:
    at = open_page("active_model")
    widget(at.selectbox, "Model to run on the single port").set_value(DEMO)
    widget(at.button, "Start").click()
    run(at)
    assert f"Start **{DEMO}** on the single port?" in joined(at.markdown)
    assert runtime.read_state(single_port) is None, "nothing starts before the confirmation"
    at.button(key="active_confirm_ok").click()
    run_until_settled(at, single_port)
    assert f"{DEMO} is ready at `http://127.0.0.1:{single_port.vllm_port}/v1`" in joined(at.success)
    metrics = {m.label: m.value for m in at.metric}
    assert (metrics["Active model"], metrics["Status"], metrics["Health"]) == (DEMO, "ready", "healthy")
    served = httpx.get(f"http://127.0.0.1:{single_port.vllm_port}/v1/models", timeout=5).json()
    assert [m["id"] for m in served["data"]] == ["imageworks/demo-vision"]

    widget(at.selectbox, "Model to run on the single port").set_value(DEMO_TEXT)
    run(at)
    widget(at.button, "Switch").click()
    run(at)
    assert f"Switch from **{DEMO}** to **{DEMO_TEXT}**?" in joined(at.markdown)
    at.button(key="active_confirm_ok").click()
    run_until_settled(at, single_port)
    assert runtime.read_state(single_port).name == DEMO_TEXT
    assert f"{DEMO_TEXT} is ready" in joined(at.success)

    widget(at.button, "Stop").click()
    run(at)
    at.button(key="active_confirm_ok").click()
    run(at)
    assert f"Stopped {DEMO_TEXT} in" in joined(at.success)
    assert runtime.read_state(single_port) is None
    assert {m.label: m.value for m in at.metric}["Active model"] == "none"
    activations = table(at)
    assert {"name", "action", "result", "start_to_ready", "stop"} <= set(activations.columns)
    assert DEMO in set(activations["name"]) and DEMO_TEXT in set(activations["name"])


def test_active_model_failed_start_shows_the_error_and_the_log_tail(
    single_port: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    update_entry(
        single_port,
        DEMO_TEXT,
        {
            "backend_config": {
                "launch": demo_launch("--crash-at-start"),
                "startup_timeout_s": 20,
            }
        },
        command="test",
    )
    at = open_page("active_model")
    widget(at.selectbox, "Model to run on the single port").set_value(DEMO_TEXT)
    widget(at.button, "Start").click()
    run(at)
    at.button(key="active_confirm_ok").click()
    run_until_settled(at, single_port)
    assert f"**Starting {DEMO_TEXT} failed:**" in joined(at.error)
    assert any("last" in c and "lines of" in c for c in texts(at.code)), "the backend's last log lines are shown"


def test_once_ready_the_page_checks_health_slowly_and_hides_its_own_poll_lines(single_port: Settings) -> None:
    runtime.activate(single_port, DEMO)
    log = runtime.backend_log_path(single_port, DEMO)
    polls_at_ready = sum("GET /health" in line for line in log.read_text().splitlines())
    for _ in range(5):  # five page refreshes (the fragment runs each second): one health check, not five
        assert active.active_view(single_port).phase == "ready"
    polls = sum("GET /health" in line for line in log.read_text().splitlines())
    assert polls - polls_at_ready <= 1
    lines = active.log_lines(single_port, DEMO)
    assert lines and not any("GET /health" in line or "GET /v1/models" in line for line in lines)
    assert any("listening on" in line for line in lines), "the start-up lines stay visible"
    assert any("GET /health" in line for line in active.log_lines(single_port, DEMO, show_polls=True))

    at = open_page("active_model")
    assert any("health-check line" in c and "hidden" in c for c in texts(at.caption))
    assert not any("GET /health" in c for c in texts(at.code))
    widget(at.toggle, "Show health checks").set_value(True)
    run(at)
    assert any("GET /health" in c for c in texts(at.code))


def test_a_failed_start_is_shown_from_the_state_in_every_session(single_port: Settings) -> None:
    update_entry(single_port, DEMO_TEXT, {"backend_config": {"launch": ["no-such-vllm", "serve"]}}, command="test")
    with pytest.raises(BackendError, match="no-such-vllm"):
        runtime.activate(single_port, DEMO_TEXT)
    at = open_page("active_model")  # a session that never clicked anything
    assert f"**Starting {DEMO_TEXT} failed:**" in joined(at.error) and "no-such-vllm" in joined(at.error)
    assert {m.label: m.value for m in at.metric}["Status"] == "failed"
    widget(at.button, "Stop").click()
    run(at)
    at.button(key="active_confirm_ok").click()
    run(at)
    assert runtime.read_state(single_port) is None and not at.error


def test_active_model_can_stop_the_backend_while_the_registry_is_broken(single_port: Settings) -> None:
    runtime.activate(single_port, DEMO)
    single_port.curated_path.write_text("[{", encoding="utf-8")
    at = open_page("active_model")
    assert "Registry failed to load" in joined(at.error)
    assert {m.label: m.value for m in at.metric}["Active model"] == DEMO
    widget(at.button, "Stop").click()
    run(at)
    at.button(key="active_confirm_ok").click()
    run(at)
    assert f"Stopped {DEMO} in" in joined(at.success)
    assert runtime.read_state(single_port) is None


# Vision Probe -------------------------------------------------------------------------------------------------
def test_vision_probe_lists_only_vision_entries_and_previews_the_canonical_image(root: Settings) -> None:
    at = open_page("vision_probe")
    options = widget(at.selectbox, "Model (entries declaring vision)").options
    assert DEMO in options and DEMO_TEXT not in options and "gpt-4o-mini_(remote)" in options
    assert at.image, "the canonical probe image is previewed"
    assert not widget(at.button, "Run probe").disabled


def test_vision_probe_on_the_demo_backend_opens_the_result_modal(single_port: Settings) -> None:
    runtime.activate(single_port, DEMO)
    at = open_page("vision_probe")
    widget(at.selectbox, "Model (entries declaring vision)").set_value(DEMO)
    widget(at.button, "Run probe").click()
    run(at)
    shown = joined(at.markdown)
    assert ":green[:material/check_circle:] `vision_ok: true`" in shown and "`grounded: true`" in shown
    assert "**Reasoning**" in shown and "`latency:" in shown
    answer = texts(at.text)[0]
    assert "red" in answer.lower() and "42" in answer
    probes = history.list_probes(single_port, DEMO)
    assert len(probes) == 1 and probes[0]["vision_ok"] == 1
    widget(at.button, "Done").click()
    run(at)
    assert "Done" not in [b.label for b in at.button], "the modal closed"
    past = table(at)
    assert list(past["vision_ok"]) == [True] and list(past["grounded"]) == [True]


def test_vision_probe_of_an_inactive_model_explains_how_to_activate_it(root: Settings) -> None:
    at = open_page("vision_probe")
    widget(at.selectbox, "Model (entries declaring vision)").set_value(DEMO)
    widget(at.button, "Run probe").click()
    run(at)
    error = joined(at.error)
    assert "**Vision probe failed:**" in error and "activate-model" in error
    assert not history.list_probes(root, DEMO) if root.history_db_path.exists() else True


def test_vision_probe_with_activation_proves_a_text_only_model_cannot_see(single_port: Settings) -> None:
    update_entry(single_port, DEMO_TEXT, {"capabilities": {"text": True, "vision": True}}, command="test")
    at = open_page("vision_probe")
    widget(at.selectbox, "Model (entries declaring vision)").set_value(DEMO_TEXT)
    widget(at.checkbox, "Activate the model first if it is not the active backend").check()
    widget(at.button, "Run probe").click()
    run(at)
    assert ":red[:material/cancel:] `vision_ok: false`" in joined(at.markdown)
    assert joined(at.error), "the reason the probe failed is shown in the modal"
    assert runtime.read_state(single_port).name == DEMO_TEXT


def test_vision_probe_upload_of_a_non_image_is_refused_with_the_reason(single_port: Settings) -> None:
    runtime.activate(single_port, DEMO)
    at = open_page("vision_probe")
    widget(at.selectbox, "Model (entries declaring vision)").set_value(DEMO)
    widget(at.radio, "Image").set_value("Upload an image")
    run(at)
    assert widget(at.button, "Run probe").disabled, "no image, no probe"
    at.file_uploader(key="probe_upload").set_value(("fake.jpg", b"this is not a jpeg", "image/jpeg"))
    run(at)
    assert "No preview" in joined(at.caption)
    widget(at.button, "Run probe").click()
    run(at)
    assert "**Vision probe failed:**" in joined(at.error) and "fake.jpg" in joined(at.error)
    assert not history.list_probes(single_port, DEMO), "nothing sent, nothing recorded"


# dashboard_data: the values the pages show --------------------------------------------------------------------
def test_age_and_duration_texts() -> None:
    now = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
    assert dashboard_data.age_text((now - timedelta(seconds=20)).isoformat(), now) == "just now"
    assert dashboard_data.age_text((now - timedelta(minutes=5)).isoformat(), now) == "5 min ago"
    assert dashboard_data.age_text((now - timedelta(hours=3)).isoformat(), now) == "3 h ago"
    assert dashboard_data.age_text((now - timedelta(days=2)).isoformat(), now) == "2 d ago"
    assert dashboard_data.age_text(None, now) == "" and dashboard_data.age_text("garbage", now) == ""
    assert dashboard_data.duration_text(4.25) == "4.2 s"
    assert dashboard_data.duration_text(185) == "3 min 05 s"
    assert dashboard_data.duration_text(7500) == "2 h 05 min"
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(12) == "12 B" and format_bytes(None) == "-"


def test_verify_progress_text_gives_fraction_sizes_files_and_rate() -> None:
    fraction, text = dashboard_data.verify_progress(50_000_000, 200_000_000, 1, 4, 2.0, "model-00001.safetensors")
    assert fraction == 0.25
    assert text == "50.0 / 200.0 MB · 1/4 files · 25.0 MB/s · model-00001.safetensors"
    assert dashboard_data.verify_progress(0, 0, 0, 0, 0.0)[0] == 0.0


def test_capability_changes_keep_the_curated_diff_small(root: Settings) -> None:
    registry = load_registry(settings=root)
    # The curated object keeps its keys; a newly enabled capability is added, a disabled one set false.
    assert dashboard_data.capability_changes(registry, DEMO, ["text", "vision"]) == {
        "text": True,
        "vision": True,
        "reasoning": False,
    }
    assert dashboard_data.capability_changes(registry, DEMO_TEXT, ["text", "tools"]) == {"text": True, "tools": True}
    with pytest.raises(Exception, match="unknown sight"):
        dashboard_data.capability_changes(registry, DEMO, ["sight"])


def test_metadata_changes_only_lists_what_differs(root: Settings) -> None:
    registry = load_registry(settings=root)
    defaults = dashboard_data.metadata_defaults(registry, DEMO)
    same = dashboard_data.metadata_changes(registry, DEMO, **defaults)
    assert same == {}
    changed = dashboard_data.metadata_changes(registry, DEMO, **{**defaults, "notes": "  ", "role_priority": 3})
    assert changed == {"notes": None, "role_priority": 3}


def test_preview_of_an_unknown_curated_name_is_refused(root: Settings) -> None:
    preview = dashboard_data.preview_curated_change(root, "nope", {"notes": "x"})
    assert not preview.ok and preview.problems == [f"'nope' is not in the curated file {root.curated_path}"]
    again = dashboard_data.preview_curated_change(root, DEMO, {"notes": "x"}, create=True)
    assert again.problems == [f"'{DEMO}' is already curated; edit it instead of importing it again"]


def test_suggest_name_from_a_repo_id() -> None:
    # the same rule as the downloader's discovered entries, so an import and a later download agree
    assert dashboard_data.suggest_name("Qwen/Qwen2.5-VL-7B-Instruct-AWQ", "awq") == "qwen2.5-vl-7b-instruct_(AWQ)"
    assert dashboard_data.suggest_name("acme/tiny", "gguf", "Q4_K_M") == "tiny_(Q4_K_M)"
    assert dashboard_data.suggest_name("acme/tiny-vlm", "safetensors") == "tiny-vlm"


def test_check_connection_never_raises() -> None:
    port = free_port()
    result = dashboard_data.check_connection(f"http://127.0.0.1:{port}/v1", timeout_s=1)
    assert not result.ok and result.message.startswith(f"http://127.0.0.1:{port}/v1/models: cannot connect")


def test_load_registry_view_keeps_the_last_good_registry(root: Settings) -> None:
    good = dashboard_data.load_registry_view(root)
    assert good.error is None and not good.stale and len(good.registry) == 6
    root.curated_path.write_text("[", encoding="utf-8")
    stale = dashboard_data.load_registry_view(root, force=True)
    assert stale.stale and stale.registry is good.registry and stale.loaded_at == good.loaded_at
    assert "invalid JSON" in stale.error.lines()[0]
