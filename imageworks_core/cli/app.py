"""The ``imageworks-models`` Typer app, shared options, output helpers, and the one exit-code mapping."""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.exceptions import TyperException

from ..errors import EXIT_UNEXPECTED, EXIT_USAGE, ImageWorksError
from ..settings import Settings, get_settings

if TYPE_CHECKING:
    from ..service import ImageWorks


# A Typer app set up as all our CLIs are (give it name= and help=): help when called bare, no completion
# commands, plain errors (run() maps them to our exit codes).
new_app = functools.partial(
    typer.Typer, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None
)

app = new_app(
    name="imageworks-models",
    help="Keep a trustworthy model registry and run models deterministically on a single port.",
)

RootOpt = Annotated[
    Path | None,
    typer.Option("--root", help="Deployment root (default: $IMAGEWORKS_ROOT, else the current directory)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]

_global: dict[str, Path | None] = {"root": None}


@app.callback()
def _callback(root: RootOpt = None) -> None:
    _global["root"] = root


def settings_for(root: Path | None) -> Settings:
    """Settings from a command's ``--root``, else the global ``--root``, else the environment."""
    return get_settings(root or _global["root"])


def service_for(root: Path | None) -> ImageWorks:
    """The service object for a command's root (as :func:`settings_for` finds it); its registry loads on use."""
    from ..service import ImageWorks

    return ImageWorks(settings_for(root))


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain aligned columns (stable for scripts, docs and tests; no terminal-width truncation)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fail(message: str, code: int) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def run(cli: typer.Typer, argv: Sequence[str] | None, prog_name: str) -> int:
    """Run a Typer app and map every outcome to our exit codes (click's usage error 2 becomes 64)."""
    command = typer.main.get_command(cli)
    try:
        result = command.main(args=list(argv) if argv is not None else None, prog_name=prog_name, standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except TyperException as exc:
        # Typer vendors click; its UsageError (bad option/argument) has exit code 2, which we reserve for drift.
        ctx = getattr(exc, "ctx", None)
        hint = f"\nTry '{ctx.command_path} --help' for help." if ctx else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        code = getattr(exc, "exit_code", EXIT_UNEXPECTED)
        typer.echo(f"{'usage error' if code == 2 else 'error'}: {message}{hint}", err=True)
        return EXIT_USAGE if code == 2 else code
    except ImageWorksError as exc:
        for line in exc.lines():
            typer.echo(f"error: {line}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # the last resort: one line, traceback only on request
        if _debug_enabled():
            traceback.print_exc()
        typer.echo(f"unexpected error: {type(exc).__name__}: {exc} (set IMAGEWORKS_DEBUG=1 for a traceback)", err=True)
        return EXIT_UNEXPECTED
    return result if isinstance(result, int) else 0


def _debug_enabled() -> bool:
    try:
        return get_settings().debug_enabled
    except Exception:  # the environment itself may be what failed
        return False


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point of ``imageworks-models``."""
    from . import commands  # noqa: F401  (registers every command on ``app``)

    sys.exit(run(app, argv, "imageworks-models"))
