"""Human-readable units shared by every front end (CLI, dashboard, error messages)."""

from __future__ import annotations

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(size: int | float | None, missing: str = "-") -> str:
    """Binary units, one decimal: ``1536`` -> ``1.5 KiB``, ``12`` -> ``12 B``; ``None`` -> ``missing``."""
    if size is None:
        return missing
    value = float(size)
    for unit in _BINARY_UNITS:
        if value < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
