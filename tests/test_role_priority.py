"""Per-role priorities and upstream fidelity: an older ImageWorks registry keeps its selection after import.

The oracle below is older ImageWorks' role rule, written from its behaviour (``select_by_role`` in
``imageworks.model_loader.role_selection`` of the public ImageWorks repository): among entries that have the role,
are not deprecated and have the required capabilities (caption, keywords, description and narration require
vision; a capability counts when any of its legacy spellings is true), the first usable ``preferred`` name wins,
else the highest ``role_priority.get(role, 0)``. It reads the legacy JSON itself; our answers come from the
imported registry through the CLI, the API, the service and the ``imageworks.model_loader`` layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_server import api_server

from imageworks.model_loader.models import RegistryEntry
from imageworks.model_loader.registry import load_registry as compat_load
from imageworks.model_loader.role_selection import select_by_role
from imageworks_core.errors import CapabilityError, UnknownModelError
from imageworks_core.legacy import ImportReport, import_legacy
from imageworks_core.registry import load_registry
from imageworks_core.service import ImageWorks
from imageworks_core.settings import Settings, get_settings

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
FIXTURES: dict[str, tuple[Path, Path | None]] = {
    "merged": (LEGACY / "model_registry.json", None),
    "pair": (LEGACY / "pair" / "model_registry.curated.json", LEGACY / "pair" / "model_registry.discovered.json"),
    "upstream_roles": (LEGACY / "upstream_roles.json", None),
}

# Older ImageWorks' capability spellings, as far as these fixtures use them.
_SPELLINGS = {
    "vision": {"vision", "visual", "multimodal", "mm", "image", "vl"},
    "tools": {"tools", "tool_use", "tool-use", "tool_calls", "function_calling"},
    "embedding": {"embedding", "embed", "text-embedding"},
    "reasoning": {"reasoning", "thinking"},
}
_ROLE_DEFAULTS = {"caption": ["vision"], "keywords": ["vision"], "description": ["vision"], "narration": ["vision"]}


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    settings = get_settings(tmp_path / "fresh")
    monkeypatch.setenv("IMAGEWORKS_ROOT", str(settings.root))
    for var in ("CHAT_PROXY_VLLM_PORT", "CHAT_PROXY_VLLM_HOST", "IMAGEWORKS_PROFILE", "IMAGEWORKS_TEST_MODEL_PATTERNS"):
        monkeypatch.delenv(var, raising=False)
    return settings


def legacy_entries(fixture: str) -> list[dict[str, Any]]:
    """The entries as older ImageWorks loaded them: curated, then the discovered copies replacing theirs."""
    curated, discovered = FIXTURES[fixture]
    merged = {e["name"]: e for e in json.loads(curated.read_text(encoding="utf-8"))}
    if discovered:
        for entry in json.loads(discovered.read_text(encoding="utf-8")):
            merged[entry["name"]] = {**merged.get(entry["name"], {}), **entry}
    return list(merged.values())


def has(entry: dict[str, Any], capability: str) -> bool:
    caps = {str(k).lower(): bool(v) for k, v in (entry.get("capabilities") or {}).items()}
    return any(caps.get(spelling) for spelling in _SPELLINGS.get(capability, {capability}))


def upstream_winner(
    entries: list[dict[str, Any]], role: str, required: tuple[str, ...] = (), preferred: tuple[str, ...] = ()
) -> str | None:
    """Older ImageWorks' choice for ``role`` (None: it raised CapabilityError). Fails on a tie at the top, which
    older ImageWorks broke by file order and we break by name (see test_documented_differences)."""
    needs = [*_ROLE_DEFAULTS.get(role, []), *required]
    by_name = {e["name"]: e for e in entries}

    def usable(entry: dict[str, Any]) -> bool:
        return role in (entry.get("roles") or []) and not entry.get("deprecated") and all(has(entry, c) for c in needs)

    for name in preferred:
        if name in by_name and usable(by_name[name]):
            return name
    ranked = sorted(((e.get("role_priority") or {}).get(role, 0), e["name"]) for e in entries if usable(e))
    if not ranked:
        return None
    assert len(ranked) < 2 or ranked[-1][0] != ranked[-2][0], f"tie at the top for {role}: {ranked[-2:]}"
    return ranked[-1][1]


def imported(fixture: str, settings: Settings) -> ImportReport:
    curated, discovered = FIXTURES[fixture]
    return import_legacy(curated, settings, discovered_path=discovered)


def all_roles(entries: list[dict[str, Any]]) -> list[str]:
    return sorted({role for e in entries for role in e.get("roles") or []} | {"no-such-role"})


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_round_trip_keeps_every_per_role_priority_licence_family_and_provenance(fixture: str, fresh: Settings) -> None:
    report = imported(fixture, fresh)
    registry = load_registry(force=True, settings=fresh)
    views = compat_load(force=True)
    snapshot = {e["name"]: e for e in json.loads(fresh.snapshot_path.read_text(encoding="utf-8"))}
    kept = 0
    for raw in legacy_entries(fixture):
        name = report.entry(raw["name"]).name
        entry, view = registry.get(name), views[name]
        priority = raw.get("role_priority") or {}
        if priority:
            kept += 1
            assert entry.role_priority == priority, name
            assert view.role_priority == priority and snapshot[name]["role_priority"] == priority, name
            assert all(entry.priority_for(role) == score for role, score in priority.items())
        assert entry.license == raw.get("license") and view.license == raw.get("license"), name
        assert entry.family == raw.get("family") and view.family == raw.get("family"), name
        for key, value in (raw.get("metadata") or {}).items():  # the provenance object, exactly
            assert entry.metadata[key] == value and view.metadata[key] == value, (name, key)
    assert kept >= 2
    # Nothing about priorities, licences, families or provenance is reported as changed or dropped (beyond the
    # curated values a legacy discovered copy hid, which the legacy loader never saw either).
    for item in report.entries:
        for change in item.changes:
            head = change.field.split(".")[0]
            assert "hidden by the legacy discovered copy" in change.reason or head not in (
                "role_priority",
                "license",
                "family",
                "metadata",
            ), (item.name, change)


def test_legacy_names_and_aliases_stay_exactly_as_they_were(fresh: Settings) -> None:
    report = imported("upstream_roles", fresh)
    registry = load_registry(force=True, settings=fresh)
    for raw in legacy_entries("upstream_roles"):
        assert report.entry(raw["name"]).name == raw["name"]
        assert registry.get(raw["name"]).model_aliases == (raw.get("model_aliases") or [])
    assert registry.get("Qwen/Qwen3-VL-8B-Instruct-FP8").name == "qwen3-vl-8b-instruct_(FP8)"
    assert registry.get("qwen3-vl-fp8").name == "qwen3-vl-8b-instruct_(FP8)"
    # A legacy field without a field here (vram_estimate_mb) is kept in metadata, not lost.
    assert registry.get("qwen3-vl-8b-instruct_(FP8)").metadata["vram_estimate_mb"] == 10600


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_select_by_role_matches_the_upstream_rule_on_every_fixture(fixture: str, fresh: Settings) -> None:
    report = imported(fixture, fresh)
    entries = legacy_entries(fixture)
    service = ImageWorks(fresh)
    for role in all_roles(entries):
        expected = upstream_winner(entries, role)
        if expected is None:
            with pytest.raises((UnknownModelError, CapabilityError)):
                service.select(role=role)
            with pytest.raises(CapabilityError, match=f"No model found for role '{role}'"):
                select_by_role(role)
            continue
        ours = report.entry(expected).name
        assert service.select(role=role).name == ours, role
        assert select_by_role(role) == ours, role


def test_required_capabilities_and_preferred_follow_the_upstream_rule(fresh: Settings) -> None:
    imported("upstream_roles", fresh)
    entries = legacy_entries("upstream_roles")
    cases: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
        ("caption", ("tools",), ()),  # qwen3 (85, tools) over florence (75)
        ("embedding", ("vision",), ()),  # siglip: "image" is a vision spelling
        (
            "caption",
            (),
            ("no-such-model", "gpt-oss-20b_(MXFP4)", "llava-1.6-mistral-7b_(Q4_0)", "qwen25vl_8.3b_(Q4_K_M)"),
        ),
        ("keywords", (), ("qwen3-vl-8b-instruct_(FP8)",)),  # preferred beats florence's 95
        ("narration", (), ("gpt-oss-20b_(MXFP4)",)),  # no vision: skipped even when preferred
    ]
    for role, required, preferred in cases:
        expected = upstream_winner(entries, role, required, preferred)
        assert expected is not None
        got = select_by_role(role, require_capabilities=list(required), preferred=list(preferred))
        assert got == expected, (role, required, preferred)
    assert upstream_winner(entries, "caption", (), cases[2][2]) == "qwen25vl_8.3b_(Q4_K_M)"
    # None has both: the error names what the best-ranked caption entry lacks (the role's vision, then audio).
    with pytest.raises(CapabilityError, match=r"'gpt-oss-20b_\(MXFP4\)' lacks capability vision, audio"):
        select_by_role("caption", require_capabilities=["audio"])


def test_the_cli_the_api_and_list_rank_by_the_role_asked(fresh: Settings, cli) -> None:
    imported("upstream_roles", fresh)
    # Florence-2 ranks 95 for keywords but 75 for captions: the per-role score decides, not the highest one.
    assert json.loads(cli("select", "--role", "caption", "--json").out)["name"] == "qwen3-vl-8b-instruct_(FP8)"
    assert json.loads(cli("select", "--role", "keywords", "--json").out)["name"] == "florence-2-large_(FP16)"
    preferred = cli("select", "--role", "caption", "--prefer", "qwen25vl_8.3b_(Q4_K_M)", "--json")
    assert json.loads(preferred.out)["name"] == "qwen25vl_8.3b_(Q4_K_M)"
    assert cli("select", "x", "--prefer", "y").code == 64
    listed = [row["name"] for row in json.loads(cli("list", "--role", "keywords", "--json").out)]
    assert listed == ["florence-2-large_(FP16)", "qwen3-vl-8b-instruct_(FP8)", "qwen25vl_8.3b_(Q4_K_M)"]
    # A text-only model with the caption role is never chosen for captions: exit 5 names what it lacks.
    only_text = cli("select", "--role", "caption", "--prefer", "gpt-oss-20b_(MXFP4)", "--require", "reasoning")
    assert only_text.code == 5 and "lacks capability vision" in only_text.err
    with api_server(fresh.root) as base:
        for role, winner in (("description", "qwen3-vl-8b-instruct_(FP8)"), ("embedding", "nomic-embed-text_(F16)")):
            response = httpx.post(f"{base}/v1/select", json={"role": role})
            assert response.status_code == 200 and response.json()["name"] == winner, response.text


def test_an_integer_priority_means_every_role_and_ties_break_by_name(fresh: Settings) -> None:
    fresh.configs_dir.mkdir(parents=True)
    vision = {"text": True, "vision": True}
    fresh.curated_path.write_text(
        json.dumps(
            [
                {
                    "name": "b-model",
                    "backend": "ollama",
                    "roles": ["caption", "keywords"],
                    "role_priority": 50,
                    "capabilities": vision,
                },
                {
                    "name": "a-model",
                    "backend": "ollama",
                    "roles": ["caption", "keywords"],
                    "role_priority": {"caption": 50, "keywords": 60},
                    "capabilities": vision,
                },
            ]
        ),
        encoding="utf-8",
    )
    service = ImageWorks(fresh)
    assert service.select(role="keywords").name == "a-model"  # 60 over b-model's 50 for every role
    assert service.select(role="caption").name == "a-model"  # 50 = 50: the name decides (older ImageWorks: file order)
    b = service.registry.get("b-model")
    assert (b.priority_for("caption"), b.priority_for("anything")) == (50, 50)
    assert RegistryEntry.from_model(b, settings=fresh).role_priority == {"caption": 50, "keywords": 50}
    with pytest.raises(Exception, match="fractional part"):
        b.model_validate({"name": "x", "role_priority": {"caption": 1.5}})


def test_show_prints_licence_family_and_provenance_and_cuts_long_values(fresh: Settings, cli) -> None:
    imported("upstream_roles", fresh)
    text = cli("show", "qwen25vl_8.3b_(Q4_K_M)").out
    assert "role_priority.caption" in text and "metadata.ollama_parameter_size  " in text
    assert "provenance (kept from the source, never used for decisions): license -, family qwen2.5vl-7b" in text
    licence_row = next(line for line in text.splitlines() if line.startswith("metadata.ollama_license"))
    assert licence_row.rstrip().endswith("discovered") and "…" in licence_row
    assert max(len(line) for line in text.splitlines()) < 250  # one long value no longer widens every row
    full = json.loads(cli("show", "qwen25vl_8.3b_(Q4_K_M)", "--json").out)["entry"]["metadata"]["ollama_license"]
    assert full.startswith("\n") and "TERMS AND CONDITIONS" in full
