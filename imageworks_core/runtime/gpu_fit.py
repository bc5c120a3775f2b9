"""GPU memory around a switch: does the next backend fit, and has the stopped one released its memory.

Every check works without a GPU: without NVML the fit check is skipped with a note and the release wait
returns at once (``None``: unknown).
"""

from __future__ import annotations

import time

from .. import gpu
from ..errors import BackendError
from ..schema import ModelEntry
from ..settings import Settings
from .readiness import poll_delay

GPU_RELEASE_TIMEOUT_S = 10.0
"""After a stop: how long to wait for the driver to release the stopped processes' GPU memory."""
GPU_RELEASE_POLL_MIN_S = 0.02
"""The shortest pause between asking the driver during that wait (the first ones: release is usually quick)."""
GPU_RELEASE_POLL_MAX_S = 0.25
"""The longest; in between the pause backs off as the readiness poll does (:func:`.readiness.poll_delay`)."""


def _cuda_devices(settings: Settings, entry: ModelEntry) -> list[int] | None:
    """GPU indexes the backend may use per CUDA_VISIBLE_DEVICES (entry env first), None when unrestricted."""
    value = entry.backend_config.env.get("CUDA_VISIBLE_DEVICES", settings.cuda_visible_devices)
    if value is None or not value.strip():
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        return None  # GPU UUIDs: cannot map to NVML indexes cheaply, check every GPU


def tensor_parallel_size(argv: list[str]) -> int:
    """How many GPUs a launch spreads over: its ``--tensor-parallel-size`` / ``-tp`` (1 when absent)."""
    return _tensor_parallel(argv)


def _tensor_parallel(argv: list[str]) -> int:
    for flag in ("--tensor-parallel-size", "-tp"):
        if flag in argv[:-1]:
            try:
                return max(1, int(argv[argv.index(flag) + 1]))
            except ValueError:
                return 1
        prefix = flag + "="
        for arg in argv:
            if arg.startswith(prefix) and arg[len(prefix) :].isdigit():
                return max(1, int(arg[len(prefix) :]))
    return 1


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_gpu_fit(
    settings: Settings, entry: ModelEntry, argv: list[str], reclaimable_pids: list[int] | tuple[int, ...] = ()
) -> str:
    """Refuse (BackendError) when the weights x ``IMAGEWORKS_GPU_OVERHEAD_FACTOR`` cannot fit in free GPU memory.

    Memory held by ``reclaimable_pids`` (the backend about to be stopped) counts as free. Returns a note for the
    operator; without NVML the check is skipped and the note says so.
    """
    try:
        gpus = gpu.query_gpus()
    except gpu.GpuUnavailable as exc:
        return f"GPU check skipped: {exc.message}"
    if settings.gpu_overhead_factor <= 0:
        return "GPU check disabled (IMAGEWORKS_GPU_OVERHEAD_FACTOR <= 0)"
    devices = _cuda_devices(settings, entry)
    if devices is not None:
        gpus = [g for g in gpus if g.index in devices] or gpus
    weights = gpu.weights_size_bytes(settings.resolve_path(entry.download_path or ""))
    needed = int(weights * settings.gpu_overhead_factor)
    spread = _tensor_parallel(argv)
    free = gpu.free_bytes_for(gpus, spread, reclaimable_pids)
    where = ", ".join(f"GPU {g.index} {g.name}" for g in gpus)
    if needed > free:
        raise BackendError(
            f"{entry.name!r} needs about {_gib(needed)} of GPU memory (weights {_gib(weights)} x overhead "
            f"{settings.gpu_overhead_factor:g}) but only {_gib(free)} is free on {spread} GPU(s) ({where}); "
            "stop other GPU users, or adjust IMAGEWORKS_GPU_OVERHEAD_FACTOR if the estimate is wrong"
        )
    return f"GPU fit: needs about {_gib(needed)}, {_gib(free)} free ({where})"


def _gpu_pids_present(pids: set[int]) -> bool | None:
    """Whether any of ``pids`` still holds GPU memory; None without NVML."""
    try:
        gpus = gpu.query_gpus()
    except gpu.GpuUnavailable:
        return None
    return any(p.pid in pids for g in gpus for p in g.processes)


def wait_gpu_release(pids: list[int]) -> tuple[bool | None, str | None]:
    """(released, warning): wait up to ``GPU_RELEASE_TIMEOUT_S`` for the driver to stop listing ``pids``."""
    held = _gpu_pids_present(set(pids))
    if held is None:
        return None, None
    started = time.monotonic()
    while held and time.monotonic() - started < GPU_RELEASE_TIMEOUT_S:
        time.sleep(poll_delay(time.monotonic() - started, GPU_RELEASE_POLL_MIN_S, GPU_RELEASE_POLL_MAX_S))
        held = _gpu_pids_present(set(pids))
    if held:
        return False, (
            f"GPU memory of pid(s) {', '.join(map(str, pids))} was not released within {GPU_RELEASE_TIMEOUT_S:g}s; "
            "check `nvidia-smi` before starting another model"
        )
    return True, None
