"""The layered registry: loading, merge precedence, validation errors, atomic writes, history and rollback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_until

from imageworks_core import history
from imageworks_core.errors import RegistryError, UnknownModelError, ValidationError
from imageworks_core.registry import edit_layer, load_registry, rollback, update_entry
from imageworks_core.settings import Settings

DEMO = "demo-vision_(CPU)"


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def test_demo_registry_loads_with_every_entry(root: Settings) -> None:
    registry = load_registry(settings=root)
    assert DEMO in registry
    assert "qwen2.5-vl-7b-instruct_(AWQ)" in registry
    assert registry.get("demo-vision").name == DEMO  # alias
    assert registry.get("imageworks/demo-vision").name == DEMO  # served id


def test_loading_writes_nothing(root: Settings) -> None:
    before = sorted(p.relative_to(root.root) for p in root.root.rglob("*"))
    load_registry(force=True, settings=root)
    after = sorted(p.relative_to(root.root) for p in root.root.rglob("*"))
    assert before == after


def test_curated_wins_per_field_nested_merge_lists_replace_and_null_clears(root: Settings) -> None:
    write_json(
        root.discovered_path,
        [
            {
                "name": DEMO,
                "download_path": "/elsewhere",
                "download_format": "gguf",
                "quantization": "Q4_K_M",
                "roles": ["embedding"],
                "source": {"provider": "huggingface", "repo_id": "x/y", "revision": "abc"},
                "download_size_bytes": 1234,
            },
            {"name": "only-discovered", "download_path": "/models/z", "download_format": "safetensors"},
        ],
    )
    curated = json.loads(root.curated_path.read_text())
    curated[0]["quantization"] = None  # explicit null clears the discovered value
    write_json(root.curated_path, curated)
    registry = load_registry(settings=root)
    entry = registry.get(DEMO)
    assert entry.download_path == "demo/models/imageworks-demo-vision"  # curated wins
    assert entry.download_size_bytes == 1234  # discovered fills the rest
    assert entry.quantization is None  # cleared
    assert entry.roles == ["caption", "description", "keywords", "chat"]  # lists replace, never concatenate
    # nested: curated source sets provider/repo_id/revision; all curated values win
    assert entry.source.provider == "local"
    assert "only-discovered" in registry and registry.get("only-discovered").backend is None
    provenance = registry.provenance(DEMO)
    assert provenance["download_path"] == "curated"
    assert provenance["download_size_bytes"] == "discovered"
    assert provenance["quantization"] == "curated (cleared)"
    assert registry.layer_of(DEMO) == "curated+discovered"


def test_nested_objects_merge_key_by_key(root: Settings) -> None:
    write_json(root.discovered_path, [{"name": DEMO, "source": {"repo_id": "from/discovered", "revision": "c0ffee"}}])
    curated = json.loads(root.curated_path.read_text())
    curated[0]["source"] = {"provider": "local"}
    write_json(root.curated_path, curated)
    entry = load_registry(settings=root).get(DEMO)
    assert (entry.source.provider, entry.source.repo_id, entry.source.revision) == ("local", "from/discovered", "c0ffee")


def test_version_lock_in_discovered_is_refused(root: Settings) -> None:
    write_json(root.discovered_path, [{"name": DEMO, "version_lock": {"locked": True}}])
    with pytest.raises(ValidationError) as info:
        load_registry(settings=root)
    assert any("version_lock" in p and "curated" in p for p in info.value.problems)


def test_trailing_comma_names_file_line_and_column(root: Settings, cli) -> None:
    text = root.curated_path.read_text()
    bad = text.rstrip().removesuffix("]").rstrip() + ",\n]\n"
    root.curated_path.write_text(bad)
    result = cli("validate")
    assert result.code == 3
    line_no = bad.count("\n") - 1 + 1
    assert f"{root.curated_path}:{line_no}:1: invalid JSON" in result.err
    assert "Traceback" not in result.err


def test_unknown_key_suggests_the_closest_and_exits_3(root: Settings, cli) -> None:
    curated = json.loads(root.curated_path.read_text())
    curated[0]["served_model"] = curated[0].pop("served_model_id")
    curated[1]["capabilities"] = {"vison": True}
    write_json(root.curated_path, curated)
    result = cli("validate")
    assert result.code == 3
    assert "unknown key 'served_model' — did you mean 'served_model_id'?" in result.err
    assert "unknown key 'capabilities.vison' — did you mean 'vision'?" in result.err  # every problem, not the first
    assert str(root.curated_path) in result.err


def test_every_problem_is_reported_in_one_error(root: Settings) -> None:
    write_json(
        root.curated_path,
        [
            {"name": "a b", "backend": "vllm"},
            {"name": "x", "backend": "nope"},
            {"name": "y", "backend": "openai"},
            {"name": "x", "backend": "vllm"},
            {"backend": "vllm"},
        ],
    )
    with pytest.raises(ValidationError) as info:
        load_registry(settings=root)
    text = "\n".join(info.value.problems)
    assert "duplicate name" in text
    assert "missing 'name'" in text
    assert "invalid name 'a b'" in text
    assert "'backend'" in text and "nope" in text
    assert "base_url" in text
    assert len(info.value.problems) >= 5


def test_names_with_parentheses_are_fine_but_not_slashes(root: Settings) -> None:
    write_json(root.curated_path, [{"name": "qwen3-vl-8b-instruct_(FP8)", "backend": "vllm"}])
    assert "qwen3-vl-8b-instruct_(FP8)" in load_registry(settings=root)
    write_json(root.curated_path, [{"name": "Qwen/Qwen3", "backend": "vllm"}])
    with pytest.raises(ValidationError):
        load_registry(settings=root)


def test_unknown_launch_placeholder_is_a_registry_error(root: Settings) -> None:
    write_json(root.curated_path, [{"name": "m", "backend": "vllm", "backend_config": {"launch": ["vllm", "{modelpath}"]}}])
    with pytest.raises(ValidationError) as info:
        load_registry(settings=root)
    assert "unknown placeholder {modelpath}" in info.value.problems[0]


def test_object_form_is_accepted_and_kept_on_write(root: Settings) -> None:
    entries = json.loads(root.curated_path.read_text())
    root.curated_path.write_text(json.dumps({"$schema": "./schema.json", "models": entries}, indent=2))
    assert DEMO in load_registry(settings=root)
    update_entry(root, DEMO, {"notes": "object form"}, command="test")
    data = json.loads(root.curated_path.read_text())
    assert data["$schema"] == "./schema.json"
    assert data["models"][0]["notes"] == "object form"


def test_cache_returns_same_object_until_a_file_changes(root: Settings) -> None:
    first = load_registry(settings=root)
    assert load_registry(settings=root) is first
    assert load_registry(force=True, settings=root) is not first
    update_entry(root, DEMO, {"notes": "changed"}, command="test")
    assert load_registry(settings=root).get(DEMO).notes == "changed"


def test_write_keeps_other_entries_byte_for_byte_and_regenerates_snapshot(root: Settings) -> None:
    before = root.curated_path.read_text()
    update_entry(root, "llava-7b_(ollama)", {"notes": "hello"}, command="test")
    after = root.curated_path.read_text()
    # Everything up to the edited (last) entry is untouched.
    start = before.index('"name": "llava-7b_(ollama)"')
    assert after[:start] == before[:start]
    snapshot = json.loads(root.snapshot_path.read_text())
    assert {e["name"] for e in snapshot} == set(load_registry(settings=root).names())
    assert next(e for e in snapshot if e["name"] == "llava-7b_(ollama)")["notes"] == "hello"


def test_invalid_write_is_refused_and_nothing_changes(root: Settings) -> None:
    before = root.curated_path.read_text()
    with pytest.raises(ValidationError):
        update_entry(root, DEMO, {"backend": "not-a-backend"}, command="test")
    assert root.curated_path.read_text() == before
    assert not root.snapshot_path.exists()


def test_history_records_previous_content_and_rollback_restores_it(root: Settings, cli) -> None:
    original = root.curated_path.read_text()
    update_entry(root, DEMO, {"notes": "first"}, command="edit 1")
    after_first = root.curated_path.read_text()
    update_entry(root, DEMO, {"notes": "second"}, command="edit 2")
    revisions = history.list_revisions(root, DEMO)
    assert [r["command"] for r in revisions] == ["edit 2", "edit 1"]
    rev_first = revisions[-1]["id"]
    assert history.get_revision(root, rev_first)["before_text"] == original
    result = cli("history", DEMO)
    assert result.code == 0 and "edit 2" in result.out
    result = cli("rollback", str(rev_first))
    assert result.code == 0, result.err
    assert root.curated_path.read_text() == original
    assert history.list_revisions(root)[0]["command"] == f"rollback {rev_first}"  # the rollback is recorded
    rollback(root, revisions[0]["id"])  # restore the content before edit 2
    assert root.curated_path.read_text() == after_first


def test_rollback_of_unknown_revision_exits_4(root: Settings, cli) -> None:
    assert cli("rollback", "999").code == 4


def test_unknown_name_offers_close_matches(root: Settings) -> None:
    with pytest.raises(UnknownModelError) as info:
        load_registry(settings=root).get("demo-visoin_(CPU)")
    assert "demo-vision_(CPU)" in info.value.close_matches


def test_runbook_module_paths_work(root: Settings) -> None:
    env = {**os.environ, "IMAGEWORKS_ROOT": str(root.root)}
    result = subprocess.run(
        [sys.executable, "-m", "imageworks.model_loader.registry", "--validate"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "registry valid" in result.stdout
    code = "from imageworks.model_loader.registry import load_registry; print(len(load_registry(force=True)))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=root.root)
    assert result.stdout.strip() == str(len(load_registry(settings=root)))


# Concurrency and crash safety -------------------------------------------------------------------------------
_WRITER = r"""
import sys
from imageworks_core.registry import update_entry
from imageworks_core.settings import get_settings
settings = get_settings(sys.argv[1])
name, count = sys.argv[2], int(sys.argv[3])
for i in range(count):
    update_entry(settings, name, {"notes": f"{name} {i}"}, command="writer", create=True)
