"""`imageworks-models import-legacy`: older ImageWorks registries become our curated + discovered pair.

Fixtures in tests/fixtures/legacy/ follow the legacy format described in imageworks_core/legacy.py: a merged
``model_registry.json`` and a curated/discovered ``pair/`` whose discovered file holds whole-entry copies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imageworks_core import audit, history
from imageworks_core.errors import RegistryError, UsageError, ValidationError
from imageworks_core.legacy import ImportReport, import_legacy
from imageworks_core.registry import load_registry, rollback
from imageworks_core.settings import Settings, get_settings

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"
MERGED = FIXTURES / "model_registry.json"
PAIR_CURATED = FIXTURES / "pair" / "model_registry.curated.json"
PAIR_DISCOVERED = FIXTURES / "pair" / "model_registry.discovered.json"
QWEN = "qwen2.5-vl-7b-instruct_(AWQ)"


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A deployment root with no registry files yet (IMAGEWORKS_ROOT points at it)."""
    settings = get_settings(tmp_path / "fresh")
    monkeypatch.setenv("IMAGEWORKS_ROOT", str(settings.root))
    monkeypatch.delenv("CHAT_PROXY_VLLM_PORT", raising=False)
    monkeypatch.delenv("CHAT_PROXY_VLLM_HOST", raising=False)
    return settings


def layer(path: Path) -> dict[str, dict]:
    return {entry["name"]: entry for entry in json.loads(path.read_text(encoding="utf-8"))}


def changes(report: ImportReport, name: str) -> dict[str, list]:
    """Field -> [(kind, old, new, reason), ...] for one entry of a report."""
    out: dict[str, list] = {}
    for change in report.entry(name).changes:
        out.setdefault(change.field, []).append((change.kind, change.old, change.new, change.reason))
    return out


def test_merged_file_splits_operator_decisions_to_curated_and_machine_facts_to_discovered(fresh: Settings) -> None:
    report = import_legacy(MERGED, fresh)
    curated, discovered = layer(fresh.curated_path), layer(fresh.discovered_path)
    assert curated[QWEN] == {
        "name": QWEN,
        "display_name": "Qwen2.5-VL 7B Instruct (AWQ)",
        "backend": "vllm",
        "model_aliases": ["qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct-AWQ"],
        "roles": ["caption", "keywords", "description"],
        "role_priority": {"caption": 90, "keywords": 80, "description": 85},  # kept per role, exactly
        "capabilities": {"text": True, "vision": True, "tools": True},
        "backend_config": {
            "extra_args": [
                "--quantization",
                "awq_marlin",
                "--max-model-len",
                "16384",
                "--limit-mm-per-prompt",
                '{"image":2}',
            ]
        },
        "generation_defaults": {"max_tokens": 512, "temperature": 0.2, "top_p": 0.9, "context_window": 16384},
        "chat_template": {"source": "embedded"},
    }
    assert discovered[QWEN] == {
        "name": QWEN,
        "download_path": "~/ai-models/weights/Qwen/Qwen2.5-VL-7B-Instruct-AWQ",
        "download_format": "awq",
        "download_location": "linux_wsl",
        "download_size_bytes": 6623518720,
        "download_files": [
            {"path": "config.json"},
            {"path": "model-00001-of-00002.safetensors"},
            {"path": "model-00002-of-00002.safetensors"},
        ],
        "downloaded_at": "2025-09-28T14:02:11.512000+00:00",
        "quantization": "awq",
        "source": {"repo_id": "Qwen/Qwen2.5-VL-7B-Instruct-AWQ", "provider": "huggingface"},
        "license": "apache-2.0",
        "family": "qwen2.5-vl-7b-instruct",
        # The legacy provenance object exactly, plus the legacy fields that have no field here.
        "metadata": {
            "producer": "Qwen",
            "model_type": "image-text-to-text",
            "files_downloaded": 9,
            "created_from_download": True,
            "registry_layer": "curated",
            "backend_alternatives": ["lmdeploy"],
            "custom_tag": "prod-captioner",
        },
    }
    # An entry with only machine facts (legacy backend "unassigned") stays discovered-only and unconfigured.
    assert "siglip-so400m-patch14-384" not in curated
    assert report.entry("siglip-so400m-patch14-384").layers == ["discovered"]
    registry = load_registry(force=True, settings=fresh)
    assert registry.get(QWEN).download_format == "awq"
    assert registry.get("siglip-so400m-patch14-384").backend is None
    assert registry.layer_of(QWEN) == "curated+discovered"
    assert report.curated_count == 5 and report.discovered_count == 5
    # The merged snapshot is regenerated from the new pair.
    snapshot = {e["name"]: e for e in json.loads(fresh.snapshot_path.read_text())}
    assert snapshot[QWEN]["backend"] == "vllm" and snapshot[QWEN]["download_format"] == "awq"


