"""``imageworks.model_loader.models``: the entry shape older ImageWorks code reads, as a view of our entries.

:class:`RegistryEntry` carries the attributes consumers of the older API use (``name``, ``backend``,
``backend_config.port``, ``capabilities.get("vision")``, ``roles``, ``role_priority.get(role, 0)``,
``served_model_id``, ``deprecated``, ``metadata``, ``license``, ``family``, ``download_path``, ...), built by
:meth:`RegistryEntry.from_model` from an :class:`imageworks_core.schema.ModelEntry`. It holds no rule of its
own: capability names are translated with the importer's table (:mod:`imageworks_core.legacy`), a process
backend's port and host are the single port's, selection and validation stay in the core. ``model`` keeps
the full entry for anything the older shape cannot say.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imageworks_core.errors import CapabilityError
from imageworks_core.legacy import LEGACY_CAPABILITY_ALIASES, capability_for
from imageworks_core.schema import ModelEntry
from imageworks_core.selection import check_capabilities
from imageworks_core.settings import Settings

__all__ = [
    "ArtifactFile",
    "Artifacts",
    "BackendConfig",
    "ChatTemplate",
    "GenerationDefaults",
    "PerformanceLastSample",
    "PerformanceSummary",
    "Probes",
    "RegistryEntry",
    "SelectedModel",
    "VersionLock",
    "VisionProbe",
    "capabilities_view",
    "capability_supported",
]


@dataclass
class BackendConfig:
    """Where the backend listens. For vllm / lmdeploy entries port and host are the single port's."""

    port: int
    model_path: str
    extra_args: list[str] = field(default_factory=list)
    host: str | None = None
    base_url: str | None = None


@dataclass
class ArtifactFile:
    path: str
    sha256: str


@dataclass
class Artifacts:
    """Per-file sha256 from the download record; the aggregate is the lock's expected hash (our format)."""

    aggregate_sha256: str
    files: list[ArtifactFile] = field(default_factory=list)


@dataclass
class ChatTemplate:
    source: str  # embedded | external
    path: str | None
    sha256: str | None


@dataclass
class GenerationDefaults:
    max_tokens: int | None = None
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop_sequences: list[str] = field(default_factory=list)
    context_window: int | None = None


@dataclass
class VersionLock:
    """``last_verified``: when the latest verification ran (history DB), whatever its result."""

    locked: bool
    expected_aggregate_sha256: str | None
    last_verified: str | None


@dataclass
class PerformanceLastSample:
    ttft_ms: float | None
    tokens_generated: int | None
    duration_ms: float | None


@dataclass
class PerformanceSummary:
    """Not recorded here: always empty (kept so attribute access keeps working)."""

    rolling_samples: int = 0
    ttft_ms_avg: float | None = None
    throughput_toks_per_s_avg: float | None = None
    last_sample: PerformanceLastSample | None = None


@dataclass
class VisionProbe:
    vision_ok: bool
    timestamp: str
    probe_version: str
    latency_ms: float | None
    notes: str | None


@dataclass
class Probes:
    """``vision``: the latest ``probe-vision`` result from the history DB, None when never probed."""

    vision: VisionProbe | None = None


@dataclass
class SelectedModel:
    """What ``service.select_model`` returns: where to send requests and under which model id."""

    logical_name: str
    endpoint_url: str
    internal_model_id: str
    backend: str
    capabilities: dict[str, bool]


def capabilities_view(entry: ModelEntry) -> dict[str, bool]:
    """The entry's capabilities under every legacy key (``vision``, ``vl``, ``multimodal``, ``embedding``,
    ``thinking``, ``tool-use``, ...), lower case, underscore and hyphen spellings, as the older API answered."""
    view: dict[str, bool] = {}
    for capability, aliases in LEGACY_CAPABILITY_ALIASES.items():
        value = bool(getattr(entry.capabilities, capability))
        for alias in aliases:
            view[alias] = value
            view[alias.replace("_", "-")] = value
    return view


def capability_supported(capabilities: dict[str, bool], requirement: str) -> bool:
    """Whether a capabilities mapping (as :func:`capabilities_view` gives it) satisfies ``requirement``, by any
    legacy spelling; False for names that are no capability."""
    canonical = capability_for(requirement) if requirement else None
    return bool(canonical and capabilities.get(canonical))


def _role_priority(entry: ModelEntry) -> dict[str, int]:
    # An integer means every role; the older shape is a mapping, so it is stated for each role the entry has
    # (selection only ever asks an entry for a role it has).
    if isinstance(entry.role_priority, int):
        return dict.fromkeys(entry.roles, entry.role_priority)
    return dict(entry.role_priority)


def _source(entry: ModelEntry) -> tuple[dict[str, Any] | None, str | None]:
    source = entry.source
    if source.provider == "huggingface":
        data = {"huggingface_id": source.repo_id, "revision": source.revision}
        provider: str | None = "hf"
    else:
        data = {"provider": source.provider, "repo_id": source.repo_id, "revision": source.revision}
        provider = source.provider
    data = {k: v for k, v in data.items() if v}
    return (data or None), provider


