"""The registry schema: pydantic models are the single source of truth.

The JSON Schema written by ``imageworks-models schema`` (also ``docs/registry.schema.json``) and the field table
``docs/registry-fields.md`` are generated from these models (``scripts/registry_docs.py``; a test keeps them in
sync). Every model forbids unknown keys so a typo is an error, not a silently ignored field.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

Backend = Literal["vllm", "ollama", "lmdeploy", "openai"]
PROCESS_BACKENDS: frozenset[str] = frozenset({"vllm", "lmdeploy"})
"""Backends we start ourselves on the single port."""

CAPABILITY_NAMES: tuple[str, ...] = ("text", "vision", "tools", "embeddings", "reasoning", "audio")
KNOWN_ROLES: tuple[str, ...] = ("caption", "keywords", "description", "narration", "chat", "embedding")
ROLE_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "caption": ("vision",),
    "keywords": ("vision",),
    "description": ("vision",),
    "narration": ("vision",),
}
"""Capabilities selection by role always requires, on top of the caller's (ImageWorks' rule: the image roles
need a model that sees). Selection by name does not add them."""
DEFAULT_VLLM_LAUNCH: tuple[str, ...] = (
    "vllm",
    "serve",
    "{model_path}",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--served-model-name",
    "{served_model_id}",
)
LAUNCH_PLACEHOLDERS: frozenset[str] = frozenset({"model_path", "port", "host", "served_model_id", "name", "python"})

NAME_MAX_CHARS = 200
"""Longest logical name or alias. Names become file names (``configs/locks/<slug>.manifest.json`` and its
``.<...>.XXXXXXXX.tmp`` while written, ``logs/backends/<slug>.log.1``). A slug is ASCII and at most
``settings.SLUG_MAX_BYTES`` (210) bytes, so the longest derived name is 238 bytes, under the 255-byte NAME_MAX
of Linux file systems whatever the name's script."""

# Characters that render as nothing, reorder the text around them or break a line: with them two entries can
# look identical in a terminal, the dashboard or a review diff while resolving differently. Refused in names,
# aliases and served ids by Unicode category: controls (Cc: C0, DEL, C1), format characters (Cf: zero-width
# space/joiners U+200B-U+200D, word joiner U+2060, BOM U+FEFF, bidi marks U+200E/U+200F/U+061C, bidi embeddings,
# overrides and isolates U+202A-U+202E/U+2066-U+2069, soft hyphen, tags), line and paragraph separators, and
# lone surrogates (which cannot even be written as UTF-8).
_INVISIBLE_CATEGORIES: dict[str, str] = {
    "Cc": "a control character",
    "Cf": "an invisible format character, such as a zero-width or bidi control",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Cs": "a lone surrogate, not valid UTF-8",
}
# The same set for JSON Schema editors, as far as a portable regex class can spell it (the BMP members).
INVISIBLE_CLASS = (
    r"\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
)
# Logical names: anything printable except '/', whitespace and the characters above.
NAME_PATTERN = rf"^[^\s/{INVISIBLE_CLASS}]+$"
VISIBLE_PATTERN = rf"^[^{INVISIBLE_CLASS}]*$"


def invisible_character(value: str) -> str | None:
    """The first refused invisible character in ``value``, described (``U+202E RIGHT-TO-LEFT OVERRIDE (…)``)."""
    for char in value:
        what = _INVISIBLE_CATEGORIES.get(unicodedata.category(char))
        if what:
            label = unicodedata.name(char, "")
            return f"U+{ord(char):04X}{' ' + label if label else ''} ({what})"
    return None


def _visible(kind: str, value: Any) -> None:
    found = invisible_character(value)
    if found:
        raise ValueError(f"{kind} contains {found}, which makes different names look alike; remove it")


def _bounded(kind: str, value: Any) -> None:
    if len(value) > NAME_MAX_CHARS:
        raise ValueError(
            f"{kind} is {len(value)} characters long, at most {NAME_MAX_CHARS} characters are allowed "
            "(lock manifests and backend logs are named after it and must fit the 255-byte file name limit); "
            "shorten it"
        )


def check_name(value: Any) -> Any:
    """``value`` if it is a valid logical name, else ValueError saying why and the fix.

    Runs before pydantic's own length and pattern checks, so the error names the limit or the offending
    character; non-strings pass through to pydantic's type check.
    """
    if not isinstance(value, str):
        return value
    _bounded("name", value)
    _visible("name", value)
    if "/" in value or any(c.isspace() for c in value):
        raise ValueError(f"invalid name {value!r}: use no '/', whitespace or control characters (parentheses are fine)")
    return value


