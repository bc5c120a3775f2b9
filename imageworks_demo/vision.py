"""What the demo backend "sees": an image described from its pixels, with Pillow only.

:func:`describe_image` names the size, the dominant colours, large uniform shapes (circle, ellipse, square,
rectangle, triangle) and dark digits read by template matching against Pillow's default font, the font the
canonical probe image (:func:`imageworks_core.probe.make_canonical_probe_image`) is drawn with. It works on
clean synthetic images, also after resizing and JPEG compression; it is no general model.

Pillow is imported on first use, so the server that imports this module binds before paying for it.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

# Image analysis settings (fractions are of the analysed image's area unless stated otherwise).
MAX_ANALYSIS_EDGE = 1024
DOMINANT_COLOUR_MIN_FRACTION = 0.02
SHAPE_MIN_FRACTION = 0.005
LARGE_SHAPE_MIN_FRACTION = 0.04
DARK_LUMINANCE_MAX = 110
GLYPH_MIN_HEIGHT_PX = 10
DIGIT_MIN_SCORE = 0.80


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
    :func:`imageworks_core.probe.make_canonical_probe_image`, also after resizing and JPEG compression; it is no general model.
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
