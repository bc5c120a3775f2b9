"""The vision probe: a model that really sees passes, one that cannot (or a broken endpoint) fails, bad images never leave.

Real processes and real HTTP: the demo backend (which describes images from their pixels) is started as a
subprocess, either as a remote ``openai`` entry pointing at it or through the runtime's real activation on the
single port; a tiny ``http.server`` in the test plays the misbehaving servers the demo cannot.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import e2e_backend
import httpx
import pytest
from conftest import demo_argv, free_port, require
from PIL import Image

from imageworks_core import audit, history
from imageworks_core.errors import UsageError
from imageworks_core.probe import (
    CANONICAL_IMAGE_NAME,
    MAX_IMAGE_BYTES,
    PROBE_QUESTION,
    ProbeResult,
    canonical_image_bytes,
    match_canonical_content,
    prepare_image,
    probe_vision,
)
from imageworks_core.settings import Settings

DEMO_SERVED = "imageworks/demo-vision"
DEMO_VISION = "demo-vision_(CPU)"
DEMO_TEXT = "demo-text_(CPU)"


# ---------------------------------------------------------------------------------------------------------
# Helpers: demo backend processes, a scriptable fake server, registry entries
# ---------------------------------------------------------------------------------------------------------


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"demo backend exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("demo backend did not become healthy")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture
def demo_server() -> Iterator[Callable[..., str]]:
    """Start demo backends (own process group each, killed at teardown); returns their ``/v1`` base URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*flags: str) -> str:
        port = free_port()
        proc = subprocess.Popen(
            demo_argv(port, "--served-model-name", DEMO_SERVED, *flags),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(proc)
        _wait_healthy(port, proc)
        return f"http://127.0.0.1:{port}/v1"

    yield start
    for proc in procs:
        _kill_group(proc)


class FakeServer:
    """A loopback HTTP server answering every POST with ``reply(request_body) -> (status, body bytes)``."""

    def __init__(self, reply: Callable[[dict[str, Any]], tuple[int, bytes]]) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                status, payload = reply(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeServer]]:
    servers: list[FakeServer] = []

    def start(reply: Callable[[dict[str, Any]], tuple[int, bytes]]) -> FakeServer:
        servers.append(FakeServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _completion(content: str, prompt_tokens: int | None = None) -> bytes:
    body: dict[str, Any] = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
    if prompt_tokens is not None:
        body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": 5}
    return json.dumps(body).encode()


def add_remote_entry(settings: Settings, name: str, base_url: str, **config: Any) -> str:
    """Append a remote ``openai`` entry to the temp root's curated registry."""
    entries = json.loads(settings.curated_path.read_text(encoding="utf-8"))
    entries.append(
        {
            "name": name,
            "backend": "openai",
            "served_model_id": DEMO_SERVED,
            "capabilities": {"text": True, "vision": True},
            "backend_config": {"base_url": base_url, **config},
        }
    )
    settings.curated_path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return name


def _probe_rows(settings: Settings) -> list[dict[str, Any]]:
    return history.list_probes(settings) if settings.history_db_path.exists() else []


def _decoded_sent_image(server: FakeServer) -> tuple[str, Image.Image]:
    """(MIME from the data URL, decoded image) of the image the fake server received."""
    content = server.requests[0]["messages"][0]["content"]
    url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
    header, _, payload = url.partition(",")
    mime = header.removeprefix("data:").removesuffix(";base64")
    return mime, Image.open(io.BytesIO(base64.b64decode(payload)))


def _jpeg_with_orientation(orientation: int, size: tuple[int, int] = (600, 400)) -> bytes:
    """Stored left half red, right half blue, with an EXIF orientation tag."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose IHDR claims ``width`` x ``height`` with a tiny IDAT (a pixel bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _png_bytes(size: tuple[int, int] = (300, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (0, 128, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def _activate(settings: Settings, name: str) -> None:
    """Activate an entry on the (free, per-test) single port with the real runtime."""
    from imageworks_core import runtime

    runtime.activate(settings, name, timeout_s=30)


@pytest.fixture
def single_port(root: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """``root`` with a free single port; whatever gets activated there is stopped at teardown."""
    monkeypatch.setenv("CHAT_PROXY_VLLM_PORT", str(free_port()))
    monkeypatch.setenv("CHAT_PROXY_VLLM_STOP_TIMEOUT_S", "3")
    from imageworks_core.settings import get_settings

    settings = get_settings(root.root)
    yield settings
    from imageworks_core import runtime

    runtime.stop(settings, reason="test teardown")


# ---------------------------------------------------------------------------------------------------------
# The canonical probe against the demo backend: it sees, it is grounded, it is recorded
# ---------------------------------------------------------------------------------------------------------


def test_canonical_probe_of_active_demo_vision_is_vision_ok_and_grounded(single_port: Settings) -> None:
    settings = single_port
    _activate(settings, DEMO_VISION)

    result = probe_vision(settings, DEMO_VISION)

    assert result.vision_ok is True, result.error
    assert result.grounded is True
    assert result.matched == ["red", "circle", "42"]
    assert "red circle" in result.answer and "42" in result.answer
    assert result.reasoning.startswith("Reasoning:")
    assert result.endpoint == f"http://127.0.0.1:{settings.vllm_port}/v1"
    assert result.model == DEMO_SERVED
    assert result.prompt_tokens is not None and result.control_prompt_tokens is not None
    assert result.prompt_tokens > result.control_prompt_tokens
    assert result.image.name == CANONICAL_IMAGE_NAME
    assert result.image.original_size == (640, 480) and result.image.sent_size == (448, 336)
    assert result.image.sha256 == hashlib.sha256(canonical_image_bytes()).hexdigest()
    assert result.error is None

    [row] = history.list_probes(settings, DEMO_VISION)
    assert (row["vision_ok"], row["grounded"], row["image_sha256"]) == (1, 1, result.image.sha256)
    assert json.loads(row["result_json"])["matched"] == ["red", "circle", "42"]
    assert "data:image" not in row["result_json"]  # never the image itself


def test_cli_probe_prints_vision_ok_true_and_reasoning_as_the_runbook_says(
    single_port: Settings, cli: Callable[..., Any], tmp_path: Path
) -> None:
    _activate(single_port, DEMO_VISION)
    photo = tmp_path / "image.jpg"
    photo.write_bytes(_jpeg_with_orientation(1))

    canonical = cli("probe-vision", DEMO_VISION)
    user_image = cli("probe-vision", DEMO_VISION, str(photo))

    assert canonical.code == 0, canonical.err
    lines = canonical.out.splitlines()
    assert "vision_ok: true" in lines and "grounded: true" in lines and "matched: [red, circle, 42]" in lines
    reasoning = next(line for line in lines if line.startswith("reasoning: "))
    assert len(reasoning) > len("reasoning: ") + 10
    assert any(line.startswith("latency_ms: ") for line in lines)
    assert user_image.code == 0, user_image.err
    assert "vision_ok: true" in user_image.out.splitlines()
    assert "grounded: null" in user_image.out.splitlines()  # content of a user image is unknown
    assert [r["image_name"] for r in history.list_probes(single_port, DEMO_VISION)] == [
        "image.jpg",
        "canonical-probe.png",
    ]


def test_text_only_backend_fails_the_probe_with_exit_6_and_an_audit_line(
    single_port: Settings, cli: Callable[..., Any]
) -> None:
    _activate(single_port, DEMO_TEXT)

    outcome = cli("probe-vision", DEMO_TEXT)

    assert outcome.code == 6
    assert "vision_ok: false" in outcome.out.splitlines()
    assert "does not support image input" in outcome.out
    assert outcome.err.count("\n") == 1 and outcome.err.startswith("error: vision probe of 'demo-text_(CPU)' failed")
    [event] = audit.read_events(single_port, "probe_failure")
    assert event["name"] == DEMO_TEXT and "HTTP 400" in event["error"]
    [row] = history.list_probes(single_port, DEMO_TEXT)
    assert row["vision_ok"] == 0


def test_inactive_process_entry_exits_6_with_the_activate_command(
    single_port: Settings, cli: Callable[..., Any]
) -> None:
    outcome = cli("probe-vision", DEMO_VISION)

    assert outcome.code == 6
    assert "imageworks-models activate-model 'demo-vision_(CPU)'" in outcome.err
    assert outcome.err.count("\n") == 1 and "Traceback" not in outcome.err
    assert _probe_rows(single_port) == []  # no probe ran, none recorded


def test_activate_flag_activates_then_probes(single_port: Settings, cli: Callable[..., Any]) -> None:
    from imageworks_core import runtime

    outcome = cli("probe-vision", DEMO_VISION, "--activate", "--json")

    assert outcome.code == 0, outcome.err
    result = json.loads(outcome.out)
    assert result["vision_ok"] is True and result["grounded"] is True
    state = runtime.read_state(single_port)
    assert state is not None and (state.name, state.status) == (DEMO_VISION, "ready")


# ---------------------------------------------------------------------------------------------------------
# Remote (openai) entries: the entry's base_url, its API key, and what proves vision
# ---------------------------------------------------------------------------------------------------------


def test_remote_entry_is_probed_at_its_base_url(root: Settings, demo_server: Callable[..., str]) -> None:
    base_url = demo_server()
    add_remote_entry(root, "demo-remote", base_url)

    result = probe_vision(root, "demo-remote")

    assert (result.vision_ok, result.grounded, result.endpoint) == (True, True, base_url)


def test_remote_api_key_is_sent_as_bearer_token(
    root: Settings, fake_server: Callable[..., FakeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fake_server(lambda body: (200, _completion("a red circle and the number 42")))
    add_remote_entry(root, "keyed", server.base_url, api_key_env="PROBE_TEST_KEY")
    monkeypatch.setenv("PROBE_TEST_KEY", "s3cret")

    result = probe_vision(root, "keyed")

    assert result.vision_ok is True and result.grounded is True
    assert server.headers[0]["authorization"] == "Bearer s3cret"


def test_request_is_a_deterministic_chat_completion_with_the_image_and_question(
    root: Settings, fake_server: Callable[..., FakeServer]
) -> None:
    server = fake_server(lambda body: (200, _completion("I see a red disc and 42")))
    add_remote_entry(root, "fake", server.base_url)

    result = probe_vision(root, "fake", max_tokens=300)

    [request] = server.requests  # no usage reported -> no control request
    assert (request["model"], request["temperature"], request["max_tokens"]) == (DEMO_SERVED, 0, 300)
    texts = [p["text"] for p in request["messages"][0]["content"] if p["type"] == "text"]
    assert texts == [PROBE_QUESTION]
    assert result.vision_ok is True and result.control_prompt_tokens is None
    assert result.matched == ["red", "circle", "42"]


def test_server_that_ignores_the_image_fails_the_token_control(
    root: Settings, fake_server: Callable[..., FakeServer]
) -> None:
    # Answers well but counts the same prompt tokens with and without the image: it never saw it.
    server = fake_server(lambda body: (200, _completion("A red circle and 42.", prompt_tokens=20)))
    add_remote_entry(root, "blind", server.base_url)

    result = probe_vision(root, "blind")

    assert len(server.requests) == 2
    assert isinstance(server.requests[1]["messages"][0]["content"], str)  # the control has no image
    assert (result.prompt_tokens, result.control_prompt_tokens) == (20, 20)
    assert result.vision_ok is False and result.grounded is True
    assert "image was not counted" in (result.error or "")


def test_reasoning_is_read_from_reasoning_fields_and_inline_think_blocks(
    root: Settings, fake_server: Callable[..., FakeServer]
) -> None:
    body = {
        "choices": [{"message": {"content": "<think>round and red; digits 4 2</think>A red circle, 42."}}],
    }
    server = fake_server(lambda _: (200, json.dumps(body).encode()))
    add_remote_entry(root, "thinker", server.base_url)

    result = probe_vision(root, "thinker")

    assert result.answer == "A red circle, 42."
    assert result.reasoning == "round and red; digits 4 2"


def test_empty_answer_is_not_vision_ok(root: Settings, fake_server: Callable[..., FakeServer]) -> None:
    server = fake_server(lambda _: (200, _completion("", prompt_tokens=300)))
    add_remote_entry(root, "mute", server.base_url)

    result = probe_vision(root, "mute")

    assert result.vision_ok is False and "empty answer" in (result.error or "")


# ---------------------------------------------------------------------------------------------------------
# Images: validated, upright, RGB, fitted, MIME matching the bytes
# ---------------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied_before_sending(
    root: Settings, fake_server: Callable[..., FakeServer], tmp_path: Path
) -> None:
    server = fake_server(lambda _: (200, _completion("two halves, red and blue")))
    add_remote_entry(root, "fake", server.base_url)
    photo = tmp_path / "rotated.jpg"
    photo.write_bytes(_jpeg_with_orientation(6))  # stored 600x400; displayed rotated 90 degrees clockwise

    result = probe_vision(root, "fake", photo)

    assert result.image.original_size == (600, 400) and result.image.exif_orientation == 6
    assert result.image.sent_size == (299, 448)  # upright 400x600 fitted to 448
    assert result.grounded is None and result.matched == []
    mime, sent = _decoded_sent_image(server)
    assert (mime, sent.format, sent.size) == ("image/jpeg", "JPEG", (299, 448))
    # The stored left (red) half is on top once upright.
    top, bottom = sent.convert("RGB").getpixel((150, 40)), sent.convert("RGB").getpixel((150, 400))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_transparent_png_is_flattened_to_rgb_and_sent_as_png() -> None:
    image = Image.new("RGBA", (1000, 500), (0, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")

    prepared = prepare_image(buffer.getvalue(), "clear.png", 448)

    sent = Image.open(io.BytesIO(prepared.data))
    assert (prepared.info.mime, sent.format, sent.mode, sent.size) == ("image/png", "PNG", "RGB", (448, 224))
    assert sent.getpixel((10, 10)) == (255, 255, 255)
    assert prepared.data_url.startswith("data:image/png;base64,")
    assert prepared.info.original_bytes == len(buffer.getvalue())


def test_entry_long_edge_is_used_and_small_images_are_not_upscaled(
    root: Settings, fake_server: Callable[..., FakeServer], tmp_path: Path
) -> None:
    server = fake_server(lambda _: (200, _completion("green")))
    add_remote_entry(root, "fake", server.base_url)
    entries = json.loads(root.curated_path.read_text())
    entries[-1]["vision_target_long_edge"] = 1024
    root.curated_path.write_text(json.dumps(entries))
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    big.write_bytes(_png_bytes((2048, 1024)))
    small.write_bytes(_png_bytes((100, 50)))

    assert probe_vision(root, "fake", big).image.sent_size == (1024, 512)
    assert probe_vision(root, "fake", small).image.sent_size == (100, 50)


def test_uploaded_bytes_are_probed_and_only_their_hash_recorded(
    root: Settings, fake_server: Callable[..., FakeServer]
) -> None:
    server = fake_server(lambda _: (200, _completion("a green square")))
    add_remote_entry(root, "fake", server.base_url)
    data = _png_bytes()

    result = probe_vision(root, "fake", image_bytes=data, image_name="upload.png")

    [row] = history.list_probes(root, "fake")
    assert (row["image_name"], row["image_sha256"], row["image_bytes"]) == (
        "upload.png",
        hashlib.sha256(data).hexdigest(),
        len(data),
    )
    assert base64.b64encode(data).decode()[:40] not in row["result_json"]
    assert result.vision_ok is True


# Each bad input: its bytes (None = the path does not exist), and the words the one-line message must contain.
BAD_IMAGES: dict[str, tuple[bytes | None, str]] = {
    "text-named-jpg": (b"this is plain text, not a JPEG\n" * 10, "not an image Pillow can read"),
    "truncated-png": (_png_bytes((400, 300))[:120], "corrupt or truncated PNG"),
    "pixel-bomb-30000x30000": (_png_header_claiming(30000, 30000), "900000000 pixels is over the limit"),
    "zero-byte": (b"", "empty file (0 bytes)"),
    "missing-file": (None, "no such file"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_exits_64_with_one_line_and_nothing_is_sent_or_recorded(
    case: str, root: Settings, fake_server: Callable[..., FakeServer], cli: Callable[..., Any], tmp_path: Path
) -> None:
    server = fake_server(lambda _: (200, _completion("should never be asked")))
    add_remote_entry(root, "fake", server.base_url)
    data, expected = BAD_IMAGES[case]
    path = tmp_path / ("photo.jpg" if case == "text-named-jpg" else f"{case}.png")
    if data is not None:
        path.write_bytes(data)

    outcome = cli("probe-vision", "fake", str(path))

    assert outcome.code == 64
    assert outcome.err.count("\n") == 1 and outcome.err.startswith("error: image ")
    assert expected in outcome.err
    assert "Traceback" not in outcome.err + outcome.out and outcome.out == ""
    assert server.requests == []
    assert _probe_rows(root) == []


def test_file_over_the_size_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="over the 20 MiB limit"):
        prepare_image(b"\0" * (MAX_IMAGE_BYTES + 1), "huge.png", 448)


def test_image_just_over_pillows_pixel_limit_is_refused_not_only_warned() -> None:
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None  # the decompression-bomb guard stays on
    side = int(limit**0.5) + 10  # over the limit but under twice it, where Pillow only warns
    with pytest.raises(UsageError, match="decompression-bomb guard"):
        prepare_image(_png_header_claiming(side, side), "warned.png", 448)


# ---------------------------------------------------------------------------------------------------------
# Broken endpoints: vision_ok false, a clear one-line error, exit 6, recorded and audited, no traceback
# ---------------------------------------------------------------------------------------------------------


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unreachable", "cannot connect to http://127.0.0.1:"),
        ("http-500", "HTTP 500 from"),
        ("timeout", "timeout: no answer from"),
        ("malformed-json", "malformed response from"),
    ],
)
def test_endpoint_failure_exits_6_with_one_clear_line(
    case: str,
    expected: str,
    root: Settings,
    demo_server: Callable[..., str],
    fake_server: Callable[..., FakeServer],
    cli: Callable[..., Any],
) -> None:
    args: list[str] = []
    if case == "unreachable":
        base_url = _closed_port_url()
    elif case == "http-500":
        base_url = demo_server("--fail-chat", "500")
    elif case == "timeout":
        base_url = demo_server("--response-delay-ms", "3000")
        args = ["--timeout", "0.5"]
    else:
        base_url = fake_server(lambda _: (200, b"<html>definitely not json")).base_url
    add_remote_entry(root, "broken", base_url)

    started = time.monotonic()
    outcome = cli("probe-vision", "broken", *args)

    assert outcome.code == 6
    assert "vision_ok: false" in outcome.out.splitlines()
    [error_line] = [line for line in outcome.out.splitlines() if line.startswith("error: ")]
    assert expected in error_line
    assert outcome.err.count("\n") == 1 and expected in outcome.err
    assert "Traceback" not in outcome.out + outcome.err
    [row] = history.list_probes(root, "broken")
    assert row["vision_ok"] == 0 and expected in json.loads(row["result_json"])["error"]
    [event] = audit.read_events(root, "probe_failure")
    assert event["name"] == "broken" and expected in event["error"]
    if case == "timeout":
        assert time.monotonic() - started < 2.5


def test_json_output_has_every_result_field(
    root: Settings, demo_server: Callable[..., str], cli: Callable[..., Any]
) -> None:
    add_remote_entry(root, "demo-remote", demo_server())

    outcome = cli("probe-vision", "demo-remote", "--json")

    assert outcome.code == 0, outcome.err
    result = json.loads(outcome.out)
    for key in (
        "vision_ok",
        "grounded",
        "matched",
        "answer",
        "reasoning",
        "latency_ms",
        "prompt_tokens",
        "control_prompt_tokens",
        "model",
        "endpoint",
        "image",
        "probe_version",
        "timestamp",
        "error",
    ):
        assert key in result
    assert set(result["image"]) >= {"name", "sha256", "original_bytes", "original_size", "sent_size", "mime"}
    assert ProbeResult.model_validate(result).to_dict() == result


def test_bad_options_are_usage_errors(root: Settings, cli: Callable[..., Any]) -> None:
    assert cli("probe-vision", DEMO_VISION, "--timeout", "0").code == 64
    assert cli("probe-vision", DEMO_VISION, "--max-tokens", "0").code == 64
    assert cli("probe-vision", "no-such-model").code == 4


# ---------------------------------------------------------------------------------------------------------
# Grounding words
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "matched"),
    [
        ("A large RED circle next to the number 42.", ["red", "circle", "42"]),
        ("a circular red disc and forty-two", ["red", "circle", "42"]),
        ("A coloured shape with 4242 on it", []),  # no whole word: 'coloured' is not red, 4242 is not 42
        ("a blue square and 7", []),
    ],
)
def test_grounding_matches_whole_content_words(answer: str, matched: list[str]) -> None:
    assert match_canonical_content(answer) == matched


# ---------------------------------------------------------------------------------------------------------
# E2E: the real tiny transformers-serve backend (a random LLaVA: it takes the image but cannot see it)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_e2e_tiny_llava_counts_image_tokens_but_is_not_grounded(single_port: Settings) -> None:
    require(*e2e_backend.inference_backend_available())
    entries = json.loads(single_port.curated_path.read_text(encoding="utf-8"))
    entries.append(
        {
            "name": "tiny-llava_(e2e)",
            "backend": "vllm",
            "served_model_id": e2e_backend.served_model_id_for(e2e_backend.tiny_llava_path()),
            "capabilities": {"text": True, "vision": True},
            "download_path": str(e2e_backend.tiny_llava_path()),
            "backend_config": {
                "launch": list(e2e_backend.TRANSFORMERS_SERVE_LAUNCH),
                "env": dict(e2e_backend.launch_env()),
                "startup_timeout_s": 600,
            },
        }
    )
    single_port.curated_path.write_text(json.dumps(entries, indent=2), encoding="utf-8")

    result = probe_vision(single_port, "tiny-llava_(e2e)", activate=True, timeout_s=300, max_tokens=16)

    assert result.vision_ok is True, result.error
    assert result.prompt_tokens is not None and result.control_prompt_tokens is not None
    # The image's placeholder tokens were counted (the control has the same question without the image).
    assert result.prompt_tokens - result.control_prompt_tokens >= e2e_backend.TINY_LLAVA_IMAGE_TOKENS
    assert result.grounded is False
    [row] = history.list_probes(single_port, "tiny-llava_(e2e)")
    assert (row["vision_ok"], row["grounded"]) == (1, 0)
