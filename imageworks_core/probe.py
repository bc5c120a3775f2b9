"""The vision probe: evidence that a model really sees, instead of trusting its declared ``vision`` capability.

One image goes to the model's OpenAI-compatible endpoint with a fixed question. ``vision_ok`` needs HTTP 200, a
non-empty answer and, when the server reports ``usage.prompt_tokens``, more prompt tokens than a text-only
control request with the same question (so a server that silently drops the image fails). Without a user image
the probe sends the canonical image (a red circle and the digits 42, :func:`make_canonical_probe_image`),
whose content is known, and ``grounded`` says whether the answer names it.

Input images are validated before anything is sent (real image by content, size limit, Pillow's
decompression-bomb guard, full decode), turned upright by their EXIF orientation, converted to RGB, fitted to
the entry's long edge and sent as a ``data:`` URL whose MIME type matches the encoded bytes. Every run is
recorded in the history DB (sha256 and size of the image, never its bytes); a failure is also an audit event.

In fleet mode the requests go to the slot serving the entry through its node's agent (a :class:`ProbeRoute` from
``Fleet.probe_route``); the run is recorded at the controller like any other, with the node named (``node``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shlex
import stat
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import BaseModel, Field

from . import audit, history
from .errors import ProbeError, UsageError
from .registry import Registry, load_registry
from .schema import ModelEntry
from .selection import endpoint_for
from .settings import Settings
from .upstream import auth_headers

if TYPE_CHECKING:
    from PIL import Image

PROBE_VERSION = 1
"""Bumped whenever the question, image or pass criteria change, so old results stay comparable."""
MAX_IMAGE_BYTES = 20 * 1024 * 1024
"""Largest accepted input file; the dashboard's upload limit (``server.maxUploadSize`` = 20 MB) matches it."""
DEFAULT_TARGET_LONG_EDGE = 448
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_TOKENS = 256
CONTROL_MAX_TOKENS = 1
"""The control request only needs its prompt-token count, so it asks for a single token."""
JPEG_QUALITY = 90
PROBE_QUESTION = "Describe this image: what shapes, colours and any text or numbers do you see?"
CANONICAL_IMAGE_NAME = "canonical-probe.png"
CANONICAL_CONTENT: dict[str, tuple[str, ...]] = {
    "red": ("red",),
    "circle": ("circle", "circular", "disc", "disk"),
    "42": ("42", "forty-two", "forty two"),
}
"""Known content of the canonical image: the word reported as matched, and the spellings that count for it."""
_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


class ProbeImage(BaseModel):
    """What was sent: identity and sizes of the image, never its bytes."""

    name: str
    sha256: str
    original_bytes: int
    original_format: str | None = None
    original_size: tuple[int, int]
    exif_orientation: int | None = None
    sent_size: tuple[int, int]
    sent_bytes: int
    mime: str


@dataclass(frozen=True)
class PreparedImage:
    """A validated image ready to send: the encoded bytes and their description."""

    info: ProbeImage
    data: bytes

    @property
    def data_url(self) -> str:
        """``data:<mime>;base64,...`` for an OpenAI ``image_url`` content part."""
        return f"data:{self.info.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


class ProbeResult(BaseModel):
    """One probe run; ``to_dict()`` is what the CLI's ``--json``, the API and the history DB hold."""

    name: str
    vision_ok: bool
    grounded: bool | None = None
    matched: list[str] = Field(default_factory=list)
    expected: list[str] = Field(default_factory=list)
    answer: str = ""
    reasoning: str = ""
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    control_prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    http_status: int | None = None
    model: str
    endpoint: str
    question: str = PROBE_QUESTION
    max_tokens: int = DEFAULT_MAX_TOKENS
    image: ProbeImage
    probe_version: int = PROBE_VERSION
    timestamp: str
    error: str | None = None
    node: str | None = None
    """The fleet node whose slot was probed (None: this box's single port or a remote endpoint)."""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def format_text(self) -> str:
        """``key: value`` lines (JSON-style lowercase booleans and null), multi-line text indented."""

        def scalar(value: Any) -> str:
            if isinstance(value, bool) or value is None:
                return json.dumps(value)
            return str(value)

        def block(value: str) -> str:
            return value.strip().replace("\n", "\n  ") if value.strip() else '""'

        image = self.image
        lines = [
            f"name: {self.name}",
            f"vision_ok: {scalar(self.vision_ok)}",
            f"grounded: {scalar(self.grounded)}",
            f"matched: [{', '.join(self.matched)}]",
            f"answer: {block(self.answer)}",
            f"reasoning: {block(self.reasoning)}",
            f"latency_ms: {scalar(self.latency_ms)}",
            f"prompt_tokens: {scalar(self.prompt_tokens)}",
            f"control_prompt_tokens: {scalar(self.control_prompt_tokens)}",
            f"model: {self.model}",
            f"endpoint: {self.endpoint}" + (f" (on node {self.node})" if self.node else ""),
            f"image: {image.name} {image.original_size[0]}x{image.original_size[1]} -> "
            f"{image.sent_size[0]}x{image.sent_size[1]} {image.mime} sha256 {image.sha256}",
            f"probe_version: {self.probe_version}",
            f"timestamp: {self.timestamp}",
        ]
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


