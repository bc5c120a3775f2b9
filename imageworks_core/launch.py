"""Turning an entry's launch template into the exact argv that runs (shared by ``show`` and the runtime)."""

from __future__ import annotations

import shlex
import sys

from .errors import RegistryError, WeightsError
from .schema import LAUNCH_PLACEHOLDERS, PLACEHOLDER_RE, ModelEntry, placeholders_in
from .settings import Settings


def expand_launch(entry: ModelEntry, settings: Settings, *, require_weights: bool = False) -> list[str]:
    """The argv for a process backend on the single port, with placeholders and CHAT_PROXY_VLLM_* applied.

    ``{host}``/``{port}`` are always the single port's (a per-entry port is never used for process backends).
    """
    template = entry.launch_template()
    if template is None:
        raise RegistryError(f"{entry.name!r}: backend {entry.backend!r} has no launch command (not a process backend)")
    model_path = settings.resolve_path(entry.download_path) if entry.download_path else None
    if require_weights and (model_path is None or not model_path.exists()):
        where = f"download_path {str(model_path)!r} does not exist" if model_path else "no download_path set"
        raise WeightsError(f"{entry.name!r}: {where}; download the weights or fix download_path")
    values = {
        "host": settings.vllm_host,
        "port": str(settings.vllm_port),
        "served_model_id": entry.effective_served_id,
        "name": entry.name,
        # The interpreter running us, so a Python-module backend runs in the project's environment.
        "python": sys.executable,
        "model_path": str(model_path) if model_path else None,
    }
    argv = []
    for arg in template:
        names = placeholders_in(arg)
        unknown = names - LAUNCH_PLACEHOLDERS
        if unknown:
            raise RegistryError(f"{entry.name!r}: unknown placeholder {{{sorted(unknown)[0]}}} in launch arg {arg!r}")
        if "model_path" in names and values["model_path"] is None:
            raise WeightsError(f"{entry.name!r}: launch uses {{model_path}} but the entry has no download_path")
        argv.append(PLACEHOLDER_RE.sub(lambda m: str(values[m.group(1)]), arg))
    if entry.backend == "vllm" and argv[:2] == ["vllm", "serve"]:
        if settings.vllm_gpu_memory_utilization is not None and "--gpu-memory-utilization" not in argv:
            argv += ["--gpu-memory-utilization", str(settings.vllm_gpu_memory_utilization)]
        argv += shlex.split(settings.vllm_extra_args)
    return argv


def preview_launch(entry: ModelEntry, settings: Settings) -> list[str] | None:
    """The argv activation would run, for display (``show``, the dashboard); None for remote / ollama entries.

    A template that cannot be expanded yet is shown as written: activation reports the real error.
    """
    if not entry.is_process_backend:
        return None
    try:
        return expand_launch(entry, settings)
    except (RegistryError, WeightsError):
        return entry.launch_template()
