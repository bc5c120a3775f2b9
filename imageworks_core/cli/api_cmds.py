"""``imageworks-models serve``: the loader API and single-port proxy (FastAPI + uvicorn)."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import RootOpt, app, settings_for
from .fleet_cmds import RayAddressOpt

MAX_CONNECTIONS = 128
"""Concurrent connections uvicorn serves; beyond it, 503 (each holds at most 1 MiB unbudgeted body)."""


@app.command("serve")
def serve_cmd(
    host: Annotated[
        str, typer.Option(help="Bind address (loopback by default; others need IMAGEWORKS_API_TOKEN).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8100,
    watch: Annotated[bool, typer.Option("--watch/--no-watch", help="Hot-reload when configs/ change.")] = True,
    ray_address: RayAddressOpt = None,
    root: RootOpt = None,
) -> None:
    """Serve /v1/models, /v1/select, /v1/verify, /v1/probe/vision, activation and the OpenAI proxy.

    In fleet mode (--ray-address or IMAGEWORKS_RAY_ADDRESS) the one port routes to every slot of the fleet; a
    cluster that does not answer ends the server at start (exit 8)."""
    import uvicorn

    from ..api import create_app

    settings = settings_for(root)
    api = create_app(settings, bind_host=host, watch=watch, ray_address=ray_address)
    typer.echo(f"ImageWorks API on http://{host}:{port}  (root: {settings.root})", err=True)
    # Bounded connections: with the guard's body budget this caps what concurrent clients can make us hold.
    uvicorn.run(
        api, host=host, port=port, log_level="warning", access_log=False, limit_concurrency=MAX_CONNECTIONS
    )
