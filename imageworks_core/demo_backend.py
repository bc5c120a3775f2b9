"""A tiny OpenAI-compatible inference server that really looks at images: the demo registry's CPU backend.

It plays the part llama-swap's ``cmd/simple-responder`` plays in its tests. For users without a GPU it is a
working backend that can be activated and vision-probed; for the process-manager tests it is a peer with
switches for slow start, crashes, ignored signals, leaked children, bad health and failing requests.

Run it as::

    python -m imageworks_core.demo_backend --host 127.0.0.1 --port 24001 --served-model-name demo-vision

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``
(both with ``stream: true`` as server-sent events). Images arrive as ``data:`` URLs and are described from
their pixels by :func:`describe_image`: size, named dominant colours, large uniform shapes (circle, ellipse,
square, rectangle, triangle) and dark digits read by template matching against Pillow's default font.
:func:`make_canonical_probe_image` draws the image the vision probe sends (a red circle and the digits 42).

Only the standard library and Pillow are used, and Pillow is imported on first use, so the server binds and
answers ``/health`` within a few tens of milliseconds of the interpreter starting.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_SERVED_NAME = "demo-vision"
OWNED_BY = "imageworks-demo"
# What an image "costs" in prompt tokens; vision models charge a fixed-ish block of tokens per image.
IMAGE_PROMPT_TOKENS = 256
MAX_BODY_BYTES = 64 * 1024 * 1024
EXIT_CRASH_AT_START = 3
EXIT_BIND_FAILED = 1
TEXT_ONLY_MESSAGE = "This model does not support image input"
# The command --spawn-child runs: a long sleeper standing in for an inference worker process.
CHILD_COMMAND: tuple[str, ...] = (sys.executable, "-c", "import time; time.sleep(3600)")

# Image analysis settings (fractions are of the analysed image's area unless stated otherwise).
MAX_ANALYSIS_EDGE = 1024
DOMINANT_COLOUR_MIN_FRACTION = 0.02
SHAPE_MIN_FRACTION = 0.005
LARGE_SHAPE_MIN_FRACTION = 0.04
DARK_LUMINANCE_MAX = 110
GLYPH_MIN_HEIGHT_PX = 10
DIGIT_MIN_SCORE = 0.80


# ---------------------------------------------------------------------------------------------------------
# Image analysis
# ---------------------------------------------------------------------------------------------------------

# Nearest-reference colour naming: several shades per name so dark red is "red", not "black".
_REFERENCE_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (0, 0, 0)),
    ("black", (35, 35, 35)),
    ("gray", (90, 90, 90)),
    ("gray", (128, 128, 128)),
    ("gray", (175, 175, 175)),
    ("white", (230, 230, 230)),
    ("white", (255, 255, 255)),
    ("red", (255, 0, 0)),
    ("red", (200, 20, 30)),
    ("red", (139, 0, 0)),
    ("orange", (255, 140, 0)),
    ("orange", (255, 165, 0)),
    ("yellow", (255, 255, 0)),
    ("yellow", (255, 215, 0)),
    ("yellow", (240, 230, 140)),
    ("green", (0, 128, 0)),
    ("green", (0, 255, 0)),
    ("green", (34, 139, 34)),
    ("green", (0, 90, 0)),
    ("green", (144, 238, 144)),
    ("cyan", (0, 255, 255)),
    ("cyan", (0, 180, 180)),
    ("blue", (0, 0, 255)),
    ("blue", (0, 0, 139)),
    ("blue", (30, 144, 255)),
    ("blue", (65, 105, 225)),
    ("purple", (128, 0, 128)),
    ("purple", (148, 0, 211)),
    ("magenta", (255, 0, 255)),
    ("pink", (255, 192, 203)),
    ("pink", (255, 105, 180)),
    ("brown", (139, 69, 19)),
    ("brown", (160, 82, 45)),
)
_COLOUR_NAMES: tuple[str, ...] = tuple(dict.fromkeys(name for name, _ in _REFERENCE_COLOURS))
_DARK_NAMES = frozenset({"black", "gray"})
_RUN = re.compile(rb"[^\x00]+")


@dataclass(frozen=True)
class DetectedShape:
    """One uniformly coloured region that has a recognisable geometric outline."""

    kind: str  # circle, ellipse, square, rectangle or triangle
    colour: str
    bbox: tuple[int, int, int, int]  # left, top, right, bottom (exclusive) in the original image's pixels
    area_fraction: float
    fill_ratio: float  # region area / bounding-box area: ~pi/4 for a circle, ~1 for a rectangle
    large: bool

    def phrase(self) -> str:
        """The shape as words, e.g. ``"a large red circle"``."""
        size = "large " if self.large else ""
        return f"a {size}{self.colour} {self.kind}"


@dataclass(frozen=True)
class ImageDescription:
    """What :func:`describe_image` saw; ``summary`` is the answer text, ``reasoning`` how it got there."""

    width: int
    height: int
    dominant_colours: tuple[str, ...]  # most common first, each covering >= DOMINANT_COLOUR_MIN_FRACTION
    colour_fractions: tuple[tuple[str, float], ...]
    background: str
    shapes: tuple[DetectedShape, ...]
    digits: str  # digits read from dark glyphs, runs separated by spaces; "" when none
    text_regions: int  # dark glyph-like marks found, read or not
    summary: str
    reasoning: str


@dataclass
class _Component:
    """An 8-connected region of a binary mask, kept as horizontal runs."""

    x0: int
    y0: int
    x1: int
    y1: int
    area: int = 0
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (y, start, end exclusive)

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def fill_ratio(self) -> float:
        return self.area / (self.width * self.height)

    def row_extents(self) -> dict[int, tuple[int, int]]:
        """Leftmost start and rightmost end of the component on each row."""
        rows: dict[int, tuple[int, int]] = {}
        for y, start, end in self.runs:
            lo, hi = rows.get(y, (start, end))
            rows[y] = (min(lo, start), max(hi, end))
        return rows


def _components(mask: Image.Image) -> list[_Component]:
    """Connected components (8-connectivity) of a 0/255 ``L`` mask, by run-length union-find.

    Runs are found by a compiled regex over the raw bytes, so the Python loop is per run, not per pixel.
    """
    width, height = mask.size
    data = mask.tobytes()
    parent: list[int] = []

    def find(label: int) -> int:
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = parent[label]
        return label

    runs: list[tuple[int, int, int, int]] = []
    previous: list[tuple[int, int, int]] = []
    for y in range(height):
        base = y * width
        current: list[tuple[int, int, int]] = []
        first = 0
        for match in _RUN.finditer(data, base, base + width):
            start, end = match.start() - base, match.end() - base
            # Runs on the row above touch this one (diagonals included) when they overlap [start-1, end].
            while first < len(previous) and previous[first][1] < start:
                first += 1
            label = -1
            k = first
            while k < len(previous) and previous[k][0] <= end:
                other = find(previous[k][2])
                if label < 0:
                    label = other
                elif other != label:
                    parent[other] = label
                k += 1
            if label < 0:
                label = len(parent)
                parent.append(label)
            current.append((start, end, label))
            runs.append((y, start, end, label))
        previous = current

    components: dict[int, _Component] = {}
    for y, start, end, label in runs:
        root = find(label)
        comp = components.get(root)
        if comp is None:
            comp = components[root] = _Component(start, y, end, y + 1)
        comp.x0, comp.x1 = min(comp.x0, start), max(comp.x1, end)
        comp.y1 = y + 1
        comp.area += end - start
        comp.runs.append((y, start, end))
    return list(components.values())


def _profile_error(comp: _Component, expected_width: Any) -> float:
    """Mean gap between each row's extent and ``expected_width(t)`` (t in 0..1 down the box), per box width."""
    rows = comp.row_extents()
    total = 0.0
    for y in range(comp.y0, comp.y1):
        lo, hi = rows.get(y, (0, 0))
        t = (y + 0.5 - comp.y0) / comp.height
        total += abs((hi - lo) - expected_width(t) * comp.width)
    return total / (comp.height * comp.width)


