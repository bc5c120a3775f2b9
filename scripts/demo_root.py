"""`make run`: seed the git-ignored demo root from the checkout's bundled demo registry, then serve the dashboard on it.

The checkout's ``configs/`` and ``demo/`` are tracked files: the dashboard writes to the root it serves (locks,
manifests, edits, history, logs), so serving the checkout itself would leave it dirty. ``make run`` serves
``.demo-root/`` instead (git-ignored, removed by ``make clean``): on first run ``configs/`` (without generated
files) and ``demo/`` are *copied* there, never linked, so no write reaches a tracked file.

Adversaries: a crash or Ctrl-C while seeding leaves a ``<name>.seeding-<pid>`` folder beside the root, never a
half-seeded root (the copy is renamed into place at the end); two ``make run`` at once seed one root (the loser of
the rename finds it seeded and uses it). A root that is already seeded is served as it is (your demo changes stay
until ``make clean``). To serve a real deployment root, run ``imageworks-dashboard --root DIR`` (or set
``IMAGEWORKS_ROOT``): this script only ever seeds its own demo root.

Run: ``python scripts/demo_root.py [--root DIR] [--port PORT] [--seed-only]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = CHECKOUT / ".demo-root"
SEEDED_FOLDERS = ("configs", "demo")
# Generated or runtime files that may sit (git-ignored) in the checkout's configs/: never part of the seed.
_NOT_SEEDED = shutil.ignore_patterns("model_registry.json", "*.lock", ".*.lock", "*.tmp", "__pycache__")


def is_seeded(root: Path) -> bool:
    """The root holds a curated registry (then it is served as it is, never re-seeded)."""
    return (root / "configs" / "model_registry.curated.json").is_file()


def seed(root: Path = DEFAULT_ROOT, source: Path = CHECKOUT) -> bool:
    """Copy ``configs/`` and ``demo/`` of ``source`` into ``root`` unless it is seeded; True when it seeded now."""
    root = root.expanduser().resolve()
    if is_seeded(root):
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f"{root.name}.seeding-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for folder in SEEDED_FOLDERS:
        shutil.copytree(source / folder, staging / folder, ignore=_NOT_SEEDED, symlinks=False)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    try:
        staging.rename(root)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not is_seeded(root):
            raise SystemExit(f"error: {root} exists and is not a demo root; remove it or pick another --root") from None
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"demo root (default {DEFAULT_ROOT})")
    parser.add_argument("--port", type=int, default=None, help="dashboard port (default $IMAGEWORKS_DASHBOARD_PORT)")
    parser.add_argument("--seed-only", action="store_true", help="seed the demo root and exit")
    args = parser.parse_args(argv)
    root = args.root.expanduser().resolve()
    if seed(root):
        print(f"seeded the demo root {root} from configs/ and demo/ (make clean removes it)", flush=True)
    if args.seed_only:
        return
    from imageworks_core import dashboard_launcher

    sys.argv = ["imageworks-dashboard", "--root", str(root), *(["--port", str(args.port)] if args.port else [])]
    dashboard_launcher.main()  # execs Streamlit: Ctrl-C and SIGTERM reach it directly


if __name__ == "__main__":
    main()
