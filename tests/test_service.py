"""The service object every front end calls: last good registry, entry status, the drift rule, selection."""

from __future__ import annotations

import json

import pytest

from imageworks_core import history
from imageworks_core.errors import EXIT_DRIFT, LockViolationError, RegistryError
from imageworks_core.registry import update_entry
from imageworks_core.service import ImageWorks
from imageworks_core.settings import Settings

DEMO = "demo-vision_(CPU)"


def _lock_and_drift(root: Settings, name: str = DEMO) -> None:
    update_entry(root, name, {"version_lock": {"locked": True, "expected_aggregate_sha256": "0" * 64}}, command="t")
    history.record_verification(root, name=name, mode="fast", algorithm="sha256", result="drift")


def test_the_last_good_registry_survives_an_invalid_file_and_the_error_is_reported(root: Settings) -> None:
    iw = ImageWorks(root)
    assert DEMO in iw.registry and iw.snapshot()[1] is None and iw.registry_status.ok
    root.curated_path.write_text("[{,]")
    status = iw.reload()
    assert status.ok is False and any("invalid JSON" in line for line in status.errors)
    assert DEMO in iw.registry  # still served
    assert iw.snapshot()[1] is not None
    assert '"event": "registry_reload_failed"' in root.audit_log_path.read_text()
    root.curated_path.write_text("[]")
    assert iw.reload().ok and DEMO not in iw.registry and iw.snapshot()[1] is None


def test_no_registry_ever_is_the_load_error_itself(root: Settings) -> None:
    root.curated_path.write_text("[{,]")
    iw = ImageWorks(root)
    assert iw.snapshot()[0] is None
    with pytest.raises(RegistryError) as caught:
        iw.registry  # noqa: B018
    assert caught.value.exit_code == 3 and any("invalid JSON" in line for line in caught.value.lines())
    assert not root.audit_log_path.exists()  # a CLI's failed load is an error message, not an audit event


def test_concurrent_first_users_all_get_the_registry(root: Settings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    iw = ImageWorks(root)
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda _: len(iw.registry), range(8)))
    assert sizes == [6] * 8


def test_refresh_picks_up_a_valid_edit(root: Settings) -> None:
    iw = ImageWorks(root)
    assert DEMO in iw.registry  # loaded on first use
    entries = json.loads(root.curated_path.read_text())
    entries.append({"name": "added", "backend": "openai", "backend_config": {"base_url": "http://127.0.0.1:9/v1"}})
    root.curated_path.write_text(json.dumps(entries))
    assert "added" not in iw.registry
    iw.refresh()
    assert "added" in iw.registry


def test_entry_status_lock_weights_latest_runs_and_the_drift_rule(root: Settings) -> None:
    iw = ImageWorks(root)
    status = iw.status(DEMO)
    assert (status.lock, status.weights, status.last_verification, status.last_probe) == (
        "unlocked",
        "present",
        None,
        None,
    )
    assert status.drifted is False and status.badges == []
    assert iw.status("qwen3-vl-8b-instruct_(FP8)").weights == "missing"
    assert iw.status("gpt-4o-mini_(remote)").weights == "n/a"
    _lock_and_drift(root)
    iw.refresh()
    status = iw.status(DEMO)
    assert status.lock == "locked" and status.last_verification["result"] == "drift"
    assert status.drifted is True and status.badges == ["drift"]
    update_entry(root, DEMO, {"version_lock": {"locked": False, "expected_aggregate_sha256": "0" * 64}}, command="t")
    iw.refresh()
    assert iw.status(DEMO).lock == "pinned" and iw.status(DEMO).drifted is False


def test_select_refuses_a_locked_entry_whose_last_verification_drifted(root: Settings) -> None:
    _lock_and_drift(root)
    iw = ImageWorks(root)
    with pytest.raises(LockViolationError) as caught:
        iw.select(name=DEMO)
    assert caught.value.reason == "locked_drift" and caught.value.exit_code == EXIT_DRIFT
    assert "imageworks-models verify" in caught.value.message
    assert iw.select(name="demo-text_(CPU)").name == "demo-text_(CPU)"


def test_cli_select_applies_the_same_drift_rule_as_the_api(root: Settings, cli) -> None:
    # Was a bug: the API answered 423 while `select` printed the endpoint.
    _lock_and_drift(root)
    result = cli("select", DEMO)
    assert result.code == EXIT_DRIFT
    assert "drifted" in result.err and result.out == ""
