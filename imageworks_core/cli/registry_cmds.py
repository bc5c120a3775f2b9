"""Registry commands: list, show, validate, schema, select, history, rollback, import-legacy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import history
from ..errors import UsageError
from ..launch import preview_launch
from ..registry import Registry, filter_entries, load_registry, write_snapshot
from ..schema import CAPABILITY_NAMES, ModelEntry, json_schema
from ..selection import endpoint_for
from ..service import EntryStatus
from .app import JsonOpt, RootOpt, app, echo_json, format_table, service_for, settings_for


def entry_summary(registry: Registry, entry: ModelEntry, status: EntryStatus) -> dict:
    """The row ``list`` shows for an entry (also its JSON form)."""
    verification, probe = status.last_verification, status.last_probe
    return {
        "name": entry.name,
        "backend": entry.backend,
        "served_model_id": entry.effective_served_id,
        "roles": entry.roles,
        "capabilities": entry.capabilities.enabled(),
        "lock": status.lock,
        "weights": status.weights,
        "last_verify": verification["result"] if verification else "never",
        "last_verify_at": verification["at"] if verification else None,
        "last_probe": (None if not probe else ("vision_ok" if probe["vision_ok"] else "failed")),
        "last_probe_at": probe["at"] if probe else None,
        "testing": entry.testing,
        "deprecated": entry.deprecated,
        "layer": registry.layer_of(entry.name),
    }


@app.command("list")
def list_cmd(
    role: Annotated[str | None, typer.Option(help="Only entries with this role.")] = None,
    capability: Annotated[
        str | None, typer.Option(help=f"Only entries with this capability ({', '.join(CAPABILITY_NAMES)}).")
    ] = None,
    backend: Annotated[str | None, typer.Option(help="Only entries of this backend.")] = None,
    profile: Annotated[str | None, typer.Option(help="Only entries in this deployment profile.")] = None,
    include_testing: Annotated[
        bool, typer.Option("--include-testing", help="Also show testing/deprecated entries.")
    ] = False,
    as_json: JsonOpt = False,
    root: RootOpt = None,
) -> None:
    """List the merged registry (curated over discovered)."""
    if capability and capability not in CAPABILITY_NAMES:
        raise UsageError(f"unknown capability {capability!r}; valid: {', '.join(CAPABILITY_NAMES)}")
    service = service_for(root)
    registry = service.registry
    entries = filter_entries(
        registry, role=role, capability=capability, backend=backend, profile=profile, include_testing=include_testing
    )
    statuses = service.statuses(entries)
    rows = [entry_summary(registry, e, statuses[e.name]) for e in entries]
    if as_json:
        echo_json(rows)
        return
    table = [
        (
            r["name"] + (" [testing]" if r["testing"] else "") + (" [deprecated]" if r["deprecated"] else ""),
            r["backend"] or "-",
            r["served_model_id"],
            ",".join(r["roles"]) or "-",
            ",".join(r["capabilities"]) or "-",
            r["lock"],
            r["weights"],
            r["last_verify"],
            r["last_probe"] or "never",
        )
        for r in rows
    ]
    headers = ("NAME", "BACKEND", "SERVED ID", "ROLES", "CAPABILITIES", "LOCK", "WEIGHTS", "VERIFIED", "PROBE")
    typer.echo(format_table(headers, table))
    hidden = len(registry) - len(entries)
    typer.echo(f"\n{len(entries)} entries" + (f" ({hidden} hidden by filters)" if hidden else ""))


_CELL_MAX = 120


def _cell(text: str) -> str:
    """A value as one table cell: on one line, cut at ``_CELL_MAX`` characters (a licence text in metadata
    would otherwise widen every row); ``--json`` prints it whole."""
    text = " ".join(text.split())
    return text if len(text) <= _CELL_MAX else text[: _CELL_MAX - 1] + "…"


@app.command("show")
def show_cmd(
    name: Annotated[str, typer.Argument(help="Logical name, alias or served id.")],
    as_json: JsonOpt = False,
    root: RootOpt = None,
) -> None:
    """Show one merged entry and the layer each field came from."""
    service = service_for(root)
    settings = service.settings
    registry = service.registry
    entry = registry.get(name)
    provenance = registry.provenance(entry.name)
    data = entry.model_dump(mode="json")
    status = service.status(entry.name)
    extra = {
        "endpoint": endpoint_for(entry, settings) if entry.backend else None,
        "launch_argv": preview_launch(entry, settings),
        "weights": status.weights,
        "last_verification": status.last_verification,
        "last_probe": status.last_probe,
    }
    if as_json:
        echo_json({"entry": data, "provenance": provenance, "layer": registry.layer_of(entry.name), **extra})
        return
    typer.echo(f"{entry.name}  ({registry.layer_of(entry.name)})")
    rows = []
    for path, layer in provenance.items():
        value: Any = data
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if layer == "default" and value in (None, [], {}, False):
            continue
        rows.append((path, _cell(json.dumps(value, default=str, ensure_ascii=False)), layer))
    typer.echo(format_table(("FIELD", "VALUE", "FROM"), rows))
    if entry.license or entry.family or entry.metadata:
        typer.echo(
            f"\nprovenance (kept from the source, never used for decisions): license {entry.license or '-'}, "
            f"family {entry.family or '-'}, {len(entry.metadata)} metadata key(s) (metadata.* above; --json in full)"
        )
    typer.echo(f"\nendpoint: {extra['endpoint'] or '-'}")
    if extra["launch_argv"]:
        typer.echo("launch argv: " + json.dumps(extra["launch_argv"]))
    typer.echo(f"weights: {extra['weights']}")
    verification = extra["last_verification"]
    typer.echo(
        f"last verification: {verification['result']} at {verification['at']}{_on_node(verification)}"
        if verification
        else "last verification: never"
    )
    probe = extra["last_probe"]
    typer.echo(
        f"last probe: vision_ok={bool(probe['vision_ok'])} grounded={probe['grounded']} at {probe['at']}"
        f"{_on_node(probe)}"
        if probe
        else "last probe: never"
    )


def _on_node(row: dict[str, Any]) -> str:
    """' on node N' for the latest verification or probe of a fleet node (history gives its ``node``)."""
    return f" on node {row['node']}" if row.get("node") else ""


@app.command("validate")
def validate_cmd(
    write_snapshot_: Annotated[
        bool, typer.Option("--write-snapshot", help="Regenerate configs/model_registry.json after a hand edit.")
    ] = False,
    root: RootOpt = None,
) -> None:
    """Validate both registry layers and their merge (exit 0 valid, 3 invalid with every problem listed)."""
    settings = settings_for(root)
    registry = load_registry(force=True, settings=settings)
    for warning in registry.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if write_snapshot_:
        path = write_snapshot(settings, registry)
        typer.echo(f"wrote {path}")
    typer.echo(f"registry valid: {len(registry)} entries")


@app.command("schema")
def schema_cmd(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print (or write) the JSON Schema of registry files, for editors."""
    text = json.dumps(json_schema(), indent=2) + "\n"
    if output:
        output.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output}")
    else:
        typer.echo(text, nl=False)


