"""The loader API on a real uvicorn server: models, select (with the reasons a 404 gives), hot reload, auth."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from api_server import api_server
from conftest import wait_until

from imageworks_core import history
from imageworks_core.api import create_app
from imageworks_core.errors import UsageError
from imageworks_core.registry import update_entry
from imageworks_core.settings import Settings

DEMO = "demo-vision_(CPU)"


@pytest.fixture
def api(root: Settings):
    with api_server(root.root) as base:
        yield base


def _reloads(api: str) -> int:
    """How many reloads the server has swapped in (a hand edit or a tool write adds one after its debounce)."""
    return httpx.get(f"{api}/v1/registry/status").json()["reloads"]


def test_healthz_and_models_list(api: str) -> None:
    assert httpx.get(f"{api}/healthz").json()["status"] == "ok"
    data = httpx.get(f"{api}/v1/models").json()
    assert data["object"] == "list"
    ids = {m["id"] for m in data["data"]}
    assert DEMO in ids and "qwen3-vl-8b-instruct_(FP8)" not in ids  # testing hidden
    card = next(m for m in data["data"] if m["id"] == DEMO)
    assert card["object"] == "model" and card["backend"] == "vllm" and "vision" in card["capabilities"]
    assert card["locked"] is False and card["last_verification"] is None
    all_ids = {m["id"] for m in httpx.get(f"{api}/v1/models", params={"include_testing": 1}).json()["data"]}
    assert "qwen3-vl-8b-instruct_(FP8)" in all_ids
    edge = {m["id"] for m in httpx.get(f"{api}/v1/models", params={"profile": "edge"}).json()["data"]}
    assert "gpt-4o-mini_(remote)" not in edge


def test_select_success_and_every_404_reason(api: str, root: Settings) -> None:
    ok = httpx.post(f"{api}/v1/select", json={"role": "caption", "require_capabilities": ["vision"]})
    assert ok.status_code == 200
    assert ok.json()["name"] == "qwen2.5-vl-7b-instruct_(AWQ)"
    assert ok.json()["endpoint"].endswith(":24001/v1") and ok.json()["active"] is False
    unknown = httpx.post(f"{api}/v1/select", json={"name": "demo-visoin"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["reason"] == "unknown_name"
    assert "demo-vision" in unknown.json()["error"]["close_matches"]
    testing = httpx.post(f"{api}/v1/select", json={"name": "qwen3-vl-8b-instruct_(FP8)"})
    assert testing.status_code == 404 and testing.json()["error"]["reason"] == "testing"
    profile = httpx.post(f"{api}/v1/select", json={"name": "gpt-4o-mini_(remote)", "profile": "edge"})
    assert profile.status_code == 404 and profile.json()["error"]["reason"] == "profile"
    capability = httpx.post(f"{api}/v1/select", json={"name": "demo-text_(CPU)", "require_capabilities": ["vision"]})
    assert capability.status_code == 409 and capability.json()["error"]["missing"] == ["vision"]
    reloads = _reloads(api)
    update_entry(root, "llava-7b_(ollama)", {"deprecated": True}, command="test")
    wait_until(lambda: _reloads(api) > reloads, timeout=10, what="the hot reload of the edit")
    deprecated = httpx.post(f"{api}/v1/select", json={"name": "llava-7b_(ollama)"})
    assert deprecated.status_code == 404 and deprecated.json()["error"]["reason"] == "deprecated"


def test_select_locked_entry_whose_last_verification_drifted_is_423(api: str, root: Settings) -> None:
    reloads = _reloads(api)
    update_entry(root, DEMO, {"version_lock": {"locked": True, "expected_aggregate_sha256": "0" * 64}}, command="t")
    history.record_verification(root, name=DEMO, mode="fast", algorithm="sha256", result="drift")
    wait_until(lambda: _reloads(api) > reloads, timeout=10, what="the hot reload of the lock")
    response = httpx.post(f"{api}/v1/select", json={"name": DEMO})
    assert response.status_code == 423
    assert response.json()["error"]["reason"] == "locked_drift"


def test_hot_reload_picks_up_an_edit_within_two_seconds(api: str, root: Settings) -> None:
    entries = json.loads(root.curated_path.read_text())
    entries.append({"name": "hot-added", "backend": "openai", "backend_config": {"base_url": "http://127.0.0.1:9/v1"}})
    root.curated_path.write_text(json.dumps(entries, indent=2))  # a plain hand edit, not through our tools
    deadline = time.monotonic() + 2.0
    seen = False
    while time.monotonic() < deadline and not seen:
        seen = "hot-added" in {m["id"] for m in httpx.get(f"{api}/v1/models").json()["data"]}
        time.sleep(0.1)
    assert seen


def test_invalid_file_keeps_last_good_registry_and_reports_errors(api: str, root: Settings) -> None:
    root.curated_path.write_text(root.curated_path.read_text().rstrip()[:-1] + ",]\n")  # trailing comma
    deadline = time.monotonic() + 3
    while httpx.get(f"{api}/v1/registry/status").json()["ok"] and time.monotonic() < deadline:
        time.sleep(0.1)
    status = httpx.get(f"{api}/v1/registry/status").json()
    assert status["ok"] is False
    assert any("invalid JSON" in line and str(root.curated_path) in line for line in status["errors"])
    assert DEMO in {m["id"] for m in httpx.get(f"{api}/v1/models").json()["data"]}  # still serving
    assert httpx.post(f"{api}/v1/registry/reload").status_code == 422
    log = root.audit_log_path.read_text()
    assert '"event": "registry_reload_failed"' in log


def test_bearer_token_required_on_every_endpoint_when_set(root: Settings) -> None:
    with api_server(root.root, env={"IMAGEWORKS_API_TOKEN": "s3cret"}) as base:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/healthz").status_code == 401
        good = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        chat = {"model": DEMO, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{base}/v1/chat/completions", json=chat).status_code == 401  # the proxy too
        assert httpx.post(f"{base}/v1/select", json={"name": DEMO}).status_code == 401


def test_a_non_loopback_bind_without_a_token_is_refused(root: Settings) -> None:
    # Was: reads open, mutations 403. Now nothing is served beyond loopback without a token (trust issue, item 2).
    with pytest.raises(UsageError, match="IMAGEWORKS_API_TOKEN"):
        create_app(root, bind_host="0.0.0.0", watch=False)


def test_get_active_shows_a_start_in_progress_as_the_cli_does(root: Settings, cli, monkeypatch) -> None:
    """While a start runs, ``GET /v1/active`` carries its progress record under ``starting`` (name, phase,
    detail, elapsed): the same record ``current-model`` prints; it is gone once the start is cancelled."""
    from conftest import demo_launch, free_port

    from imageworks_core.service import ImageWorks
    from imageworks_core.settings import get_settings

    slow = "slow_(CPU)"
    monkeypatch.setenv("CHAT_PROXY_VLLM_PORT", str(free_port()))
    curated = json.loads(root.curated_path.read_text(encoding="utf-8"))
    curated.append(
        {
            "name": slow,
            "backend": "vllm",
            "served_model_id": "test/slow",
            "download_path": "demo/models/imageworks-demo-vision",
            "backend_config": {
                "launch": ["bash", "-c", 'sleep 60; exec "$@"', "-", *demo_launch()],
                "startup_timeout_s": 120,
            },
        }
    )
    root.curated_path.write_text(json.dumps(curated, indent=2), encoding="utf-8")
    service = ImageWorks(get_settings(root.root))
    with api_server(root.root) as base:
        assert httpx.get(f"{base}/v1/active").json()["starting"] is None
        service.start_activation(slow)
        try:
            seen: dict = {}

            def loading() -> bool:
                seen.update(httpx.get(f"{base}/v1/active", timeout=10).json())
                return (seen["starting"] or {}).get("phase") == "waiting"

            wait_until(loading, timeout=30, what="GET /v1/active to show the start waiting for its backend")
            starting = seen["starting"]
            record = service.activation()
            assert record is not None
            assert {k: starting[k] for k in ("name", "phase", "started_at", "activated_by", "pid")} == {
                "name": slow,
                "phase": "waiting",
                "started_at": record.started_at.isoformat().replace("+00:00", "Z"),
                "activated_by": record.activated_by,
                "pid": record.pid,
            }
            assert starting["detail"] and starting["elapsed_s"] >= 0
            assert seen["active"]["status"] == "starting" and seen["active"]["name"] == slow
            shown = cli("current-model", "--no-health").out
            assert f"activating {slow!r} (waiting" in shown, shown
        finally:
            result = service.stop(reason="test done")
        assert result is not None and result.cancelled == slow
        assert httpx.get(f"{base}/v1/active").json() == {"active": None, "starting": None, "switching_to": None}
