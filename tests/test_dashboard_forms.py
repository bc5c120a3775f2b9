"""Models → Registry: the Edit-metadata and Import forms cover every curated field an operator sets.

AppTest fills the forms as an operator would (the runbook's "fix download_path", aliases, launch argv as one
argument per line or a JSON list, env, profiles, testing), previews the curated diff, saves, and checks that the
curated file holds exactly that change; invalid input shows the problem and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
from apptest_pages import APP, TIMEOUT_S, joined, run
from streamlit.testing.v1 import AppTest

from imageworks_core import dashboard_data, history
from imageworks_core.errors import UsageError
from imageworks_core.registry import load_registry
from imageworks_core.settings import Settings

DEMO = "demo-vision_(CPU)"
pytestmark = pytest.mark.usefixtures("fresh_home")


def open_entry(name: str) -> AppTest:
    at = run(AppTest.from_file(str(APP), default_timeout=TIMEOUT_S))
    next(w for w in at.selectbox if w.label == "Entry").set_value(name)
    return run(at)


def curated(settings: Settings) -> dict[str, dict[str, Any]]:
    """The curated file's raw entries by name."""
    return {e["name"]: e for e in json.loads(settings.curated_path.read_text(encoding="utf-8"))}


def curated_diff(at: AppTest) -> str:
    return next(str(c.value) for c in at.code if str(c.value).startswith("--- a/model_registry.curated.json"))


def edit(at: AppTest, field: str) -> str:
    return f"edit_{field}:{DEMO}"


# The runbook's "fix download_path" ----------------------------------------------------------------------------
def test_fix_download_path_previews_then_saves_exactly_that_change(root: Settings) -> None:
    moved = root.root / "demo" / "models" / "moved-demo"
    shutil.move(root.root / "demo" / "models" / "imageworks-demo-vision", moved)
    before = curated(root)
    before_text = root.curated_path.read_text(encoding="utf-8")
    at = open_entry(DEMO)
    assert "Weights missing" in joined(at.warning)
    at.text_input(key=edit(at, "download_path")).input("demo/models/moved-demo")
    at.button(key=edit(at, "preview")).click()
    run(at)
    diff = curated_diff(at)
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == [
        '-    "download_path": "demo/models/imageworks-demo-vision",',
        '+    "download_path": "demo/models/moved-demo",',
    ]
    assert root.curated_path.read_text(encoding="utf-8") == before_text, "a preview writes nothing"

    at.button(key=edit(at, "save")).click()
    run(at)
    after = curated(root)
    before[DEMO]["download_path"] = "demo/models/moved-demo"
    assert after == before
    registry = load_registry(force=True, settings=root)
    assert registry.weights_present(DEMO)
    assert f"Saved {DEMO}" in joined(at.success)
    assert [r["command"] for r in history.list_revisions(root)] == [f"dashboard: edit {DEMO}"]


# Every curated field ------------------------------------------------------------------------------------------
def test_edit_form_sets_names_aliases_launch_env_profiles_and_flags(root: Settings) -> None:
    before = curated(root)
    at = open_entry(DEMO)
    at.text_input(key=edit(at, "display_name")).input("Demo (reviewed)")
    at.text_input(key=edit(at, "served")).input("imageworks/demo-vision-2")
    at.text_area(key=edit(at, "aliases")).input("demo-vision\ndv\n")
    launch = ["{python}", "-m", "imageworks_demo.server", "--host", "{host}", "--port", "{port}"]
    at.text_area(key=edit(at, "launch")).input("\n".join(launch))
    at.text_area(key=edit(at, "extra_args")).input("--served-model-name\n{served_model_id}")
    at.text_area(key=edit(at, "env")).input("OMP_NUM_THREADS=2\nDEMO_MODE = strict")
    at.text_input(key=edit(at, "profiles")).input("cpu, laptop")
    at.checkbox(key=edit(at, "testing")).check()
    at.button(key=edit(at, "save")).click()
    run(at)
    assert not at.error, joined(at.error)
    expected = before[DEMO] | {
        "display_name": "Demo (reviewed)",
        "served_model_id": "imageworks/demo-vision-2",
        "model_aliases": ["demo-vision", "dv"],
        "backend_config": {
            "launch": launch,
            "health_path": "/health",
            "startup_timeout_s": 30,
            "extra_args": ["--served-model-name", "{served_model_id}"],
            "env": {"OMP_NUM_THREADS": "2", "DEMO_MODE": "strict"},
        },
        "profiles": ["cpu", "laptop"],
        "testing": True,
    }
    after = curated(root)
    assert after[DEMO] == expected
    assert {k: v for k, v in after.items() if k != DEMO} == {k: v for k, v in before.items() if k != DEMO}
    entry = load_registry(force=True, settings=root).get("dv")
    assert entry.name == DEMO and entry.launch_template() == [*launch, "--served-model-name", "{served_model_id}"]