@app.command("select")
def select_cmd(
    name: Annotated[str | None, typer.Argument(help="Logical name, alias or served id.")] = None,
    role: Annotated[str | None, typer.Option(help="Select the best entry for a role instead.")] = None,
    require: Annotated[
        str | None, typer.Option(help="Required capabilities, comma separated (e.g. vision,tools).")
    ] = None,
    profile: Annotated[str | None, typer.Option(help="Deployment profile (default $IMAGEWORKS_PROFILE).")] = None,
    prefer: Annotated[
        str | None,
        typer.Option(help="With --role: names to try first, comma separated; the first usable one wins."),
    ] = None,
    as_json: JsonOpt = False,
    root: RootOpt = None,
) -> None:
    """Resolve a name or role to an endpoint (exit 4 unknown/filtered, 5 capability mismatch).

    By role: the highest role_priority for that role (then name) among usable entries with the role and the
    capabilities; caption, keywords, description and narration always require vision."""
    if (name is None) == (role is None):
        raise UsageError("give a NAME or --role ROLE (exactly one)")
    if prefer and role is None:
        raise UsageError("--prefer goes with --role ROLE")
    required = [c for c in (require or "").split(",") if c.strip()]
    preferred = [p.strip() for p in (prefer or "").split(",") if p.strip()]
    selection = service_for(root).select(
        name=name, role=role, require_capabilities=required, profile=profile, preferred=preferred
    )
    if as_json:
        echo_json(selection.to_dict())
        return
    for key, value in selection.to_dict().items():
        typer.echo(f"{key}: {','.join(value) if isinstance(value, list) else value}")


@app.command("history")
def history_cmd(
    name: Annotated[str | None, typer.Argument(help="Only revisions touching this entry.")] = None,
    limit: Annotated[int, typer.Option(help="How many revisions.")] = 50,
    as_json: JsonOpt = False,
    root: RootOpt = None,
) -> None:
    """List registry revisions (newest first). A revision keeps the file's content before that change."""
    settings = settings_for(root)
    rows = history.list_revisions(settings, name, limit) if settings.history_db_path.exists() else []
    if as_json:
        echo_json(rows)
        return
    if not rows:
        typer.echo("no revisions recorded yet")
        return
    table = [
        (r["id"], r["at"], Path(r["file"]).name, r["actor"], history.revision_label(r), ",".join(r["names"]))
        for r in rows
    ]
    typer.echo(format_table(("REV", "AT", "FILE", "ACTOR", "COMMAND", "ENTRIES"), table))
    typer.echo("\nrestore the content a revision kept: imageworks-models rollback REV")


@app.command("rollback")
def rollback_cmd(
    rev: Annotated[int, typer.Argument(help="Revision id from `imageworks-models history`.")],
    show_diff: Annotated[bool, typer.Option("--diff", help="Print the diff that the rollback applies.")] = False,
    root: RootOpt = None,
) -> None:
    """Restore a registry file to the content kept as revision REV (recorded as a new revision)."""
    service = service_for(root)
    diff = service.revision_diff(rev)
    if show_diff:
        typer.echo(diff.rollback, nl=False)
    registry = service.rollback(rev)
    typer.echo(f"restored {diff.file} to revision {rev}")
    for warning in registry.warnings:
        typer.echo(f"warning: {warning}", err=True)


@app.command("import-legacy")
def import_legacy_cmd(
    path: Annotated[Path, typer.Argument(help="Legacy model_registry.json (merged) or a curated/discovered file.")],
    discovered: Annotated[
        Path | None, typer.Option(help="The legacy discovered file, when PATH is a legacy curated file.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing curated/discovered files.")] = False,
    as_json: JsonOpt = False,
    root: RootOpt = None,
) -> None:
    """Convert an older ImageWorks registry into our curated + discovered pair, reporting every change."""
    report = service_for(root).import_legacy(path, discovered_path=discovered, force=force)
    if as_json:
        echo_json(report.to_dict())
        return
    typer.echo(report.format_text())
