"""Imports every command module so each registers its commands on the shared app."""

from . import registry_cmds  # noqa: F401
from . import api_cmds  # noqa: F401
from . import probe_cmds  # noqa: F401
from . import verify_cmds  # noqa: F401
from . import runtime_cmds  # noqa: F401