def test_launch_argv_as_a_json_list_keeps_spaces_inside_arguments(root: Settings) -> None:
    at = open_entry(DEMO)
    argv = ["{python}", "-c", "import sys; print(sys.argv)", "--port", "{port}"]
    at.text_area(key=edit(at, "launch")).input(json.dumps(argv))
    at.button(key=edit(at, "preview")).click()
    run(at)
    assert '"import sys; print(sys.argv)"' in curated_diff(at)
    at.button(key=edit(at, "save")).click()
    run(at)
    assert curated(root)[DEMO]["backend_config"]["launch"] == argv


# Invalid input: the problem is shown, nothing is written ------------------------------------------------------
def _assert_untouched(root: Settings, before: str) -> None:
    assert root.curated_path.read_text(encoding="utf-8") == before
    assert not root.history_db_path.exists() or not history.list_revisions(root)


def test_a_bidi_control_in_an_alias_is_refused_and_nothing_is_written(root: Settings) -> None:
    before = root.curated_path.read_text(encoding="utf-8")
    at = open_entry(DEMO)
    at.text_area(key=edit(at, "aliases")).input("demo-vision\ndemo\u202eoiv")
    at.button(key=edit(at, "save")).click()
    run(at)
    error = joined(at.error)
    assert "Not saved — the registry would be invalid" in error
    assert "model_aliases" in error and "U+202E" in error
    _assert_untouched(root, before)


def test_a_bad_launch_json_names_the_field_and_nothing_is_written(root: Settings) -> None:
    before = root.curated_path.read_text(encoding="utf-8")
    at = open_entry(DEMO)
    at.text_area(key=edit(at, "launch")).input('["{python}", "-m",]')
    at.button(key=edit(at, "preview")).click()
    run(at)
    assert "launch: invalid JSON list at line 1" in joined(at.error)
    at.button(key=edit(at, "save")).click()
    run(at)
    assert "launch: invalid JSON list at line 1" in joined(at.error)
    _assert_untouched(root, before)


def test_an_unknown_launch_placeholder_and_a_bad_env_line_are_refused(root: Settings) -> None:
    before = root.curated_path.read_text(encoding="utf-8")
    at = open_entry(DEMO)
    at.text_area(key=edit(at, "launch")).input("{python}\n{gpu}")
    at.button(key=edit(at, "save")).click()
    run(at)
    assert "unknown placeholder {gpu}" in joined(at.error)
    at.text_area(key=edit(at, "launch")).input(
        dashboard_data.metadata_defaults(load_registry(settings=root), DEMO)["launch"]
    )
    at.text_area(key=edit(at, "env")).input("JUSTAKEY")
    at.button(key=edit(at, "save")).click()
    run(at)
    assert "env: line 1 'JUSTAKEY' is not KEY=VALUE" in joined(at.error)
    _assert_untouched(root, before)