def _check_alias(value: Any) -> Any:
    if isinstance(value, str):
        _bounded("alias", value)
        _visible("alias", value)
    return value


def _check_served_id(value: Any) -> Any:
    if isinstance(value, str):
        _visible("served id", value)
    return value


# The constraints feed the JSON Schema; the before-validators run first and give the precise message.
LogicalName = Annotated[
    str, StringConstraints(max_length=NAME_MAX_CHARS, pattern=NAME_PATTERN), BeforeValidator(check_name)
]
Alias = Annotated[
    str, StringConstraints(max_length=NAME_MAX_CHARS, pattern=VISIBLE_PATTERN), BeforeValidator(_check_alias)
]
ServedId = Annotated[str, StringConstraints(pattern=VISIBLE_PATTERN), BeforeValidator(_check_served_id)]


PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
"""``{identifier}`` only, so JSON arguments such as ``{"image": 2}`` pass through untouched."""


def placeholders_in(arg: str) -> set[str]:
    """Placeholder names (``{port}`` -> ``port``) used in one argv element."""
    return set(PLACEHOLDER_RE.findall(arg))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Capabilities(_Strict):
    """What the model can do; booleans, all default false except ``text``."""

    text: bool = True
    vision: bool = False
    tools: bool = False
    embeddings: bool = False
    reasoning: bool = False
    audio: bool = False

    def enabled(self) -> list[str]:
        return [name for name in CAPABILITY_NAMES if getattr(self, name)]


class Source(_Strict):
    """Where the weights came from."""

    provider: str | None = Field(default=None, description="e.g. huggingface, ollama, local")
    repo_id: str | None = None
    revision: str | None = None


class BackendConfig(_Strict):
    """How to reach or start the backend."""

    launch: list[str] | None = Field(
        default=None,
        description="argv for process backends; placeholders {model_path} {host} {port} {served_model_id} {name} {python}",
    )
    base_url: str | None = Field(default=None, description="remote OpenAI-compatible base URL (…/v1)")
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    env: dict[str, str] = Field(default_factory=dict)
    extra_args: list[str] = Field(default_factory=list)
    health_path: str | None = None
    startup_timeout_s: float | None = Field(default=None, gt=0)
    api_key_env: str | None = Field(default=None, description="env var holding the remote API key")

    @field_validator("launch", "extra_args")
    @classmethod
    def _valid_argv(cls, value: list[str] | None) -> list[str] | None:
        if not value:
            return value
        if not all(isinstance(a, str) and a for a in value):
            raise ValueError("must be an argv list of non-empty strings (no shell string)")
        for arg in value:
            unknown = placeholders_in(arg) - LAUNCH_PLACEHOLDERS
            if unknown:
                raise ValueError(
                    f"unknown placeholder {{{sorted(unknown)[0]}}} in {arg!r}; "
                    f"valid: {', '.join('{' + p + '}' for p in sorted(LAUNCH_PLACEHOLDERS))}"
                )
        return value

    @field_validator("launch")
    @classmethod
    def _launch_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("launch must not be empty (omit it to use the backend's default)")
        return value


class ChatTemplate(_Strict):
    source: str | None = Field(default=None, description="embedded, file, or hub")
    path: str | None = None
    sha256: str | None = None


class VersionLock(_Strict):
    """Pinned weights: set only from a full verification (``lock NAME --set-expected``)."""

    locked: bool = False
    algorithm: str = "sha256"
    expected_aggregate_sha256: str | None = None
    locked_at: datetime | None = None
    locked_by: str | None = None
    manifest_path: str | None = None
    unlocked_at: datetime | None = None
    unlocked_by: str | None = None
    unlock_reason: str | None = None


FieldLayer = Literal["curated", "discovered", "curated_only"]
"""Who owns a field: ``curated`` (operator decisions), ``discovered`` (machine facts the downloader and scans
write; curated may still override one, e.g. a moved ``download_path``), ``curated_only`` (never in the
machine-written overlay). Declared once, on the fields below (``x-layer`` in the JSON Schema)."""
_FACT: dict[str, Any] = {"x-layer": "discovered"}
_CURATED_ONLY: dict[str, Any] = {"x-layer": "curated_only"}