def _classify_shape(comp: _Component) -> str | None:
    """Name the outline of a solid component, or None when it is no simple geometric shape."""
    if comp.width < 8 or comp.height < 8:
        return None
    rows = comp.row_extents()
    # A hole (a ring, a glyph like "0") means it is not a uniformly coloured solid shape.
    solidity = comp.area / sum(hi - lo for lo, hi in rows.values())
    if solidity < 0.95:
        return None
    fill = comp.fill_ratio
    aspect = comp.width / comp.height
    if 0.70 <= fill <= 0.86 and _profile_error(comp, lambda t: math.sqrt(max(0.0, 1 - (2 * t - 1) ** 2))) < 0.05:
        return "circle" if 0.85 <= aspect <= 1.18 else "ellipse"
    if fill >= 0.88 and _profile_error(comp, lambda t: 1.0) < 0.05:
        return "square" if 0.9 <= aspect <= 1.11 else "rectangle"
    if 0.40 <= fill <= 0.60:
        error = min(_profile_error(comp, lambda t: t), _profile_error(comp, lambda t: 1 - t))
        if error < 0.06:
            return "triangle"
    return None


@lru_cache(maxsize=1)
def _palette_image() -> Image.Image:
    from PIL import Image

    palette = [channel for _, rgb in _REFERENCE_COLOURS for channel in rgb]
    image = Image.new("P", (1, 1))
    image.putpalette(palette)
    return image


