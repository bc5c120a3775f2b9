"""Import an older ImageWorks registry (``imageworks-models import-legacy``) into our curated + discovered pair.

The legacy format, as this module assumes it
--------------------------------------------
Older ImageWorks deployments keep either one merged ``model_registry.json`` or a ``model_registry.curated.json`` /
``model_registry.discovered.json`` pair. Each is a JSON array of entries (``{"models": [...]}`` is accepted too).
An entry serialises every field of the old dataclass, empty ones included::

    name, display_name, backend ("vllm", "vllm-openai", "ollama", "lmdeploy", "openai-compatible", "remote",
        "gguf", "unassigned", ...),
    backend_config {port, model_path, extra_args, host, base_url},
    capabilities {text, vision, vl, multimodal, mm, image, function_calling, tool_use, embedding, thinking, ...}
        (dozens of alias keys; any true alias means the capability),
    roles, role_priority ({role: score}, higher wins, a missing role scores 0), served_model_id (may be null or
        the string "None"),
    model_aliases, generation_defaults, chat_template {source: embedded|external|none, path, sha256},
    version_lock {locked, expected_aggregate_sha256, last_verified}, artifacts {aggregate_sha256, files},
    probes {vision: {vision_ok, timestamp, ...}}, performance, metadata {...}, profiles_placeholder,
    license, family, source {huggingface_id}, source_provider ("hf", "ollama"), quantization,
    backend_alternatives, deprecated, download_format, download_location, download_path,
    download_size_bytes, download_files (relative paths), download_directory_checksum, downloaded_at,
    last_accessed

In a legacy pair the discovered file holds whole-entry copies that override the curated entry of the same name
(the legacy loader's overlay); we reproduce that, key by key, and report the curated values it hid.

How an entry is converted
-------------------------
* Operator decisions go to the curated file: display_name, backend, served_model_id, model_aliases, roles,
  role_priority, capabilities, backend_config, generation_defaults, chat_template, profiles, testing,
  deprecated, notes, hash_ignore, vision_target_long_edge. Machine facts go to the discovered file:
  download_path, download_format, download_location, download_size_bytes, download_files, downloaded_at,
  quantization, source, license, family, metadata.
* ``role_priority`` keeps its shape: a ``{role: score}`` mapping stays a mapping, so selection by role ranks
  exactly as the legacy loader did (``role_priority.get(role, 0)``, higher wins).
* Logical names and aliases are kept as they are (only surrounding whitespace goes, as the legacy loader did);
  a name that is invalid here (``/``, whitespace) becomes a valid one and the old name is kept as a model alias;
  a null served id is omitted (the name is served instead). Backend and capability aliases are normalised.
* ``backend_config.model_path`` becomes ``download_path`` when there is none; a per-entry port or host of a
  process backend (vllm, lmdeploy) is dropped because they run on the single port.
* ``metadata`` (README and licence hashes, producer, model type, library, ...) is kept exactly, and every legacy
  field without a field of its own here (``backend_alternatives``, custom keys) is kept in it under its own
  key. It is shown, never used for decisions.
* An entry the legacy loader treated as a test model (its name convention, ``metadata.testing``) is imported
  with ``testing: true`` (see :func:`legacy_testing_reason`).
* Only what truly cannot carry over is dropped, each with its replacement: a legacy lock's expected hash uses
  another aggregate format, so the lock is not kept and the report tells the operator to verify and lock
  again; artifact hashes, the directory checksum, probe results, latency statistics and access times are
  runtime state that verify, probe-vision and the history DB replace.
* Empty legacy values (null, "", [], {} and all-empty objects) and values equal to our schema's default carry
  no information and are left out silently; everything else that is changed, moved or dropped is reported, per
  entry, with the old and the new value.

The converted pair is validated with the real merge (:func:`registry.build_registry`) before anything is written.
Existing registry files are never replaced without ``force``; with it, their previous content is kept as
revisions (``imageworks-models history`` / ``rollback``).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
from filelock import Timeout
from pydantic import BaseModel

from . import audit
from .errors import RegistryError, UsageError, ValidationError
from .journal import FileChange, apply_change, refuse_over_pending
from .registry import (
    WRITE_LOCK_TIMEOUT_S,
    Registry,
    build_registry,
    lock_for,
    read_current,
    recover,
    snapshot_text,
)
from .registry_file import atomic_write_text, render_new_file
from .schema import CAPABILITY_NAMES, NAME_PATTERN, PROCESS_BACKENDS, BackendConfig, ModelEntry, fields_of_layer
from .settings import Settings

ChangeKind = Literal["changed", "moved", "dropped", "action"]
"""changed: new value; moved: same value under another field (``new`` names it); dropped: not imported;
action: imported differently, and the operator has to act (the reason says how)."""

_BACKEND_ALIASES: dict[str, str] = {
    "vllm": "vllm",
    "vllm-openai": "vllm",
    "vllm_openai": "vllm",
    "vllm-server": "vllm",
    "ollama": "ollama",
    "lmdeploy": "lmdeploy",
    "lm-deploy": "lmdeploy",
    "lm_deploy": "lmdeploy",
    "turbomind": "lmdeploy",
    "openai": "openai",
    "openai-compatible": "openai",
    "openai_compatible": "openai",
    "openai-api": "openai",
    "remote": "openai",
}
# Legacy backends that were OpenAI-compatible servers we neither start nor know by name.
_OPENAI_SERVERS = frozenset({"gguf", "llama.cpp", "llamacpp", "llama-cpp", "lmstudio", "lm-studio"})
# Legacy placeholders meaning "no backend chosen yet".
_UNCONFIGURED_BACKENDS = frozenset({"unassigned", "none", "unknown", "null"})

_CAPABILITY_ALIASES: dict[str, tuple[str, ...]] = {
    "text": ("text", "language", "chat", "completion"),
    "vision": ("vision", "visual", "multimodal", "mm", "image", "images", "vl", "vlm"),
    "tools": (
        "tools",
        "tool",
        "tool_use",
        "tool_call",
        "tool_calls",
        "toolcalls",
        "toolchoice",
        "tool_choice",
        "auto_tool_choice",
        "toolcalling",
        "function_call",
        "function_calls",
        "function_calling",
        "functioncalling",
        "function_tools",
    ),
    "embeddings": ("embeddings", "embedding", "embed", "text_embedding", "representation"),
    # The legacy normaliser also treated reasoning-model names as reasoning flags.
    "reasoning": (
        "reasoning",
        "thinking",
        "reason",
        "think",
        "chain_of_thought",
        "cot",
        "reasoner",
        "o1",
        "o3",
        "r1",
        "deepseek",
    ),
    "audio": ("audio", "speech", "voice", "asr", "tts"),
}
_CAPABILITY_OF: dict[str, str] = {alias: cap for cap, aliases in _CAPABILITY_ALIASES.items() for alias in aliases}
LEGACY_CAPABILITY_ALIASES: dict[str, tuple[str, ...]] = _CAPABILITY_ALIASES
"""Every legacy capability key (underscore spelling) by our capability name: the one table the importer and the
``imageworks.model_loader`` compatibility layer translate with."""


def capability_for(key: str) -> str | None:
    """Our capability for a legacy capability key, any case or spelling (``VL`` -> vision, ``tool-use`` -> tools,
    ``embedding`` -> embeddings, ``thinking`` -> reasoning); None when it names none."""
    return _CAPABILITY_OF.get(key.strip().lower().replace("-", "_").replace(" ", "_"))


# The legacy loader's test-model convention (its ``testing_filters``): a name starting with one of the prefixes,
# containing the mark, or equal to a stem or a stem followed by "-"; or ``metadata.testing`` true; or a match of
# one of the regular expressions in IMAGEWORKS_TEST_MODEL_PATTERNS (comma-separated, anchored at the name's start).
_LEGACY_TEST_PREFIXES = ("testmodel", "mini-test", "custom-family")
_LEGACY_TEST_STEMS = ("model-awq", "model-fp16", "demo-model", "r")
_LEGACY_TEST_MARK = "testzzz"


def extra_test_name_patterns(settings: Settings) -> list[re.Pattern[str]]:
    """The extra test-model name patterns of IMAGEWORKS_TEST_MODEL_PATTERNS (UsageError naming a bad one)."""
    patterns = []
    for text in (part.strip() for part in settings.test_model_patterns.split(",")):
        if not text:
            continue
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise UsageError(
                f"IMAGEWORKS_TEST_MODEL_PATTERNS: {text!r} is not a regular expression ({exc}); fix or unset it"
            ) from exc
    return patterns


def legacy_testing_reason(name: str, metadata: Any, settings: Settings) -> str | None:
    """Why the legacy loader treated ``name`` as a test model (None when it did not); see the convention above."""
    stripped = name.strip()
    if (
        stripped.startswith(_LEGACY_TEST_PREFIXES)
        or _LEGACY_TEST_MARK in stripped
        or any(stripped == stem or stripped.startswith(stem + "-") for stem in _LEGACY_TEST_STEMS)
    ):
        return "the legacy loader treats names like this as test models"
    for pattern in extra_test_name_patterns(settings):
        if pattern.match(stripped):
            return f"the name matches IMAGEWORKS_TEST_MODEL_PATTERNS {pattern.pattern!r}"
    if isinstance(metadata, dict) and metadata.get("testing") is True:
        return "legacy metadata.testing is true"
    return None


_PASSTHROUGH = frozenset(
    {
        "display_name",
        "hash_ignore",
        "vision_target_long_edge",
        "profiles",
        "testing",
        "deprecated",
        "notes",
        "download_format",
        "download_location",
        "download_size_bytes",
        "downloaded_at",
        "quantization",
        "license",
        "family",
    }
)
"""Fields copied as they are; each goes to the layer the schema says owns it (the rest are converted)."""
_PASSTHROUGH_CURATED = tuple(f for f in fields_of_layer("curated") if f in _PASSTHROUGH)
_PASSTHROUGH_DISCOVERED = tuple(f for f in fields_of_layer("discovered") if f in _PASSTHROUGH)

_DROPPED_LEGACY_FIELDS: dict[str, str] = {
    "artifacts": "legacy file hashes use another aggregate format; `imageworks-models verify {name}` hashes the weights again",
    "probes": "legacy probe results are not carried over; re-run `imageworks-models probe-vision {name} IMAGE`",
    "performance": "legacy latency statistics are not carried over",
    "download_directory_checksum": "legacy directory checksum; `imageworks-models verify {name}` replaces it",
    "last_accessed": "access times are not kept in the registry",
}
"""Runtime state the importer cannot carry over: each has a replacement here (named in the reason). Every other
legacy field without a field of its own is kept in ``metadata`` under its own key."""
_HANDLED_LEGACY_FIELDS = frozenset({"name", "source_provider", *ModelEntry.model_fields, *_DROPPED_LEGACY_FIELDS})
_BACKEND_CONFIG_PASSTHROUGH = ("env", "health_path", "startup_timeout_s", "api_key_env")
_NULL_SERVED_IDS = frozenset({"", "none", "null"})
_INVALID_NAME_RUN = re.compile(r"[\s/\x00-\x1f\x7f]+")
_NAME_RE = re.compile(NAME_PATTERN)
# lmdeploy's own OpenAI-compatible server command; our schema needs lmdeploy entries to spell out their argv.
_LMDEPLOY_LAUNCH = [
    "lmdeploy",
    "serve",
    "api_server",
    "{model_path}",
    "--server-name",
    "{host}",
    "--server-port",
    "{port}",
    "--model-name",
    "{served_model_id}",
]


# The report ---------------------------------------------------------------------------------------------------
@dataclass
class FieldChange:
    """One legacy field that the import changed, dropped, or that needs the operator's action."""

    field: str
    kind: ChangeKind
    old: Any = None
    new: Any = None
    reason: str = ""

    def format_text(self) -> str:
        """One report line: ``kind  field: old -> new  (reason)``."""
        reason = f"  ({self.reason})" if self.reason else ""
        if self.kind == "moved":
            return f"moved    {self.field} -> {self.new}: {_show(self.old)}{reason}"
        value = _show(self.old) + ("" if self.kind == "dropped" else " -> " + _show(self.new))
        return f"{'ACTION ' if self.kind == 'action' else self.kind}  {self.field}: {value}{reason}"