class ModelEntry(_Strict):
    """One logical model. ``name`` is the key operators and tools use."""

    name: LogicalName = Field(
        description=f"logical name: at most {NAME_MAX_CHARS} characters (file names derive from it); no '/', "
        "whitespace, control, zero-width or bidi-control characters",
    )
    display_name: str | None = None
    backend: Backend | None = Field(default=None, description="unset = not yet configured (discovered only)")
    served_model_id: ServedId | None = Field(
        default=None, description="id the backend serves; no control or invisible characters"
    )
    model_aliases: list[Alias] = Field(
        default_factory=list,
        description=f"other names: at most {NAME_MAX_CHARS} characters; no control, zero-width or bidi-control characters",
    )
    roles: list[str] = Field(default_factory=list)
    role_priority: int | dict[str, int] = Field(
        default=0,
        description="selection rank by role, higher wins: an integer for every role, or {role: score} per role "
        "(a role missing from the mapping scores 0); ties broken by name",
    )
    capabilities: Capabilities = Field(default_factory=Capabilities)
    download_path: str | None = Field(default=None, json_schema_extra=_FACT)
    download_format: str | None = Field(
        default=None, description="safetensors, gguf, awq, gptq, fp8, …", json_schema_extra=_FACT
    )
    download_location: str | None = Field(default=None, json_schema_extra=_FACT)
    download_size_bytes: int | None = Field(default=None, ge=0, json_schema_extra=_FACT)
    download_files: list[dict[str, Any]] | None = Field(default=None, json_schema_extra=_FACT)
    downloaded_at: datetime | None = Field(default=None, json_schema_extra=_FACT)
    quantization: str | None = Field(default=None, json_schema_extra=_FACT)
    source: Source = Field(default_factory=Source, json_schema_extra=_FACT)
    license: str | None = Field(
        default=None,
        description="licence of the weights (e.g. mit, apache-2.0); informational",
        json_schema_extra=_FACT,
    )
    family: str | None = Field(
        default=None, description="base model family (e.g. qwen2.5-vl-7b); informational", json_schema_extra=_FACT
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="free-form provenance (README and licence hashes, producer, model type, library, ...): kept "
        "and shown, never used for decisions",
        json_schema_extra=_FACT,
    )
    backend_config: BackendConfig = Field(default_factory=BackendConfig)
    generation_defaults: dict[str, Any] = Field(default_factory=dict)
    chat_template: ChatTemplate | None = None
    version_lock: VersionLock | None = Field(default=None, json_schema_extra=_CURATED_ONLY)
    hash_ignore: list[str] = Field(default_factory=list)
    vision_target_long_edge: int | None = Field(default=None, ge=32, le=8192)
    profiles: list[str] = Field(default_factory=list, description="deployment profiles; empty = all")
    testing: bool = False
    deprecated: bool = False
    notes: str | None = None

    @model_validator(mode="after")
    def _backend_consistency(self) -> ModelEntry:
        if self.backend == "openai" and not self.backend_config.base_url:
            raise ValueError("backend 'openai' needs backend_config.base_url (e.g. https://host/v1)")
        if self.backend == "lmdeploy" and not self.backend_config.launch:
            raise ValueError("backend 'lmdeploy' needs backend_config.launch (an argv list)")
        return self

    # Derived values -------------------------------------------------------------------------------------
    @property
    def is_process_backend(self) -> bool:
        return self.backend in PROCESS_BACKENDS

    @property
    def locked(self) -> bool:
        return bool(self.version_lock and self.version_lock.locked)

    @property
    def effective_served_id(self) -> str:
        return self.served_model_id or self.name

    def priority_for(self, role: str) -> int:
        """This entry's rank for ``role``: the integer (every role), or the mapping's score (0 when absent)."""
        if isinstance(self.role_priority, int):
            return self.role_priority
        return self.role_priority.get(role, 0)

    def launch_template(self) -> list[str] | None:
        """The argv template before placeholder expansion (default ``vllm serve`` for vllm entries)."""
        if self.backend_config.launch:
            return [*self.backend_config.launch, *self.backend_config.extra_args]
        if self.backend == "vllm":
            return [*DEFAULT_VLLM_LAUNCH, *self.backend_config.extra_args]
        return None


