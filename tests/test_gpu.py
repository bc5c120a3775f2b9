"""GPU state through NVML, with a fake ``pynvml`` (no GPU here): figures, degradation without NVML, and the
runtime's GPU-fit refusal, GPU figures and memory-release wait."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
from conftest import free_port

from imageworks_core import gpu, runtime
from imageworks_core.errors import BackendError
from imageworks_core.runtime import gpu_fit
from imageworks_core.settings import Settings, get_settings

GIB = 2**30
DEMO = "demo-vision_(CPU)"


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeDevice:
    name: str | bytes
    total: int
    used: int
    utilization: int | None = 37
    temperature: int | None = 55
    processes: list[tuple[int, int | None]] = field(default_factory=list)


def fake_nvml(devices: list[FakeDevice], init_error: str | None = None) -> types.ModuleType:
    """A stand-in for the ``pynvml`` module with the calls gpu.py makes."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNVMLError
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.calls = []

    def init() -> None:
        nvml.calls.append("init")
        if init_error:
            raise FakeNVMLError(init_error)

    def not_supported(value: Any) -> Any:
        if value is None:
            raise FakeNVMLError("Not Supported")
        return value

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: nvml.calls.append("shutdown")
    nvml.nvmlDeviceGetCount = lambda: len(devices)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    nvml.nvmlDeviceGetName = lambda d: d.name
    nvml.nvmlDeviceGetMemoryInfo = lambda d: types.SimpleNamespace(total=d.total, used=d.used, free=d.total - d.used)
    nvml.nvmlDeviceGetUtilizationRates = lambda d: types.SimpleNamespace(gpu=not_supported(d.utilization), memory=0)
    nvml.nvmlDeviceGetTemperature = lambda d, _sensor: not_supported(d.temperature)
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda d: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in d.processes
    ]
    nvml.nvmlDeviceGetGraphicsRunningProcesses = lambda d: []
    return nvml


def install(monkeypatch: pytest.MonkeyPatch, nvml: types.ModuleType | None) -> None:
    # gpu.py imports pynvml on every call; None in sys.modules makes that import fail like a missing package.
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


# gpu.py --------------------------------------------------------------------------------------------------
def test_query_gpus_reads_every_device(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml(
        [
            FakeDevice(b"NVIDIA H100 80GB HBM3", 80 * GIB, 20 * GIB, processes=[(4321, 18 * GIB), (99, None)]),
            FakeDevice("NVIDIA L4", 24 * GIB, 0, utilization=None, temperature=None),
        ]
    )
    install(monkeypatch, nvml)
    first, second = gpu.query_gpus()
    assert first == gpu.GpuInfo(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=80 * GIB,
        memory_used_bytes=20 * GIB,
        memory_free_bytes=60 * GIB,
        utilization_percent=37,
        temperature_c=55,
        processes=(gpu.GpuProcess(4321, 18 * GIB), gpu.GpuProcess(99, None)),
    )
    # Fields a device does not support are None, not an error.
    assert second.name == "NVIDIA L4" and second.utilization_percent is None and second.temperature_c is None
    assert first.memory_held_by([4321, 99, 7]) == 18 * GIB
    assert first.to_dict()["processes"][0] == {"pid": 4321, "used_memory_bytes": 18 * GIB}
    assert nvml.calls == ["init", "shutdown"]  # NVML is not left initialised
    assert gpu.gpu_snapshot() == [first, second]


@pytest.mark.parametrize(
    ("nvml", "reason"),
    [
        (fake_nvml([], init_error="NVML Shared Library Not Found"), "NVML could not initialise: NVML Shared Library"),
        (fake_nvml([], init_error="Driver Not Loaded"), "NVML could not initialise: Driver Not Loaded"),
        (fake_nvml([]), "NVML reports no devices"),
        (None, "the NVML Python binding is not installed"),
    ],
    ids=["no-library", "no-driver", "no-devices", "no-binding"],
)
def test_without_nvml_callers_get_a_reason_or_an_empty_list(
    monkeypatch: pytest.MonkeyPatch, nvml: types.ModuleType | None, reason: str
) -> None:
    install(monkeypatch, nvml)
    with pytest.raises(gpu.GpuUnavailable) as caught:
        gpu.query_gpus()
    assert caught.value.reason.startswith(reason)
    assert caught.value.message.startswith("No NVIDIA GPU visible (")
    assert gpu.gpu_snapshot() == []


def test_free_bytes_counts_the_backend_about_to_stop_and_tensor_parallel_spread() -> None:
    cards = [
        gpu.GpuInfo(0, "a", 80 * GIB, 70 * GIB, 10 * GIB, 0, 0, (gpu.GpuProcess(11, 60 * GIB),)),
        gpu.GpuInfo(1, "b", 80 * GIB, 50 * GIB, 30 * GIB, 0, 0, ()),
    ]
    assert gpu.free_bytes_for(cards) == 30 * GIB
    assert gpu.free_bytes_for(cards, reclaimable_pids=[11]) == 70 * GIB
    assert gpu.free_bytes_for(cards, devices=2) == 40 * GIB


def test_weights_size_sums_files_and_follows_links(tmp_path) -> None:
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "x").write_bytes(b"a" * 1000)
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "blobs" / "x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert gpu.weights_size_bytes(tmp_path) == 2000
    assert gpu.weights_size_bytes(tmp_path / "blobs" / "x") == 1000


