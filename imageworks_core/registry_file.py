"""Registry files on disk: parsing with clear syntax errors, span-preserving edits, atomic replacement.

A registry file is a JSON array of entries, or ``{"$schema": ..., "models": [...]}``. Edits splice only the
changed entries' text, so a lock toggle is a small reviewable diff and every other byte stays as it was.
Writes go to a temp file in the same directory, are fsynced, then ``os.replace``d: a reader (or a writer
killed at any instant) sees the old or the new file, never a torn one. A writer killed before the replace
leaves its ``.<name>.<random>.tmp``; :func:`remove_stale_temps` (run by recovery, under the file locks) removes it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from .errors import RegistryError

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
WRITE_LOCK_TIMEOUT_S = 30.0

# Crash-sweep hook: the named points of the write protocol, in order (see imageworks_core.journal).
CRASH_POINTS = ("intent", "tmp", "replace", "snapshot", "audit", "commit")
CRASH_EXIT_CODE = 137
_CRASH_HITS: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Test hook: with ``IMAGEWORKS_CRASH_AT=<name>[:<n>]`` the process exits at once (``os._exit``, no cleanup,
    as a SIGKILL would) the n-th time (default first) it reaches ``name``. Unset, it costs one dict lookup."""
    spec = os.environ.get("IMAGEWORKS_CRASH_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _CRASH_HITS[name] = _CRASH_HITS.get(name, 0) + 1
    if _CRASH_HITS[name] == int(nth or 1):
        os._exit(CRASH_EXIT_CODE)


def lock_for(path: Path) -> FileLock:
    """The inter-process lock every writer of ``path`` takes (``<file>.lock`` beside it)."""
    return FileLock(str(path) + ".lock", timeout=WRITE_LOCK_TIMEOUT_S)


def temp_files(directory: Path, suffix: str) -> list[Path]:
    """Temp files :func:`atomic_write_text` leaves in ``directory`` for targets whose name ends with ``suffix``."""
    if not directory.is_dir():
        return []
    return [
        p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp") and suffix + "." in p.name
    ]


@dataclass
class RegistryText:
    """A parsed registry file: its text, its entries and where each entry's text lies."""

    path: Path
    text: str
    entries: list[dict[str, Any]]
    object_form: bool = False
    spans: list[tuple[int, int]] = field(default_factory=list)
    array_open: int = 0
    array_close: int = 0


def syntax_error_message(path: Path, exc: json.JSONDecodeError) -> str:
    """``file:line:col: message`` with the fix, as an editor would point at it."""
    return (
        f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg} "
        "(fix the syntax, e.g. remove a trailing comma, or roll back with `imageworks-models rollback`)"
    )


def parse_entries(path: Path, text: str) -> tuple[list[Any], bool]:
    """The raw entries of a registry file and whether it uses the object form. Raises RegistryError."""
    if not text.strip():
        return [], False
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(syntax_error_message(path, exc)) from exc
    if isinstance(data, list):
        return data, False
    if isinstance(data, dict) and isinstance(data.get("models"), list):
        extra = sorted(set(data) - {"$schema", "models"})
        if extra:
            raise RegistryError(f"{path}: unknown top-level key(s) {', '.join(extra)}; only '$schema' and 'models'")
        return data["models"], True
    raise RegistryError(f"{path}: expected a JSON array of entries or an object with a 'models' array")


def read_registry_text(path: Path, text: str | None = None) -> RegistryText:
    """Parse a registry file (``text``, else read from ``path``; missing reads as empty), locating each entry."""
    if text is None:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    entries, object_form = parse_entries(path, text)
    parsed = RegistryText(path=path, text=text, entries=entries, object_form=object_form)
    if text.strip():
        _locate_spans(parsed)
    return parsed


def _skip(text: str, index: int) -> int:
    match = _WS.match(text, index)
    return match.end() if match else index


def _locate_spans(parsed: RegistryText) -> None:
    text = parsed.text
    i = _skip(text, 0)
    if text[i] == "{":
        i += 1
        while True:
            i = _skip(text, i)
            if text[i] == "}":
                raise RegistryError(f"{parsed.path}: no 'models' array found")
            key, i = _DECODER.raw_decode(text, i)
            i = _skip(text, i) + 1  # the ':'
            i = _skip(text, i)
            if key == "models":
                break
            _, i = _DECODER.raw_decode(text, i)
            i = _skip(text, i)
            if text[i] == ",":
                i += 1
    parsed.array_open = i
    i += 1
    while True:
        i = _skip(text, i)
        if text[i] == "]":
            parsed.array_close = i
            return
        start = i
        _, end = _DECODER.raw_decode(text, i)
        parsed.spans.append((start, end))
        i = _skip(text, end)
        if text[i] == ",":
            i += 1


def _indent_at(text: str, index: int) -> str:
    line_start = text.rfind("\n", 0, index) + 1
    prefix = text[line_start:index]
    return prefix if not prefix.strip() else "  "


def _line_indent(text: str, index: int) -> str:
    line_start = text.rfind("\n", 0, index) + 1
    return text[line_start : _skip_blanks(text, line_start)]