# Image preparation -------------------------------------------------------------------------------------------
def make_canonical_probe_image(size: tuple[int, int] = (640, 480)) -> Image.Image:
    """The vision probe's image: on white, a large red circle (left half) and the digits 42 in black (right).

    Drawn with Pillow's default font, the font the demo backend's digit reader matches against, so the demo
    answers it the way a real vision model would.
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    radius = round(min(width / 2, height) * 0.4)
    cx, cy = width // 4, height // 2
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(255, 0, 0))
    font = ImageFont.load_default(size=max(12, round(min(width / 2, height) * 0.6)))
    draw.text((3 * width // 4, height // 2), "42", font=font, fill=(0, 0, 0), anchor="mm")
    return image


@lru_cache(maxsize=1)
def canonical_image_bytes() -> bytes:
    """The canonical probe image (:func:`make_canonical_probe_image`) as PNG bytes."""
    buffer = io.BytesIO()
    make_canonical_probe_image().save(buffer, format="PNG")
    return buffer.getvalue()


_DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-decode")
"""One full-size decode at a time per process, always on the same thread: concurrent uploads wait instead of
adding up, and the decoder's large blocks are reused from one malloc arena instead of one per request thread."""
_STRIP_BYTES = 4 << 20
"""Rows are shrunk a strip of about this many bytes at a time (the premultiplied copy Pillow makes is per strip)."""
_TRANSPOSE_FOR_ORIENTATION = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}
"""EXIF orientation -> the transpose that makes the image upright (as ``ImageOps.exif_transpose`` does)."""


def prepare_image(data: bytes, name: str, target_long_edge: int, *, max_pixels: int | None = None) -> PreparedImage:
    """Validate, orient, convert and resize an image; UsageError (one line, naming the problem) when bad.

    Pure: nothing is read from disk or sent. The file is judged by its content, never its extension.
    Memory is bounded: the pixel count is checked from the header before any decoding (``max_pixels``, default
    ``IMAGEWORKS_MAX_IMAGE_PIXELS``); one image is decoded at a time; JPEGs decode at reduced scale; and the
    image is shrunk to the target before it is rotated or flattened, so only one full-size copy ever exists.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UsageError(f"image {name}: empty file (0 bytes), not an image")
    if len(data) > MAX_IMAGE_BYTES:
        raise UsageError(f"image {name}: {len(data)} bytes is over the {MAX_IMAGE_BYTES // (1024 * 1024)} MiB limit")
    limit = max_pixels if max_pixels is not None else Settings.model_fields["max_image_pixels"].default
    fmt: str | None = None
    width = height = 0
    orientation: Any = None
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice its limit; here any image over our limit is refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format
                width, height = probe.size
                if width * height > limit:
                    raise Image.DecompressionBombError(f"{width}x{height}")
                probe.verify()
            # verify() leaves the image unusable; decode fully from a fresh handle to catch truncation.
            orientation, rgb = _DECODER.submit(_decode, data, fmt, target_long_edge).result()
    except UnidentifiedImageError:
        raise UsageError(
            f"image {name}: not an image Pillow can read (the content is no known image format, whatever the extension)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Image.open itself may refuse before the size is known here; Pillow's message then names it.
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        size = (
            f"{width}x{height} = {width * height} pixels"
            if width
            else (f"{counted.group(1)} pixels" if counted else "the pixel count")
        )
        raise UsageError(
            f"image {name}: {size} is over the limit of {limit} pixels "
            "(decompression-bomb guard; IMAGEWORKS_MAX_IMAGE_PIXELS sets it)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"image {name}: corrupt or truncated {fmt or 'image'} data ({detail})") from None

    # Photos stay JPEG (small, no visible loss); everything else goes lossless so drawn text keeps its edges.
    out_format, mime = ("JPEG", "image/jpeg") if fmt == "JPEG" else ("PNG", "image/png")
    buffer = io.BytesIO()
    rgb.save(buffer, format=out_format, **({"quality": JPEG_QUALITY} if out_format == "JPEG" else {}))
    encoded = buffer.getvalue()
    info = ProbeImage(
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        original_bytes=len(data),
        original_format=fmt,
        original_size=(width, height),
        exif_orientation=int(orientation) if isinstance(orientation, int) else None,
        sent_size=rgb.size,
        sent_bytes=len(encoded),
        mime=mime,
    )
    return PreparedImage(info=info, data=encoded)


def _decode(data: bytes, fmt: str | None, target_long_edge: int) -> tuple[Any, Any]:
    """(EXIF orientation, the fitted upright RGB image); runs on the decoder thread."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if fmt == "JPEG":
            img.draft("RGB", (target_long_edge, target_long_edge))  # the decoder itself scales by 1/2..1/8
        img.load()
        orientation = img.getexif().get(0x0112)
        return orientation, _fit_upright_rgb(img, target_long_edge, orientation)


