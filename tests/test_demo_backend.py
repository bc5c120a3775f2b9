"""The demo backend: image description from pixels, the OpenAI-compatible API, and its fault-injection switches.

Unit tests call :func:`describe_image` directly; the rest run the real server as a subprocess on loopback
(launched the way the registry launches it) and talk HTTP to it, like the process manager does.
"""

from __future__ import annotations

import ast
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import REPO, demo_argv, free_port, wait_until
from PIL import Image, ImageDraw, ImageFont

from imageworks_core.probe import make_canonical_probe_image
from imageworks_demo.server import IMAGE_PROMPT_TOKENS, TEXT_ONLY_MESSAGE
from imageworks_demo.vision import decode_image_data_url, describe_image, image_to_data_url

SERVED = "demo-vision"
PROBE_PROMPT = "Describe this image. Mention any shape, its colour and any text you can read."


# ---------------------------------------------------------------------------------------------------------
# describe_image: the answer comes from the pixels
# ---------------------------------------------------------------------------------------------------------


def _jpeg_448(img: Image.Image) -> Image.Image:
    """What a client typically sends: longest edge 448, JPEG quality 90."""
    small = img.copy()
    small.thumbnail((448, 448))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _text_image(text: str, size: tuple[int, int] = (900, 240), font_size: int = 110) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text(
        (size[0] // 2, size[1] // 2), text, font=ImageFont.load_default(size=font_size), fill="black", anchor="mm"
    )
    return image


def test_canonical_probe_image_reads_as_red_circle_and_42() -> None:
    description = describe_image(make_canonical_probe_image())
    assert (description.width, description.height) == (640, 480)
    assert description.dominant_colours[0] == "white"
    assert "red" in description.dominant_colours
    assert [(s.kind, s.colour, s.large) for s in description.shapes] == [("circle", "red", True)]
    assert 0.74 < description.shapes[0].fill_ratio < 0.82  # ~pi/4
    assert description.digits == "42"
    assert description.summary == "I see a 640x480 image, mostly white, with a large red circle and the text 42."
    assert "fill ratio" in description.reasoning and "circle" in description.reasoning


@pytest.mark.parametrize("size", [(640, 480), (1024, 768), (320, 240)])
def test_canonical_probe_image_survives_resize_to_448_and_jpeg(size: tuple[int, int]) -> None:
    description = describe_image(_jpeg_448(make_canonical_probe_image(size)))
    assert [(s.kind, s.colour) for s in description.shapes] == [("circle", "red")]
    assert description.digits == "42"


def test_blue_rectangle_is_blue_and_not_a_circle() -> None:
    image = Image.new("RGB", (640, 480), "white")
    ImageDraw.Draw(image).rectangle((100, 120, 520, 360), fill=(0, 0, 255))
    description = describe_image(image)
    assert "blue" in description.dominant_colours
    assert [(s.kind, s.colour) for s in description.shapes] == [("rectangle", "blue")]
    assert description.shapes[0].fill_ratio > 0.95
    assert "circle" not in description.summary
    assert description.digits == ""


def test_plain_white_image_has_no_shapes_and_no_digits() -> None:
    description = describe_image(Image.new("RGB", (320, 200), "white"))
    assert description.dominant_colours == ("white",)
    assert description.shapes == ()
    assert description.digits == "" and description.text_regions == 0
    assert description.summary == "I see a 320x200 image, mostly white, with no distinct shapes or text."


def test_other_shapes_are_told_apart_by_fill_ratio_and_outline() -> None:
    def shape(draw: Callable[[ImageDraw.ImageDraw], None]) -> list[tuple[str, str]]:
        image = Image.new("RGB", (640, 480), "white")
        draw(ImageDraw.Draw(image))
        return [(s.kind, s.colour) for s in describe_image(image).shapes]

    assert shape(lambda d: d.rectangle((100, 100, 300, 300), fill=(0, 160, 0))) == [("square", "green")]
    assert shape(lambda d: d.ellipse((80, 140, 560, 340), fill=(255, 220, 0))) == [("ellipse", "yellow")]
    assert shape(lambda d: d.polygon([(320, 40), (90, 440), (550, 440)], fill=(128, 0, 128))) == [
        ("triangle", "purple")
    ]
    # A ring is no uniformly filled circle.
    assert shape(lambda d: d.ellipse((100, 100, 400, 400), outline=(255, 0, 0), width=20)) == []


def test_every_digit_is_read_and_letters_are_not() -> None:
    assert describe_image(_text_image("0123456789", font_size=80)).digits == "0123456789"
    assert describe_image(_jpeg_448(_text_image("2024 117"))).digits == "2024 117"
    letters = describe_image(_text_image("Hello"))
    assert letters.digits == "" and letters.text_regions > 0
    assert "text-like marks" in letters.summary


def test_transparent_areas_count_as_white() -> None:
    image = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((50, 20, 210, 180), fill=(255, 0, 0, 255))
    description = describe_image(image)
    assert description.background == "white"
    assert [(s.kind, s.colour) for s in description.shapes] == [("circle", "red")]


def test_data_urls_round_trip_and_bad_ones_are_refused() -> None:
    image = make_canonical_probe_image((64, 48))
    assert decode_image_data_url(image_to_data_url(image)).size == (64, 48)
    with pytest.raises(ValueError, match="data: image URLs"):
        decode_image_data_url("https://example.com/cat.png")
    with pytest.raises(ValueError, match="base64"):
        decode_image_data_url("data:image/png;base64,@@not-base64@@")
    with pytest.raises(ValueError, match="Cannot decode image"):
        decode_image_data_url("data:image/png;base64,aGVsbG8gd29ybGQ=")


# ---------------------------------------------------------------------------------------------------------
# The server as a real process
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Backend:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def _wait_healthy(backend: Backend, timeout_s: float = 15.0) -> float:
    """Poll /health until 200; returns the seconds waited. Fails with the log tail on exit or timeout."""
    started = time.monotonic()
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() - started < timeout_s:
            if backend.proc.poll() is not None:
                pytest.fail(f"backend exited {backend.proc.returncode}:\n{backend.log()}")
            try:
                if client.get(f"{backend.url}/health").status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.02)
    pytest.fail(f"backend not healthy after {timeout_s}s:\n{backend.log()}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The backend leads its own session, so its group holds it and any child it spawned.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture
def start_backend(tmp_path: Path) -> Iterator[Callable[..., Backend]]:
    """Start ``python -m imageworks_demo.server`` with extra flags; every process group is killed after."""
    started: list[Backend] = []

    def start(*flags: str, wait: bool = True) -> Backend:
        port = free_port()
        log_path = tmp_path / f"backend-{len(started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                demo_argv(port, "--served-model-name", SERVED, *flags),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        backend = Backend(proc, port, log_path)
        started.append(backend)
        if wait:
            _wait_healthy(backend)
        return backend

    yield start
    for backend in started:
        _kill_group(backend.proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """One well-behaved backend shared by the API tests (starting one per test would be slow)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("demo-backend") / "backend.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            demo_argv(port, "--served-model-name", SERVED),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    backend = Backend(proc, port, log_path)
    try:
        _wait_healthy(backend)
        yield backend
    finally:
        _kill_group(proc)


def _chat_body(image: Image.Image | None = None, prompt: str = PROBE_PROMPT, **extra: object) -> dict[str, object]:
    content: list[dict[str, object]] = [{"type": "text", "text": prompt}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image_to_data_url(image)}})
    return {"model": SERVED, "messages": [{"role": "user", "content": content}], **extra}


def _sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_health_and_model_list(server: Backend) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [(SERVED, "model", "imageworks-demo")]


def test_chat_describes_the_probe_image(server: Backend) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json=_chat_body(make_canonical_probe_image()), timeout=30
    )
    assert response.status_code == 200
    reply = response.json()
    assert reply["object"] == "chat.completion" and reply["model"] == SERVED
    message = reply["choices"][0]["message"]
    assert message["role"] == "assistant"
    for word in ("red", "circle", "42"):
        assert word in message["content"]
    assert message["reasoning_content"].startswith("Reasoning: dominant colours")
    assert reply["choices"][0]["finish_reason"] == "stop"

    text_only = httpx.post(f"{server.url}/v1/chat/completions", json=_chat_body(), timeout=30).json()
    usage, text_usage = reply["usage"], text_only["usage"]
    assert usage["prompt_tokens"] == text_usage["prompt_tokens"] + IMAGE_PROMPT_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_answer_comes_from_pixels_not_from_the_prompt(server: Backend) -> None:
    body = _chat_body(Image.new("RGB", (320, 240), "white"), prompt="Is there a red circle and the number 42?")
    content = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).json()["choices"][0]["message"][
        "content"
    ]
    assert "42" not in content and "circle" not in content and "red" not in content
    body = _chat_body(prompt="Say: a red circle and the text 42")
    content = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).json()["choices"][0]["message"][
        "content"
    ]
    assert "42" not in content and "circle" not in content


def test_chat_streams_word_by_word_and_ends_with_done(server: Backend) -> None:
    body = _chat_body(make_canonical_probe_image(), stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    pieces = [d for d in deltas if d]
    assert len(pieces) > 5
    streamed = "".join(pieces)
    full = httpx.post(f"{server.url}/v1/chat/completions", json=_chat_body(make_canonical_probe_image()), timeout=30)
    assert streamed == full.json()["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["prompt_tokens"] > IMAGE_PROMPT_TOKENS


def test_max_tokens_cuts_the_answer(server: Backend) -> None:
    reply = httpx.post(
        f"{server.url}/v1/chat/completions", json=_chat_body(make_canonical_probe_image(), max_tokens=3), timeout=30
    ).json()
    assert reply["choices"][0]["message"]["content"] == "I see a"
    assert reply["choices"][0]["finish_reason"] == "length"


def test_text_completions_plain_and_streamed(server: Backend) -> None:
    body = {"model": SERVED, "prompt": "Once upon a time"}
    reply = httpx.post(f"{server.url}/v1/completions", json=body).json()
    assert reply["object"] == "text_completion"
    text = reply["choices"][0]["text"]
    assert "Once upon a time" in text and reply["usage"]["prompt_tokens"] == 4
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as response:
        events = _sse_events(response)
    assert events[-1] == "[DONE]" and len(events) > 3
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == text


def test_errors_are_openai_shaped(server: Backend) -> None:
    chat = f"{server.url}/v1/chat/completions"
    unknown = httpx.post(chat, json={**_chat_body(), "model": "gpt-4"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "invalid_request_error" and "gpt-4" in unknown.json()["error"]["message"]

    for url in ("https://example.com/cat.png", "data:image/png;base64,%%%", "data:image/png;base64,aGVsbG8="):
        body = {
            "model": SERVED,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        }
        response = httpx.post(chat, json=body)
        assert response.status_code == 400, url
        assert response.json()["error"]["type"] == "invalid_request_error"

    assert httpx.post(chat, content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400
    assert httpx.post(chat, json={"model": SERVED, "messages": []}).status_code == 400
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404


def test_each_request_is_logged_with_status_and_time(server: Backend) -> None:
    httpx.get(f"{server.url}/health?probe=log")
    wait_until(lambda: "/health?probe=log" in server.log(), timeout=10, what="the request's log line")
    assert any(
        line.startswith("demo_backend: GET /health?probe=log 200 ") and line.endswith("ms")
        for line in server.log().splitlines()
    )


# ---------------------------------------------------------------------------------------------------------
# Fault injection, as the process manager sees it
# ---------------------------------------------------------------------------------------------------------


def test_text_only_refuses_images_but_answers_text(start_backend: Callable[..., Backend]) -> None:
    backend = start_backend("--text-only")
    chat = f"{backend.url}/v1/chat/completions"
    refused = httpx.post(chat, json=_chat_body(make_canonical_probe_image()))
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == TEXT_ONLY_MESSAGE
    assert httpx.post(chat, json=_chat_body()).status_code == 200


def test_crash_at_start_exits_non_zero_quickly(start_backend: Callable[..., Backend]) -> None:
    backend = start_backend("--crash-at-start", wait=False)
    assert backend.proc.wait(timeout=10) == 3
    assert "error: simulated crash at start" in backend.log()


def test_slow_start_delays_health(start_backend: Callable[..., Backend]) -> None:
    backend = start_backend("--slow-start", "1.0", wait=False)
    assert _wait_healthy(backend) >= 0.9


def test_unhealthy_answers_503(start_backend: Callable[..., Backend]) -> None:
    backend = start_backend("--unhealthy", wait=False)
    deadline = time.monotonic() + 15
    while True:
        try:
            response = httpx.get(f"{backend.url}/health")
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, backend.log()
            time.sleep(0.02)
    assert response.status_code == 503


def test_response_delay_and_failing_chat(start_backend: Callable[..., Backend]) -> None:
    backend = start_backend("--response-delay-ms", "400", "--fail-chat", "500")
    started = time.monotonic()
    response = httpx.post(f"{backend.url}/v1/chat/completions", json=_chat_body(), timeout=10)
    assert time.monotonic() - started >= 0.4
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{backend.url}/v1/chat/completions", json=_chat_body(), timeout=0.1)


def test_sigterm_stops_it_cleanly(start_backend: Callable[..., Backend]) -> None:
    backend = start_backend()
    process = psutil.Process(backend.proc.pid)
    process.terminate()
    assert process.wait(timeout=5) == 0
    assert "received SIGTERM" in backend.log()


def test_ignore_sigterm_survives_sigterm_and_dies_on_sigkill(start_backend: Callable[..., Backend]) -> None:
    backend = start_backend("--ignore-sigterm")
    process = psutil.Process(backend.proc.pid)
    process.terminate()
    with pytest.raises(psutil.TimeoutExpired):
        process.wait(timeout=0.5)
    assert httpx.get(f"{backend.url}/health").status_code == 200
    process.kill()
    assert process.wait(timeout=5) == -signal.SIGKILL


def test_spawn_child_shares_the_process_group(start_backend: Callable[..., Backend]) -> None:
    backend = start_backend("--spawn-child")
    children = psutil.Process(backend.proc.pid).children()
    assert len(children) == 1
    child = children[0]
    assert os.getpgid(child.pid) == os.getpgid(backend.proc.pid)
    assert f"spawned child pid={child.pid}" in backend.log()
    # Killing the group (what the fixture and the process manager do) takes the child too.
    _kill_group(backend.proc)
    child.wait(timeout=5)
    assert not child.is_running()


# ---------------------------------------------------------------------------------------------------------
# The demo is no part of the product
# ---------------------------------------------------------------------------------------------------------


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_the_core_and_the_dashboard_never_import_the_demo() -> None:
    product = [*(REPO / "imageworks_core").rglob("*.py"), *(REPO / "dashboard").rglob("*.py")]
    offenders = {
        str(path.relative_to(REPO)): sorted(m for m in _imported_modules(path) if m.split(".")[0] == "imageworks_demo")
        for path in product
    }
    assert len(product) > 20
    assert {path: modules for path, modules in offenders.items() if modules} == {}
