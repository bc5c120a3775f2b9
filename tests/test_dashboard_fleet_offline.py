"""The Active Model page in fleet mode with no cluster at the address (AppTest, no Ray cluster: it runs in a module
of its own, since a process already joined to a test cluster would keep that connection and see a fleet)."""

from __future__ import annotations

import sys
import time

import pytest
from apptest_pages import joined
from apptest_pages import open_page as open_app_page
from conftest import free_port

from imageworks_core.dashboard_data import fleet
from imageworks_core.settings import Settings


def test_fleet_mode_without_a_cluster_says_why_and_starts_nothing(
    root: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No cluster at the address: the page says so (or names the extra where Ray is absent) instead of breaking.
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "this process is still joined to a Ray cluster"
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("IMAGEWORKS_RAY_ADDRESS", address)
    at = open_app_page("active_model")
    assert f"Fleet mode: Ray cluster at `{address}`" in joined(at.caption)
    errors = joined(at.error)
    assert "The fleet cannot be read:" in errors
    assert f"no Ray cluster answers at {address}" in errors or "uv sync --extra fleet" in errors
    assert at.button(key="fleet_start").disabled
    assert not at.table  # no node table without a fleet


def test_an_actions_outcome_outlives_the_reruns_that_follow_it(
    root: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Forget's line used to be shown by one run only: a rerun right after it (the page re-rendering because a
    # node died, the next fragment tick) took it away before the operator (or a test) could read it.
    monkeypatch.setenv("IMAGEWORKS_RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    at = open_app_page("active_model")
    at.session_state["fleet_message"] = fleet.Notice.of("success", "Forgot fleet-b (slot s-1 on node n3)")
    for _ in range(3):
        at.run()
        assert "Forgot fleet-b (slot s-1 on node n3)" in joined(at.success)
    at.session_state["fleet_message"] = fleet.Notice("success", "an old line", until=time.monotonic() - 1)
    at.run()
    assert "an old line" not in joined(at.success)