def _skip_blanks(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t":
        index += 1
    return index


def render_entry(entry: dict[str, Any], indent: str, unit: int = 2) -> str:
    """An entry as pretty JSON (``unit`` spaces per level) whose continuation lines carry ``indent``."""
    lines = json.dumps(entry, indent=unit, ensure_ascii=False).split("\n")
    return "\n".join([lines[0], *(indent + line for line in lines[1:])])


def _members(text: str, start: int) -> tuple[list[tuple[str, int, int, int]], int]:
    """Top-level members of the object at ``start``: (key, key_start, value_start, value_end), and the '}' index."""
    members = []
    i = start + 1
    while True:
        i = _skip(text, i)
        if text[i] == "}":
            return members, i
        key_start = i
        key, i = _DECODER.raw_decode(text, i)
        i = _skip(text, _skip(text, i) + 1)
        value_start = i
        _, i = _DECODER.raw_decode(text, i)
        members.append((key, key_start, value_start, i))
        i = _skip(text, i)
        if text[i] == ",":
            i += 1


def splice_object(text: str, start: int, end: int, old: Any, new: Any, unit: int = 2) -> str:
    """The new text of the object at ``text[start:end]``: only changed members are rewritten.

    A lock toggle therefore changes the ``version_lock`` lines alone, however the rest was formatted.
    """
    if not isinstance(old, dict) or not isinstance(new, dict) or not old or not new:
        return render_entry(new, _indent_at(text, start), unit)
    members, close = _members(text, start)
    indent = _indent_at(text, members[0][1])
    out: list[str] = []
    cursor = start
    kept_any = False
    for index, (key, key_start, value_start, value_end) in enumerate(members):
        if key not in new:
            # Drop ", key: value" (or "key: value," for the first member).
            if index == 0:
                nxt = members[1][1] if len(members) > 1 else close
                out.append(text[cursor:key_start])
                cursor = nxt
            else:
                out.append(text[cursor : members[index - 1][3]])
                cursor = value_end
            continue
        kept_any = True
        out.append(text[cursor:value_start])
        if new[key] == old.get(key):
            out.append(text[value_start:value_end])
        elif isinstance(new[key], dict) and isinstance(old.get(key), dict) and text[value_start] == "{":
            out.append(splice_object(text, value_start, value_end, old[key], new[key], unit))
        else:
            out.append(
                render_entry(new[key], indent, unit)
                if isinstance(new[key], dict | list)
                else json.dumps(new[key], ensure_ascii=False)
            )
        cursor = value_end
    if not kept_any:
        return render_entry(new, _indent_at(text, start), unit)
    for key, value in new.items():
        if key not in old:
            out.append(f",\n{indent}{json.dumps(key)}: " + render_entry(value, indent, unit))
    out.append(text[cursor:end])
    return "".join(out)


def render_new_file(entries: list[dict[str, Any]], object_form: bool = False) -> str:
    """A whole registry file in our canonical layout."""
    if object_form:
        return json.dumps({"models": entries}, indent=2, ensure_ascii=False) + "\n"
    return json.dumps(entries, indent=2, ensure_ascii=False) + "\n"


def splice(parsed: RegistryText, new_entries: list[dict[str, Any]]) -> str:
    """New file text: entries kept equal keep their exact bytes; changed ones are re-rendered in place.

    ``new_entries`` must keep the surviving old entries in their old relative order (edits never reorder);
    entries are matched by ``name``. New entries are appended at the end of the array.
    """
    if not parsed.text.strip():
        return render_new_file(new_entries)
    text = parsed.text
    if not parsed.spans:
        outer = _line_indent(text, parsed.array_open)
        indent = outer + "  "
        body = ",\n".join(indent + render_entry(e, indent) for e in new_entries)
        body = "\n" + body + "\n" + outer if new_entries else ""
        return text[: parsed.array_open + 1] + body + text[parsed.array_close :]
    old_names = [e.get("name") if isinstance(e, dict) else None for e in parsed.entries]
    new_by_name = {e.get("name"): e for e in new_entries}
    kept = {n for n in old_names if n in new_by_name}
    appended = [e for e in new_entries if e.get("name") not in kept or e.get("name") is None]
    indent = _indent_at(text, parsed.spans[0][0])
    unit = max(len(indent) - len(_line_indent(text, parsed.array_close)), 1)
    pieces: list[str] = []
    cursor = parsed.array_open + 1
    survivors: list[str] = []
    for (start, end), old, name in zip(parsed.spans, parsed.entries, old_names, strict=True):
        if name in kept:
            new = new_by_name[name]
            survivors.append(text[start:end] if new == old else splice_object(text, start, end, old, new, unit))
    # Re-join: keep the original separator text between surviving entries where possible.
    if len(survivors) == len(parsed.spans):
        for (start, end), piece in zip(parsed.spans, survivors, strict=True):
            pieces.append(text[cursor:start])
            pieces.append(piece)
            cursor = end
        tail = text[cursor : parsed.array_close]
        body = "".join(pieces)
        for entry in appended:
            body += ",\n" + indent + render_entry(entry, indent, unit)
        return text[: parsed.array_open + 1] + body + tail + text[parsed.array_close :]
    # Some entries were removed: rebuild the array body with the file's indentation.
    all_pieces = survivors + [render_entry(e, indent, unit) for e in appended]
    closing_indent = _indent_at(text, parsed.array_close)
    body = ("\n" + indent + (",\n" + indent).join(all_pieces) + "\n" + closing_indent) if all_pieces else ""
    return text[: parsed.array_open + 1] + body + text[parsed.array_close :]


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    """Write via temp file + fsync + ``os.replace`` (+ directory fsync), keeping the file's mode.

    ``durable=False`` skips both fsyncs: the file is still replaced whole (a crashed writer leaves the old or
    the new content), but a power cut may lose the write. Only for files that describe nothing surviving one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        crash_point("tmp")
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
