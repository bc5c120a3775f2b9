"""Which layer owns each field is declared once, on the schema, and the registry, legacy import and discovery
all read it from there."""

from __future__ import annotations

from imageworks_core import discovery, legacy, registry
from imageworks_core.schema import ModelEntry, field_layer, fields_of_layer, json_schema


def test_every_field_has_one_owner_and_the_tables_partition_the_entry() -> None:
    owners = {name: field_layer(name) for name in ModelEntry.model_fields if name != "name"}
    assert set(owners.values()) == {"curated", "discovered", "curated_only"}
    partition = [*fields_of_layer("curated"), *fields_of_layer("discovered"), *fields_of_layer("curated_only")]
    assert sorted(partition) == sorted(owners)
    assert fields_of_layer("curated_only") == ("version_lock",)
    assert "download_path" in fields_of_layer("discovered") and "roles" in fields_of_layer("curated")


def test_the_json_schema_shows_the_owner_to_editors() -> None:
    properties = json_schema()["$defs"]["ModelEntry"]["properties"]
    assert properties["download_path"]["x-layer"] == "discovered"
    assert properties["version_lock"]["x-layer"] == "curated_only"


def test_registry_legacy_and_discovery_read_the_declaration() -> None:
    assert registry.CURATED_ONLY_FIELDS == frozenset(fields_of_layer("curated_only"))
    assert discovery.DISCOVERED_FIELDS == fields_of_layer("discovered")
    assert set(legacy._PASSTHROUGH_CURATED) <= set(fields_of_layer("curated"))
    assert set(legacy._PASSTHROUGH_DISCOVERED) <= set(fields_of_layer("discovered"))