def test_backend_and_capability_aliases_are_normalised(fresh: Settings) -> None:
    report = import_legacy(MERGED, fresh)
    registry = load_registry(force=True, settings=fresh)
    assert registry.get(QWEN).backend == "vllm"  # "vllm-openai"
    assert registry.get("gpt-4o-mini_(remote)").backend == "openai"  # "openai-compatible"
    # vl/multimodal -> vision, tool_use/function_calling -> tools, thinking -> reasoning; any true alias wins.
    assert registry.get(QWEN).capabilities.enabled() == ["text", "vision", "tools"]
    assert registry.get("gpt-4o-mini_(remote)").capabilities.enabled() == ["text", "vision", "tools"]
    assert registry.get("internvl2-8b_(BF16)").capabilities.enabled() == ["text", "vision", "reasoning"]
    assert changes(report, QWEN)["backend"] == [("changed", "vllm-openai", "vllm", "legacy backend alias")]
    kind, old, new, reason = changes(report, QWEN)["capabilities"][0]
    assert (kind, new) == ("changed", {"text": True, "vision": True, "tools": True})
    assert "28 legacy keys folded" in reason and "vl" in reason and "function_calling" in reason
    # A key that is no capability of ours is dropped, and said so.
    assert changes(report, QWEN)["capabilities"][1][:2] == ("dropped", {"object_detection": True})
    # An explicit text=false (embedding model) survives the folding.
    import_legacy(PAIR_CURATED, fresh, discovered_path=PAIR_DISCOVERED, force=True)
    embed = load_registry(force=True, settings=fresh).get("nomic-embed-text_(F16)")
    assert embed.capabilities.enabled() == ["embeddings"]


def test_null_served_model_id_is_omitted_and_falls_back_to_the_name(fresh: Settings) -> None:
    report = import_legacy(MERGED, fresh)
    curated = layer(fresh.curated_path)
    assert "served_model_id" not in curated[QWEN]  # legacy null
    assert "served_model_id" not in curated["Qwen-Qwen2-VL-2B"]  # legacy string "None"
    registry = load_registry(force=True, settings=fresh)
    assert registry.get(QWEN).effective_served_id == QWEN
    kind, old, _new, reason = changes(report, QWEN)["served_model_id"][0]
    assert (kind, old) == ("dropped", None) and f"under its name {QWEN!r}" in reason
    assert changes(report, "Qwen-Qwen2-VL-2B")["served_model_id"][0][:2] == ("dropped", "None")
    # An ollama entry's null served id is recovered from its legacy model reference instead.
    assert curated["llava_7b_(Q4_0)"]["served_model_id"] == "llava:7b"
    assert changes(report, "llava_7b_(Q4_0)")["served_model_id"][0][:3] == ("changed", None, "llava:7b")


