"""The API as an attacker sees it: browser-originated requests, rebinding hosts, binds, tokens, sizes, bad bodies.

The threat model is a web page the operator happens to open (it can send simple cross-origin requests and
rebind a DNS name to 127.0.0.1) and anyone on the network when the API listens beyond loopback.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from api_server import api_server
from fastapi.testclient import TestClient

from imageworks_core import runtime
from imageworks_core.api import create_app
from imageworks_core.api_security import is_loopback_bind
from imageworks_core.settings import Settings

DEMO = "demo-vision_(CPU)"
CHAT = {"model": DEMO, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def api(root: Settings):
    with api_server(root.root) as base:
        yield base
    runtime.stop(root, reason="test teardown")  # old code let a CSRF request start a backend


def _client(root: Settings, **kwargs: object) -> TestClient:
    kwargs.setdefault("bind_host", "127.0.0.1")
    return TestClient(create_app(root, watch=False, **kwargs), base_url="http://127.0.0.1:8100")  # type: ignore[arg-type]


# 1. Browser-originated requests ------------------------------------------------------------------------------------
def test_cross_origin_text_plain_chat_post_is_refused_and_starts_nothing(api: str, root: Settings) -> None:
    response = httpx.post(
        f"{api}/v1/chat/completions",
        content=json.dumps(CHAT),
        headers={"Content-Type": "text/plain", "Origin": "http://evil.example"},
    )
    assert response.status_code == 403
    assert "Origin" in response.json()["error"]["message"]
    assert "IMAGEWORKS_ALLOWED_ORIGINS" in response.json()["error"]["message"]
    assert not root.active_state_path.exists()


def test_form_posts_from_a_page_cannot_stop_reload_or_probe(api: str, root: Settings) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"}
    for path in ("/v1/deactivate", "/v1/registry/reload", "/v1/probe/vision", "/v1/activate", "/v1/verify"):
        response = httpx.post(f"{api}{path}", content=b"name=demo", headers=form)
        assert response.status_code == 403, path
        assert response.json()["error"]["reason"] == "origin"
    multipart = httpx.post(
        f"{api}/v1/probe/vision", data={"name": DEMO}, files={"image": ("x.png", b"\x89PNG")},
        headers={"Origin": "http://evil.example"},
    )
    assert multipart.status_code == 403
    assert not root.history_db_path.exists()  # no probe, verification or change was recorded


def test_rebinding_host_names_are_refused_on_every_route(api: str) -> None:
    evil = {"Host": "attacker.example"}
    for method, path in [
        ("GET", "/healthz"),
        ("GET", "/v1/models"),
        ("GET", "/v1/active"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/redoc"),
        ("POST", "/v1/select"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
    ]:
        response = httpx.request(method, f"{api}{path}", json=CHAT if method == "POST" else None, headers=evil)
        assert response.status_code == 403, path
        message = response.json()["error"]["message"]
        assert "attacker.example" in message and "IMAGEWORKS_ALLOWED_HOSTS" in message
        assert "\n" not in message
    streaming = httpx.post(f"{api}/v1/chat/completions", json={**CHAT, "stream": True}, headers=evil)
    assert streaming.status_code == 403


def test_loopback_hosts_pass_and_the_allowlist_extends_them(root: Settings) -> None:
    with _client(root) as client:
        for host in ("127.0.0.1:8100", "localhost:8100", "[::1]:8100", "localhost", "127.0.0.2"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
        assert client.get("/v1/models", headers={"Host": "box.lan"}).status_code == 403
    root_env = root.model_copy(update={"allowed_hosts": "box.lan, *.example.org"})
    with _client(root_env) as client:
        assert client.get("/v1/models", headers={"Host": "box.lan:8100"}).status_code == 200
        assert client.get("/v1/models", headers={"Host": "gpu.example.org"}).status_code == 200
        assert client.get("/v1/models", headers={"Host": "example.org.evil.example"}).status_code == 403


def test_allowed_origins_pass_and_requests_without_origin_are_unaffected(root: Settings) -> None:
    with _client(root) as client:
        assert client.post("/v1/select", json={"name": DEMO}).status_code == 200
        refused = client.post("/v1/select", json={"name": DEMO}, headers={"Origin": "http://127.0.0.1:8501"})
        assert refused.status_code == 403  # default: no origin allowed, not even the dashboard's
        assert client.get("/v1/models", headers={"Origin": "null"}).status_code == 403
    allowed = root.model_copy(update={"allowed_origins": "http://127.0.0.1:8501"})
    with _client(allowed) as client:
        ok = client.post("/v1/select", json={"name": DEMO}, headers={"Origin": "http://127.0.0.1:8501"})
        assert ok.status_code == 200
        assert "access-control-allow-origin" not in ok.headers  # no CORS: a browser page still cannot read it


def test_json_routes_need_a_json_content_type(root: Settings) -> None:
    with _client(root) as client:
        for path in ("/v1/select", "/v1/verify", "/v1/activate", "/v1/chat/completions", "/v1/completions"):
            response = client.post(path, content=json.dumps({"name": DEMO}), headers={"Content-Type": "text/plain"})
            assert response.status_code == 415, path
            assert "application/json" in response.json()["error"]["message"]
        assert client.post("/v1/select", content=json.dumps({"name": DEMO})).status_code == 415  # none at all
        charset = client.post(
            "/v1/select", content=json.dumps({"name": DEMO}), headers={"Content-Type": "application/json; charset=utf-8"}
        )
        assert charset.status_code == 200
        # Body-less actions: no content type is fine, a form body is not.
        assert client.post("/v1/registry/reload").status_code == 200
        form = client.post("/v1/registry/reload", content=b"a=b", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert form.status_code == 415
        preflight = client.options("/v1/select", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in preflight.headers


# 2. Bind and token policy ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["", "0.0.0.0", "::", "10.255.255.1", "no-such-host.invalid"])
def test_serve_refuses_a_non_loopback_bind_without_a_token(cli, root: Settings, host: str, monkeypatch) -> None:
    import uvicorn

    monkeypatch.delenv("IMAGEWORKS_API_TOKEN", raising=False)

    def must_not_listen(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"serve started listening on {host!r} without a token")

    monkeypatch.setattr(uvicorn, "run", must_not_listen)
    result = cli("serve", "--host", host, "--port", "1", "--no-watch")
    assert result.code == 64
    assert "IMAGEWORKS_API_TOKEN" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_loopback_binds_are_recognised() -> None:
    for host in ("127.0.0.1", "127.0.0.53", "::1", "localhost"):
        assert is_loopback_bind(host), host
    for host in ("", "0.0.0.0", "::", "10.255.255.1", "no-such-host.invalid"):
        assert not is_loopback_bind(host), host


def test_a_non_loopback_bind_needs_the_token_on_every_route(root: Settings) -> None:
    secured = root.model_copy(update={"api_token": "s3cret"})
    with _client(secured, bind_host="0.0.0.0") as client:
        for path in ("/healthz", "/v1/models", "/docs", "/openapi.json", "/redoc", "/v1/registry/status"):
            assert client.get(path).status_code == 401, path
        assert client.post("/v1/select", json={"name": DEMO}).status_code == 401
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert client.get("/openapi.json", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cre"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401


# 3. Resource limits ------------------------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_413_before_it_is_read(root: Settings) -> None:
    small = root.model_copy(update={"max_body_mb": 1})
    big = b'{"model": "x", "pad": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    with _client(small) as client:
        declared = client.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
        assert declared.status_code == 413
        assert "IMAGEWORKS_MAX_BODY_MB" in declared.json()["error"]["message"]

        def chunks():
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536]

        chunked = client.post("/v1/select", content=chunks(), headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413


def test_control_routes_take_small_bodies_and_json_values_are_counted_before_parsing(root: Settings) -> None:
    with _client(root) as client:
        padded = json.dumps({"name": DEMO, "pad": "x" * (2 << 20)})
        response = client.post("/v1/select", content=padded, headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "1048576 bytes" in response.json()["error"]["message"]
        # 8 MiB of tiny values would parse into ~110 MiB of objects: refused before json.loads runs.
        many = b'{"model": "x", "messages": [], "pad": [' + b",".join([b'"ab"'] * 1_600_000) + b"]}"
        counted = client.post("/v1/chat/completions", content=many, headers={"Content-Type": "application/json"})
        assert counted.status_code == 400 and "JSON values" in counted.json()["error"]["message"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width``x``height`` but carries a tiny (truncated) image stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_from_the_header_before_decoding(root: Settings) -> None:
    with _client(root) as client:
        response = client.post(
            "/v1/probe/vision", data={"name": DEMO}, files={"image": ("bomb.png", _png_header_only(9400, 9400))}
        )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "9400x9400" in message and "IMAGEWORKS_MAX_IMAGE_PIXELS" in message


def test_malformed_proxy_bodies_are_400_never_500(root: Settings) -> None:
    with _client(root) as client:
        for body in (
            {"model": DEMO, "messages": 5},
            {"model": DEMO, "messages": [5]},
            {"model": DEMO, "messages": [{"role": "user", "content": 5}]},
            {"model": DEMO, "messages": [], "stream": "yes"},
            {"model": 5, "messages": []},
            [1, 2],
        ):
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": DEMO, "prompt": {"x": 1}}).status_code == 400
        assert client.post("/v1/select", json={"name": 5}).status_code == 422
        assert client.post("/v1/probe/vision", json=[1]).status_code == 400
        assert client.post("/v1/select", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422


def test_prepare_image_refuses_over_the_pixel_limit_without_decoding() -> None:
    from imageworks_core.errors import UsageError
    from imageworks_core.probe import prepare_image

    with pytest.raises(UsageError, match="9400x9400"):
        prepare_image(_png_header_only(9400, 9400), "bomb.png", 448, max_pixels=40_000_000)
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), "red").save(buffer, format="PNG")
    prepared = prepare_image(buffer.getvalue(), "ok.png", 448, max_pixels=60_000)
    assert prepared.info.sent_size == (300, 200)
    with pytest.raises(UsageError, match="300x200"):
        prepare_image(buffer.getvalue(), "ok.png", 448, max_pixels=50_000)


def _run_cli(root: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess with a hard time and memory bound (the old code blocked on a FIFO, ate /dev/zero)."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    return subprocess.run(
        [sys.executable, "-m", "imageworks_core.cli", "--root", str(root.root), *args],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit_memory,  # noqa: PLW1509 (single-threaded test process)
    )


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "char-device"])
def test_probe_vision_refuses_non_regular_files_at_once(root: Settings, tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        target = tmp_path / "pipe.png"
        os.mkfifo(target)
    elif kind == "directory":
        target = tmp_path / "dir.png"
        target.mkdir()
    elif kind == "dev-zero":
        target = Path("/dev/zero")
    else:
        target = Path("/dev/null")
    try:
        result = _run_cli(root, "probe-vision", DEMO, str(target))
    except subprocess.TimeoutExpired:
        pytest.fail(f"probe-vision on a {kind} did not return")
    assert result.returncode == 64, result.stderr
    assert "not a regular file" in result.stderr and str(target) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_image_reads_are_bounded_by_bytes_read_not_st_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imageworks_core import probe
    from imageworks_core.errors import UsageError

    image = tmp_path / "grows.png"
    image.write_bytes(b"\x89PNG" + b"\0" * 4096)
    monkeypatch.setattr(probe, "MAX_IMAGE_BYTES", 1024)
    with pytest.raises(UsageError, match="over the"):
        probe._read_image_file(image)
    real_stat, real_fstat = os.stat, os.fstat

    def small(st: os.stat_result) -> os.stat_result:  # a file that grows after the size check, or lies about it
        return os.stat_result((st.st_mode, *tuple(st)[1:6], 10, *tuple(st)[7:10]))

    monkeypatch.setattr(os, "stat", lambda path, *a, **k: small(real_stat(path, *a, **k)))
    monkeypatch.setattr(os, "fstat", lambda fd: small(real_fstat(fd)))
    with pytest.raises(UsageError, match="over the"):
        probe._read_image_file(image)


@pytest.mark.slow
def test_peak_rss_stays_bounded_under_hostile_uploads(root: Settings) -> None:
    """Four concurrent decodable images near the pixel limit, declared bombs and an oversized chat body."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (6000, 6000), (0, 0, 0, 0)).save(buffer, format="PNG", compress_level=1)
    near_limit = buffer.getvalue()
    bomb = _png_header_only(9400, 9400)
    with api_server(root.root) as base:
        port = int(base.rsplit(":", 1)[1])
        pid = next(c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN")

        def upload(data: bytes) -> int:
            files = {"image": ("i.png", data)}
            return httpx.post(f"{base}/v1/probe/vision", data={"name": DEMO}, files=files, timeout=120).status_code

        # The costliest JSON the limits let through: ~1M short strings in ~32 MiB, parsed by the proxy.
        dense = b'{"model": "x", "messages": [], "pad": [' + b",".join([b'"' + b"a" * 28 + b'"'] * 999_000) + b"]}"

        def chat(_: int) -> int:
            headers = {"Content-Type": "application/json"}
            return httpx.post(f"{base}/v1/chat/completions", content=dense, headers=headers, timeout=120).status_code

        with ThreadPoolExecutor(12) as pool:
            dense_statuses = pool.map(chat, range(3))
            statuses = list(pool.map(upload, [near_limit] * 4 + [bomb] * 4))
            assert list(dense_statuses) == [404] * 3  # parsed, then: no model "x"
            huge = httpx.post(
                f"{base}/v1/chat/completions",
                content=b'{"model": "x", "pad": "' + b"a" * (300 << 20) + b'"}',
                headers={"Content-Type": "application/json"},
                timeout=120,
            )
        peak_kib = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM")).split()[1])
    print(f"API peak RSS under hostile uploads: {peak_kib / 1024:.0f} MiB")
    assert statuses[4:] == [400] * 4
    assert statuses[:4] == [502] * 4  # decoded, then refused: the demo backend is not active
    assert huge.status_code == 413
    assert peak_kib < 512 * 1024


# 8. Last good registry everywhere -------------------------------------------------------------------------------
def test_an_invalid_registry_keeps_serving_every_route_from_the_last_good_one(root: Settings) -> None:
    with _client(root) as client:
        root.curated_path.write_text(root.curated_path.read_text().rstrip()[:-1] + ",]\n")
        assert client.post("/v1/registry/reload").status_code == 422
        verify = client.post("/v1/verify", json={"name": DEMO, "fast": True})
        assert verify.status_code == 200 and verify.json()["result"] == "unlocked"
        assert "x-imageworks-registry-error" in verify.headers
        probe = client.post("/v1/probe/vision", json={"name": DEMO})
        assert probe.status_code == 502  # ran against the last good entry: the demo backend is simply not active
        assert "not the active backend" in probe.json()["error"]["message"]
        models = client.get("/v1/models").json()
        assert DEMO in {m["id"] for m in models["data"]}
        assert models["registry"]["ok"] is False and any("invalid JSON" in e for e in models["registry"]["errors"])
        assert client.post("/v1/select", json={"name": DEMO}).status_code == 200
        try:
            activated = client.post("/v1/activate", json={"name": DEMO})
            assert activated.status_code == 200 and activated.json()["status"] == "ready", activated.text
        finally:
            assert client.post("/v1/deactivate").json() == {"stopped": True}


def test_503_only_when_there_never_was_a_good_registry(root: Settings) -> None:
    root.curated_path.write_text("[{,]")
    with _client(root) as client:
        response = client.get("/v1/models")
        assert response.status_code == 503
        assert "invalid JSON" in " ".join(response.json()["error"]["problems"])