def _box_reduce(img: Any, factor: int) -> Any:
    """``img.reduce(factor)`` strip by strip (same pixels: strips are whole boxes tall), so the premultiplied
    copy Pillow makes for transparent modes is a strip, never a second full-size image."""
    from PIL import Image

    rows = factor * max(1, _STRIP_BYTES // (img.width * 4 * factor))
    out = Image.new(img.mode, (-(-img.width // factor), -(-img.height // factor)))
    for top in range(0, img.height, rows):
        out.paste(img.crop((0, top, img.width, min(img.height, top + rows))).reduce(factor), (0, top // factor))
    return out


def _fit_upright_rgb(img: Any, target_long_edge: int, orientation: Any) -> Any:
    """First frame, fitted to the long edge, upright, as RGB with transparency flattened onto white.

    Shrinking comes first (a box reduce to about twice the target, then Lanczos, as Pillow's ``reducing_gap``
    does), so rotation and flattening work on the small image.
    """
    from PIL import Image

    transparent = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    work = img.convert("RGBA" if transparent else "RGB") if img.mode not in ("RGBA", "RGB") else img
    long_edge = max(work.size)
    if long_edge > target_long_edge:
        scale = target_long_edge / long_edge
        fitted = (max(1, round(work.width * scale)), max(1, round(work.height * scale)))
        factor = long_edge // (2 * target_long_edge)
        if factor >= 2:
            work = _box_reduce(work, factor)
        work = work.resize(fitted, Image.Resampling.LANCZOS)
    method = _TRANSPOSE_FOR_ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    if method:
        work = work.transpose(getattr(Image.Transpose, method))
    if work.mode == "RGBA":
        background = Image.new("RGBA", work.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, work).convert("RGB")
    return work if work is not img else work.copy()


def _describe_non_regular(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((label for test, label in kinds if test(mode)), "not a plain file")


def _read_image_file(path: Path) -> bytes:
    """The file's bytes, refusing anything but a regular file; reads stop at the size limit, whatever st_size says.

    Opened non-blocking, so a FIFO never waits for a writer; the type is checked on the open descriptor (no race
    between the check and the read).
    """
    limit_mib = MAX_IMAGE_BYTES // (1024 * 1024)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UsageError(f"image {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"image {path}: cannot read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"image {path}: is {_describe_non_regular(st.st_mode)}, not a regular file")
        if st.st_size > MAX_IMAGE_BYTES:
            raise UsageError(f"image {path.name}: {st.st_size} bytes is over the {limit_mib} MiB limit")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(1 << 20, MAX_IMAGE_BYTES + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_IMAGE_BYTES:
                raise UsageError(
                    f"image {path.name}: more than {MAX_IMAGE_BYTES} bytes is over the {limit_mib} MiB limit"
                )
        return b"".join(chunks)
    except OSError as exc:
        raise UsageError(f"image {path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


# Grounding ---------------------------------------------------------------------------------------------------
def match_canonical_content(text: str) -> list[str]:
    """The canonical image's content words that ``text`` names (whole words, any case)."""
    lowered = text.lower()
    return [
        word
        for word, spellings in CANONICAL_CONTENT.items()
        if any(re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", lowered) for s in spellings)
    ]


# Target resolution -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeRoute:
    """Where a probe's requests go: ``endpoint`` (an OpenAI base URL), the ``transport`` that carries them (None:
    a direct connection) and the fleet ``node`` serving the entry (None on one box)."""

    endpoint: str
    transport: httpx.BaseTransport | None = None
    node: str | None = None


Router = Callable[[ModelEntry, bool], ProbeRoute]
"""(entry, activate) -> its route: how fleet mode reaches a process-backed entry's slot."""


def activate_command(name: str) -> str:
    """The exact shell command that activates ``name`` (quoted: names may contain parentheses)."""
    return f"imageworks-models activate-model {shlex.quote(name)}"


def _resolve_endpoint(settings: Settings, entry: ModelEntry, activate: bool, registry: Registry | None = None) -> str:
    if entry.backend is None:
        raise ProbeError(f"{entry.name!r} has no backend configured; set backend and backend_config first")
    if not entry.is_process_backend:
        return endpoint_for(entry, settings)
    from . import runtime

    if activate:
        state = runtime.activate(settings, entry.name, registry=registry)
        return state.base_url.rstrip("/")
    state = runtime.read_state(settings)
    if state is not None and state.name == entry.name and state.status == "ready":
        return state.base_url.rstrip("/")
    if state is None:
        active = "no backend is active"
    elif state.name == entry.name:
        active = f"its backend is {state.status}, not ready"
    else:
        active = f"the active backend is {state.name!r} ({state.status})"
    summary = f"{entry.name!r} is not the active backend ({active})"
    raise ProbeError(
        f"{summary}; activate it first: {activate_command(entry.name)} (or rerun the probe with --activate)",
        inactive=entry.name,
        summary=summary,
    )


# The request ---------------------------------------------------------------------------------------------------
@dataclass
class _Reply:
    status: int
    content: str
    reasoning: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None


class _RequestFailed(Exception):
    """A request that got no usable answer; the message is the one-line ``error`` of the result."""


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return _one_line(response.text, 200) or "(empty body)"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return _one_line(str(error["message"]), 200)
    if isinstance(error, str):
        return _one_line(error, 200)
    if isinstance(body, dict) and body.get("detail"):
        return _one_line(str(body["detail"]), 200)
    return _one_line(response.text, 200)


def _text_of(value: Any) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _post_chat(client: httpx.Client, url: str, payload: dict[str, Any], headers: dict[str, str]) -> _Reply:
    try:
        response = client.post(url, json=payload, headers=headers)
    except httpx.TimeoutException:
        timeout = client.timeout.read
        raise _RequestFailed(f"timeout: no answer from {url} within {timeout:g} s") from None
    except httpx.ConnectError as exc:
        raise _RequestFailed(f"cannot connect to {url}: {_one_line(str(exc)) or 'connection failed'}") from None
    except httpx.HTTPError as exc:
        raise _RequestFailed(f"request to {url} failed: {type(exc).__name__}: {_one_line(str(exc))}") from None
    if response.status_code != 200:
        raise _RequestFailed(f"HTTP {response.status_code} from {url}: {_error_message(response)}")
    try:
        body = response.json()
    except ValueError:
        raise _RequestFailed(
            f"malformed response from {url}: HTTP 200 but the body is not JSON ({_one_line(response.text, 60)!r})"
        ) from None
    choices = body.get("choices") if isinstance(body, dict) else None
    message = (
        choices[0].get("message") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    )
    if not isinstance(message, dict):
        raise _RequestFailed(f"malformed response from {url}: JSON without choices[0].message")
    content = _text_of(message.get("content"))
    reasoning = _text_of(message.get("reasoning_content")) or _text_of(message.get("reasoning"))
    # Servers without a reasoning parser leave the thinking inline.
    thoughts = _THINK_BLOCK.findall(content)
    if thoughts:
        content = _THINK_BLOCK.sub("", content)
        reasoning = reasoning or "\n".join(t.strip() for t in thoughts)
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    prompt_tokens = usage.get("prompt_tokens")
    completion_tokens = usage.get("completion_tokens")
    return _Reply(
        status=response.status_code,
        content=content.strip(),
        reasoning=reasoning.strip(),
        prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
        completion_tokens=completion_tokens if isinstance(completion_tokens, int) else None,
        finish_reason=choices[0].get("finish_reason"),
    )


# The probe -------------------------------------------------------------------------------------------------------
def probe_vision(
    settings: Settings,
    name: str,
    image_path: str | os.PathLike[str] | None = None,
    *,
    image_bytes: bytes | None = None,
    image_name: str | None = None,
    activate: bool = False,
    timeout_s: float | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    registry: Registry | None = None,
    router: Router | None = None,
) -> ProbeResult:
    """Probe whether ``name`` really sees an image; the run is recorded in history (and audited when failed).

    The image is ``image_path``, else ``image_bytes`` (an upload, called ``image_name``), else the canonical
    probe image (the only case where ``grounded`` is known). Raises UsageError for bad arguments or a bad image
    (nothing sent or recorded), UnknownModelError for an unknown name, ProbeError when a process-backed entry is
    not the active backend and ``activate`` is false, BackendError when activation fails. Network and protocol
    failures do not raise: they give ``vision_ok=False`` with a one-line ``error``.

    ``router`` (fleet mode) finds a process-backed entry's slot instead of the single port; its errors
    (ProbeError when it runs nowhere, SlotLost for a lost node) pass through, and nothing is recorded then.
    """
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    if timeout <= 0:
        raise UsageError(f"timeout must be positive, got {timeout:g}")
    if max_tokens < 1:
        raise UsageError(f"max_tokens must be at least 1, got {max_tokens}")
    if image_path is not None and image_bytes is not None:
        raise UsageError("give an image path or image bytes, not both")
    entry = (registry or load_registry(settings=settings)).get(name)
    target = entry.vision_target_long_edge or DEFAULT_TARGET_LONG_EDGE
    pixels = settings.max_image_pixels
    canonical = image_path is None and image_bytes is None
    if image_path is not None:
        path = Path(image_path)
        prepared = prepare_image(_read_image_file(path), path.name, target, max_pixels=pixels)
    elif image_bytes is not None:
        prepared = prepare_image(image_bytes, image_name or "upload", target, max_pixels=pixels)
    else:
        prepared = prepare_image(canonical_image_bytes(), CANONICAL_IMAGE_NAME, target, max_pixels=pixels)

    if router is not None and entry.backend is not None and entry.is_process_backend:
        route = router(entry, activate)
    else:
        route = ProbeRoute(_resolve_endpoint(settings, entry, activate, registry))
    endpoint = route.endpoint
    url = f"{endpoint}/chat/completions"
    model = entry.effective_served_id
    image_payload = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": prepared.data_url}},
                    {"type": "text", "text": PROBE_QUESTION},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    control_payload = {
        "model": model,
        "messages": [{"role": "user", "content": PROBE_QUESTION}],
        "temperature": 0,
        "max_tokens": CONTROL_MAX_TOKENS,
    }
    result = ProbeResult(
        name=entry.name,
        vision_ok=False,
        model=model,
        endpoint=endpoint,
        max_tokens=max_tokens,
        image=prepared.info,
        expected=list(CANONICAL_CONTENT) if canonical else [],
        timestamp=history.now_iso(),
        node=route.node,
    )
    headers = auth_headers(entry)
    where = {"node": route.node} if route.node else {}
    with httpx.Client(timeout=httpx.Timeout(timeout), transport=route.transport) as client:
        started = time.perf_counter()
        try:
            reply = _post_chat(client, url, image_payload, headers)
        except _RequestFailed as exc:
            result.latency_ms = round((time.perf_counter() - started) * 1000, 1)
            result.error = str(exc)
        else:
            result.latency_ms = round((time.perf_counter() - started) * 1000, 1)
            result.http_status = reply.status
            result.answer = reply.content
            result.reasoning = reply.reasoning
            result.prompt_tokens = reply.prompt_tokens
            result.completion_tokens = reply.completion_tokens
            result.finish_reason = reply.finish_reason
            if canonical:
                result.matched = match_canonical_content(reply.content)
                result.grounded = len(result.matched) == len(CANONICAL_CONTENT)
            result.error = _judge(client, url, control_payload, headers, result)
            result.vision_ok = result.error is None

    history.record_probe(settings, entry.name, result.to_dict())
    if result.vision_ok:
        audit.log_event(
            settings, "probe", name=entry.name, vision_ok=True, grounded=result.grounded, endpoint=endpoint, **where
        )
    else:
        audit.log_event(settings, "probe_failure", name=entry.name, error=result.error, endpoint=endpoint, **where)
    return result


def _judge(
    client: httpx.Client, url: str, control_payload: dict[str, Any], headers: dict[str, str], result: ProbeResult
) -> str | None:
    """Why a 200 answer does not prove vision (None when it does); runs the control request when needed."""
    if not result.answer:
        finish = f" (finish_reason {result.finish_reason})" if result.finish_reason else ""
        return f"empty answer{finish}; the model produced no content for the image question"
    if result.prompt_tokens is None:
        return None
    try:
        control = _post_chat(client, url, control_payload, headers)
    except _RequestFailed as exc:
        return f"text-only control request failed: {exc}"
    result.control_prompt_tokens = control.prompt_tokens
    if control.prompt_tokens is None:
        return None
    if result.prompt_tokens <= control.prompt_tokens:
        return (
            f"the image was not counted: {result.prompt_tokens} prompt tokens with the image, "
            f"{control.prompt_tokens} without it (the server ignored or dropped the image)"
        )
    return None
