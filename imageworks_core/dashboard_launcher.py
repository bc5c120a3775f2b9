"""``imageworks-dashboard``: serve the Streamlit dashboard on 127.0.0.1 (never on all interfaces by default).

The Streamlit app sits beside this package: ``dashboard/`` in a checkout, ``imageworks_dashboard/`` when installed
from the wheel (which ships the checkout's ``dashboard/`` under that name). Its settings (upload limit, XSRF
protection, no error details in the browser) are in ``.streamlit/config.toml`` next to ``app.py``, which Streamlit
reads as the script-level config wherever it is started from.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .settings import get_settings


def _find_app() -> Path:
    """The dashboard's ``app.py``: the installed copy first, then the checkout's (returned even when missing)."""
    base = Path(__file__).resolve().parent.parent
    for folder in ("imageworks_dashboard", "dashboard"):
        if (base / folder / "app.py").is_file():
            return base / folder / "app.py"
    return base / "dashboard" / "app.py"


DASHBOARD_APP = _find_app()


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
    if not DASHBOARD_APP.is_file():
        typer.echo(f"Error: the dashboard app is missing ({DASHBOARD_APP}); reinstall imageworks-model-loader", err=True)
        raise typer.Exit(1)
    settings = get_settings(root)
    os.environ["IMAGEWORKS_ROOT"] = str(settings.root)
    port = port or settings.dashboard_port
    typer.echo(f"ImageWorks dashboard on http://{address}:{port}  (root: {settings.root})")
    # exec: signals (Ctrl-C, SIGTERM) go straight to Streamlit. The working dir is the app's own, so no stray
    # .streamlit/config.toml in the caller's directory is read as the project config.
    os.chdir(DASHBOARD_APP.parent)
    argv = streamlit_argv(port, address)
    os.execv(argv[0], argv)


def main() -> None:
    """Console-script entry point."""
    typer.run(_serve)