# Import: the same fields for a new entry ----------------------------------------------------------------------
def test_import_form_sets_aliases_launch_and_flags_on_the_new_entry(root: Settings) -> None:
    weights = root.root / "models" / "acme" / "tiny"
    weights.mkdir(parents=True)
    (weights / "model.safetensors").write_bytes(b"\0" * 64)
    history.record_download(
        root,
        repo_id="acme/tiny",
        status="ok",
        commit_sha="abc",
        path=str(weights),
        total_bytes=64,
        format="safetensors",
    )
    at = run(AppTest.from_file(str(APP), default_timeout=TIMEOUT_S))
    at.session_state["registry_tab"] = "Import from Download History"
    run(at)
    key = "download:1"
    at.text_input(key=f"import_name:{key}").input("tiny")
    at.text_input(key=f"import_display_name:{key}").input("Tiny test model")
    at.text_area(key=f"import_aliases:{key}").input("tiny-alias")
    at.number_input(key=f"import_priority:{key}").set_value(5)
    at.text_area(key=f"import_launch:{key}").input('["{python}", "-m", "server", "--port", "{port}"]')
    at.text_area(key=f"import_env:{key}").input("A=1")
    at.checkbox(key=f"import_deprecated:{key}").check()
    at.text_area(key=f"import_notes:{key}").input("for tests")
    at.button(key=f"import_add:{key}").click()
    run(at)
    assert not at.error, joined(at.error)
    raw = curated(root)["tiny"]
    assert raw["display_name"] == "Tiny test model" and raw["model_aliases"] == ["tiny-alias"]
    assert raw["role_priority"] == 5 and raw["deprecated"] is True and raw["notes"] == "for tests"
    assert raw["backend_config"] == {"launch": ["{python}", "-m", "server", "--port", "{port}"], "env": {"A": "1"}}
    assert raw["download_path"] == str(weights) and "testing" not in raw and "profiles" not in raw


# The parsing rules, directly ----------------------------------------------------------------------------------
def test_argv_and_env_text_round_trip() -> None:
    plain = ["vllm", "serve", "{model_path}"]
    assert dashboard_data.argv_text(plain) == "vllm\nserve\n{model_path}"
    tricky = ["python", "-c", " padded ", ""]
    assert dashboard_data.argv_text(tricky).startswith("[")
    for argv in (plain, tricky):
        assert dashboard_data.parse_argv("launch", dashboard_data.argv_text(argv)) == argv
    assert dashboard_data.parse_argv("launch", "a b\n\n  c  \n") == ["a b", "c"], "never split on spaces"
    env = {"A": "1", "B": "x=y"}
    assert dashboard_data.parse_env(dashboard_data.env_text(env)) == env
    assert dashboard_data.parse_env('{"A": "1"}') == {"A": "1"}
    with pytest.raises(UsageError, match="the value of A must be a string"):
        dashboard_data.parse_env('{"A": 1}')


def test_launch_in_both_its_field_and_the_json_box_must_agree(root: Settings) -> None:
    registry = load_registry(settings=root)
    defaults = dashboard_data.metadata_defaults(registry, DEMO)
    assert "launch" not in json.loads(defaults["backend_config"]), "launch has its own field"
    # An unchanged launch field leaves the JSON box's launch in force (the box may carry it).
    box = json.dumps({"launch": ["{python}", "x"], "health_path": "/health", "startup_timeout_s": 30})
    changes = dashboard_data.metadata_changes(registry, DEMO, **{**defaults, "backend_config": box})
    assert changes["backend_config"]["launch"] == ["{python}", "x"]
    with pytest.raises(UsageError, match="launch: set both"):
        dashboard_data.metadata_changes(registry, DEMO, **{**defaults, "backend_config": box, "launch": "{python}\ny"})
    # An emptied launch field removes the key (the backend's default launch applies).
    cleared = dashboard_data.metadata_changes(registry, DEMO, **{**defaults, "launch": ""})
    assert "launch" not in cleared["backend_config"]
