"""The JSON Schema and the field table under docs/ are generated from the models and kept in sync."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO

from imageworks_core.schema import fields_markdown, json_schema


def _generator():
    spec = importlib.util.spec_from_file_location("registry_docs", REPO / "scripts" / "registry_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_files_match_the_models() -> None:
    for path, text in _generator().generated().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path} is stale: run `uv run python scripts/registry_docs.py`"
        )


def test_the_table_and_the_schema_state_the_new_fields() -> None:
    table = fields_markdown()
    assert "| `role_priority` | integer or {string: integer} | `0` | curated |" in table
    assert "| `license` | string or null | `null` | discovered |" in table
    assert "| `metadata` | object | `{}` | discovered | free-form provenance" in table
    priority = json_schema()["$defs"]["ModelEntry"]["properties"]["role_priority"]
    assert priority["anyOf"] == [{"type": "integer"}, {"additionalProperties": {"type": "integer"}, "type": "object"}]
    assert (
        json.loads((REPO / "docs" / "registry.schema.json").read_text())["$defs"]["ModelEntry"]["properties"][
            "metadata"
        ]["x-layer"]
        == "discovered"
    )
