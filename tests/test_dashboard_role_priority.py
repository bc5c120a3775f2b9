"""Models → Registry: per-role priorities are edited per role, the role filter ranks by the role asked, and an
entry's licence, family and provenance are shown (AppTest, as an operator uses the page)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from apptest_pages import APP, TIMEOUT_S, joined, run, table, widget
from streamlit.testing.v1 import AppTest

from imageworks_core.dashboard_data.edits import parse_role_priorities, role_priority_text
from imageworks_core.errors import UsageError
from imageworks_core.legacy import import_legacy
from imageworks_core.registry import load_registry
from imageworks_core.settings import Settings

DEMO = "demo-vision_(CPU)"
QWEN = "qwen2.5-vl-7b-instruct_(AWQ)"
UPSTREAM = Path(__file__).parent / "fixtures" / "legacy" / "upstream_roles.json"
pytestmark = pytest.mark.usefixtures("fresh_home")


def open_entry(name: str) -> AppTest:
    at = run(AppTest.from_file(str(APP), default_timeout=TIMEOUT_S))
    widget(at.selectbox, "Entry").set_value(name)
    return run(at)


def ranked(at: AppTest, role: str) -> list[str]:
    widget(at.selectbox, "Role").set_value(role)
    run(at)
    return list(table(at)["name"])


def test_per_role_priorities_are_edited_per_role_and_the_role_filter_ranks_by_them(root: Settings) -> None:
    at = open_entry(DEMO)
    assert at.text_area(key=f"edit_priorities:{DEMO}").value == ""  # the demo entry has one number for every role
    before = ranked(at, "caption")
    assert before.index(QWEN) < before.index(DEMO)  # 10 over 1
    at.text_area(key=f"edit_priorities:{DEMO}").input("caption=20\nkeywords: 3")
    at.button(key=f"edit_save:{DEMO}").click()
    run(at)
    assert not at.error, joined(at.error)
    raw = {e["name"]: e for e in json.loads(root.curated_path.read_text(encoding="utf-8"))}[DEMO]
    assert raw["role_priority"] == {"caption": 20, "keywords": 3}
    caption = ranked(at, "caption")
    assert caption.index(DEMO) < caption.index(QWEN)  # 20 over 10 for captions ...
    keywords = ranked(at, "keywords")
    assert keywords.index(QWEN) < keywords.index(DEMO)  # ... but 3 under 10 for keywords
    assert "Ranked for **keywords**" in joined(at.caption)
    # The form shows the mapping back; clearing it returns to one number for every role.
    at = open_entry(DEMO)
    assert at.text_area(key=f"edit_priorities:{DEMO}").value == "caption=20\nkeywords=3"
    at.text_area(key=f"edit_priorities:{DEMO}").input("")
    at.number_input(key=f"edit_priority:{DEMO}").set_value(4)
    at.button(key=f"edit_save:{DEMO}").click()
    run(at)
    assert load_registry(force=True, settings=root).get(DEMO).role_priority == 4


def test_a_bad_priority_line_names_it_and_nothing_is_written(root: Settings) -> None:
    before = root.curated_path.read_bytes()
    at = open_entry(DEMO)
    at.text_area(key=f"edit_priorities:{DEMO}").input("caption=high")
    at.button(key=f"edit_save:{DEMO}").click()
    run(at)
    assert "role priorities: line 1 'caption=high' is not role=score" in joined(at.error)
    assert root.curated_path.read_bytes() == before
    assert parse_role_priorities('{"caption": 2}') == {"caption": 2}
    with pytest.raises(UsageError, match="the score of 'caption' must be an integer"):
        parse_role_priorities('{"caption": "2"}')
    assert role_priority_text({"a": 1, "b": 2}) == "a=1\nb=2" and role_priority_text(7) == ""


def test_the_entry_detail_shows_licence_family_and_provenance(tmp_path: Path, monkeypatch) -> None:
    from imageworks_core.settings import get_settings

    settings = get_settings(tmp_path / "upstream")
    monkeypatch.setenv("IMAGEWORKS_ROOT", str(settings.root))
    import_legacy(UPSTREAM, settings)
    at = open_entry("florence-2-large_(FP16)")
    page = joined(at.markdown)
    assert "**Provenance** (kept from the source; informational, never used for decisions)" in page
    assert "Licence: `mit` · Family: `florence-2-large`" in page
    shown = json.loads(at.json[0].proto.body)
    assert shown["readme_signals"] == {"license_hint": "mit"} and shown["producer"] == "microsoft"
    assert at.text_area(key="edit_priorities:florence-2-large_(FP16)").value == (
        "keywords=95\ncaption=75\nobject_detection=90"
    )
    fields = table(at, 1)
    assert "role_priority.keywords" in list(fields["field"]) and "license" in list(fields["field"])
