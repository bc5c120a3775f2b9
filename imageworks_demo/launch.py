"""How to start the demo backend: one helper for registry entries, tests and benchmarks.

A test or benchmark that builds its own argv drifts from the registry's; both come from here.
"""

from __future__ import annotations

import sys

SERVER_MODULE = "imageworks_demo.server"
"""The module ``python -m`` runs; also what a process listing shows, to find demo backends by command line."""


def demo_launch(*flags: str) -> list[str]:
    """A registry ``backend_config.launch`` template that runs the demo backend (``flags``: its fault switches)."""
    return [
        "{python}",
        "-m",
        SERVER_MODULE,
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--served-model-name",
        "{served_model_id}",
        *flags,
    ]


def demo_argv(port: int, *flags: str, host: str = "127.0.0.1") -> list[str]:
    """The argv that starts the demo backend directly on ``host:port`` with this interpreter."""
    return [sys.executable, "-m", SERVER_MODULE, "--host", host, "--port", str(port), *flags]
