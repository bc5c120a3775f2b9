"""The API's runtime side on a real server with the demo backend: activation, proxy, streaming, autostart,
one switch at a time, vision gating, verify and probe endpoints."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import psutil
import pytest
from api_server import api_server
from conftest import free_port

from imageworks_core.probe import make_canonical_probe_image
from imageworks_core.settings import Settings
from imageworks_demo.launch import SERVER_MODULE

DEMO = "demo-vision_(CPU)"
TEXT = "demo-text_(CPU)"


@pytest.fixture
def api(root: Settings):
    port = free_port()
    env = {"CHAT_PROXY_VLLM_PORT": str(port), "CHAT_PROXY_VLLM_STOP_TIMEOUT_S": "3"}
    with api_server(root.root, env=env) as base:
        yield base, port
        httpx.post(f"{base}/v1/deactivate", timeout=30)


def demo_backends(port: int) -> list[psutil.Process]:
    """Demo backends serving on this test's single port (other tests' backends are not ours to count)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if SERVER_MODULE in cmdline and str(port) in cmdline:
            found.append(proc)
    return found


def image_message(text: str = "What do you see?") -> list[dict]:
    buffer = io.BytesIO()
    make_canonical_probe_image().save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return [
        {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}
    ]


def test_activate_active_proxy_and_deactivate(api) -> None:
    base, port = api
    state = httpx.post(f"{base}/v1/activate", json={"name": "demo-vision"}, timeout=60).json()
    assert state["name"] == DEMO and state["status"] == "ready" and state["port"] == port
    active = httpx.get(f"{base}/v1/active").json()["active"]
    assert active["name"] == DEMO and active["healthy"] is True
    reply = httpx.post(
        f"{base}/v1/chat/completions", json={"model": "demo-vision", "messages": image_message()}, timeout=60
    )
    assert reply.status_code == 200
    assert "red circle" in reply.json()["choices"][0]["message"]["content"]
    selected = httpx.post(f"{base}/v1/select", json={"name": DEMO}).json()
    assert selected["active"] is True and selected["endpoint"] == f"http://127.0.0.1:{port}/v1"
    assert httpx.post(f"{base}/v1/deactivate", timeout=30).json() == {"stopped": True}
    assert httpx.get(f"{base}/v1/active").json()["active"] is None


def test_streaming_passes_through_chunk_by_chunk_intact(api) -> None:
    base, port = api
    httpx.post(f"{base}/v1/activate", json={"name": DEMO}, timeout=60)
    body = {"model": DEMO, "stream": True, "messages": [{"role": "user", "content": "say hello to the operator"}]}
    direct_body = {**body, "model": "imageworks/demo-vision"}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=direct_body, timeout=30) as r:
        direct = [line for line in r.iter_lines() if line]
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        proxied = [line for line in r.iter_lines() if line]
    assert proxied[-1] == "data: [DONE]" and len(proxied) > 3
    strip = [json.loads(x[6:])["choices"] for x in proxied[:-1]]
    assert strip == [json.loads(x[6:])["choices"] for x in direct[:-1]]


def test_request_for_inactive_model_autostarts_it(api) -> None:
    base, port = api
    httpx.post(f"{base}/v1/activate", json={"name": DEMO}, timeout=60)
    reply = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": TEXT, "messages": [{"role": "user", "content": "hello"}]},
        timeout=60,
    )
    assert reply.status_code == 200
    assert httpx.get(f"{base}/v1/active").json()["active"]["name"] == TEXT
    assert len(demo_backends(port)) == 1


def test_image_to_a_model_without_vision_is_409_before_any_backend_sees_it(api) -> None:
    base, _ = api
    reply = httpx.post(f"{base}/v1/chat/completions", json={"model": TEXT, "messages": image_message()}, timeout=30)
    assert reply.status_code == 409 and reply.json()["error"]["missing"] == ["vision"]
    assert httpx.get(f"{base}/v1/active").json()["active"] is None  # nothing was started for it


