"""Benchmark: what a model switch costs on top of the backend's own stop and start, against the demo backend.

In one run, on one free loopback port in a temporary root:

1. the backend alone: ``Popen`` + poll ``/health`` every 10 ms (its own start-to-healthy time), then SIGTERM
   and poll for its exit every 1 ms (its own stop time);
2. ours: ``runtime.activate`` alternating between two demo entries (each switch stops one and starts the other),
   in-process as the API server and dashboard call it, and through the CLI (``python -m imageworks_core.cli``);
3. the llama-swap way: a plain script that kills the old process, starts the new one and polls ``/health``
   once a second.

Overhead = switch time - (the backend's own stop time + its own start-to-healthy time), medians. Target: at
most 0.1 s per switch. (Earlier runs reported switch time - start-to-healthy only; that figure is printed too.)
Run: ``uv run python bench/activation_overhead.py [--switches N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from imageworks_demo.launch import demo_argv, demo_launch

REPO = Path(__file__).resolve().parent.parent
TARGET_OVERHEAD_S = 0.1
ENTRIES = {"bench-a_(CPU)": "bench/a", "bench-b_(CPU)": "bench/b"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_argv(port: int, served: str) -> list[str]:
    return demo_argv(port, "--served-model-name", served)


def make_root(root: Path) -> None:
    """A deployment root with the demo weights and two demo-backend entries."""
    (root / "configs").mkdir(parents=True)
    shutil.copytree(REPO / "demo", root / "demo")
    entries = [
        {
            "name": name,
            "backend": "vllm",
            "served_model_id": served,
            "download_path": "demo/models/imageworks-demo-vision",
            "backend_config": {"launch": demo_launch(), "startup_timeout_s": 30},
        }
        for name, served in ENTRIES.items()
    ]
    (root / "configs" / "model_registry.curated.json").write_text(json.dumps(entries, indent=2))


def wait_healthy(client: httpx.Client, port: int, interval_s: float, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise RuntimeError(f"backend on port {port} not healthy within {deadline_s}s")


def stop_process(proc: subprocess.Popen[bytes], deadline_s: float = 15.0) -> None:
    """SIGTERM the group and wait for the exit, polled every 1 ms (``Popen.wait`` sleeps up to 50 ms)."""
    os.killpg(proc.pid, signal.SIGTERM)
    end = time.monotonic() + deadline_s
    while proc.poll() is None:
        if time.monotonic() > end:
            raise RuntimeError(f"backend pid {proc.pid} still running {deadline_s}s after SIGTERM")
        time.sleep(0.001)


def backend_alone(port: int, n: int) -> tuple[list[float], list[float]]:
    """(start-to-healthy times, stop times) of the bare backend, polled every 10 ms."""
    starts, stops = [], []
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        for i in range(n):
            began = time.monotonic()
            proc = subprocess.Popen(
                backend_argv(port, list(ENTRIES.values())[i % 2]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                wait_healthy(client, port, 0.01)
                starts.append(time.monotonic() - began)
            finally:
                began = time.monotonic()
                stop_process(proc)
                stops.append(time.monotonic() - began)
    return starts, stops


def llama_swap_way(port: int, n: int) -> list[float]:
    """Switch times of the plain script: kill the old process, start the new one, poll /health each 1 s."""
    times = []
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        current = subprocess.Popen(
            backend_argv(port, "bench/a"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_healthy(client, port, 1.0)
        try:
            for i in range(n):
                began = time.monotonic()
                stop_process(current)
                current = subprocess.Popen(
                    backend_argv(port, list(ENTRIES.values())[(i + 1) % 2]),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                wait_healthy(client, port, 1.0)
                times.append(time.monotonic() - began)
        finally:
            stop_process(current)
    return times


def ours(switch: Callable[[str], None], n: int) -> list[float]:
    names = list(ENTRIES)
    switch(names[0])
    times = []
    for i in range(n):
        began = time.monotonic()
        switch(names[(i + 1) % 2])
        times.append(time.monotonic() - began)
    return times


def summary(label: str, values: list[float], baseline: float | None) -> list[str]:
    median = statistics.median(values)
    overhead = "" if baseline is None else f"{median - baseline:+.3f}"
    return [label, f"{median:.3f}", f"{min(values):.3f}", f"{max(values):.3f}", overhead]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=10, help="switches per method (default 10)")
    parser.add_argument("--cli-switches", type=int, default=4, help="switches through the CLI (default 4)")
    args = parser.parse_args()

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="iw-activation-bench-") as tmp:
        root = Path(tmp) / "root"
        make_root(root)
        os.environ.update(IMAGEWORKS_ROOT=str(root), CHAT_PROXY_VLLM_PORT=str(port), CHAT_PROXY_VLLM_HOST="127.0.0.1")
        from imageworks_core import history, runtime
        from imageworks_core.settings import get_settings

        settings = get_settings(root)
        starts, stops = backend_alone(port, args.switches)
        start_s, stop_s = statistics.median(starts), statistics.median(stops)
        try:
            api = ours(lambda name: runtime.activate(settings, name), args.switches)
            runtime.stop(settings)
            cli_env = {**os.environ}

            def via_cli(name: str) -> None:
                subprocess.run(
                    [sys.executable, "-m", "imageworks_core.cli", "activate-model", name],
                    env=cli_env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )

            cli = ours(via_cli, args.cli_switches)
        finally:
            runtime.stop(settings)
        rows = [r for r in history.list_activations(settings, limit=1000) if r["result"] == "ready" and r["stop_s"]]
        recorded_start = statistics.median(r["start_to_ready_s"] for r in rows)
        recorded_stop = statistics.median(r["stop_s"] for r in rows)
        swap = llama_swap_way(port, args.switches)

    table = [
        ["method", "median s", "min s", "max s", "overhead s"],
        summary("backend alone: start-to-healthy (10 ms poll)", starts, None),
        summary("backend alone: SIGTERM to exit", stops, None),
        summary("ours: activate() switch (in-process)", api, stop_s + start_s),
        summary("ours: `imageworks-models activate-model` (CLI)", cli, stop_s + start_s),
        summary("llama-swap way: kill, start, poll /health 1 s", swap, stop_s + start_s),
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    overhead = statistics.median(api) - stop_s - start_s
    print()
    print(
        f"recorded by the runtime (medians): stop {recorded_stop:.3f} s, start-to-ready {recorded_start:.3f} s "
        f"(backend alone: stop {stop_s:.3f} s, start-to-healthy {start_s:.3f} s)"
    )
    print(
        f"overhead per switch (in-process) beyond the backend's own stop + start: {overhead:.3f} s "
        f"({'within' if overhead <= TARGET_OVERHEAD_S else 'OVER'} the {TARGET_OVERHEAD_S} s target); "
        f"llama-swap way: {statistics.median(swap) - stop_s - start_s:.3f} s; "
        f"switch minus start-to-healthy only (the earlier figure): {statistics.median(api) - start_s:.3f} s"
    )
    return 0 if overhead <= TARGET_OVERHEAD_S else 1


if __name__ == "__main__":
    sys.exit(main())