def test_single_port_backends_drop_their_port_and_model_path_becomes_download_path(fresh: Settings) -> None:
    report = import_legacy(MERGED, fresh)
    curated, discovered = layer(fresh.curated_path), layer(fresh.discovered_path)
    qwen = changes(report, QWEN)
    assert qwen["backend_config.port"][0][:2] == ("dropped", 24001)
    assert "single port" in qwen["backend_config.port"][0][3]
    assert qwen["backend_config.extra_args --port"][0][:2] == ("dropped", "24001")
    assert "--port" not in curated[QWEN]["backend_config"]["extra_args"]
    assert qwen["backend_config.model_path"][0][:2] == (
        "dropped",
        "~/ai-models/weights/Qwen/Qwen2.5-VL-7B-Instruct-AWQ",
    )
    # Without a legacy download_path, model_path is where the weights are.
    assert discovered["Qwen-Qwen2-VL-2B"]["download_path"] == "/srv/models/Qwen/Qwen2-VL-2B-Instruct"
    moved = changes(report, "Qwen-Qwen2-VL-2B")["backend_config.model_path"][0]
    assert moved[:3] == ("moved", "/srv/models/Qwen/Qwen2-VL-2B-Instruct", "download_path")
    # lmdeploy: port dropped too, and the argv our schema requires is spelled out (extra_args appended).
    internvl = load_registry(force=True, settings=fresh).get("internvl2-8b_(BF16)")
    assert internvl.backend_config.port is None
    assert internvl.launch_template()[:3] == ["lmdeploy", "serve", "api_server"]
    assert internvl.launch_template()[-4:] == ["--tp", "1", "--session-len", "8192"]
    # Remote and ollama entries keep where they are reached.
    assert curated["gpt-4o-mini_(remote)"]["backend_config"] == {"base_url": "https://api.openai.com/v1"}
    assert curated["llava_7b_(Q4_0)"]["backend_config"] == {"host": "127.0.0.1", "port": 11434}
    assert "download_path" not in discovered["llava_7b_(Q4_0)"]  # "ollama:/llava:7b" is no directory


def test_legacy_lock_hash_is_not_trusted_and_the_report_says_how_to_lock_again(fresh: Settings) -> None:
    report = import_legacy(MERGED, fresh)
    assert "version_lock" not in layer(fresh.curated_path)[QWEN]
    assert not load_registry(force=True, settings=fresh).get(QWEN).locked
    qwen = changes(report, QWEN)
    assert qwen["version_lock.expected_aggregate_sha256"][0][0] == "dropped"
    kind, old, new, reason = qwen["version_lock.locked"][0]
    assert (kind, old, new) == ("action", True, False)
    assert f"imageworks-models verify {QWEN}" in reason and f"imageworks-models lock {QWEN} --set-expected" in reason
    assert [(name, c.field) for name, c in report.actions()] == [(QWEN, "version_lock.locked")]


def test_invalid_names_become_valid_and_the_old_name_stays_an_alias(fresh: Settings) -> None:
    report = import_legacy(MERGED, fresh)
    entry = report.entry("Qwen/Qwen2-VL 2B")
    assert entry.name == "Qwen-Qwen2-VL-2B"
    assert changes(report, "Qwen-Qwen2-VL-2B")["name"][0][:3] == ("changed", "Qwen/Qwen2-VL 2B", "Qwen-Qwen2-VL-2B")
    registry = load_registry(force=True, settings=fresh)
    assert registry.get("Qwen/Qwen2-VL 2B").name == "Qwen-Qwen2-VL-2B"  # lookups by the old name still work