@dataclass
class RegistryEntry:
    """One entry in the older API's shape (see the module docstring); mutate it and call
    ``registry.save_registry()`` to write the supported fields back (``registry.WRITABLE_FIELDS``)."""

    name: str
    display_name: str | None
    backend: str  # vllm | lmdeploy | ollama | openai | unassigned
    backend_config: BackendConfig
    capabilities: dict[str, bool]
    artifacts: Artifacts
    chat_template: ChatTemplate
    version_lock: VersionLock
    performance: PerformanceSummary
    probes: Probes
    profiles_placeholder: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    served_model_id: str | None = None
    model_aliases: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    license: str | None = None
    source: dict[str, Any] | None = None
    deprecated: bool = False
    family: str | None = None
    source_provider: str | None = None
    quantization: str | None = None
    backend_alternatives: list[str] = field(default_factory=list)
    role_priority: dict[str, int] = field(default_factory=dict)  # per role, higher wins, a missing role is 0
    download_format: str | None = None
    download_location: str | None = None
    download_path: str | None = None
    download_size_bytes: int | None = None
    download_files: list[str] = field(default_factory=list)
    download_directory_checksum: str | None = None
    downloaded_at: str | None = None
    last_accessed: str | None = None
    testing: bool = False
    model: ModelEntry | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_model(
        cls,
        entry: ModelEntry,
        *,
        settings: Settings,
        last_verification: dict[str, Any] | None = None,
        last_probe: dict[str, Any] | None = None,
    ) -> RegistryEntry:
        """The older shape of ``entry``; the two history rows fill ``version_lock.last_verified`` and
        ``probes.vision``."""
        config = entry.backend_config
        process = entry.is_process_backend
        lock = entry.version_lock
        expected = lock.expected_aggregate_sha256 if lock else None
        template = entry.chat_template
        source, provider = _source(entry)
        defaults = {k: v for k, v in entry.generation_defaults.items() if k in GenerationDefaults.__dataclass_fields__}
        probe = None
        if last_probe:
            probe = VisionProbe(
                vision_ok=bool(last_probe.get("vision_ok")),
                timestamp=str(last_probe.get("at") or ""),
                probe_version="imageworks-models probe-vision",
                latency_ms=last_probe.get("latency_ms"),
                notes=None,
            )
        return cls(
            name=entry.name,
            display_name=entry.display_name or entry.name,
            backend=entry.backend or "unassigned",
            backend_config=BackendConfig(
                port=settings.vllm_port if process else (config.port or 0),
                model_path=entry.download_path or "",
                extra_args=list(config.extra_args),
                host=settings.vllm_host if process else config.host,
                base_url=config.base_url,
            ),
            capabilities=capabilities_view(entry),
            artifacts=Artifacts(
                aggregate_sha256=expected or "",
                files=[
                    ArtifactFile(path=str(f.get("path", "")), sha256=str(f.get("sha256", "")))
                    for f in entry.download_files or []
                    if f.get("sha256")
                ],
            ),
            chat_template=ChatTemplate(
                source="external"
                if template and template.source == "file"
                else (template and template.source) or "embedded",
                path=template.path if template else None,
                sha256=template.sha256 if template else None,
            ),
            version_lock=VersionLock(
                locked=entry.locked,
                expected_aggregate_sha256=expected,
                last_verified=(last_verification or {}).get("at"),
            ),
            performance=PerformanceSummary(),
            probes=Probes(vision=probe),
            profiles_placeholder=entry.metadata.get("profiles_placeholder"),
            metadata=dict(entry.metadata),
            generation_defaults=GenerationDefaults(**defaults),
            served_model_id=entry.served_model_id,
            model_aliases=list(entry.model_aliases),
            roles=list(entry.roles),
            license=entry.license,
            source=source,
            deprecated=entry.deprecated,
            family=entry.family,
            source_provider=provider,
            quantization=entry.quantization,
            backend_alternatives=list(entry.metadata.get("backend_alternatives") or []),
            role_priority=_role_priority(entry),
            download_format=entry.download_format,
            download_location=entry.download_location,
            download_path=entry.download_path,
            download_size_bytes=entry.download_size_bytes,
            download_files=[str(f.get("path", "")) for f in entry.download_files or []],
            downloaded_at=entry.downloaded_at.isoformat() if entry.downloaded_at else None,
            testing=entry.testing,
            model=entry,
        )

    def require_capabilities(self, required: list[str]) -> None:
        """ValueError naming what this entry lacks of ``required`` (legacy capability names accepted)."""
        if self.model is None:
            raise ValueError(f"{self.name!r} was not read from the registry; load it with registry.get_entry")
        try:
            check_capabilities(self.model, [capability_for(c) or c for c in required])
        except CapabilityError as exc:
            raise ValueError(str(exc)) from exc
