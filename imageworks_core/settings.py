"""The one settings object: deployment root, every derived path, and every environment setting.

Resolution order for the root: an explicit ``root`` argument (the CLI's ``--root``), else ``IMAGEWORKS_ROOT``,
else the current directory. Nothing else in the code base hard-codes a path under the root.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Environment-driven settings; paths are derived properties of ``root``."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=True, extra="ignore")

    root: Path = Field(default_factory=Path.cwd, validation_alias="IMAGEWORKS_ROOT")
    profile: str | None = Field(default=None, validation_alias="IMAGEWORKS_PROFILE")
    model_root: Path | None = Field(default=None, validation_alias="IMAGEWORKS_MODEL_ROOT")
    dashboard_port: int = Field(default=8501, validation_alias="IMAGEWORKS_DASHBOARD_PORT")
    api_token: str | None = Field(default=None, validation_alias="IMAGEWORKS_API_TOKEN")
    # API request guard (see api_security): extra Host names and browser Origins, and input size bounds.
    allowed_hosts: str = Field(default="", validation_alias="IMAGEWORKS_ALLOWED_HOSTS")
    allowed_origins: str = Field(default="", validation_alias="IMAGEWORKS_ALLOWED_ORIGINS")
    max_body_mb: float = Field(default=32.0, gt=0, validation_alias="IMAGEWORKS_MAX_BODY_MB")
    max_image_pixels: int = Field(default=40_000_000, gt=0, validation_alias="IMAGEWORKS_MAX_IMAGE_PIXELS")
    actor: str | None = Field(default=None, validation_alias="IMAGEWORKS_ACTOR")
    debug: str = Field(default="", validation_alias="IMAGEWORKS_DEBUG")
    # The Hugging Face Hub, read per call (huggingface_hub itself reads these once, at import).
    hf_endpoint: str | None = Field(default=None, validation_alias="HF_ENDPOINT")
    hf_hub_offline: str = Field(default="", validation_alias="HF_HUB_OFFLINE")
    transformers_offline: str = Field(default="", validation_alias="TRANSFORMERS_OFFLINE")
    # Single-port runtime (names kept from the original chat proxy so existing deployments carry over).
    vllm_host: str = Field(default="127.0.0.1", validation_alias="CHAT_PROXY_VLLM_HOST")
    vllm_port: int = Field(default=24001, validation_alias="CHAT_PROXY_VLLM_PORT")
    vllm_start_timeout_s: float = Field(default=600.0, validation_alias="CHAT_PROXY_VLLM_START_TIMEOUT_S")
    vllm_stop_timeout_s: float = Field(default=15.0, validation_alias="CHAT_PROXY_VLLM_STOP_TIMEOUT_S")
    vllm_health_path: str = Field(default="/health", validation_alias="CHAT_PROXY_VLLM_HEALTH_PATH")
    vllm_gpu_memory_utilization: float | None = Field(
        default=None, validation_alias="CHAT_PROXY_VLLM_GPU_MEMORY_UTILIZATION"
    )
    vllm_extra_args: str = Field(default="", validation_alias="CHAT_PROXY_VLLM_EXTRA_ARGS")
    gpu_overhead_factor: float = Field(default=1.2, validation_alias="IMAGEWORKS_GPU_OVERHEAD_FACTOR")
    cuda_visible_devices: str | None = Field(default=None, validation_alias="CUDA_VISIBLE_DEVICES")
    # Older ImageWorks' extra test-model name patterns (regular expressions, comma-separated): names matching
    # one are imported as testing and reported as test models by imageworks.model_loader.testing_filters.
    test_model_patterns: str = Field(default="", validation_alias="IMAGEWORKS_TEST_MODEL_PATTERNS")

    @property
    def debug_enabled(self) -> bool:
        """``IMAGEWORKS_DEBUG`` set to anything but empty or 0: tracebacks for unexpected errors."""
        return self.debug.strip() not in ("", "0")

    @property
    def hub_offline(self) -> bool:
        """``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is on (1, on, yes, true)."""
        flags = (self.hf_hub_offline, self.transformers_offline)
        return any(value.strip().upper() in {"1", "ON", "YES", "TRUE"} for value in flags)

    def model_post_init(self, __context: object) -> None:
        self.root = self.root.expanduser().resolve()

    # Paths under the root -------------------------------------------------------------------------------
    @property
    def configs_dir(self) -> Path:
        return self.root / "configs"

    @property
    def curated_path(self) -> Path:
        return self.configs_dir / "model_registry.curated.json"

    @property
    def discovered_path(self) -> Path:
        return self.configs_dir / "model_registry.discovered.json"

    @property
    def snapshot_path(self) -> Path:
        return self.configs_dir / "model_registry.json"

    @property
    def locks_dir(self) -> Path:
        return self.configs_dir / "locks"

    @property
    def locations_path(self) -> Path:
        return self.configs_dir / "locations.json"

    @property
    def staging_dir(self) -> Path:
        return self.root / "_staging"

    @property
    def active_state_path(self) -> Path:
        return self.staging_dir / "active_vllm.json"

    @property
    def activation_lock_path(self) -> Path:
        return self.staging_dir / "active_vllm.lock"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def audit_log_path(self) -> Path:
        return self.logs_dir / "model_loader.log"

    @property
    def backend_logs_dir(self) -> Path:
        return self.logs_dir / "backends"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def history_db_path(self) -> Path:
        return self.state_dir / "history.sqlite3"

    def resolve_path(self, value: str | os.PathLike[str]) -> Path:
        """Resolve a registry path: ``~`` expanded, relative paths taken from the root."""
        path = Path(os.path.expandvars(str(value))).expanduser()
        return path if path.is_absolute() else self.root / path

    def env_sources(self) -> list[tuple[str, str, str]]:
        """Every setting as (env var, effective value, 'env' or 'default') for display."""
        rows = []
        for name, field in type(self).model_fields.items():
            alias = field.validation_alias
            if not isinstance(alias, str):
                continue
            value = getattr(self, name)
            rows.append((alias, "" if value is None else str(value), "env" if alias in os.environ else "default"))
        return rows


def get_settings(root: str | os.PathLike[str] | None = None) -> Settings:
    """Settings for ``root`` (when given) or from the environment."""
    if root is not None:
        return Settings(IMAGEWORKS_ROOT=Path(root))
    return Settings()


_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
SLUG_MAX_BYTES = 210
"""Longest slug: every name the schema accepts (200 characters) keeps its full slug (+ 9-byte hash suffix), and
the longest name derived from a slug (a lock manifest's temp file, 28 bytes more) stays under NAME_MAX (255)."""


def slugify(name: str) -> str:
    """A file-name-safe ASCII slug of at most ``SLUG_MAX_BYTES`` (``qwen3-vl_(FP8)`` -> ``qwen3-vl_FP8-<hash>``)."""
    slug = re.sub(r"_+", "_", _SLUG_UNSAFE.sub("_", name)).strip("._-") or "entry"
    if slug != name or len(slug) > SLUG_MAX_BYTES:
        # Two names that differ only in unsafe characters, or only past the cut, must not share a file.
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        slug = f"{slug[: SLUG_MAX_BYTES - 9].rstrip('._-')}-{digest}"
    return slug