def test_report_lists_every_changed_and_dropped_field_with_old_and_new_values(fresh: Settings, cli) -> None:
    result = cli("import-legacy", str(MERGED), "--root", str(fresh.root))
    assert result.code == 0, result.err
    text = result.out
    assert f"imported 6 legacy entries from {MERGED}" in text
    for line in (
        'changed  backend: "vllm-openai" -> "vllm"  (legacy backend alias)',
        "dropped  backend_config.port: 24001  (vllm runs on the single port (CHAT_PROXY_VLLM_PORT, now 24001)",
        'moved    source.huggingface_id -> source.repo_id: "Qwen/Qwen2.5-VL-7B-Instruct-AWQ"',
        'changed  source_provider: "hf" -> "huggingface"',
        'moved    custom_tag -> metadata.custom_tag: "prod-captioner"  (no field of its own here; kept, never used for decisions)',
        'moved    backend_alternatives -> metadata.backend_alternatives: ["lmdeploy"]',
        'dropped  download_directory_checksum: "3fa9c0d1e2b4a6f8"',
        "ACTION   version_lock.locked: true -> false",
        'changed  chat_template.source: "external" -> "file"',
        'changed  backend: "openai-compatible" -> "openai"',
        'dropped  backend_config.host: "api.openai.com"  (base_url already says where the server is)',
        'dropped  backend: "unassigned"',
        "Qwen/Qwen2-VL 2B -> Qwen-Qwen2-VL-2B  (curated+discovered)",
        "1 change(s) need your action",
    ):
        assert line in text, line
    for dropped in ("artifacts", "performance", "probes", "last_accessed"):
        assert f"  dropped  {dropped}: " in text, dropped
    # Only what truly cannot carry over is dropped: per-role priorities, licence, family and provenance are kept.
    for kept in ("role_priority", "license", "family", "metadata"):
        assert f"  dropped  {kept}" not in text and f"changed  {kept}" not in text, kept
    # Empty legacy values carry nothing and are not reported (e.g. the Qwen2 entry's empty role_priority {}).
    qwen2_block = text.split("Qwen/Qwen2-VL 2B -> Qwen-Qwen2-VL-2B")[1].split("\n\n")[0]
    assert "role_priority" not in qwen2_block and "version_lock" not in qwen2_block
    data = json.loads(cli("import-legacy", str(MERGED), "--root", str(fresh.root), "--force", "--json").out)
    qwen = next(e for e in data["entries"] if e["name"] == QWEN)
    assert {"field": "served_model_id", "kind": "dropped", "old": None, "new": None} | {
        "reason": f"legacy null: omitted, so the backend serves it under its name {QWEN!r}"
    } in qwen["changes"]
    assert data["actions"][0]["name"] == QWEN and data["actions"][0]["field"] == "version_lock.locked"
    assert data["written"]["curated"] == {"path": str(fresh.curated_path), "entries": 5}


def test_pair_import_applies_the_legacy_discovered_overlay_and_reports_what_it_hid(fresh: Settings) -> None:
    report = import_legacy(PAIR_CURATED, fresh, discovered_path=PAIR_DISCOVERED)
    assert report.sources == [str(PAIR_CURATED), str(PAIR_DISCOVERED)]
    curated, discovered = layer(fresh.curated_path), layer(fresh.discovered_path)
    assert list(curated) == ["florence-2-large_(FP16)", "qwen2.5vl_7b_(Q4_K_M)", "nomic-embed-text_(F16)"]
    # The legacy loader used the discovered copy of an entry in both files: its roles win, and the report
    # shows the curated value it hid.
    assert curated["qwen2.5vl_7b_(Q4_K_M)"]["roles"] == ["caption"]
    hidden = changes(report, "qwen2.5vl_7b_(Q4_K_M)")["roles"][0]
    assert hidden[:3] == ("dropped", ["caption", "description"], ["caption"]) and "hidden" in hidden[3]
    assert discovered["qwen2.5vl_7b_(Q4_K_M)"]["downloaded_at"] == "2025-10-12T21:15:30.120000+00:00"
    assert discovered["florence-2-large_(FP16)"]["download_path"] == "/models/microsoft/Florence-2-large"
    assert curated["florence-2-large_(FP16)"]["model_aliases"] == ["microsoft/Florence-2-large"]
    assert "chat_template" not in curated["florence-2-large_(FP16)"]  # legacy source "none"
    registry = load_registry(force=True, settings=fresh)
    assert registry.get("microsoft/Florence-2-large").name == "florence-2-large_(FP16)"
    florence = registry.get("florence-2-large_(FP16)")
    assert florence.role_priority == {"keywords": 95, "caption": 75}
    assert (florence.priority_for("keywords"), florence.priority_for("caption"), florence.priority_for("chat")) == (95, 75, 0)
    assert (florence.license, florence.family) == ("mit", "florence-2-large")


