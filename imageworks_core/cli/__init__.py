"""Command-line front ends: thin shells that format core results and map errors to exit codes."""

from .app import app, main

__all__ = ["app", "main"]