print("done", flush=True)
"""


def _big_registry(root: Settings, n: int) -> None:
    write_json(
        root.curated_path,
        [{"name": f"model-{i:05d}", "backend": "vllm", "roles": ["chat"], "notes": "x" * 200} for i in range(n)],
    )


@pytest.mark.slow
def test_sigkill_during_writes_never_leaves_a_torn_file(root: Settings) -> None:
    _big_registry(root, 3000)
    load_registry(force=True, settings=root)
    kills = mid_write = 0
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root.root), "model-00000", "1000"])
        wait_until(
            lambda proc=proc: proc.poll() is not None or history.pending_changes(root),
            timeout=60,
            what="the writer's first change in flight",
            interval=0.005,
        )
        assert proc.poll() is None, "the writer exited before it was killed"
        time.sleep(0.005 * (attempt % 4))  # jitter, not a wait: kills land at other steps of the protocol
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += proc.returncode == -signal.SIGKILL
        # Caught inside the write protocol: its intent is pending, or its temp file is still there.
        temps = [p for p in root.configs_dir.iterdir() if p.name.endswith(".tmp")]
        mid_write += bool(history.pending_changes(root) or temps)
        registry = load_registry(force=True, settings=root)  # parses and validates: old or new, never torn
        assert len(registry) == 3000
        assert not history.pending_changes(root)  # the load settled the interrupted change
    assert kills == 12
    assert mid_write > 0, "no kill landed inside a write: the test proved nothing"
    leftovers = [p.name for p in root.configs_dir.iterdir() if p.name.endswith(".tmp")]
    # A killed writer may leave its temp file; it is never the registry itself and loading ignores it.
    assert all(name.startswith(".model_registry") for name in leftovers)


@pytest.mark.slow
def test_concurrent_writers_lose_nothing(root: Settings) -> None:
    writers = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root.root), f"writer-{i}", "15"], stdout=subprocess.PIPE, text=True
        )
        for i in range(writers)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "done" in out
    registry = load_registry(force=True, settings=root)
    for i in range(writers):
        assert registry.get(f"writer-{i}").notes == f"writer-{i} 14"
    assert DEMO in registry
    assert len(history.list_revisions(root, limit=1000)) == writers * 15


def test_edit_layer_validates_before_writing(root: Settings) -> None:
    before = root.curated_path.read_text()

    def break_it(entries: list[dict]) -> None:
        entries[0]["capabilities"] = {"vision": "maybe"}

    with pytest.raises(RegistryError):
        edit_layer(root, "curated", break_it, command="test")
    assert root.curated_path.read_text() == before