def test_curated_file_alone_warns_that_its_discovered_overlay_was_left_out(fresh: Settings) -> None:
    report = import_legacy(PAIR_CURATED, fresh)
    assert [e.name for e in report.entries] == ["florence-2-large_(FP16)", "qwen2.5vl_7b_(Q4_K_M)"]
    assert report.warnings == [
        f"model_registry.curated.json looks like a legacy curated file; its overlay {PAIR_DISCOVERED} was not "
        f"imported (add --discovered {PAIR_DISCOVERED})"
    ]


def test_refuses_to_overwrite_an_existing_registry_without_force(root: Settings, cli) -> None:
    before = {p: p.read_bytes() for p in (root.curated_path, root.discovered_path)}
    result = cli("import-legacy", str(MERGED), "--root", str(root.root))
    assert result.code == 64
    assert str(root.curated_path) in result.err and "--force" in result.err
    assert str(root.discovered_path) not in result.err  # the demo's discovered file is an empty list: nothing to lose
    assert {p: p.read_bytes() for p in before} == before
    assert not root.snapshot_path.exists() and not root.history_db_path.exists()


def test_force_replaces_the_registry_and_keeps_the_old_content_as_a_revision(root: Settings, cli) -> None:
    demo_curated = root.curated_path.read_text()
    result = cli("import-legacy", str(MERGED), "--root", str(root.root), "--force")
    assert result.code == 0, result.err
    assert QWEN in layer(root.curated_path) and "demo-vision_(CPU)" not in layer(root.curated_path)
    revisions = {Path(r["file"]).name: r for r in history.list_revisions(root)}
    curated_rev = revisions["model_registry.curated.json"]
    assert curated_rev["command"] == f"import-legacy {MERGED.resolve()} --force"
    assert "demo-vision_(CPU)" in curated_rev["names"] and QWEN in curated_rev["names"]
    assert history.get_revision(root, curated_rev["id"])["before_text"] == demo_curated
    assert f"replaced; its previous content is revision {curated_rev['id']}" in result.out
    events = audit.read_events(root, "registry_write")
    assert {e["file"] for e in events} == {str(root.curated_path), str(root.discovered_path)}
    # The revision is a real rollback point.
    rollback(root, curated_rev["id"])
    assert root.curated_path.read_text() == demo_curated


def test_imported_registry_loads_and_list_shows_the_entries(fresh: Settings, cli) -> None:
    assert cli("import-legacy", str(MERGED), "--root", str(fresh.root)).code == 0
    result = cli("list", "--root", str(fresh.root), "--json")
    assert result.code == 0, result.err
    rows = {row["name"]: row for row in json.loads(result.out)}
    assert set(rows) == {
        QWEN,
        "Qwen-Qwen2-VL-2B",
        "gpt-4o-mini_(remote)",
        "llava_7b_(Q4_0)",
        "siglip-so400m-patch14-384",
    }  # internvl2 is deprecated: hidden by default
    assert rows[QWEN]["served_model_id"] == QWEN and rows[QWEN]["lock"] == "unlocked"
    assert rows[QWEN]["weights"] == "missing" and rows[QWEN]["layer"] == "curated+discovered"
    assert rows["llava_7b_(Q4_0)"]["served_model_id"] == "llava:7b"
    text = cli("list", "--root", str(fresh.root), "--include-testing").out
    assert "internvl2-8b_(BF16) [deprecated]  lmdeploy" in text
    assert cli("validate", "--root", str(fresh.root)).out.strip() == "registry valid: 6 entries"


def test_invalid_legacy_json_gives_file_line_col_and_exit_3(fresh: Settings, cli) -> None:
    broken = FIXTURES / "broken.json"
    result = cli("import-legacy", str(broken), "--root", str(fresh.root))
    assert result.code == 3
    assert f"error: {broken}:5:3: invalid JSON: Expecting property name enclosed in double quotes" in result.err
    assert not fresh.configs_dir.exists()


