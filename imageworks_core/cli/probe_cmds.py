"""Vision probe command: probe-vision."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import EXIT_BACKEND
from .app import JsonOpt, RootOpt, app, echo_json
from .fleet_cmds import RayAddressOpt, service_with_fleet


@app.command("probe-vision")
def probe_vision_cmd(
    name: Annotated[str, typer.Argument(help="Logical name, alias or served id.")],
    image: Annotated[
        Path | None, typer.Argument(help="Image to send (any format Pillow reads); default: the canonical image.")
    ] = None,
    activate: Annotated[
        bool, typer.Option("--activate", help="Activate the entry first when it is not the active backend.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Seconds to wait for each request [default: 60].")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Answer budget; reasoning models need room [default: 256].")
    ] = None,
    as_json: JsonOpt = False,
    ray_address: RayAddressOpt = None,
    root: RootOpt = None,
) -> None:
    """Prove a model really sees: send an image, check the answer (exit 0 vision_ok, 6 failed, 64 bad image).

    In fleet mode a model ImageWorks starts is probed in the slot serving it, through its node's agent (exit 8
    naming the node when that node is lost); --activate places it first when it runs nowhere."""
    from ..probe import DEFAULT_MAX_TOKENS  # imported on use: httpx and Pillow are slow to import

    result = service_with_fleet(root, ray_address).probe(
        name,
        image,
        activate=activate,
        timeout_s=timeout,
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
    )
    if as_json:
        echo_json(result.to_dict())
    else:
        typer.echo(result.format_text())
    if not result.vision_ok:
        typer.echo(f"error: vision probe of {result.name!r} failed: {result.error}", err=True)
        raise typer.Exit(EXIT_BACKEND)
