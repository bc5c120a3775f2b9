"""``imageworks.model_loader``: the Python API of older ImageWorks keeps working, as a layer over the service.

Each test calls the names older consumers import, with the semantics older ImageWorks had (written from its
public repository's behaviour), and checks the files and the core registry they reach.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imageworks.model_loader import registry as compat
from imageworks.model_loader.models import RegistryEntry, SelectedModel, capability_supported
from imageworks.model_loader.registry import (
    RegistryLoadError,
    get_entry,
    list_models,
    load_registry,
    remove_entry,
    save_registry,
)
from imageworks.model_loader.role_selection import DEFAULT_ROLE_CAPABILITIES, list_models_for_role, select_by_role
from imageworks.model_loader.service import CapabilityError, select_model
from imageworks.model_loader.testing_filters import is_testing_entry, is_testing_name
from imageworks_core import errors, history
from imageworks_core.errors import UsageError, ValidationError
from imageworks_core.legacy import import_legacy
from imageworks_core.registry import load_registry as core_load
from imageworks_core.service import ImageWorks
from imageworks_core.settings import Settings

DEMO = "demo-vision_(CPU)"
FLORENCE = "florence-2-large_(FP16)"
UPSTREAM = Path(__file__).parent / "fixtures" / "legacy" / "upstream_roles.json"


def raw_layer(path: Path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads(path.read_text(encoding="utf-8"))}


@pytest.fixture
def upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A root holding the imported upstream-shaped registry; IMAGEWORKS_ROOT points at it."""
    from imageworks_core.settings import get_settings

    settings = get_settings(tmp_path / "upstream")
    monkeypatch.setenv("IMAGEWORKS_ROOT", str(settings.root))
    for var in ("CHAT_PROXY_VLLM_PORT", "CHAT_PROXY_VLLM_HOST", "IMAGEWORKS_PROFILE", "IMAGEWORKS_TEST_MODEL_PATTERNS"):
        monkeypatch.delenv(var, raising=False)
    import_legacy(UPSTREAM, settings)
    return settings


# registry ------------------------------------------------------------------------------------------------------
def test_load_registry_returns_entries_by_name_cached_until_forced(upstream: Settings) -> None:
    entries = load_registry(force=True)
    assert isinstance(entries, dict) and all(isinstance(e, RegistryEntry) for e in entries.values())
    assert list_models() == sorted(raw_layer(UPSTREAM))
    assert load_registry() is entries  # cached, as before
    assert load_registry(force=True) is not entries
    florence = get_entry(FLORENCE)
    assert florence.role_priority == {"keywords": 95, "caption": 75, "object_detection": 90}
    assert (florence.license, florence.family, florence.source_provider) == ("mit", "florence-2-large", "hf")
    assert florence.source == {"huggingface_id": "microsoft/Florence-2-large"}
    assert florence.metadata["readme_signals"] == {"license_hint": "mit"}
    # The capabilities answer under every older spelling; a vllm entry listens on the single port.
    assert florence.capabilities["vision"] and florence.capabilities["vl"] and florence.capabilities.get("multimodal")
    assert not florence.capabilities["tools"] and not florence.capabilities.get("function-calling")
    assert (florence.backend, florence.backend_config.port, florence.backend_config.host) == (
        "vllm",
        24001,
        "127.0.0.1",
    )
    assert florence.backend_config.model_path == "/models/microsoft/Florence-2-large"
    assert florence.served_model_id is None and florence.display_name == "Florence-2 Large (FP16)"
    ollama = get_entry("qwen25vl_8.3b_(Q4_K_M)")
    assert (ollama.backend_config.port, ollama.backend_config.host) == (11434, "imageworks-ollama")
    assert get_entry("qwen3-vl-8b-instruct_(FP8)").chat_template.source == "external"
    assert get_entry("nomic-embed-text_(F16)").capabilities["embedding"]
    assert capability_supported(get_entry("nomic-embed-text_(F16)").capabilities, "text-embedding")
    assert get_entry("microsoft/Florence-2-large") is florence  # an alias reaches the same loaded entry
    with pytest.raises(KeyError, match="Model 'no-such' not found in registry"):
        get_entry("no-such")


def test_invalid_files_raise_registry_load_error_and_paths_are_refused(upstream: Settings) -> None:
    upstream.curated_path.write_text("[{,]", encoding="utf-8")
    with pytest.raises(RegistryLoadError) as info:
        load_registry(force=True)
    assert isinstance(info.value, errors.RegistryError) and info.value.exit_code == 3
    assert f"{upstream.curated_path}:1:3" in str(info.value)
    with pytest.raises(UsageError, match="import-legacy"):
        load_registry(UPSTREAM)


