"""NVIDIA GPU state through NVML (``pynvml`` from the ``nvidia-ml-py`` package).

Every caller must work on a machine without a GPU: :func:`query_gpus` raises :class:`GpuUnavailable` with the
reason, :func:`gpu_snapshot` returns ``[]`` instead. ``NO_GPU_MESSAGE`` is the text front ends show then.
NVML is initialised and shut down per call (it is reference counted), so nothing stays open between calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

# Defined in errors.py (every error lives there); kept importable from here, where callers look for them.
from .errors import NO_GPU_MESSAGE as NO_GPU_MESSAGE
from .errors import GpuUnavailable as GpuUnavailable


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU; ``used_memory_bytes`` is None when the driver does not say."""

    pid: int
    used_memory_bytes: int | None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU at the moment it was read; a field the device does not report is None."""

    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: int | None
    temperature_c: int | None
    processes: tuple[GpuProcess, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["processes"] = [asdict(p) for p in self.processes]
        return data

    def memory_held_by(self, pids: Iterable[int]) -> int:
        """Bytes this GPU reports for ``pids`` (processes with an unknown amount count as 0)."""
        wanted = set(pids)
        return sum(p.used_memory_bytes or 0 for p in self.processes if p.pid in wanted)


def _load_nvml() -> ModuleType:
    # Imported per call so a test can put a fake ``pynvml`` in sys.modules.
    try:
        import pynvml
    except ImportError as exc:
        raise GpuUnavailable(f"the NVML Python binding is not installed: {exc}") from exc
    return pynvml


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _optional(nvml: ModuleType, call: Any, *args: Any) -> Any:
    """An NVML field that some devices do not support: None instead of an error."""
    try:
        return call(*args)
    except nvml.NVMLError:
        return None


def _processes(nvml: ModuleType, handle: Any) -> tuple[GpuProcess, ...]:
    seen: dict[int, GpuProcess] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        call = getattr(nvml, getter, None)
        running = _optional(nvml, call, handle) if call else None
        for proc in running or ():
            used = getattr(proc, "usedGpuMemory", None)
            # NVML reports "not available" (e.g. without permission) as None or a huge sentinel.
            if used is not None and used >= 2**63:
                used = None
            if proc.pid not in seen or (used or 0) > (seen[proc.pid].used_memory_bytes or 0):
                seen[proc.pid] = GpuProcess(pid=int(proc.pid), used_memory_bytes=used)
    return tuple(seen.values())


def query_gpus() -> list[GpuInfo]:
    """Every visible GPU's memory, utilisation, temperature and processes. Raises GpuUnavailable."""
    nvml = _load_nvml()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise GpuUnavailable(f"NVML could not initialise: {exc}") from exc
    except OSError as exc:  # the shared library itself failed to load
        raise GpuUnavailable(f"NVML library could not be loaded: {exc}") from exc
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise GpuUnavailable("NVML reports no devices")
        gpus = []
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            rates = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
            temperature = _optional(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_total_bytes=int(memory.total),
                    memory_used_bytes=int(memory.used),
                    memory_free_bytes=int(memory.free),
                    utilization_percent=None if rates is None else int(rates.gpu),
                    temperature_c=None if temperature is None else int(temperature),
                    processes=_processes(nvml, handle),
                )
            )
        return gpus
    except nvml.NVMLError as exc:
        raise GpuUnavailable(f"NVML query failed: {exc}") from exc
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def gpu_snapshot() -> list[GpuInfo]:
    """Like :func:`query_gpus`, but ``[]`` when no GPU can be read (show ``NO_GPU_MESSAGE`` then)."""
    try:
        return query_gpus()
    except GpuUnavailable:
        return []


def weights_size_bytes(path: Path) -> int:
    """Bytes of the weights at ``path`` (a file, or every file below a directory; symlinks followed)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(directory) / name).stat().st_size
            except OSError:
                continue  # a dangling link is the verifier's business, not the estimate's
    return total


def free_bytes_for(gpus: list[GpuInfo], devices: int = 1, reclaimable_pids: Iterable[int] = ()) -> int:
    """Memory a launch spread over ``devices`` GPUs can use: the largest ``devices`` free amounts summed,
    counting memory held by ``reclaimable_pids`` (a backend about to be stopped) as free."""
    pids = list(reclaimable_pids)
    free = sorted((g.memory_free_bytes + g.memory_held_by(pids) for g in gpus), reverse=True)
    return sum(free[: max(1, devices)])
