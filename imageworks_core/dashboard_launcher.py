"""``imageworks-dashboard``: serve the Streamlit dashboard on 127.0.0.1 (never on all interfaces by default)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .settings import get_settings

DASHBOARD_APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"


def streamlit_argv(port: int, address: str = "127.0.0.1", headless: bool = True) -> list[str]:
    """The argv that serves the dashboard (also used by the browser tests)."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(DASHBOARD_APP),
        "--server.address",
        address,
        "--server.port",
        str(port),
        "--server.headless",
        "true" if headless else "false",
        "--browser.gatherUsageStats",
        "false",
    ]


def _serve(
    port: Annotated[int | None, typer.Option(help="Port (default $IMAGEWORKS_DASHBOARD_PORT, else 8501).")] = None,
    root: Annotated[Path | None, typer.Option(help="Deployment root (default $IMAGEWORKS_ROOT or cwd).")] = None,
    address: Annotated[str, typer.Option(help="Bind address; keep 127.0.0.1 unless behind an auth proxy.")] = "127.0.0.1",
) -> None:
    """Start the ImageWorks dashboard."""
    settings = get_settings(root)
    os.environ["IMAGEWORKS_ROOT"] = str(settings.root)
    port = port or settings.dashboard_port
    typer.echo(f"ImageWorks dashboard on http://{address}:{port}  (root: {settings.root})")
    # exec: signals (Ctrl-C, SIGTERM) go straight to Streamlit; the dashboard's working dir is the app's.
    os.chdir(DASHBOARD_APP.parent.parent)
    argv = streamlit_argv(port, address)
    os.execv(argv[0], argv)


def main() -> None:
    """Console-script entry point."""
    typer.run(_serve)
