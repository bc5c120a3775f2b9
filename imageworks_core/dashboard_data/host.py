"""Host panels: GPU cards from NVML (degrading cleanly without one) and system memory/CPU from psutil."""

from __future__ import annotations

from typing import Any

from ..units import format_bytes


def gpu_cards() -> tuple[list[dict[str, Any]], str | None]:
    """NVML GPU cards for display, or ([], 'No NVIDIA GPU visible (reason)') when NVML is unavailable."""
    from .. import gpu

    try:
        snapshot = gpu.query_gpus()
    except gpu.GpuUnavailable as exc:
        return [], exc.message
    except Exception as exc:  # a broken driver must degrade to a message, never a traceback on the page
        return [], f"{gpu.NO_GPU_MESSAGE} ({type(exc).__name__}: {exc})"
    cards = [
        {
            "name": info.name,
            "index": info.index,
            "memory": f"{format_bytes(info.memory_used_bytes)} / {format_bytes(info.memory_total_bytes)}",
            "memory_fraction": info.memory_used_bytes / info.memory_total_bytes if info.memory_total_bytes else 0.0,
            "utilization": info.utilization_percent,
            "temperature": info.temperature_c,
        }
        for info in snapshot
    ]
    if not cards:
        return [], gpu.NO_GPU_MESSAGE
    return cards, None


def system_stats() -> dict[str, Any]:
    """Host RAM and CPU figures via psutil."""
    import psutil

    memory = psutil.virtual_memory()
    return {
        "ram": f"{format_bytes(memory.total - memory.available)} / {format_bytes(memory.total)}",
        "ram_percent": memory.percent,
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpus": psutil.cpu_count() or 0,
        "load": " ".join(f"{x:.2f}" for x in psutil.getloadavg()),
    }