def test_two_concurrent_requests_for_two_models_never_leave_two_backends(api) -> None:
    base, port = api
    results: dict[str, httpx.Response] = {}

    def ask(model: str) -> None:
        results[model] = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            timeout=90,
        )

    threads = [threading.Thread(target=ask, args=(m,)) for m in (DEMO, TEXT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in results.values())
    assert statuses in ([200, 200], [200, 503])
    for response in results.values():
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) > 0
    assert len(demo_backends(port)) == 1
    active = httpx.get(f"{base}/v1/active").json()["active"]
    assert active["name"] in (DEMO, TEXT) and active["alive"] is True


def test_verify_and_probe_endpoints(api, root: Settings) -> None:
    base, _ = api
    report = httpx.post(f"{base}/v1/verify", json={"name": DEMO}, timeout=60)
    assert report.status_code == 200 and report.json()["result"] == "unlocked"
    assert httpx.post(f"{base}/v1/verify", json={"name": "nope"}).status_code == 404
    httpx.post(f"{base}/v1/activate", json={"name": DEMO}, timeout=60)
    probe = httpx.post(f"{base}/v1/probe/vision", json={"name": DEMO}, timeout=60).json()
    assert probe["vision_ok"] is True and probe["grounded"] is True
    buffer = io.BytesIO()
    make_canonical_probe_image().save(buffer, format="JPEG")
    upload = httpx.post(
        f"{base}/v1/probe/vision",
        data={"name": DEMO},
        files={"image": ("photo.jpg", buffer.getvalue(), "image/jpeg")},
        timeout=60,
    ).json()
    assert upload["vision_ok"] is True and upload["image"]["name"] == "photo.jpg"
    bad = httpx.post(
        f"{base}/v1/probe/vision", data={"name": DEMO}, files={"image": ("x.jpg", b"not an image", "image/jpeg")}
    )
    assert bad.status_code == 400 and "not an image" in bad.json()["error"]["message"]


def test_verify_endpoint_reports_drift_as_409(api, root: Settings) -> None:
    base, _ = api
    from imageworks_core.verification import lock_entry

    lock_entry(root, DEMO, set_expected=True)
    deadline = time.monotonic() + 3  # the server hot-reloads the lock written above
    while not next(m for m in httpx.get(f"{base}/v1/models").json()["data"] if m["id"] == DEMO)["locked"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with open(root.root / "demo/models/imageworks-demo-vision/config.json", "a") as handle:
        handle.write("\n")
    response = httpx.post(f"{base}/v1/verify", json={"name": DEMO}, timeout=60)
    assert response.status_code == 409
    assert response.json()["report"]["modified"][0]["path"] == "config.json"
    selected = httpx.post(f"{base}/v1/select", json={"name": DEMO})
    assert selected.status_code == 423  # locked and its last verification drifted


def test_activation_endpoints_error_paths(api) -> None:
    base, _ = api
    unknown = httpx.post(f"{base}/v1/activate", json={"name": "no-such-model"}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["reason"] == "unknown_name"
    remote = httpx.post(f"{base}/v1/activate", json={"name": "gpt-4o-mini_(remote)"}, timeout=30)
    assert remote.status_code == 400 and "nothing to activate" in remote.json()["error"]["message"]
    assert httpx.post(f"{base}/v1/activate", json={}).status_code == 422  # body validation
    assert httpx.post(f"{base}/v1/deactivate", timeout=30).json() == {"stopped": False}  # idempotent
    assert httpx.get(f"{base}/v1/active").json() == {"active": None, "starting": None, "switching_to": None}


def test_completions_proxy_and_bad_bodies(api) -> None:
    base, _ = api
    reply = httpx.post(f"{base}/v1/completions", json={"model": DEMO, "prompt": "Once upon"}, timeout=60)
    assert reply.status_code == 200 and reply.json()["object"] == "text_completion"
    json_type = {"Content-Type": "application/json"}  # without it: 415 (tests/test_api_security.py)
    assert httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers=json_type).status_code == 400
    missing = httpx.post(f"{base}/v1/chat/completions", json={"messages": []})
    assert missing.status_code == 400 and "'model'" in missing.json()["error"]["message"]
    unknown = httpx.post(f"{base}/v1/chat/completions", json={"model": "nope", "messages": []})
    assert unknown.status_code == 404
