"""``verify``, ``lock`` and ``unlock``: weight verification and version locks (exit 2 on drift, 7 on missing)."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from .app import JsonOpt, RootOpt, app, echo_json, service_for
from .fleet_cmds import RayAddressOpt, service_with_fleet

AlgorithmOpt = Annotated[
    str | None, typer.Option("--algorithm", help="sha256 (default; equals HF LFS sha256) or blake3.")
]


class ProgressBar:
    """A one-line progress bar with bytes/s on stderr (only on a terminal; silent in pipes and logs)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()

    def __call__(self, bytes_done: int, bytes_total: int, files_done: int, files_total: int, current: str) -> None:
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        fraction = bytes_done / bytes_total if bytes_total else 1.0
        bar = "#" * int(fraction * 30)
        sys.stderr.write(
            f"\r{self.label} [{bar:<30}] {fraction:6.1%} {bytes_done / 1e9:6.2f}/{bytes_total / 1e9:.2f} GB "
            f"{bytes_done / elapsed / 1e6:7.0f} MB/s files {files_done}/{files_total} "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _algorithm(value: str | None) -> str | None:
    if value not in (None, "sha256", "blake3"):
        raise typer.BadParameter(f"unknown algorithm {value!r}; use sha256 or blake3", param_hint="--algorithm")
    return value


@app.command("verify")
def verify_cmd(
    name: Annotated[str, typer.Argument(help="Logical name, alias or served id.")],
    fast: Annotated[
        bool, typer.Option("--fast", help="Re-hash only files whose size/mtime/ctime/inode changed.")
    ] = False,
    algorithm: AlgorithmOpt = None,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            help="Fleet mode: verify that node's copy (name or id; 'auto': the node serving it, else the least "
            "loaded node holding its weights). Without it, this root's copy is verified.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    ray_address: RayAddressOpt = None,
    root: RootOpt = None,
) -> None:
    """Hash the entry's weights and compare with its lock (exit 0 match/unpinned, 2 drift, 7 missing).

    In fleet mode --node verifies a node's copy against this root's lock (recorded here, naming the node;
    exit 8 when the node is unknown or lost); --node without fleet mode exits 64."""
    bar = ProgressBar(f"verify {name}" + (f" on node {node}" if node else ""))
    try:
        result = service_with_fleet(root, ray_address).verify(
            name,
            fast=fast,
            algorithm=_algorithm(algorithm),  # type: ignore[arg-type]
            progress=bar,
            node=node,
        )
    finally:
        bar.close()
    if as_json:
        echo_json(result.to_dict())
    else:
        typer.echo(result.format_text())
    if result.result == "drift":
        raise typer.Exit(2)


@app.command("lock")
def lock_cmd(
    name: Annotated[str, typer.Argument(help="Logical name, alias or served id.")],
    set_expected: Annotated[
        bool, typer.Option("--set-expected", help="Full verification, then pin its aggregate as the expected hash.")
    ] = False,
    algorithm: AlgorithmOpt = None,
    as_json: JsonOpt = False,
    root: RootOpt = None,
) -> None:
    """Lock an entry's version (with --set-expected: pin the current weights from a full read)."""
    bar = ProgressBar(f"lock {name}")
    try:
        result = service_for(root).lock(
            name, set_expected=set_expected, algorithm=_algorithm(algorithm) or "sha256", progress=bar
        )  # type: ignore[arg-type]
    finally:
        bar.close()
    if as_json:
        echo_json(result.to_dict() if result else {"name": name, "locked": True})
        return
    if result is None:
        typer.echo(f"{name}: locked (expected hash unchanged)")
        return
    typer.echo(f"{result.name}: locked at aggregate sha256 {result.aggregate}")
    typer.echo(f"  {result.file_count} files, {result.total_bytes:,} bytes; manifest written to {result.lock_file}")
    typer.echo("  commit configs/model_registry.curated.json and the manifest together")


@app.command("unlock")
def unlock_cmd(
    name: Annotated[str, typer.Argument(help="Logical name, alias or served id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (incident report reference); required.")] = "",
    root: RootOpt = None,
) -> None:
    """Unlock an entry (keeps the expected hash; the reason goes to the audit log)."""
    service = service_for(root)
    service.unlock(name, reason=reason)
    typer.echo(f"{name}: unlocked (reason recorded in {service.settings.audit_log_path})")