def _name_lut() -> list[int]:
    """Palette index -> colour-name index, padded to 256 entries."""
    lut = [_COLOUR_NAMES.index(name) for name, _ in _REFERENCE_COLOURS]
    return lut + [0] * (256 - len(lut))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Upright RGB, transparent areas flattened onto white (how a viewer would show them)."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


@lru_cache(maxsize=1)
def _font_metrics() -> tuple[float, float, float]:
    """Pillow's default font per unit of font size: digit ink height (median), digit advance, space advance."""
    from PIL import ImageFont

    font = ImageFont.load_default(size=100)
    heights = sorted(font.getbbox(d)[3] - font.getbbox(d)[1] for d in "0123456789")
    return heights[len(heights) // 2] / 100, font.getlength("0") / 100, font.getlength(" ") / 100


_GLYPH_CANVAS = (40, 32)


def _glyph_vector(mask: Image.Image) -> tuple[float, ...]:
    """A glyph bitmap scaled to a fixed height and centred on a fixed canvas, keeping its aspect ratio."""
    from PIL import Image

    width, height = mask.size
    canvas_w, canvas_h = _GLYPH_CANVAS
    scaled_w = max(1, min(canvas_w, round(width * canvas_h / height)))
    scaled = mask.resize((scaled_w, canvas_h), Image.Resampling.BOX)
    canvas = Image.new("L", _GLYPH_CANVAS, 0)
    canvas.paste(scaled, ((canvas_w - scaled_w) // 2, 0))
    return tuple(float(v) for v in canvas.tobytes())


@lru_cache(maxsize=32)
def _digit_templates(font_size: int) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """Digits 0-9 rendered with the default font at ``font_size``, thresholded like the analysed image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    templates = []
    for digit in "0123456789":
        left, top, right, bottom = font.getbbox(digit)
        image = Image.new("L", (right - left + 4, bottom - top + 4), 255)
        ImageDraw.Draw(image).text((2 - left, 2 - top), digit, font=font, fill=0)
        ink = image.point([255 if v < DARK_LUMINANCE_MAX else 0 for v in range(256)])
        box = ink.getbbox()
        if box is None:
            continue
        templates.append((digit, _glyph_vector(ink.crop(box))))
    return tuple(templates)


def _correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of two equally long vectors (0 when either is constant)."""
    n = len(a)
    mean_a, mean_b = sum(a) / n, sum(b) / n
    cov = var_a = var_b = 0.0
    for x, y in zip(a, b, strict=True):
        dx, dy = x - mean_a, y - mean_b
        cov += dx * dy
        var_a += dx * dx
        var_b += dy * dy
    if var_a == 0 or var_b == 0:
        return 0.0
    return cov / math.sqrt(var_a * var_b)


def _component_mask(comp: _Component) -> Image.Image:
    """The component alone (not its neighbours inside the same box) as a 0/255 bitmap of its bounding box."""
    from PIL import Image

    buffer = bytearray(comp.width * comp.height)
    for y, start, end in comp.runs:
        offset = (y - comp.y0) * comp.width - comp.x0
        buffer[offset + start : offset + end] = b"\xff" * (end - start)
    return Image.frombytes("L", (comp.width, comp.height), bytes(buffer))


def _read_digit(comp: _Component) -> tuple[str, float]:
    """Best-matching digit for a glyph and its correlation score, against templates of the same height."""
    font_size = max(6, min(600, round(comp.height / _font_metrics()[0])))
    vector = _glyph_vector(_component_mask(comp))
    scored = [(_correlation(vector, template), digit) for digit, template in _digit_templates(font_size)]
    score, digit = max(scored)
    return digit, score


def _is_glyph_like(comp: _Component, image_height: int) -> bool:
    return (
        GLYPH_MIN_HEIGHT_PX <= comp.height <= 0.9 * image_height
        and comp.area >= 30
        and 0.08 <= comp.fill_ratio <= 0.8
        and comp.width <= 1.5 * comp.height
    )


def _text_lines(glyphs: list[_Component]) -> list[list[_Component]]:
    """Group glyphs into lines (vertically overlapping, similar height), each sorted left to right."""
    lines: list[list[_Component]] = []
    for glyph in sorted(glyphs, key=lambda g: (g.y0 + g.y1) / 2):
        for line in lines:
            ref = line[0]
            overlap = min(ref.y1, glyph.y1) - max(ref.y0, glyph.y0)
            if overlap >= 0.5 * min(ref.height, glyph.height) and max(ref.height, glyph.height) <= 1.6 * min(
                ref.height, glyph.height
            ):
                line.append(glyph)
                break
        else:
            lines.append([glyph])
    return [sorted(line, key=lambda g: g.x0) for line in lines]


def _read_digits(glyphs: list[_Component]) -> tuple[str, list[str]]:
    """Digits read from the glyphs (runs split by unreadable glyphs and wide gaps) and reasoning notes."""
    runs: list[str] = []
    notes: list[str] = []
    height_ratio, advance_ratio, space_ratio = _font_metrics()
    for line in _text_lines(glyphs):
        line_height = max(g.height for g in line)
        word_pitch = (advance_ratio + space_ratio / 2) / height_ratio * line_height
        current = ""
        previous: _Component | None = None
        for glyph in line:
            digit, score = _read_digit(glyph)
            readable = score >= DIGIT_MIN_SCORE
            notes.append(f"{digit} ({score:.2f})" if readable else f"? (best {digit} {score:.2f})")
            # The font's digits are tabular (equal advance, centred ink), so a space shows as extra pitch.
            wide_gap = previous is not None and (glyph.x0 + glyph.x1 - previous.x0 - previous.x1) / 2 > word_pitch
            if not readable or wide_gap:
                if current:
                    runs.append(current)
                current = ""
            if readable:
                current += digit
            previous = glyph
        if current:
            runs.append(current)
    return " ".join(runs), notes


def _join_words(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def describe_image(img: Image.Image) -> ImageDescription:
    """Describe an image from its pixels: size, named dominant colours, large shapes and dark digits.

    Pure: the input is not modified. Colours are named by nearest reference colour; each non-background
    colour's connected regions are classified by bounding-box fill ratio and row profile (a circle fills
    ~pi/4 of its box, a rectangle ~1); dark glyph-like regions are matched against digits rendered with
    Pillow's default font at the glyph's height. Works on clean synthetic images such as
    :func:`make_canonical_probe_image`, also after resizing and JPEG compression; it is no general model.
    """
    from PIL import Image, ImageChops

    rgb = _to_rgb(img)
    width, height = rgb.size
    scale = 1.0
    if max(width, height) > MAX_ANALYSIS_EDGE:
        scale = max(width, height) / MAX_ANALYSIS_EDGE
        rgb = rgb.resize((max(1, round(width / scale)), max(1, round(height / scale))), Image.Resampling.BOX)
    work_w, work_h = rgb.size
    total = work_w * work_h

    indexed = rgb.quantize(palette=_palette_image(), dither=Image.Dither.NONE)
    names = Image.frombytes("L", indexed.size, indexed.tobytes()).point(_name_lut())
    histogram = names.histogram()
    fractions = sorted(
        ((name, histogram[i] / total) for i, name in enumerate(_COLOUR_NAMES) if histogram[i]),
        key=lambda item: -item[1],
    )
    dominant = tuple(name for name, share in fractions if share >= DOMINANT_COLOUR_MIN_FRACTION)

    # The background is the colour most common along the border, where subjects rarely sit.
    strip = max(1, min(work_w, work_h) // 50)
    border = [0] * 256
    for box in (
        (0, 0, work_w, strip),
        (0, work_h - strip, work_w, work_h),
        (0, 0, strip, work_h),
        (work_w - strip, 0, work_w, work_h),
    ):
        for i, count in enumerate(names.crop(box).histogram()):
            border[i] += count
    background = _COLOUR_NAMES[max(range(len(_COLOUR_NAMES)), key=lambda i: border[i])]

    def to_original(comp: _Component) -> tuple[int, int, int, int]:
        return (round(comp.x0 * scale), round(comp.y0 * scale), round(comp.x1 * scale), round(comp.y1 * scale))

    shapes: list[DetectedShape] = []
    notes: list[str] = []
    shape_boxes: set[tuple[int, int, int, int]] = set()
    for name, share in fractions:
        if name == background or share < SHAPE_MIN_FRACTION:
            continue
        index = _COLOUR_NAMES.index(name)
        mask = names.point([255 if v == index else 0 for v in range(256)])
        for comp in _components(mask):
            if comp.area < SHAPE_MIN_FRACTION * total:
                continue
            kind = _classify_shape(comp)
            if kind is None and _is_glyph_like(comp, work_h):
                continue  # left to the text reader below
            notes.append(
                f"{name} blob {comp.width}x{comp.height} fill ratio {comp.fill_ratio:.2f} "
                f"aspect {comp.width / comp.height:.2f} => {kind or 'no simple shape'}"
            )
            if kind is None:
                continue
            shape_boxes.add((comp.x0, comp.y0, comp.x1, comp.y1))
            area_fraction = comp.area / total
            shapes.append(
                DetectedShape(
                    kind=kind,
                    colour=name,
                    bbox=to_original(comp),
                    area_fraction=round(area_fraction, 4),
                    fill_ratio=round(comp.fill_ratio, 3),
                    large=area_fraction >= LARGE_SHAPE_MIN_FRACTION,
                )
            )
    shapes.sort(key=lambda s: -s.area_fraction)

    # Dark and colourless: black text, but not a saturated dark blue or red.
    dark_lut = [255 if v < len(_COLOUR_NAMES) and _COLOUR_NAMES[v] in _DARK_NAMES else 0 for v in range(256)]
    dark = ImageChops.darker(
        names.point(dark_lut), rgb.convert("L").point([255 if v < DARK_LUMINANCE_MAX else 0 for v in range(256)])
    )
    glyphs = [
        comp
        for comp in _components(dark)
        if _is_glyph_like(comp, work_h) and (comp.x0, comp.y0, comp.x1, comp.y1) not in shape_boxes
    ]
    digits, digit_notes = _read_digits(glyphs) if glyphs else ("", [])
    if glyphs:
        notes.append(f"{len(glyphs)} dark glyph(s) read as {' '.join(digit_notes)} => {digits or 'no digits'}")

    top_name, top_share = fractions[0]
    if top_share >= 0.5:
        colour_phrase = f"mostly {top_name}"
    else:
        main = [name for name, share in fractions[:3] if share >= 0.2] or [top_name]
        colour_phrase = f"mainly {_join_words(main)}"
    parts = [shape.phrase() for shape in shapes]
    if digits:
        parts.append(f"the text {digits}")
    elif glyphs:
        parts.append("some dark text-like marks I cannot read")
    contents = f"with {_join_words(parts)}" if parts else "with no distinct shapes or text"
    summary = f"I see a {width}x{height} image, {colour_phrase}, {contents}."
    colour_note = ", ".join(f"{name} {share:.0%}" for name, share in fractions if share >= 0.01)
    reasoning = "; ".join([f"Reasoning: dominant colours {colour_note}", f"background {background}", *notes]) + "."
    return ImageDescription(
        width=width,
        height=height,
        dominant_colours=dominant,
        colour_fractions=tuple((name, round(share, 4)) for name, share in fractions),
        background=background,
        shapes=tuple(shapes),
        digits=digits,
        text_regions=len(glyphs),
        summary=summary,
        reasoning=reasoning,
    )


def make_canonical_probe_image(size: tuple[int, int] = (640, 480)) -> Image.Image:
    """The vision probe's image: on white, a large red circle (left half) and the digits 42 in black (right).

    Drawn with Pillow's default font so that :func:`describe_image`'s digit templates match it.
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


def image_to_data_url(img: Image.Image, fmt: str = "PNG", **save_options: Any) -> str:
    """Encode an image as a ``data:image/...;base64,`` URL for an OpenAI ``image_url`` part."""
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save_options)
    mime = "image/jpeg" if fmt.upper() in ("JPEG", "JPG") else f"image/{fmt.lower()}"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def decode_image_data_url(url: str) -> Image.Image:
    """Decode a base64 ``data:`` image URL into a loaded Pillow image; ValueError says what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not url.startswith("data:"):
        raise ValueError("Only data: image URLs are supported by the demo backend (no remote fetching)")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError("Image data URL must look like data:image/<type>;base64,<data>")
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"Image data URL is not valid base64: {exc}") from exc
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"Cannot decode image: {exc}") from exc
    return image


# ---------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP server
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendOptions:
    """Server behaviour, including the fault-injection switches the process-manager tests use."""

    served_names: tuple[str, ...] = (DEFAULT_SERVED_NAME,)
    unhealthy: bool = False
    text_only: bool = False
    response_delay_s: float = 0.0
    fail_chat_status: int | None = None


class _ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error", **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": error_type, "param": None, "code": None, **extra}}


def _log(line: str) -> None:
    # Flushed per line so a process manager tailing our stderr sees it live.
    sys.stderr.write(f"demo_backend: {line}\n")
    sys.stderr.flush()


def _word_count(text: str) -> int:
    return len(text.split())


def _word_pieces(text: str) -> list[str]:
    """Split text into streaming deltas, one word each with its leading whitespace (they re-join exactly)."""
    return re.findall(r"\s*\S+(?:\s+$)?", text) or ([text] if text else [])


def _truncate_words(text: str, limit: Any) -> tuple[str, bool]:
    """Cut text to ``limit`` words (a word stands for a token here); report whether it was cut."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return text, False
    pieces = _word_pieces(text)
    if len(pieces) <= limit:
        return text, False
    return "".join(pieces[:limit]), True


@dataclass
class _ChatInput:
    texts: list[str] = field(default_factory=list)
    image_urls: list[str] = field(default_factory=list)


def _parse_messages(messages: Any) -> _ChatInput:
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "'messages' must be a non-empty list", param="messages")
    parsed = _ChatInput()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise _ApiError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        content = message.get("content")
        if content is None:
            continue
        if isinstance(content, str):
            parsed.texts.append(content)
            continue
        if not isinstance(content, list):
            raise _ApiError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parsed.texts.append(part["text"])
            elif kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str):
                    raise _ApiError(400, f"messages[{i}].content[{j}].image_url.url must be a string", param="messages")
                parsed.image_urls.append(url)
            else:
                raise _ApiError(400, f"messages[{i}].content[{j}] has unsupported part type {kind!r}", param="messages")
    return parsed


class _DemoServer(ThreadingHTTPServer):
    daemon_threads = True  # in-flight streams must not hold up shutdown

    def __init__(self, address: tuple[str, int], options: BackendOptions) -> None:
        self.options = options
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Small header + body writes must not wait for delayed ACKs (Nagle): keeps loopback latency at ~1 ms.
    disable_nagle_algorithm = True
    server_version = "imageworks-demo/0.1"
    server: _DemoServer

    _status: int = 0

    # Routing --------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch({"/health": self._health, "/v1/models": self._models})

    def do_POST(self) -> None:
        self._dispatch({"/v1/chat/completions": self._chat, "/v1/completions": self._completions})

    def do_PUT(self) -> None:
        self._dispatch({})  # JSON 404/405 instead of the stdlib's HTML 501 page

    do_DELETE = do_PATCH = do_PUT

    def _dispatch(self, routes: dict[str, Any]) -> None:
        started = time.perf_counter()
        self._status = 0
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            handler = routes.get(path)
            if handler is None:
                known = path in ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions")
                if known:
                    raise _ApiError(405, f"Method {self.command} not allowed on {path}")
                raise _ApiError(404, f"No route {self.command} {path}", error_type="not_found_error")
            handler()
        except _ApiError as exc:
            self._send_json(exc.status, exc.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in the demo must still answer, like a real server's 500
            _log(f"error: {type(exc).__name__}: {exc}")
            if not self._status:
                self._send_json(500, _ApiError(500, "Internal error in the demo backend", "server_error").body)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            _log(f"{self.command} {self.path} {self._status} {elapsed_ms:.1f}ms")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self._status = int(code) if isinstance(code, int) else 0  # HTTPStatus is an int too

    def log_message(self, format: str, *args: Any) -> None:
        _log(format % args)

    # Helpers --------------------------------------------------------------------------------------------
    def _send_json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_json(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise _ApiError(411, "A Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would corrupt the next request
            raise _ApiError(413, f"Request body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _ApiError(400, f"Request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise _ApiError(400, "Request body must be a JSON object")
        return body

    def _check_model(self, body: dict[str, Any]) -> str:
        names = self.server.options.served_names
        model = body.get("model", names[0])
        if model not in names:
            raise _ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return str(model)

    def _delay(self) -> None:
        if self.server.options.response_delay_s > 0:
            time.sleep(self.server.options.response_delay_s)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _send_event(self, payload: Any) -> None:
        data = b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_stream(self) -> None:
        self._send_event(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # Endpoints ------------------------------------------------------------------------------------------
    def _health(self) -> None:
        if self.server.options.unhealthy:
            self._send_json(503, {"status": "unhealthy"})
        else:
            self._send_json(200, {"status": "ok"})

    def _models(self) -> None:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY, "root": name, "parent": None}
            for name in self.server.options.served_names
        ]
        self._send_json(200, {"object": "list", "data": data})

    def _chat(self) -> None:
        body = self._read_json()
        self._delay()
        options = self.server.options
        if options.fail_chat_status is not None:
            raise _ApiError(
                options.fail_chat_status, f"Injected failure (--fail-chat {options.fail_chat_status})", "server_error"
            )
        model = self._check_model(body)
        chat = _parse_messages(body.get("messages"))
        if chat.image_urls and options.text_only:
            raise _ApiError(400, TEXT_ONLY_MESSAGE)
        descriptions = []
        for url in chat.image_urls:
            try:
                descriptions.append(describe_image(decode_image_data_url(url)))
            except ValueError as exc:
                raise _ApiError(400, str(exc), param="messages") from exc

        if not descriptions:
            words = sum(_word_count(t) for t in chat.texts)
            # Deliberately no echo of the prompt: an answer must never pass a vision probe without pixels.
            content = (
                f"I am the ImageWorks demo backend ({model}). Your message had {words} words and no image; "
                "send an image and I will describe what I see."
            )
            reasoning = "Reasoning: no image in the request, so there is nothing to describe."
        elif len(descriptions) == 1:
            content, reasoning = descriptions[0].summary, descriptions[0].reasoning
        else:
            content = " ".join(f"Image {i}: {d.summary}" for i, d in enumerate(descriptions, 1))
            reasoning = " ".join(f"Image {i}: {d.reasoning}" for i, d in enumerate(descriptions, 1))

        content, truncated = _truncate_words(content, body.get("max_completion_tokens", body.get("max_tokens")))
        finish_reason = "length" if truncated else "stop"
        prompt_tokens = sum(_word_count(t) for t in chat.texts) + IMAGE_PROMPT_TOKENS * len(descriptions)
        reasoning_tokens = _word_count(reasoning)
        completion_tokens = _word_count(content) + reasoning_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        }
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.get("stream"):
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            self._send_json(
                200,
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                },
            )
            return

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }

        self._start_stream()
        self._send_event(chunk({"role": "assistant", "content": ""}))
        for piece in _word_pieces(reasoning):
            self._send_event(chunk({"reasoning_content": piece}))
        for piece in _word_pieces(content):
            self._send_event(chunk({"content": piece}))
        self._send_event(chunk({}, finish_reason))
        if (body.get("stream_options") or {}).get("include_usage"):
            tail = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
            self._send_event({**tail, "choices": [], "usage": usage})
        self._end_stream()

    def _completions(self) -> None:
        body = self._read_json()
        self._delay()
        model = self._check_model(body)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            prompt = "\n".join(prompt)
        if not isinstance(prompt, str):
            raise _ApiError(400, "'prompt' must be a string or a list of strings", param="prompt")
        words = prompt.split()
        quoted = " ".join(words[:16]) + (" ..." if len(words) > 16 else "")
        text = f' Demo completion of "{quoted}" ({len(words)} words).'
        text, truncated = _truncate_words(text, body.get("max_tokens"))
        finish_reason = "length" if truncated else "stop"
        usage = {
            "prompt_tokens": len(words),
            "completion_tokens": _word_count(text),
            "total_tokens": len(words) + _word_count(text),
        }
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def completion(text_part: str, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": text_part, "logprobs": None, "finish_reason": finish}
            return {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [choice]}

        if not body.get("stream"):
            self._send_json(200, {**completion(text, finish_reason), "usage": usage})
            return
        self._start_stream()
        for piece in _word_pieces(text):
            self._send_event(completion(piece, None))
        self._send_event(completion("", finish_reason))
        if (body.get("stream_options") or {}).get("include_usage"):
            self._send_event({**completion("", None), "choices": [], "usage": usage})
        self._end_stream()


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (flag names follow ``vllm serve`` where they overlap)."""
    parser = argparse.ArgumentParser(
        prog="python -m imageworks_core.demo_backend",
        description="OpenAI-compatible demo backend that describes images with Pillow; with fault injection.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=24001, help="0 picks a free port (printed on start)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=[DEFAULT_SERVED_NAME],
        metavar="NAME",
        help="model id(s) accepted in requests and listed by /v1/models",
    )
    faults = parser.add_argument_group("fault injection (for process-manager and proxy tests)")
    faults.add_argument("--slow-start", type=float, default=0.0, metavar="SECONDS", help="sleep before binding")
    faults.add_argument(
        "--crash-at-start", action="store_true", help=f"log an error and exit {EXIT_CRASH_AT_START} before binding"
    )
    faults.add_argument("--ignore-sigterm", action="store_true", help="ignore SIGTERM (only SIGKILL stops it)")
    faults.add_argument(
        "--spawn-child",
        action="store_true",
        help="start a sleeping child in our process group and leave it running on exit, like a leaky worker",
    )
    faults.add_argument("--unhealthy", action="store_true", help="answer /health with 503 forever")
    faults.add_argument("--text-only", action="store_true", help=f"refuse images with 400 {TEXT_ONLY_MESSAGE!r}")
    faults.add_argument(
        "--response-delay-ms", type=int, default=0, metavar="N", help="sleep before answering completions"
    )
    faults.add_argument(
        "--fail-chat", type=int, default=None, metavar="STATUS", help="answer chat completions with this HTTP status"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fail_chat is not None and not 100 <= args.fail_chat <= 599:
        parser.error(f"--fail-chat must be an HTTP status code (100-599), not {args.fail_chat}")
    options = BackendOptions(
        served_names=tuple(args.served_model_name),
        unhealthy=args.unhealthy,
        text_only=args.text_only,
        response_delay_s=max(0, args.response_delay_ms) / 1000,
        fail_chat_status=args.fail_chat,
    )
    _log(f"starting pid={os.getpid()} pgid={os.getpgrp()} models={','.join(options.served_names)}")

    if args.spawn_child:
        # Spawned before any SIGTERM change so the child keeps the default disposition; its output goes
        # nowhere so it cannot hold our caller's pipes open after we are gone.
        child = subprocess.Popen(
            CHILD_COMMAND, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _log(f"spawned child pid={child.pid} pgid={os.getpgid(child.pid)}")

    stop = threading.Event()
    server: _DemoServer | None = None

    def request_stop(signum: int, _frame: Any) -> None:
        _log(f"received {signal.Signals(signum).name}, shutting down")
        stop.set()
        if server is not None:
            # shutdown() waits for serve_forever to return, which runs on this (the main) thread.
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, request_stop)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _log("ignoring SIGTERM")
    else:
        signal.signal(signal.SIGTERM, request_stop)

    if args.slow_start > 0:
        _log(f"slow start: sleeping {args.slow_start:g}s before binding")
        if stop.wait(args.slow_start):
            return 0
    if args.crash_at_start:
        _log(f"error: simulated crash at start (--crash-at-start), exiting {EXIT_CRASH_AT_START}")
        return EXIT_CRASH_AT_START

    try:
        server = _DemoServer((args.host, args.port), options)
    except (OSError, OverflowError) as exc:
        _log(f"error: cannot listen on {args.host}:{args.port}: {exc}")
        return EXIT_BIND_FAILED
    host, port = server.server_address[:2]
    _log(f"listening on http://{host}:{port}")
    try:
        if not stop.is_set():
            server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    _log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
