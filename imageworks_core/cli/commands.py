"""Imports every command module so each registers its commands on the shared app."""

from . import (
    api_cmds,  # noqa: F401
    fleet_cmds,  # noqa: F401
    probe_cmds,  # noqa: F401
    registry_cmds,  # noqa: F401
    runtime_cmds,  # noqa: F401
    verify_cmds,  # noqa: F401
)