def rank_for_role(entries: Iterable[ModelEntry], role: str) -> list[ModelEntry]:
    """``entries`` best first for ``role``: highest :meth:`ModelEntry.priority_for`, then name (the one ranking
    that selection, ``list --role`` and the dashboard's role filter share)."""
    return sorted(entries, key=lambda entry: (-entry.priority_for(role), entry.name))


def json_schema() -> dict[str, Any]:
    """JSON Schema of a registry file (array of entries, or ``{"models": [...]}``) for editors."""
    entry = ModelEntry.model_json_schema()
    defs = entry.pop("$defs", {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ImageWorks model registry",
        "$defs": {**defs, "ModelEntry": entry},
        "oneOf": [
            {"type": "array", "items": {"$ref": "#/$defs/ModelEntry"}},
            {
                "type": "object",
                "properties": {
                    "$schema": {"type": "string"},
                    "models": {"type": "array", "items": {"$ref": "#/$defs/ModelEntry"}},
                },
                "required": ["models"],
                "additionalProperties": False,
            },
        ],
    }


def field_layer(name: str) -> FieldLayer:
    """The layer that owns an entry field (see :data:`FieldLayer`)."""
    extra = ModelEntry.model_fields[name].json_schema_extra
    layer = extra.get("x-layer") if isinstance(extra, dict) else None
    return cast(FieldLayer, layer or "curated")


def fields_of_layer(layer: FieldLayer) -> tuple[str, ...]:
    """Entry fields owned by ``layer``, in schema order (``name``, the key of both layers, is in neither)."""
    return tuple(name for name in ModelEntry.model_fields if name != "name" and field_layer(name) == layer)


def _type_text(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    """A JSON Schema property's type in words (``string or null``, ``list of string``, ``{string: integer}``)."""
    if "$ref" in prop:
        return f"object ({prop['$ref'].rsplit('/', 1)[-1]})"
    if "anyOf" in prop:
        return " or ".join(_type_text(option, defs) for option in prop["anyOf"])
    if "enum" in prop:
        return "one of " + ", ".join(str(v) for v in prop["enum"])
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type_text(prop.get('items', {}), defs)}"
    if kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        return f"{{string: {_type_text(prop['additionalProperties'], defs)}}}"
    return str(kind)


def _default_text(model: type[BaseModel], name: str) -> str:
    info = model.model_fields[name]
    if info.is_required():
        return "required"
    default = info.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        default = default.model_dump(mode="json", exclude_defaults=True)
    return json.dumps(default, ensure_ascii=False) if default not in ({}, None) else ("{}" if default == {} else "null")


def fields_markdown() -> str:
    """The registry field table (``docs/registry-fields.md``), generated from the models like the JSON Schema
    (``docs/registry.schema.json``); ``scripts/registry_docs.py`` writes both, a test keeps them in sync."""
    schema = json_schema()
    defs = schema["$defs"]
    lines = [
        "# Registry fields",
        "",
        "Generated from `imageworks_core/schema.py` by `scripts/registry_docs.py` (do not edit by hand; the JSON",
        "Schema beside it is `registry.schema.json`). Layer: `curated` (your decisions), `discovered` (machine facts;",
        "curated may override one), `curated_only` (never in the discovered overlay).",
        "",
        "| field | type | default | layer | meaning |",
        "|---|---|---|---|---|",
    ]
    entry = defs["ModelEntry"]["properties"]
    for name in ModelEntry.model_fields:
        prop = entry[name]
        layer = "both (the key)" if name == "name" else field_layer(name)
        description = prop.get("description", "").replace("|", "\\|")
        lines.append(
            f"| `{name}` | {_type_text(prop, defs)} | `{_default_text(ModelEntry, name)}` | {layer} | {description} |"
        )
        ref = prop.get("$ref") or next((o["$ref"] for o in prop.get("anyOf", []) if "$ref" in o), None)
        if ref:
            nested_name = ref.rsplit("/", 1)[-1]
            nested_model = {m.__name__: m for m in (Capabilities, Source, BackendConfig, ChatTemplate, VersionLock)}[
                nested_name
            ]
            for sub, sub_prop in defs[nested_name]["properties"].items():
                sub_description = sub_prop.get("description", "").replace("|", "\\|")
                lines.append(
                    f"| `{name}.{sub}` | {_type_text(sub_prop, defs)} | `{_default_text(nested_model, sub)}` | "
                    f"{layer} | {sub_description} |"
                )
    return "\n".join(lines) + "\n"