def test_unusable_legacy_entries_are_listed_and_nothing_is_written(fresh: Settings, tmp_path: Path) -> None:
    legacy = tmp_path / "model_registry.json"
    legacy.write_text(json.dumps([{"name": "ok"}, {"display_name": "no name"}, "not an entry"]))
    with pytest.raises(RegistryError) as exc:
        import_legacy(legacy, fresh)
    assert exc.value.lines() == [
        f"{legacy}: entry #2: missing 'name' (every entry needs a logical name)",
        f"{legacy}: entry #3: expected an object, got str",
    ]
    assert not fresh.configs_dir.exists()


def test_converted_registry_is_validated_before_anything_is_written(fresh: Settings, tmp_path: Path) -> None:
    legacy = tmp_path / "model_registry.json"
    entry = {"name": "x_(FP16)", "backend": "vllm", "backend_config": {"extra_args": ["--config", "{model}.yaml"]}}
    legacy.write_text(json.dumps([entry]))
    with pytest.raises(ValidationError) as exc:
        import_legacy(legacy, fresh)
    assert exc.value.exit_code == 3
    assert "nothing written" in exc.value.lines()[0]
    assert any(
        line.startswith(f"{legacy} (converted, curated layer): entry 'x_(FP16)': field 'backend_config.extra_args'")
        and "unknown placeholder {model}" in line
        for line in exc.value.lines()
    )
    assert not fresh.configs_dir.exists()


def test_layer_files_without_entries_are_not_protected(fresh: Settings) -> None:
    fresh.configs_dir.mkdir(parents=True)
    fresh.curated_path.write_text("")
    fresh.discovered_path.write_text("[]\n")
    report = import_legacy(MERGED, fresh)
    assert report.replaced == []
    assert QWEN in layer(fresh.curated_path)


def test_in_place_import_of_a_legacy_pair_keeps_the_legacy_text_as_revisions(fresh: Settings) -> None:
    fresh.configs_dir.mkdir(parents=True)
    shutil.copy(PAIR_CURATED, fresh.curated_path)
    shutil.copy(PAIR_DISCOVERED, fresh.discovered_path)
    with pytest.raises(RegistryError):  # the legacy files are not a valid registry of ours
        load_registry(force=True, settings=fresh)
    with pytest.raises(UsageError):
        import_legacy(fresh.curated_path, fresh, discovered_path=fresh.discovered_path)
    report = import_legacy(fresh.curated_path, fresh, discovered_path=fresh.discovered_path, force=True)
    assert sorted(report.replaced) == sorted([str(fresh.curated_path), str(fresh.discovered_path)])
    kept = history.get_revision(fresh, report.revisions[str(fresh.discovered_path)])["before_text"]
    assert kept == PAIR_DISCOVERED.read_text()
    assert len(load_registry(force=True, settings=fresh)) == 3


def test_a_legacy_merged_snapshot_is_protected_and_kept_as_a_revision(fresh: Settings) -> None:
    fresh.configs_dir.mkdir(parents=True)
    shutil.copy(MERGED, fresh.snapshot_path)  # a legacy root: one merged model_registry.json, no layer files
    with pytest.raises(UsageError, match="model_registry.json already holds a registry"):
        import_legacy(fresh.snapshot_path, fresh)
    assert not fresh.curated_path.exists()
    report = import_legacy(fresh.snapshot_path, fresh, force=True)
    assert report.replaced == [str(fresh.snapshot_path)]
    kept = history.get_revision(fresh, report.revisions[str(fresh.snapshot_path)])["before_text"]
    assert kept == MERGED.read_text()
    assert {e["name"] for e in json.loads(fresh.snapshot_path.read_text())} >= {QWEN, "Qwen-Qwen2-VL-2B"}


def test_missing_legacy_file_is_a_usage_error(fresh: Settings, cli) -> None:
    result = cli("import-legacy", str(FIXTURES / "nope.json"), "--root", str(fresh.root))
    assert result.code == 64
    assert f"{FIXTURES / 'nope.json'}: no such legacy registry file" in result.err