def test_save_registry_writes_changed_fields_as_one_curated_change(upstream: Settings) -> None:
    entries = load_registry(force=True)
    florence = entries[FLORENCE]
    florence.role_priority["caption"] = 99
    florence.roles.append("vision_general")
    florence.capabilities["tool_use"] = True  # an older spelling of tools
    del florence.metadata["registry_layer"]
    florence.license = "MIT"
    florence.backend_config.extra_args.append("--enforce-eager")
    discovered_before = upstream.discovered_path.read_bytes()
    assert save_registry() == upstream.snapshot_path
    assert upstream.discovered_path.read_bytes() == discovered_before  # machine facts untouched
    entry = core_load(force=True, settings=upstream).get(FLORENCE)
    assert entry.role_priority == {"keywords": 95, "caption": 99, "object_detection": 90}
    assert entry.roles[-1] == "vision_general" and entry.capabilities.tools and entry.license == "MIT"
    assert "registry_layer" not in entry.metadata and entry.metadata["producer"] == "microsoft"
    assert entry.backend_config.extra_args[-1] == "--enforce-eager"
    revisions = history.list_revisions(upstream)
    assert [r["command"] for r in revisions[:1]] == ["imageworks.model_loader.registry.save_registry"]
    assert ImageWorks(upstream).select(role="caption").name == FLORENCE  # 99 now beats qwen3's 85
    assert save_registry() and history.list_revisions(upstream) == revisions  # nothing changed: nothing written


def test_save_registry_refuses_what_it_cannot_write_and_writes_nothing(upstream: Settings) -> None:
    entries = load_registry(force=True)
    before = upstream.curated_path.read_bytes()
    entries[FLORENCE].backend_config.port = 9999
    entries[FLORENCE].roles = ["caption"]
    with pytest.raises(UsageError, match=r"florence-2-large_\(FP16\): backend_config.port cannot be saved"):
        save_registry()
    assert upstream.curated_path.read_bytes() == before
    entries = load_registry(force=True)
    entries[FLORENCE].capabilities["object_detection"] = True
    with pytest.raises(UsageError, match="'object_detection'] is not a capability here"):
        save_registry()
    entries = load_registry(force=True)
    entries[FLORENCE].served_model_id = "bad\u202eid"  # the schema refuses it: ValidationError, nothing written
    with pytest.raises(ValidationError):
        save_registry()
    assert upstream.curated_path.read_bytes() == before


def test_remove_entry_removes_both_layers_and_refuses_a_locked_entry(root: Settings) -> None:
    entries = load_registry(force=True)
    assert remove_entry("no-such") is False
    assert remove_entry("qwen2.5-vl-7b-instruct_(AWQ)") is True
    assert "qwen2.5-vl-7b-instruct_(AWQ)" not in load_registry() and "qwen2.5-vl-7b-instruct_(AWQ)" not in entries
    assert "qwen2.5-vl-7b-instruct_(AWQ)" not in raw_layer(root.curated_path)
    assert "qwen2.5-vl-7b-instruct_(AWQ)" not in core_load(force=True, settings=root)
    ImageWorks(root).lock(DEMO, set_expected=True)
    load_registry(force=True)
    with pytest.raises(UsageError, match=r"'demo-vision_\(CPU\)' is locked; nothing removed"):
        remove_entry(DEMO)
    assert DEMO in load_registry() and DEMO in raw_layer(root.curated_path)
    entry = get_entry(DEMO)
    assert entry.version_lock.locked and entry.version_lock.last_verified  # the verification that pinned it
    assert entry.artifacts.aggregate_sha256 == entry.version_lock.expected_aggregate_sha256


