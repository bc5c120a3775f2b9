"""Fleet settings: the Ray address and, per node, its deployment root, ``max_models`` and weights paths.

- ``IMAGEWORKS_RAY_ADDRESS`` (or ``--ray-address``): the Ray cluster to join (``auto``, or ``host:port`` of the
  head started with ``ray start --head``). Unset: single-box mode, exactly as without fleet mode.
- ``configs/fleet.json`` under the controller's root (optional)::

      {"defaults": {"max_models": 1},
       "nodes": {"gpu-box-2": {"root": "/srv/imageworks", "max_models": 2,
                               "idle_ttl_s": 900, "locations": {"linux_wsl": "/data/weights"}}}}

  A node is named by its Ray node name (``ray start --node-name``; Ray's default is the node's IP address).
  ``root`` is the node's deployment root (its slots' state, logs, audit log and history; relative weights paths
  resolve there); default: the controller's root path. ``max_models``: how many models the node serves at once
  (a request through the API for another model then evicts the node's least recently used one).
  ``idle_ttl_s``: seconds without a request after which the node's agent stops a slot (reason "idle for N s",
  audit event ``fleet_idle_stop`` in the node's audit log); default none (never), read when a slot starts.
  ``locations``: where each download location (an entry's ``download_location``) lives on that node, so an
  entry downloaded at the controller resolves to the node's copy of the same files.

Bad content is a one-line UsageError (exit 64) naming the file, the field, the value and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..errors import UsageError
from ..schema import ModelEntry
from ..settings import Settings

FLEET_CONFIG_FILE = "fleet.json"
"""The per-node settings file, in the controller root's ``configs/``."""


class FleetSettings(BaseSettings):
    """Fleet settings read from the environment."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=True, extra="ignore")

    ray_address: str | None = Field(default=None, validation_alias="IMAGEWORKS_RAY_ADDRESS")


def ray_address(explicit: str | None = None) -> str | None:
    """The Ray address fleet mode uses: ``explicit`` (``--ray-address``), else ``IMAGEWORKS_RAY_ADDRESS``; None
    (or empty) means single-box mode."""
    value = explicit if explicit is not None else FleetSettings().ray_address
    return value.strip() or None if value else None


class NodeConfig(BaseModel):
    """One node's settings (every field optional: the defaults' value, else the built-in one applies)."""

    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(default=None, description="the node's deployment root (default: the controller's)")
    max_models: int | None = Field(default=None, ge=1, description="models served at once on the node (default 1)")
    idle_ttl_s: float | None = Field(
        default=None, gt=0, description="stop a slot after this many seconds without a request (default: never)"
    )
    locations: dict[str, str] = Field(
        default_factory=dict, description="download location name (or recorded root) -> its path on this node"
    )


class FleetConfig(BaseModel):
    """The content of ``configs/fleet.json``."""

    model_config = ConfigDict(extra="forbid")

    defaults: NodeConfig = Field(default_factory=NodeConfig)
    nodes: dict[str, NodeConfig] = Field(default_factory=dict)

    def for_node(self, name: str, controller_root: Path) -> ResolvedNode:
        """The settings of node ``name``: its own, else the defaults, else the built-in values."""
        own = self.nodes.get(name, NodeConfig())
        return ResolvedNode(
            name=name,
            root=own.root or self.defaults.root or str(controller_root),
            max_models=own.max_models or self.defaults.max_models or 1,
            idle_ttl_s=own.idle_ttl_s if own.idle_ttl_s is not None else self.defaults.idle_ttl_s,
            locations={**self.defaults.locations, **own.locations},
        )


class ResolvedNode(BaseModel):
    """A node's effective settings (see :meth:`FleetConfig.for_node`)."""

    name: str
    root: str
    max_models: int
    idle_ttl_s: float | None = None
    locations: dict[str, str]


def fleet_config_path(settings: Settings) -> Path:
    """``configs/fleet.json`` under the controller's root."""
    return settings.configs_dir / FLEET_CONFIG_FILE


def load_fleet_config(settings: Settings) -> FleetConfig:
    """The fleet config (defaults when the file does not exist); UsageError naming the problem otherwise."""
    path = fleet_config_path(settings)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return FleetConfig()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc}); fix the file or remove it") from exc
    try:
        return FleetConfig.model_validate(data)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        raise UsageError(
            f"{path}: {where}: {problem['msg']} (value {problem.get('input')!r}); expected "
            '{"defaults": {...}, "nodes": {"NODE": {"root": "/path", "max_models": 1, "idle_ttl_s": 900, '
            '"locations": {"name": "/path"}}}} (idle_ttl_s: seconds > 0, or leave it out to never stop an idle model)'
        ) from exc


def node_download_path(entry: ModelEntry, settings: Settings, node: ResolvedNode) -> str | None:
    """The entry's ``download_path`` as the node must see it.

    When the entry's ``download_location`` is mapped for the node, the part of the path below that location's
    root at the controller is joined to the node's path for it. Otherwise the path goes as written: a relative
    path resolves against the node's root, ``~`` against the home of the user running the node agent.
    """
    if not entry.download_path:
        return None
    location = entry.download_location
    if location and location in node.locations:
        from ..download import location_roots  # imported here: the downloader pulls in the Hub client

        try:
            roots = location_roots(settings)
        except UsageError:
            roots = {}
        controller_root = roots.get(location) or (Path(location).expanduser() if "/" in location else None)
        path = settings.resolve_path(entry.download_path)
        if controller_root is not None and path.is_relative_to(controller_root):
            below = PurePosixPath(path.relative_to(controller_root).as_posix())
            return str(PurePosixPath(node.locations[location]) / below)
    return entry.download_path