@dataclass
class EntryReport:
    """What happened to one legacy entry: its old and new name, the layers it went to, every change."""

    legacy_name: str
    name: str
    layers: list[str] = field(default_factory=list)
    changes: list[FieldChange] = field(default_factory=list)

    def add(self, field_: str, kind: ChangeKind, old: Any = None, new: Any = None, reason: str = "") -> None:
        self.changes.append(FieldChange(field_, kind, old, new, reason))


@dataclass
class ImportReport:
    """The result of :func:`import_legacy`: files read and written, and per entry every change."""

    sources: list[str]
    curated_path: str
    discovered_path: str
    snapshot_path: str
    entries: list[EntryReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    revisions: dict[str, int] = field(default_factory=dict)
    curated_count: int = 0
    discovered_count: int = 0

    def entry(self, name: str) -> EntryReport:
        """The report of an entry by its new or legacy name."""
        for item in self.entries:
            if name in (item.name, item.legacy_name):
                return item
        raise KeyError(name)

    def actions(self) -> list[tuple[str, FieldChange]]:
        """(entry name, change) for every change the operator has to act on."""
        return [(e.name, c) for e in self.entries for c in e.changes if c.kind == "action"]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able data (``import-legacy --json``)."""
        return {
            "sources": self.sources,
            "written": {
                "curated": {"path": self.curated_path, "entries": self.curated_count},
                "discovered": {"path": self.discovered_path, "entries": self.discovered_count},
                "snapshot": {"path": self.snapshot_path},
            },
            "replaced": self.replaced,
            "revisions": self.revisions,
            "warnings": self.warnings,
            "entries": [
                {
                    "legacy_name": e.legacy_name,
                    "name": e.name,
                    "layers": e.layers,
                    "changes": [asdict(c) for c in e.changes],
                }
                for e in self.entries
            ],
            "actions": [{"name": name, **asdict(change)} for name, change in self.actions()],
        }

    def format_text(self) -> str:
        """The report as the CLI prints it: files written, then every entry with each change on its own line."""
        lines = [f"imported {len(self.entries)} legacy entries from {' + '.join(self.sources)}"]
        for label, path, what in (
            ("curated   ", self.curated_path, f"{self.curated_count} entries"),
            ("discovered", self.discovered_path, f"{self.discovered_count} entries"),
            ("snapshot  ", self.snapshot_path, "regenerated"),
        ):
            rev = self.revisions.get(path)
            if path in self.replaced:
                what += f", replaced; its previous content is revision {rev}" if rev else ", replaced"
            lines.append(f"  {label} {path}  ({what})")
        lines += [f"warning: {w}" for w in self.warnings]
        for entry in self.entries:
            title = entry.name if entry.name == entry.legacy_name else f"{entry.legacy_name} -> {entry.name}"
            lines.append("")
            lines.append(f"{title}  ({'+'.join(entry.layers)})" + ("" if entry.changes else ": imported unchanged"))
            lines += ["  " + change.format_text() for change in entry.changes]
        actions = self.actions()
        lines.append("")
        if actions:
            lines.append(f"{len(actions)} change(s) need your action (marked ACTION above).")
        lines.append("next: imageworks-models list")
        return "\n".join(lines)


def _show(value: Any, limit: int = 90) -> str:
    if value is None:
        return "null"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Small helpers ------------------------------------------------------------------------------------------------
def _blank(value: Any) -> bool:
    """True for values that carry no information in a legacy file (null, "", [], {}, objects of blanks)."""
    if value is None or value == "" or value == [] or value == {}:
        return True
    if isinstance(value, dict):
        return all(_blank(v) or v is False or (type(v) in (int, float) and v == 0) for v in value.values())
    return False


def _schema_problem(model: type[BaseModel], field_: str, value: Any) -> str | None:
    """Why ``value`` is not valid for ``model.field_`` (None when it is), using the schema itself."""
    base: dict[str, Any] = {"name": "legacy-import"} if model is ModelEntry else {}
    try:
        model.model_validate({**base, field_: value})
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        return str(error["msg"]).removeprefix("Value error, ")
    return None


def _is_default(field_: str, value: Any) -> bool:
    info = ModelEntry.model_fields[field_]
    return not info.is_required() and value == info.get_default(call_default_factory=True)


def _ordered(entry: dict[str, Any], model: type[BaseModel] = ModelEntry) -> dict[str, Any]:
    """Keys in the schema's field order, so imported files read like hand-written ones."""
    order = {name: index for index, name in enumerate(model.model_fields)}
    return dict(sorted(entry.items(), key=lambda item: order.get(item[0], len(order))))


def _strip_flags(args: list[str], flags: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Remove ``--flag VALUE`` / ``--flag=VALUE`` pairs; returns the rest and the removed values by flag."""
    flags = tuple(flags)
    kept: list[str] = []
    removed: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in flags and index + 1 < len(args):
            removed[arg] = args[index + 1]
            index += 2
            continue
        flag = next((f for f in flags if arg.startswith(f + "=")), None)
        if flag:
            removed[flag] = arg.split("=", 1)[1]
        else:
            kept.append(arg)
        index += 1
    return kept, removed


# Reading the legacy files -------------------------------------------------------------------------------------
def _read_legacy_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UsageError(f"{path}: no such legacy registry file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from Windows editors
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(
            f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg} "
            f"(fix the legacy file, e.g. check it with `jq . {path}`; nothing was written)"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("models"), list):
        data = data["models"]
    if not isinstance(data, list):
        raise RegistryError(f"{path}: expected a JSON array of model entries (or an object with a 'models' array)")
    problems = []
    for index, raw in enumerate(data):
        if not isinstance(raw, dict):
            problems.append(f"{path}: entry #{index + 1}: expected an object, got {type(raw).__name__}")
        elif not isinstance(raw.get("name"), str) or not raw["name"].strip():
            problems.append(f"{path}: entry #{index + 1}: missing 'name' (every entry needs a logical name)")
    if problems:
        raise RegistryError(f"{path}: {len(problems)} unusable entries; nothing written", problems)
    return data


def _index(path: Path, entries: list[dict[str, Any]], warnings: list[str]) -> dict[str, dict[str, Any]]:
    by_name: dict[str, dict[str, Any]] = {}
    for raw in entries:
        key = raw["name"].strip()
        if key in by_name:
            warnings.append(f"{path}: entry {key!r} appears more than once; the last copy was imported")
        by_name[key] = raw
    return by_name


def _read_legacy(
    path: Path, discovered_path: Path | None, warnings: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[FieldChange]]]:
    """Legacy entries by name, the legacy discovered overlay applied; plus what the overlay hid, per name."""
    entries = _index(path, _read_legacy_file(path), warnings)
    hidden: dict[str, list[FieldChange]] = {}
    if discovered_path is None:
        sibling = path.with_name(path.name.replace("curated", "discovered"))
        if "curated" in path.name and sibling.is_file():
            warnings.append(
                f"{path.name} looks like a legacy curated file; its overlay {sibling} was not imported (add --discovered {sibling})"
            )
        return entries, hidden
    for key, raw in _index(discovered_path, _read_legacy_file(discovered_path), warnings).items():
        base = entries.get(key)
        if base is None:
            entries[key] = raw
            continue
        for field_, value in base.items():
            carried = field_ in _HANDLED_LEGACY_FIELDS - set(_DROPPED_LEGACY_FIELDS)
            if carried and field_ in raw and raw[field_] != value and not _blank(value):
                hidden.setdefault(key, []).append(
                    FieldChange(
                        field_,
                        "dropped",
                        value,
                        raw[field_],
                        f"legacy curated value hidden by the legacy discovered copy {discovered_path.name}, as the legacy loader did",
                    )
                )
        entries[key] = {**base, **raw}
    return entries, hidden


# Converting one entry -----------------------------------------------------------------------------------------
class _EntryConverter:
    """Splits one legacy entry into a curated and a discovered record, reporting every change."""

    def __init__(self, raw: dict[str, Any], report: EntryReport, settings: Settings) -> None:
        self.raw = raw
        self.report = report
        self.settings = settings
        self.name = report.name
        self.curated: dict[str, Any] = {"name": report.name}
        self.discovered: dict[str, Any] = {"name": report.name}
        self.backend: str | None = None
        self.model_path: str | None = None
        self.served_name_from_args: str | None = None

    def add(self, field_: str, kind: ChangeKind, old: Any = None, new: Any = None, reason: str = "") -> None:
        self.report.add(field_, kind, old, new, reason.replace("{name}", self.name))

    def convert(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self._backend()
        self._backend_config()
        self._served_model_id()
        self._capabilities()
        self._roles()
        self._role_priority()
        self._model_aliases()
        self._generation_defaults()
        self._chat_template()
        self._version_lock()
        self._passthrough(_PASSTHROUGH_CURATED, self.curated)
        self._download_path()
        self._passthrough(_PASSTHROUGH_DISCOVERED, self.discovered)
        self._download_files()
        self._source()
        self._metadata()
        self._testing()
        self._dropped()
        return _ordered(self.curated), _ordered(self.discovered)

    # Backend and how to reach it ----------------------------------------------------------------------------
    def _backend(self) -> None:
        raw = self.raw.get("backend")
        if _blank(raw):
            return
        key = str(raw).strip().lower()
        if key in _BACKEND_ALIASES:
            self.backend = _BACKEND_ALIASES[key]
            if self.backend != raw:
                self.add("backend", "changed", raw, self.backend, "legacy backend alias")
        elif key in _OPENAI_SERVERS:
            self.backend = "openai"
            self.add("backend", "changed", raw, "openai", "served by an OpenAI-compatible server we do not start")
        elif key in _UNCONFIGURED_BACKENDS:
            self.add(
                "backend",
                "dropped",
                raw,
                reason="legacy placeholder for 'no backend yet'; the entry stays unconfigured",
            )
        else:
            self.add(
                "backend",
                "action",
                raw,
                None,
                "unknown backend; set one of vllm, ollama, lmdeploy, openai in the curated file before using {name}",
            )

    def _argv(self, field_: str, value: Any) -> list[str]:
        if isinstance(value, str):
            argv = shlex.split(value)
            self.add(field_, "changed", value, argv, "shell string split into an argv list")
            return argv
        if not isinstance(value, list):
            self.add(field_, "dropped", value, reason="not an argv list")
            return []
        argv = [str(a) for a in value if a is not None and a != ""]
        if argv != value:
            self.add(field_, "changed", value, argv, "argv elements must be non-empty strings")
        return argv

    def _backend_config(self) -> None:
        raw = self.raw.get("backend_config")
        if _blank(raw):
            raw = {}
        if not isinstance(raw, dict):
            self.add("backend_config", "dropped", raw, reason="not an object")
            raw = {}
        config: dict[str, Any] = {}
        model_path = raw.get("model_path")
        self.model_path = None if _blank(model_path) else str(model_path)
        for key in ("launch", "extra_args"):
            if not _blank(raw.get(key)):
                argv = self._argv(f"backend_config.{key}", raw[key])
                if argv:
                    config[key] = argv
        for key in _BACKEND_CONFIG_PASSTHROUGH:
            value = raw.get(key)
            if _blank(value):
                continue
            problem = _schema_problem(BackendConfig, key, value)
            if problem:
                self.add(f"backend_config.{key}", "dropped", value, reason=problem)
            else:
                config[key] = value
        host = None if _blank(raw.get("host")) else str(raw["host"]).strip()
        port = self._port(raw.get("port"))
        base_url = None if _blank(raw.get("base_url")) else str(raw["base_url"]).strip()
        for key, value in raw.items():
            if key not in {
                "model_path",
                "launch",
                "extra_args",
                "host",
                "port",
                "base_url",
                *_BACKEND_CONFIG_PASSTHROUGH,
            } and not _blank(value):
                self.add(f"backend_config.{key}", "dropped", value, reason="not a backend_config key here")
        if self.backend in PROCESS_BACKENDS:
            self._single_port(config, raw, host, port, base_url)
        elif self.backend == "openai":
            self._remote(config, raw, host, port, base_url)
        else:
            config.update({k: v for k, v in (("host", host), ("port", port), ("base_url", base_url)) if v is not None})
        if self.backend:
            self.curated["backend"] = self.backend
        if config:
            self.curated["backend_config"] = _ordered(config, BackendConfig)

    def _port(self, value: Any) -> int | None:
        if _blank(value) or value == 0:
            return None
        try:
            port = int(value)
        except (TypeError, ValueError):
            port = 0
        if isinstance(value, bool) or not 1 <= port <= 65535:
            self.add("backend_config.port", "dropped", value, reason="not a TCP port")
            return None
        return port

    def _single_port(
        self, config: dict[str, Any], raw: dict[str, Any], host: str | None, port: int | None, base_url: str | None
    ) -> None:
        settings = self.settings
        single_port_why = {
            "port": f"{self.backend} runs on the single port (CHAT_PROXY_VLLM_PORT, now {settings.vllm_port}); "
            "a per-entry port is never used",
            "host": f"{self.backend} runs on the single port's host (CHAT_PROXY_VLLM_HOST, now {settings.vllm_host})",
            "base_url": "process backends are reached on the single port",
        }
        for key, value in (("port", port), ("host", host), ("base_url", base_url)):
            if value is not None:
                self.add(f"backend_config.{key}", "dropped", raw[key], reason=single_port_why[key])
        extra = config.get("extra_args", [])
        flags = ["--port", "--host"] + (
            ["--served-model-name"] if self.backend == "vllm" and not config.get("launch") else []
        )
        kept, removed = _strip_flags(extra, flags)
        if removed:
            config["extra_args"] = kept
            if not kept:
                config.pop("extra_args")
        for flag, value in removed.items():
            if flag == "--served-model-name":
                self.served_name_from_args = value
                why = "the launch command passes served_model_id"
            else:
                why = "the launch command passes the single port's " + {"--port": "port", "--host": "host"}[flag]
            self.add(f"backend_config.extra_args {flag}", "dropped", value, reason=why)
        if self.backend == "lmdeploy" and not config.get("launch"):
            config["launch"] = list(_LMDEPLOY_LAUNCH)
            self.add(
                "backend_config.launch",
                "changed",
                None,
                config["launch"],
                "lmdeploy entries need an explicit argv; this is lmdeploy's standard api_server command (review it)",
            )

    def _remote(
        self, config: dict[str, Any], raw: dict[str, Any], host: str | None, port: int | None, base_url: str | None
    ) -> None:
        if base_url is None and host is not None:
            base_url = f"http://{host}{':' + str(port) if port else ''}/v1"
            self.add("backend_config.base_url", "changed", None, base_url, "built from the legacy host and port")
        elif base_url is not None:
            for key, value in (("host", host), ("port", port)):
                if value is not None:
                    self.add(
                        f"backend_config.{key}", "dropped", raw[key], reason="base_url already says where the server is"
                    )
        if base_url is None:
            self.add(
                "backend",
                "action",
                self.raw.get("backend"),
                None,
                "an OpenAI-compatible entry needs backend_config.base_url; left unconfigured: set backend and base_url for {name}",
            )
            self.backend = None
            return
        config["base_url"] = base_url

    def _served_model_id(self) -> None:
        present = "served_model_id" in self.raw
        value = self.raw.get("served_model_id")
        if isinstance(value, str) and value.strip().lower() not in _NULL_SERVED_IDS:
            self.curated["served_model_id"] = value.strip()
            if value.strip() != value:
                self.add("served_model_id", "changed", value, value.strip(), "surrounding whitespace removed")
            return
        if value is not None and not isinstance(value, str):
            self.curated["served_model_id"] = str(value)
            self.add("served_model_id", "changed", value, str(value), "served ids are strings")
            return
        derived, source = None, ""
        if self.served_name_from_args:
            derived, source = self.served_name_from_args, "taken from --served-model-name in the legacy extra_args"
        elif self.backend == "ollama" and self.model_path and self.model_path.startswith("ollama:"):
            derived = self.model_path.split(":", 1)[1].lstrip("/")
            source = "taken from the legacy backend_config.model_path (the ollama tag)"
        if derived:
            self.curated["served_model_id"] = derived
            self.add("served_model_id", "changed", value, derived, source)
        elif present:
            self.add(
                "served_model_id",
                "dropped",
                value,
                reason=f"legacy null: omitted, so the backend serves it under its name {self.name!r}",
            )

    # Operator decisions -----------------------------------------------------------------------------------
    def _capabilities(self) -> None:
        raw = self.raw.get("capabilities")
        if raw is None or raw == {} or raw == []:  # not _blank(): an all-false map still says text=false
            return
        if isinstance(raw, list):
            flags = {str(k): True for k in raw}
        elif isinstance(raw, dict):
            flags = {str(k): bool(v) for k, v in raw.items()}
        else:
            self.add("capabilities", "dropped", raw, reason="not an object of booleans")
            return
        # Any true alias means the capability (the legacy rule); text stays on unless a text alias says otherwise.
        result = dict.fromkeys(CAPABILITY_NAMES, False)
        said: set[str] = set()
        unknown: dict[str, Any] = {}
        for key, value in flags.items():
            canonical = capability_for(key)
            if canonical is None:
                unknown[key] = raw[key] if isinstance(raw, dict) else True
                continue
            said.add(canonical)
            result[canonical] = result[canonical] or value
        if "text" not in said:
            result["text"] = True
        capabilities = {name: result[name] for name in CAPABILITY_NAMES if name == "text" or result[name]}
        self.curated["capabilities"] = capabilities
        folded = [k for k in flags if k not in unknown and k not in CAPABILITY_NAMES]
        if folded or isinstance(raw, list):
            true_keys = [k for k, v in flags.items() if v and k not in unknown]
            self.add(
                "capabilities",
                "changed",
                raw,
                capabilities,
                f"{len(flags) - len(unknown)} legacy keys folded by alias; true: {', '.join(true_keys) or 'none'}",
            )
        if unknown:
            self.add(
                "capabilities", "dropped", unknown, reason=f"not capabilities here ({', '.join(CAPABILITY_NAMES)})"
            )

    def _roles(self) -> None:
        raw = self.raw.get("roles")
        if _blank(raw):
            return
        items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list) else None
        if items is None:
            self.add("roles", "dropped", raw, reason="not a list of role names")
            return
        roles: list[str] = []
        for item in items:
            if isinstance(item, str) and item.strip() and item.strip() not in roles:
                roles.append(item.strip())
        if roles != raw:
            self.add("roles", "changed", raw, roles, "normalised to a list of distinct role names")
        if roles:
            self.curated["roles"] = roles

    def _role_priority(self) -> None:
        """Kept as it was: a {role: score} mapping stays a mapping (selection ranks by the role asked), a number
        stays a number. Only scores that are no integers change (and are reported)."""
        raw = self.raw.get("role_priority")
        if _blank(raw) or raw == 0:
            return
        if isinstance(raw, dict):
            scores: dict[str, int] = {}
            for role, score in raw.items():
                if type(score) not in (int, float):
                    self.add(f"role_priority.{role}", "dropped", score, reason="not a number")
                    continue
                scores[str(role)] = round(score)
                if scores[str(role)] != score:
                    self.add(f"role_priority.{role}", "changed", score, scores[str(role)], "priorities are integers")
            if scores:
                self.curated["role_priority"] = scores
            return
        if type(raw) not in (int, float):
            self.add("role_priority", "dropped", raw, reason="not a number or a {role: score} mapping")
            return
        value = round(raw)
        if value != raw:
            self.add("role_priority", "changed", raw, value, "priorities are integers")
        if value:
            self.curated["role_priority"] = value

    def _model_aliases(self) -> None:
        raw = self.raw.get("model_aliases")
        if _blank(raw):
            return
        if not isinstance(raw, list):
            raw_list = [raw] if isinstance(raw, str) else []
            self.add(
                "model_aliases",
                "changed" if raw_list else "dropped",
                raw,
                raw_list or None,
                "aliases are a list of strings",
            )
        else:
            raw_list = raw
        aliases = []
        for alias in raw_list:
            if isinstance(alias, str) and alias.strip() and alias.strip() not in aliases:
                aliases.append(alias.strip())
        if aliases:
            self.curated["model_aliases"] = aliases

    def _generation_defaults(self) -> None:
        raw = self.raw.get("generation_defaults")
        if _blank(raw):
            return
        if not isinstance(raw, dict):
            self.add("generation_defaults", "dropped", raw, reason="not an object")
            return
        # Legacy files list every parameter, unset ones as null/[]: leaving them out means the same.
        defaults = {k: v for k, v in raw.items() if not _blank(v)}
        if defaults:
            self.curated["generation_defaults"] = defaults

    def _chat_template(self) -> None:
        raw = self.raw.get("chat_template")
        if _blank(raw):
            return
        if not isinstance(raw, dict):
            self.add("chat_template", "dropped", raw, reason="not an object")
            return
        template = {k: raw[k] for k in ("source", "path", "sha256") if not _blank(raw.get(k))}
        source = str(template.get("source", "")).lower()
        if source in ("none", "null") and "path" not in template:
            self.add("chat_template", "dropped", raw, reason="legacy 'none': no template override")
            return
        if source == "external":
            template["source"] = "file"
            self.add("chat_template.source", "changed", raw["source"], "file", "legacy 'external' is a template file")
        for key, value in raw.items():
            if key not in ("source", "path", "sha256") and not _blank(value):
                self.add(f"chat_template.{key}", "dropped", value, reason="not a chat_template key here")
        if template:
            self.curated["chat_template"] = template

    def _version_lock(self) -> None:
        raw = self.raw.get("version_lock")
        if _blank(raw):
            return
        if not isinstance(raw, dict):
            self.add("version_lock", "dropped", raw, reason="not an object")
            return
        expected = raw.get("expected_aggregate_sha256")
        if not _blank(expected):
            self.add(
                "version_lock.expected_aggregate_sha256",
                "dropped",
                expected,
                reason="the legacy aggregate hash is computed differently from ours and cannot be trusted",
            )
        if not _blank(raw.get("last_verified")):
            self.add(
                "version_lock.last_verified",
                "dropped",
                raw["last_verified"],
                reason="verification history starts with the next verify",
            )
        for key, value in raw.items():
            if key not in ("locked", "expected_aggregate_sha256", "last_verified") and not _blank(value):
                self.add(f"version_lock.{key}", "dropped", value, reason="not carried over with the legacy lock")
        if raw.get("locked"):
            self.add(
                "version_lock.locked",
                "action",
                True,
                False,
                "not locked after the import: run `imageworks-models verify {name}`, then "
                "`imageworks-models lock {name} --set-expected`",
            )

    def _passthrough(self, fields: Iterable[str], target: dict[str, Any]) -> None:
        for field_ in fields:
            value = self.raw.get(field_)
            if _blank(value) or _is_default(field_, value):
                continue
            problem = _schema_problem(ModelEntry, field_, value)
            if problem:
                self.add(field_, "dropped", value, reason=problem)
            else:
                target[field_] = value

    # Machine facts ----------------------------------------------------------------------------------------
    def _download_path(self) -> None:
        raw = self.raw.get("download_path")
        path = None if _blank(raw) else str(raw)
        model_path = self.model_path
        if path and path.startswith("ollama:"):
            self.add(
                "download_path",
                "dropped",
                raw,
                reason="an ollama model reference, not a directory: ollama keeps its own weights",
            )
            path = None
        if model_path is not None:
            if model_path.startswith("ollama:"):
                reason = "an ollama model reference, not a directory: served_model_id names the model"
                self.add("backend_config.model_path", "dropped", model_path, reason=reason)
            elif path is None:
                path = model_path
                self.add("backend_config.model_path", "moved", model_path, "download_path", "a machine fact")
            elif model_path == path:
                self.add("backend_config.model_path", "dropped", model_path, reason="same as download_path")
            else:
                self.add(
                    "backend_config.model_path",
                    "action",
                    model_path,
                    None,
                    f"differs from download_path {path!r}, which was kept; check which directory holds the weights",
                )
        if path:
            self.discovered["download_path"] = path

    def _download_files(self) -> None:
        raw = self.raw.get("download_files")
        if _blank(raw):
            return
        if not isinstance(raw, list):
            self.add("download_files", "dropped", raw, reason="not a list")
            return
        files = [{"path": f} if isinstance(f, str) else f for f in raw if isinstance(f, str | dict)]
        if len(files) != len(raw):
            self.add(
                "download_files",
                "dropped",
                [f for f in raw if not isinstance(f, str | dict)],
                reason="neither a path nor an object",
            )
        if any(isinstance(f, str) for f in raw):
            self.add("download_files", "changed", raw, files, 'each relative path became {"path": ...}')
        if files:
            self.discovered["download_files"] = files

    def _source(self) -> None:
        raw = self.raw.get("source")
        source: dict[str, Any] = {}
        if isinstance(raw, str) and raw.strip():
            source["repo_id"] = raw.strip()
            self.add("source", "changed", raw, source, "a bare repository id")
        elif isinstance(raw, dict):
            renames = {"huggingface_id": "repo_id", "hf_id": "repo_id", "repo": "repo_id", "branch": "revision"}
            for key, value in raw.items():
                if _blank(value):
                    continue
                target = renames.get(key, key)
                if target not in ("provider", "repo_id", "revision"):
                    self.add(
                        f"source.{key}", "dropped", value, reason="not a source key here (provider, repo_id, revision)"
                    )
                    continue
                source[target] = str(value)
                if target != key:
                    self.add(f"source.{key}", "moved", value, f"source.{target}")
        elif not _blank(raw):
            self.add("source", "dropped", raw, reason="not an object")
        provider = self.raw.get("source_provider")
        if not _blank(provider):
            value = {"hf": "huggingface"}.get(str(provider).lower(), str(provider).lower())
            if source.get("provider", value) != value:
                self.add("source_provider", "dropped", provider, reason=f"source.provider {source['provider']!r} kept")
            elif "provider" not in source:
                source["provider"] = value
                if value == provider:
                    self.add("source_provider", "moved", provider, "source.provider")
                else:
                    self.add("source_provider", "changed", provider, value, "moved to source.provider")
        if isinstance(raw, dict) and "provider" not in source and ("huggingface_id" in raw or "hf_id" in raw):
            source["provider"] = "huggingface"
        if source:
            self.discovered["source"] = source

    def _metadata(self) -> None:
        """The legacy ``metadata`` object, kept exactly (provenance: README/licence hashes, producer, ...), plus
        every legacy field that has no field here and is no runtime state: each under its own key."""
        raw = self.raw.get("metadata")
        metadata: dict[str, Any] = {}
        if isinstance(raw, dict):
            metadata = dict(raw)
        elif not _blank(raw):
            self.add("metadata", "dropped", raw, reason="not an object")
        for key, value in self.raw.items():
            if key in _HANDLED_LEGACY_FIELDS or _blank(value):
                continue
            if key in metadata and metadata[key] != value:
                self.add(
                    key, "dropped", value, reason=f"metadata already holds another {key!r}: {_show(metadata[key])}"
                )
                continue
            metadata[key] = value
            self.add(key, "moved", value, f"metadata.{key}", "no field of its own here; kept, never used for decisions")
        if metadata:
            self.discovered["metadata"] = metadata

    def _testing(self) -> None:
        if self.curated.get("testing"):
            return
        why = legacy_testing_reason(self.raw.get("name", ""), self.raw.get("metadata"), self.settings)
        if why:
            self.curated["testing"] = True
            self.add(
                "testing",
                "changed",
                False,
                True,
                why + "; hidden from selection here too (clear it if it is a real model)",
            )

    def _dropped(self) -> None:
        for key, value in self.raw.items():
            if key not in _DROPPED_LEGACY_FIELDS or _blank(value):
                continue
            self.add(key, "dropped", value, reason=_DROPPED_LEGACY_FIELDS[key].replace("{name}", self.name))


# Names across entries -----------------------------------------------------------------------------------------
def _assign_names(legacy_names: list[str]) -> dict[str, str]:
    """New logical name per legacy name: valid names are kept, others made valid and unique."""
    taken = {name.strip() for name in legacy_names if _NAME_RE.match(name.strip())}
    result: dict[str, str] = {}
    for legacy in legacy_names:
        stripped = legacy.strip()
        if _NAME_RE.match(stripped):
            result[legacy] = stripped
            continue
        base = _INVALID_NAME_RUN.sub("-", stripped).strip("-") or "entry"
        candidate, suffix = base, 2
        while candidate in taken:
            candidate, suffix = f"{base}-{suffix}", suffix + 1
        taken.add(candidate)
        result[legacy] = candidate
    return result


def _settle_aliases(converted: list[tuple[EntryReport, dict[str, Any]]]) -> None:
    """Keep each alias once, never equal to an entry's name; the old name of a renamed entry becomes an alias."""
    names = {report.name for report, _ in converted}
    owner: dict[str, str] = {}
    for report, curated in converted:
        aliases = list(curated.get("model_aliases", []))
        old = report.legacy_name.strip()
        if old != report.name and old not in aliases:
            aliases.insert(0, old)
        kept = []
        for alias in aliases:
            if alias == report.name:
                report.add("model_aliases", "dropped", alias, reason="same as the logical name")
            elif alias in names:
                report.add("model_aliases", "dropped", alias, reason="it is another entry's name")
            elif alias in owner:
                report.add("model_aliases", "dropped", alias, reason=f"already an alias of {owner[alias]!r}")
            else:
                owner[alias] = report.name
                kept.append(alias)
        if kept:
            curated["model_aliases"] = kept
        else:
            curated.pop("model_aliases", None)


def convert_entries(
    legacy: dict[str, dict[str, Any]], settings: Settings, hidden: dict[str, list[FieldChange]] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[EntryReport]]:
    """Convert legacy entries (by legacy name) into curated and discovered entries plus a report per entry.

    Pure: reads and writes no file. The result still has to pass :func:`registry.build_registry`.
    """
    hidden = hidden or {}
    names = _assign_names([raw["name"] for raw in legacy.values()])
    converted: list[tuple[EntryReport, dict[str, Any], dict[str, Any]]] = []
    for key, raw in legacy.items():
        report = EntryReport(legacy_name=raw["name"], name=names[raw["name"]])
        if report.name != raw["name"]:
            why = "names may not contain '/', whitespace or control characters"
            if report.name != raw["name"].strip():
                why += "; the old name is kept as a model alias"
            report.add("name", "changed", raw["name"], report.name, why)
        report.changes.extend(hidden.get(key, []))
        curated, discovered = _EntryConverter(raw, report, settings).convert()
        converted.append((report, curated, discovered))
    _settle_aliases([(report, curated) for report, curated, _ in converted])
    curated_out, discovered_out, reports = [], [], []
    for report, curated, discovered in converted:
        if len(discovered) > 1:
            discovered_out.append(discovered)
            report.layers.append("discovered")
        if len(curated) > 1 or len(discovered) == 1:
            curated_out.append(_ordered(curated))
            report.layers.insert(0, "curated")
        reports.append(report)
    return curated_out, discovered_out, reports


# Writing ----------------------------------------------------------------------------------------------------
def _entry_names(text: str | None) -> list[str] | None:
    """Entry names in a registry file's text; None when it cannot be parsed (unparsable counts as content)."""
    if text is None or not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(data, dict):
        data = data.get("models", [data])
    if not isinstance(data, list):
        return None
    return [str(e.get("name")) for e in data if isinstance(e, dict)] if data else []


def _protected(settings: Settings, before: dict[Path, str | None]) -> list[Path]:
    """Files an import would lose content from: layer files holding entries, else a legacy merged snapshot.

    A snapshot next to layer files is our derived view and is simply regenerated; a snapshot without them is
    a legacy single-file registry.
    """
    holding = [path for path, text in before.items() if text is not None and _entry_names(text) != []]
    layers = [path for path in holding if path != settings.snapshot_path]
    return layers or holding


def _write_pair(
    settings: Settings,
    texts: dict[Path, str],
    registry: Registry,
    report: ImportReport,
    *,
    force: bool,
    command: str,
) -> None:
    """Write both layers under both file locks as one journaled change, keeping every replaced file's content.

    Both layers are replaced in one change rather than through ``replace_layer_text`` one at a time: that
    validates each new layer against the other's *current* content (possibly legacy, invalid here), so a pair
    could fail half-written; and a crash between two separate writes would leave a mix of old and new files.
    The final pair was validated by the caller. A legacy merged snapshot being replaced is part of the change.
    """
    actor = audit.current_actor(settings)
    snapshot = settings.snapshot_path
    recover(settings)
    try:
        with lock_for(settings.curated_path), lock_for(settings.discovered_path), lock_for(snapshot):
            refuse_over_pending(settings, [*texts, snapshot])
            before = {path: read_current(path) for path in (*texts, snapshot)}
            protected = _protected(settings, before)
            if protected and not force:
                raise UsageError(
                    f"{', '.join(str(p) for p in protected)} already {'holds' if len(protected) == 1 else 'hold'} "
                    "a registry; nothing written. Re-run with --force to replace it (the current content is kept "
                    "as a revision: `imageworks-models history`, `imageworks-models rollback REV`)"
                )
            files = [
                FileChange(
                    path,
                    before[path],
                    text,
                    sorted(set(_entry_names(before[path]) or []) | set(_entry_names(text) or [])),
                )
                for path, text in texts.items()
            ]
            if snapshot in protected:
                new_snapshot = snapshot_text(registry)
                names = sorted(set(_entry_names(before[snapshot]) or []) | set(_entry_names(new_snapshot) or []))
                files.append(FileChange(snapshot, before[snapshot], new_snapshot, names))
            events = [
                ("registry_write", {"file": str(f.path), "command": command, "names": f.names})
                for f in files
                if f.path != snapshot and f.before != f.after
            ]
            applied = apply_change(
                settings,
                files,
                command=command,
                actor=actor,
                events=events,
                write_snapshot=None if snapshot in protected else lambda: _write_snapshot_locked(settings, registry),
            )
            report.revisions = {str(path): rev for path, rev in applied.revisions.items()}
            report.replaced = [str(p) for p in protected]
    except Timeout as exc:
        raise RegistryError(
            f"{settings.configs_dir}: another process holds a registry lock for over {WRITE_LOCK_TIMEOUT_S:.0f} s"
        ) from exc


def _write_snapshot_locked(settings: Settings, registry: Registry) -> None:
    """The merged snapshot, written while this process already holds the snapshot's lock."""
    atomic_write_text(settings.snapshot_path, snapshot_text(registry))


def _relabel(problem: str, settings: Settings, source: str) -> str:
    for layer, path in (("curated", settings.curated_path), ("discovered", settings.discovered_path)):
        prefix = f"{path}: "
        if problem.startswith(prefix):
            return f"{source} (converted, {layer} layer): {problem[len(prefix) :]}"
    return problem


def import_legacy(
    path: str | Path, settings: Settings, discovered_path: str | Path | None = None, force: bool = False
) -> ImportReport:
    """Convert a legacy registry (merged file, or curated ``path`` + ``discovered_path``) into our layer files.

    Validates the converted pair with the real merge before writing anything. Raises UsageError (exit 64) when
    the layer files (or a legacy merged snapshot) already hold entries and ``force`` is false, RegistryError
    (exit 3) for unreadable legacy files (``file:line:col`` for bad JSON) and ValidationError (exit 3) when the
    converted registry would be invalid. Returns the report of every change.
    """
    path = Path(path)
    discovered = Path(discovered_path) if discovered_path is not None else None
    if discovered is not None and discovered.resolve() == path.resolve():
        raise UsageError(f"{path} given as both the legacy curated and the legacy discovered file")
    sources = [str(path)] + ([str(discovered)] if discovered else [])
    report = ImportReport(
        sources=sources,
        curated_path=str(settings.curated_path),
        discovered_path=str(settings.discovered_path),
        snapshot_path=str(settings.snapshot_path),
    )
    legacy, hidden = _read_legacy(path, discovered, report.warnings)
    curated, discovered_entries, report.entries = convert_entries(legacy, settings, hidden)
    try:
        registry = build_registry(settings, curated, discovered_entries)
    except ValidationError as exc:
        problems = [_relabel(p, settings, str(path)) for p in exc.problems]
        raise ValidationError(
            f"{path}: the converted registry would be invalid; nothing written",
            [f"{path}: the converted registry would be invalid; nothing written (fix the legacy file):", *problems],
        ) from exc
    report.curated_count, report.discovered_count = len(curated), len(discovered_entries)
    resolved = [str(Path(source).resolve()) for source in sources]
    command = "import-legacy " + " ".join(resolved) + (" --force" if force else "")
    texts = {
        settings.curated_path: render_new_file(curated),
        settings.discovered_path: render_new_file(discovered_entries),
    }
    _write_pair(settings, texts, registry, report, force=force, command=command)
    return report
