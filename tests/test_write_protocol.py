"""The registry write protocol: what counts as a valid layer file, no lost updates, crash safety, movable roots.

Every mutation (edit, lock, re-pin, unlock, rollback, import-legacy) is one journaled change: intent rows in the
history DB, files by atomic replace, snapshot, audit lines, then the rows are committed. A crash anywhere is
settled at the next load: temp files removed, a change that did not fully reach the disk is undone and its rows
marked not applied, a change that did is committed with its audit lines, manifest/curated mismatches reported.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from imageworks_core import audit, history, registry
from imageworks_core.errors import RegistryError
from imageworks_core.registry import load_registry, rollback, update_entry
from imageworks_core.registry_file import lock_for
from imageworks_core.service import ImageWorks
from imageworks_core.settings import Settings, get_settings
from imageworks_core.verification import lock_entry, unlock_entry

REPO = Path(__file__).resolve().parent.parent
DEMO = "demo-vision_(CPU)"
sys.path.insert(0, str(REPO / "bench"))


# What a valid layer file is ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   \n\t\n"])
def test_blank_curated_file_is_invalid_exit_3(root: Settings, cli, text: str) -> None:
    root.curated_path.write_text(text)
    with pytest.raises(RegistryError) as info:
        load_registry(force=True, settings=root)
    assert info.value.exit_code == 3
    assert "an empty registry is `[]`" in "\n".join(info.value.lines())
    result = cli("validate")
    assert result.code == 3 and "an empty registry is `[]`" in result.err


def test_empty_array_is_a_valid_empty_curated_layer(root: Settings, cli) -> None:
    root.curated_path.write_text("[]\n")
    loaded = load_registry(force=True, settings=root)
    assert loaded.curated == {} and loaded.names() == list(loaded.discovered)
    assert cli("validate").code == 0


def test_a_fresh_root_without_files_or_history_loads_empty(tmp_path: Path) -> None:
    fresh = get_settings(tmp_path / "fresh")
    assert len(load_registry(force=True, settings=fresh)) == 0
    update_entry(fresh, "x_(FP16)", {"backend": "vllm"}, command="create", create=True)
    assert load_registry(settings=fresh).names() == ["x_(FP16)"]


def test_curated_file_that_disappears_from_a_root_with_history_is_invalid(root: Settings, cli) -> None:
    update_entry(root, DEMO, {"notes": "reviewed"}, command="edit")
    root.curated_path.unlink()
    with pytest.raises(RegistryError) as info:
        load_registry(force=True, settings=root)
    assert info.value.exit_code == 3
    text = "\n".join(info.value.lines())
    assert "is missing" in text and "rollback" in text
    assert cli("validate").code == 3
    with pytest.raises(RegistryError):  # an edit does not silently recreate it with one entry
        update_entry(root, DEMO, {"notes": "again"}, command="edit", create=True)
    assert not root.curated_path.exists()


def test_running_service_keeps_serving_when_the_curated_file_is_truncated(root: Settings) -> None:
    service = ImageWorks(root)
    count = len(service.registry)
    root.curated_path.write_text("")
    status = service.reload()
    assert not status.ok and "an empty registry is `[]`" in "\n".join(status.errors)
    assert len(service.registry) == count and DEMO in service.registry


def test_rollback_repairs_a_curated_file_with_broken_json(root: Settings, cli) -> None:
    original = root.curated_path.read_text()
    update_entry(root, DEMO, {"notes": "edited"}, command="edit")
    rev = history.list_revisions(root)[0]["id"]
    root.curated_path.write_text(original.replace("}\n]", "},\n]"))  # a trailing comma from a hand edit
    assert cli("validate").code == 3
    result = cli("rollback", str(rev))
    assert result.code == 0, result.err
    assert root.curated_path.read_text() == original


def _killed_edit(root: Settings, point: str) -> None:
    code = (
        "import sys; from imageworks_core.registry import update_entry; from imageworks_core.settings import "
        f"get_settings; update_entry(get_settings(sys.argv[1]), {DEMO!r}, {{'notes': 'x'}}, command='killed edit')"
    )
    env = {**os.environ, "IMAGEWORKS_CRASH_AT": point}
    assert subprocess.run([sys.executable, "-c", code, str(root.root)], env=env).returncode == 137


def test_a_change_killed_before_its_file_was_replaced_is_listed_as_not_applied(root: Settings, cli) -> None:
    before = root.curated_path.read_text()
    _killed_edit(root, "tmp")
    assert [p.name for p in root.configs_dir.glob(".*.tmp")]
    warnings = load_registry(force=True, settings=root).warnings
    assert root.curated_path.read_text() == before and not list(root.configs_dir.glob(".*.tmp"))
    assert any("undone" in w for w in warnings) and any("removed" in w for w in warnings)
    assert history.list_revisions(root)[0]["status"] == "not_applied"
    assert "killed edit (not applied: interrupted)" in cli("history").out
    assert audit.read_events(root, "recovery")[0]["undone"]


def test_a_change_killed_after_its_file_was_replaced_is_committed_with_its_audit_line(root: Settings) -> None:
    _killed_edit(root, "replace")
    assert not audit.read_events(root, "registry_write")
    registry_now = load_registry(force=True, settings=root)
    assert registry_now.get(DEMO).notes == "x"
    assert history.list_revisions(root)[0]["status"] == "applied"
    line = audit.read_events(root, "registry_write")[0]
    assert line["recovered"] is True and line["change"] == history.list_revisions(root)[0]["change_id"]
    assert json.loads(root.snapshot_path.read_text())[0]["notes"] == "x"  # the snapshot caught up


def test_no_write_lands_on_top_of_a_crashed_change_before_it_is_recovered(root: Settings) -> None:
    _killed_edit(root, "tmp")
    live_writer = lock_for(root.discovered_path)  # another writer at work: recovery must wait for it
    live_writer.acquire()
    try:
        with pytest.raises(RegistryError, match="awaits recovery"):
            update_entry(root, DEMO, {"notes": "on top"}, command="edit")
    finally:
        live_writer.release()
    update_entry(root, DEMO, {"notes": "on top"}, command="edit")
    assert [r["status"] for r in history.list_revisions(root)] == ["applied", "not_applied"]


# No lost update between lock, unlock and re-pin -------------------------------------------------------------
def _change_weights(root: Settings) -> None:
    path = root.root / "demo" / "models" / "imageworks-demo-vision" / "config.json"
    path.write_text(path.read_text() + "\n")


def _interleave(monkeypatch: pytest.MonkeyPatch, slow, fast) -> None:
    """Run ``slow`` in a thread that stops right before it takes the registry's file lock; run ``fast`` to the
    end meanwhile; then let ``slow`` go on. A writer that read the entry before the lock writes stale data."""
    real = registry.lock_for
    at_lock, go = threading.Event(), threading.Event()

    def gated(path: Path):
        if threading.current_thread().name == "slow" and not at_lock.is_set():
            at_lock.set()
            assert go.wait(30)
        return real(path)

    monkeypatch.setattr(registry, "lock_for", gated)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            slow()
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="slow")
    thread.start()
    assert at_lock.wait(30)
    fast()
    go.set()
    thread.join(30)
    if errors:
        raise errors[0]


def test_lock_toggle_racing_a_re_pin_keeps_the_new_expected_hash(root: Settings, monkeypatch) -> None:
    lock_entry(root, DEMO, set_expected=True)
    unlock_entry(root, DEMO, reason="INC-1")
    _change_weights(root)
    _interleave(monkeypatch, lambda: lock_entry(root, DEMO), lambda: lock_entry(root, DEMO, set_expected=True))
    entry = load_registry(force=True, settings=root).get(DEMO)
    manifest = json.loads((root.root / entry.version_lock.manifest_path).read_text())
    assert entry.locked
    assert entry.version_lock.expected_aggregate_sha256 == manifest["aggregate"]


def test_unlock_racing_a_re_pin_keeps_the_new_expected_hash(root: Settings, monkeypatch) -> None:
    lock_entry(root, DEMO, set_expected=True)
    _change_weights(root)
    _interleave(
        monkeypatch,
        lambda: unlock_entry(root, DEMO, reason="INC-2"),
        lambda: lock_entry(root, DEMO, set_expected=True),
    )
    entry = load_registry(force=True, settings=root).get(DEMO)
    manifest = json.loads((root.root / entry.version_lock.manifest_path).read_text())
    assert not entry.locked and entry.version_lock.unlock_reason == "INC-2"
    assert entry.version_lock.expected_aggregate_sha256 == manifest["aggregate"]


def test_an_edit_racing_a_lock_toggle_loses_no_field(root: Settings, monkeypatch) -> None:
    lock_entry(root, DEMO, set_expected=True)
    unlock_entry(root, DEMO, reason="INC-3")
    _interleave(
        monkeypatch,
        lambda: update_entry(root, DEMO, {"notes": "slow writer"}, command="edit"),
        lambda: lock_entry(root, DEMO),
    )
    entry = load_registry(force=True, settings=root).get(DEMO)
    assert entry.locked and entry.notes == "slow writer"


# The audit line belongs to the change -----------------------------------------------------------------------
def test_lock_and_unlock_audit_lines_carry_the_change_id_of_their_revision(root: Settings) -> None:
    lock_entry(root, DEMO, set_expected=True)
    unlock_entry(root, DEMO, reason="INC-4")
    unlock = audit.read_events(root, "unlock")[0]
    revision = history.list_revisions(root, DEMO)[0]
    assert unlock["change"] == revision["change_id"] and revision["status"] == "applied"


# Root-relative history --------------------------------------------------------------------------------------
def test_history_stores_root_relative_paths_and_rollback_works_after_the_root_moves(root: Settings, cli) -> None:
    original = root.curated_path.read_text()
    update_entry(root, DEMO, {"notes": "before the move"}, command="edit")
    rev = history.list_revisions(root)[0]
    assert rev["file"] == "configs/model_registry.curated.json"
    moved = root.root.parent / "moved-root"
    shutil.move(root.root, moved)
    settings = get_settings(moved)
    rollback(settings, rev["id"])
    assert settings.curated_path.read_text() == original
    assert cli("history", "--root", str(moved)).code == 0


def test_old_rows_with_absolute_paths_under_a_previous_root_still_roll_back(root: Settings) -> None:
    original = root.curated_path.read_text()
    update_entry(root, DEMO, {"notes": "edited"}, command="edit")
    old_root = "/srv/imageworks-old"
    with sqlite3.connect(root.history_db_path) as conn:  # a row as the previous release wrote it
        conn.execute(
            "INSERT INTO revisions (file, at, actor, command, before_text, after_text, names)"
            " VALUES (?, '2024-01-01T00:00:00+00:00', 'ops', 'edit', ?, ?, '[]')",
            (f"{old_root}/configs/model_registry.curated.json", original, original),
        )
        rev = conn.execute("SELECT MAX(id) FROM revisions").fetchone()[0]
    rollback(root, rev)
    assert root.curated_path.read_text() == original
    assert history.revision_path(root, f"{old_root}/elsewhere/x.json") == Path(f"{old_root}/elsewhere/x.json")


# Crash sweep ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_crash_at_every_write_point_of_every_mutation_leaves_a_consistent_root(tmp_path: Path) -> None:
    """Kill (``os._exit``) each mutation at each write point in a subprocess, then load once (recovery)."""
    from crash_sweep import run_sweep

    summary = run_sweep(tmp_path)
    assert summary["cases"] == summary["kill_points"] * summary["mutations"] >= 30
    assert summary["killed"] >= 25, summary  # points a mutation never reaches complete normally
    assert summary["torn_files"] == 0, summary["details"]
    assert summary["orphan_history_rows"] == 0, summary["details"]
    assert summary["unreported_mismatches"] == 0, summary["details"]
    assert summary["missing_audit_lines"] == 0, summary["details"]
    assert summary["leftover_tmp_files"] == 0, summary["details"]


def test_a_stale_re_pin_manifest_is_reported_with_its_fix(root: Settings, cli) -> None:
    lock_entry(root, DEMO, set_expected=True)
    entry = load_registry(settings=root).get(DEMO)
    manifest_path = root.root / entry.version_lock.manifest_path
    data = json.loads(manifest_path.read_text())
    data["aggregate"] = "0" * 64  # what an interrupted re-pin of the old code left behind
    manifest_path.write_text(json.dumps(data))
    warnings = load_registry(force=True, settings=root).warnings
    assert any(DEMO in w and "--set-expected" in w for w in warnings), warnings
    result = subprocess.run(
        [sys.executable, "-m", "imageworks_core.registry", "--validate", "--root", str(root.root)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "--set-expected" in result.stderr


def test_connections_opening_a_new_history_db_at_once_all_get_in(tmp_path: Path) -> None:
    # The dashboard's verify thread and its page (or two CLI runs) opening a history DB that does not exist yet:
    # SQLite refused the losers of the switch to WAL with "database is locked" at once (seen in CI).
    failures: list[Exception] = []
    for attempt in range(30):
        settings = get_settings(tmp_path / f"root-{attempt}")
        start = threading.Barrier(6)

        def open_it(settings: Settings = settings, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                with history.connect(settings) as conn:
                    conn.execute("SELECT COUNT(*) FROM verifications").fetchone()
            except sqlite3.OperationalError as exc:
                failures.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