# The runtime with a fake GPU -----------------------------------------------------------------------------
@pytest.fixture
def single_port(root: Settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CHAT_PROXY_VLLM_PORT", str(free_port()))
    monkeypatch.setenv("CHAT_PROXY_VLLM_STOP_TIMEOUT_S", "1")
    settings = get_settings(root.root)
    yield settings
    runtime.stop(settings)


def test_activation_refused_when_weights_cannot_fit_in_free_gpu_memory(
    single_port: Settings, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(monkeypatch, fake_nvml([FakeDevice("NVIDIA T4", 16 * GIB, 16 * GIB - 100)]))
    result = cli("activate-model", DEMO)
    assert result.code == 6
    assert f"{DEMO!r} needs about" in result.err and "x overhead 1.2" in result.err
    assert "only 0.0 GiB is free on 1 GPU(s) (GPU 0 NVIDIA T4)" in result.err
    assert not single_port.active_state_path.exists()
    events = [json.loads(line) for line in single_port.audit_log_path.read_text().splitlines()]
    assert events[-1]["event"] == "activation_failed" and "needs about" in events[-1]["reason"]


def test_gpu_fit_uses_the_overhead_factor_setting(single_port: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from imageworks_core.launch import expand_launch
    from imageworks_core.registry import load_registry

    install(monkeypatch, fake_nvml([FakeDevice("NVIDIA T4", 16 * GIB, 8 * GIB)]))
    entry = load_registry(settings=single_port).get(DEMO)
    argv = expand_launch(entry, single_port)
    size = gpu.weights_size_bytes(single_port.resolve_path(entry.download_path))
    assert "needs about 0.0 GiB, 8.0 GiB free" in runtime.check_gpu_fit(single_port, entry, argv)
    # An overhead that makes the tiny demo weights exceed 8 GiB is refused; 0 disables the check.
    monkeypatch.setenv("IMAGEWORKS_GPU_OVERHEAD_FACTOR", str(9 * GIB / size))
    with pytest.raises(BackendError, match="needs about 9.0 GiB"):
        runtime.check_gpu_fit(get_settings(single_port.root), entry, argv)
    monkeypatch.setenv("IMAGEWORKS_GPU_OVERHEAD_FACTOR", "0")
    assert "disabled" in runtime.check_gpu_fit(get_settings(single_port.root), entry, argv)


def test_gpu_check_is_skipped_with_a_note_without_nvml(single_port: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, fake_nvml([], init_error="Driver Not Loaded"))
    phases: list[tuple[str, str]] = []
    state = runtime.activate(single_port, DEMO, on_progress=lambda phase, _t, detail: phases.append((phase, detail)))
    assert state.status == "ready"
    assert ("gpu", "GPU check skipped: No NVIDIA GPU visible (NVML could not initialise: Driver Not Loaded)") in phases
    status = runtime.current(single_port)
    assert status is not None and status.gpus == [] and "Driver Not Loaded" in (status.gpu_note or "")


def test_current_model_shows_gpu_memory_and_stop_waits_for_its_release(
    single_port: Settings, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = FakeDevice("NVIDIA H100", 80 * GIB, 30 * GIB, utilization=64)
    install(monkeypatch, fake_nvml([device]))
    state = runtime.activate(single_port, DEMO)
    device.processes = [(state.pid, 12 * GIB)]
    status = runtime.current(single_port)
    assert status is not None and status.gpu_memory_bytes == 12 * GIB and status.gpus[0]["name"] == "NVIDIA H100"
    shown = cli("current-model").out
    assert "gpu memory: 12.0 GiB held by this backend" in shown
    assert "gpu 0:      NVIDIA H100: 30.0 GiB / 80.0 GiB used, utilisation 64%" in shown

    # The driver keeps reporting the pid after it exited: the stop warns instead of claiming the memory is free.
    monkeypatch.setattr(gpu_fit, "GPU_RELEASE_TIMEOUT_S", 0.3)
    result = runtime.stop(single_port)
    assert result is not None and result.gpu_released is False
    assert result.warnings and f"GPU memory of pid(s) {state.pid} was not released" in result.warnings[0]
    assert not psutil.pid_exists(state.pid) or psutil.Process(state.pid).status() == psutil.STATUS_ZOMBIE

    device.processes = []
    second = runtime.activate(single_port, DEMO)
    result = runtime.stop(single_port)
    assert result is not None and result.gpu_released is True and result.warnings == []
    assert second.pid in result.stopped_pids