def test_validate_module_keeps_working(root: Settings) -> None:
    env = {**os.environ, "IMAGEWORKS_ROOT": str(root.root)}
    result = subprocess.run(
        [sys.executable, "-m", "imageworks.model_loader.registry", "--validate"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"registry valid: {len(core_load(settings=root))} entries")
    root.curated_path.write_text("[{,]", encoding="utf-8")
    bad = subprocess.run(
        [sys.executable, "-m", "imageworks.model_loader.registry", "--validate"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 3 and f"{root.curated_path}:1:3" in bad.stderr


# service -------------------------------------------------------------------------------------------------------
def test_select_model_returns_the_older_descriptor(root: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_PROXY_VLLM_PORT", "25000")
    selected = select_model(DEMO, require_capabilities=["vision", "thinking"])  # thinking: older name of reasoning
    assert selected == SelectedModel(
        logical_name=DEMO,
        endpoint_url="http://127.0.0.1:25000/v1",
        internal_model_id="imageworks/demo-vision",
        backend="vllm",
        capabilities=get_entry(DEMO).capabilities,
    )
    # Naming a model selects it even when deprecated or testing, as before.
    assert select_model("llava-7b_(ollama)").endpoint_url == "http://127.0.0.1:11434/v1"
    assert select_model("qwen3-vl-8b-instruct_(FP8)").logical_name == "qwen3-vl-8b-instruct_(FP8)"
    with pytest.raises(CapabilityError, match="lacks capability vision"):
        select_model("demo-text_(CPU)", require_capabilities=["vl"])
    with pytest.raises(KeyError, match="Model 'nope' not found"):
        select_model("nope")
    assert CapabilityError is errors.CapabilityError  # one hierarchy: the CLI maps it to exit 5


# role_selection ------------------------------------------------------------------------------------------------
def test_role_selection_names(upstream: Settings) -> None:
    assert DEFAULT_ROLE_CAPABILITIES == {r: ["vision"] for r in ("caption", "keywords", "description", "narration")}
    # Deprecated (llava) excluded; gpt-oss has the role but is still listed: the listing does not check vision.
    assert list_models_for_role("caption") == sorted(
        ["florence-2-large_(FP16)", "gpt-oss-20b_(MXFP4)", "qwen25vl_8.3b_(Q4_K_M)", "qwen3-vl-8b-instruct_(FP8)"]
    )
    assert select_by_role("caption") == "qwen3-vl-8b-instruct_(FP8)"
    assert select_by_role("caption", preferred=["qwen25vl_8.3b_(Q4_K_M)"]) == "qwen25vl_8.3b_(Q4_K_M)"
    assert select_by_role("chat") == "gpt-oss-20b_(MXFP4)"  # no vision needed for chat
    with pytest.raises(CapabilityError, match="No model found for role 'translation'"):
        select_by_role("translation")


# testing_filters -----------------------------------------------------------------------------------------------
def test_testing_filters_follow_the_older_convention_and_the_flag(root: Settings, monkeypatch) -> None:
    for name in ("testmodel-x", "mini-test_(AWQ)", "custom-family-1", "a-testzzz-b", "model-awq", "demo-model-q4", "r"):
        assert is_testing_name(name), name
    for name in ("florence-2-large_(FP16)", "model-awqx", "rwkv-7b", "demo-vision_(CPU)"):
        assert not is_testing_name(name), name
    entries = load_registry(force=True)
    assert is_testing_entry("qwen3-vl-8b-instruct_(FP8)", entries["qwen3-vl-8b-instruct_(FP8)"])  # testing flag
    assert not is_testing_entry(DEMO, entries[DEMO])
    entries[DEMO].metadata["testing"] = True  # the older opt-in
    assert is_testing_entry(DEMO, entries[DEMO])
    monkeypatch.setenv("IMAGEWORKS_TEST_MODEL_PATTERNS", "^scratch-, ^tmp_")
    assert is_testing_name("scratch-llm") and is_testing_name("tmp_x") and not is_testing_name("xscratch-")
    monkeypatch.setenv("IMAGEWORKS_TEST_MODEL_PATTERNS", "([")
    with pytest.raises(UsageError, match=r"IMAGEWORKS_TEST_MODEL_PATTERNS: '\(\[' is not a regular expression"):
        is_testing_name("x")


def test_import_marks_the_older_test_models_testing_so_selection_agrees(tmp_path: Path, monkeypatch) -> None:
    from imageworks_core.settings import get_settings

    settings = get_settings(tmp_path / "t")
    legacy = tmp_path / "legacy.json"
    vision = {"text": True, "vision": True}
    legacy.write_text(
        json.dumps(
            [
                {
                    "name": "testmodel-captioner",
                    "backend": "ollama",
                    "roles": ["caption"],
                    "capabilities": vision,
                    "role_priority": {"caption": 100},
                },
                {
                    "name": "flagged_(Q4)",
                    "backend": "ollama",
                    "roles": ["caption"],
                    "capabilities": vision,
                    "metadata": {"testing": True},
                    "role_priority": {"caption": 90},
                },
                {"name": "real_(Q4)", "backend": "ollama", "roles": ["caption"], "capabilities": vision},
            ]
        ),
        encoding="utf-8",
    )
    report = import_legacy(legacy, settings)
    curated = raw_layer(settings.curated_path)
    assert curated["testmodel-captioner"]["testing"] is True and curated["flagged_(Q4)"]["testing"] is True
    assert "testing" not in curated["real_(Q4)"]
    change = next(c for c in report.entry("flagged_(Q4)").changes if c.field == "testing")
    assert (change.kind, change.old, change.new) == ("changed", False, True)
    assert "legacy metadata.testing is true" in change.reason
    assert ImageWorks(settings).select(role="caption").name == "real_(Q4)"
    monkeypatch.setenv("IMAGEWORKS_ROOT", str(settings.root))
    assert is_testing_entry("flagged_(Q4)", load_registry(force=True)["flagged_(Q4)"])
    assert compat.WRITABLE_FIELDS[0] == "display_name"
