"""Logical names and aliases: a bounded length so every file named after an entry fits NAME_MAX, and no
invisible or reordering characters (zero-width, bidi controls, C0/C1 controls) that make two names look alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import demo_launch, free_port

from imageworks_core import runtime
from imageworks_core.registry import load_registry
from imageworks_core.schema import NAME_MAX_CHARS, NAME_PATTERN, VISIBLE_PATTERN, json_schema
from imageworks_core.settings import SLUG_MAX_BYTES, Settings, get_settings, slugify

DEMO_WEIGHTS = "demo/models/imageworks-demo-vision"
NAME_MAX = 255  # bytes in one path component on Linux file systems (ext4, xfs, btrfs, tmpfs)


def demo_entry(name: str, **overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "backend": "vllm",
        "served_model_id": "test/long",
        "capabilities": {"text": True, "vision": True},
        "download_path": DEMO_WEIGHTS,
        "backend_config": {"launch": demo_launch(), "startup_timeout_s": 20},
    }
    entry.update(overrides)
    return entry


def write_registry(settings: Settings, *entries: dict[str, Any]) -> None:
    settings.curated_path.write_text(json.dumps(list(entries), indent=2), encoding="utf-8")
    settings.discovered_path.write_text("[]\n", encoding="utf-8")


def longest_component(root: Path) -> int:
    """The longest file or directory name under ``root``, in UTF-8 bytes."""
    return max(len(os.fsencode(p.name)) for p in root.rglob("*"))


# Length ----------------------------------------------------------------------------------------------------
def test_a_250_character_name_is_refused_at_validation_naming_entry_field_and_limit(root: Settings, cli) -> None:
    name = "m" * 250
    write_registry(root, demo_entry(name))
    result = cli("list")
    assert result.code == 3
    line = next(line for line in result.err.splitlines() if "'name'" in line)
    assert str(root.curated_path) in line
    assert f"at most {NAME_MAX_CHARS} characters" in line
    assert "250" in line
    assert "shorten" in line
    assert "Traceback" not in result.err
    assert cli("validate").code == 3


def test_an_overlong_alias_is_refused(root: Settings, cli) -> None:
    write_registry(root, demo_entry("ok", model_aliases=["a" * (NAME_MAX_CHARS + 1)]))
    result = cli("validate")
    assert result.code == 3
    assert "'model_aliases.0'" in result.err and f"at most {NAME_MAX_CHARS} characters" in result.err


def test_a_name_at_the_limit_can_be_locked_and_its_manifest_fits(root: Settings, cli) -> None:
    # Non-ASCII characters are the worst case for the slug: each run becomes '_' plus a hash suffix.
    name = ("é-" * NAME_MAX_CHARS)[:NAME_MAX_CHARS]
    write_registry(root, demo_entry(name))
    assert cli("validate").code == 0
    result = cli("lock", name, "--set-expected")
    assert result.code == 0, result.err
    entry = load_registry(settings=root, force=True).get(name)
    manifest = root.root / entry.version_lock.manifest_path
    assert json.loads(manifest.read_text())["name"] == name
    assert len(os.fsencode(manifest.name)) < NAME_MAX
    assert cli("verify", name).code == 0


def test_a_name_at_the_limit_activates_and_its_backend_log_fits(root: Settings, cli, monkeypatch) -> None:
    monkeypatch.setenv("CHAT_PROXY_VLLM_PORT", str(free_port()))
    monkeypatch.setenv("CHAT_PROXY_VLLM_STOP_TIMEOUT_S", "2")
    settings = get_settings(root.root)
    name = "x" * NAME_MAX_CHARS
    write_registry(settings, demo_entry(name))
    try:
        first = cli("activate-model", name)
        assert first.code == 0, first.err
        assert cli("activate-model", "--stop").code == 0
        second = cli("activate-model", name)  # the second start rotates the first log to .log.1
        assert second.code == 0, second.err
    finally:
        runtime.stop(settings, reason="test cleanup")
    log = runtime.backend_log_path(settings, name)
    assert log.exists() and log.with_name(log.name + ".1").exists()
    assert repr(name) in log.read_text()
    assert longest_component(settings.root) < NAME_MAX


@pytest.mark.parametrize(
    "name",
    [
        "x" * 10_000,
        "ü" * 400,
        "a/b" * 200,
        "qwen3-vl-8b-instruct_(FP8)" * 20,
    ],
)
def test_slugs_are_bounded_ascii_and_distinct(name: str) -> None:
    slug = slugify(name)
    assert slug.isascii() and len(slug) <= SLUG_MAX_BYTES
    assert slugify(name + "y") != slug  # a truncated slug still tells names apart


def test_short_slugs_are_unchanged() -> None:
    # Existing lock manifests and logs keep their file names.
    assert slugify("demo-vision_(CPU)") == "demo-vision_CPU-" + hashlib.sha256(b"demo-vision_(CPU)").hexdigest()[:8]
    assert slugify("plain-name.v2") == "plain-name.v2"
    assert slugify("m" * NAME_MAX_CHARS) == "m" * NAME_MAX_CHARS


# Lookalikes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("char", "label"),
    [
        ("\u202e", "U+202E"),  # RIGHT-TO-LEFT OVERRIDE
        ("\u200b", "U+200B"),  # ZERO WIDTH SPACE
        ("\u200d", "U+200D"),  # ZERO WIDTH JOINER
        ("\u2060", "U+2060"),  # WORD JOINER
        ("\ufeff", "U+FEFF"),  # BYTE ORDER MARK / ZERO WIDTH NO-BREAK SPACE
        ("\u2066", "U+2066"),  # LEFT-TO-RIGHT ISOLATE
        ("\u200f", "U+200F"),  # RIGHT-TO-LEFT MARK
        ("\u061c", "U+061C"),  # ARABIC LETTER MARK
        ("\x85", "U+0085"),  # NEXT LINE (C1)
        ("\x9b", "U+009B"),  # CONTROL SEQUENCE INTRODUCER (C1)
        ("\x1b", "U+001B"),  # ESCAPE (C0)
        ("\u2028", "U+2028"),  # LINE SEPARATOR: would split the one-line error
        ("\ud800", "U+D800"),  # a lone surrogate: valid JSON escape, not encodable as UTF-8
    ],
)
def test_invisible_and_control_characters_in_a_name_exit_3(root: Settings, cli, char: str, label: str) -> None:
    write_registry(root, demo_entry(f"demo{char}vision"))
    result = cli("list")
    assert result.code == 3
    line = next(line for line in result.err.splitlines() if "'name'" in line)
    assert str(root.curated_path) in line
    assert label in line and "remove" in line
    assert char not in result.err  # the message escapes it, so a terminal shows what is there
    assert len(result.err.strip().splitlines()) == 1  # one problem, one line
    assert cli("validate").code == 3


def test_a_c1_control_in_an_alias_exits_3_naming_the_alias(root: Settings, cli) -> None:
    write_registry(root, demo_entry("demo", model_aliases=["fine", "de\x85mo"]))
    result = cli("list")
    assert result.code == 3
    line = next(line for line in result.err.splitlines() if "model_aliases" in line)
    assert str(root.curated_path) in line and "entry 'demo'" in line
    assert "'model_aliases.1'" in line and "U+0085" in line and "remove" in line
    assert "\x85" not in result.err


def test_a_zero_width_alias_in_the_discovered_overlay_names_that_file(root: Settings, cli) -> None:
    write_registry(root, demo_entry("demo"))
    root.discovered_path.write_text(json.dumps([{"name": "other", "model_aliases": ["demo\u200b"]}]))
    result = cli("validate")
    assert result.code == 3
    assert f"{root.discovered_path}: entry 'other': field 'model_aliases.0'" in result.err
    assert "U+200B" in result.err


def test_ordinary_unicode_names_stay_valid(root: Settings) -> None:
    write_registry(root, demo_entry("modèle-日本語_(FP8)", model_aliases=["ζ-model", "emoji-🦙"]))
    registry = load_registry(settings=root, force=True)
    assert registry.get("emoji-🦙").name == "modèle-日本語_(FP8)"


def test_a_bidi_override_in_a_served_id_exits_3(root: Settings, cli) -> None:
    write_registry(root, demo_entry("demo", served_model_id="org/\u202eledom"))
    result = cli("validate")
    assert result.code == 3
    assert "field 'served_model_id'" in result.err and "U+202E RIGHT-TO-LEFT OVERRIDE" in result.err


def test_the_schema_states_the_bounds_for_editors() -> None:
    props = json_schema()["$defs"]["ModelEntry"]["properties"]
    assert props["name"]["maxLength"] == NAME_MAX_CHARS and props["name"]["pattern"] == NAME_PATTERN
    assert props["model_aliases"]["items"] == {"maxLength": NAME_MAX_CHARS, "pattern": VISIBLE_PATTERN, "type": "string"}
    assert f"at most {NAME_MAX_CHARS} characters" in props["name"]["description"]
    # list[str] and str | None, as editors read them (was asserted on field_table, removed as dead code)
    assert props["model_aliases"]["type"] == "array" and props["model_aliases"]["items"]["type"] == "string"
    assert [option["type"] for option in props["served_model_id"]["anyOf"]] == ["string", "null"]


@pytest.mark.parametrize("char", ["\u202e", "\u200b", "\ufeff", "\x85", "\u2066", "\u061c", "\u00ad"])
def test_the_schema_patterns_refuse_what_the_validator_refuses(char: str) -> None:
    # Editors check the JSON Schema pattern; it must agree with the loader on the characters it can spell.
    assert re.fullmatch(NAME_PATTERN, f"a{char}b") is None
    assert re.fullmatch(VISIBLE_PATTERN, f"a{char}b") is None
    assert re.fullmatch(NAME_PATTERN, "modèle-日本語_(FP8)") and re.fullmatch(VISIBLE_PATTERN, "org/a model")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("m" * (NAME_MAX_CHARS + 1), f"at most {NAME_MAX_CHARS} characters"), ("tiny\u200b", "U+200B")],
)
def test_download_scan_name_option_uses_the_same_rule(
    root: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, expected: str
) -> None:
    from imageworks_core.cli.app import run
    from imageworks_core.cli.download_cmds import app

    weights = tmp_path / "tiny"
    weights.mkdir()
    (weights / "model.bin").write_bytes(b"\x80\x02tiny")
    before = root.discovered_path.read_text()
    capsys.readouterr()
    assert run(app, ["scan", str(weights), "--name", name], "imageworks-download") == 64
    assert expected in capsys.readouterr().err
    assert root.discovered_path.read_text() == before
