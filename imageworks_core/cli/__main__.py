"""``python -m imageworks_core.cli`` runs ``imageworks-models``."""

from .app import main

main()
