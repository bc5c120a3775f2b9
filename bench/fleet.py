"""Benchmark: what fleet mode costs against single-box, in one run on a 2-node Ray cluster on loopback.

Starts a head and a node ``n2`` (``ray.cluster_utils.Cluster``, everything on 127.0.0.1, as the fleet tests do)
and measures the same demo backend both ways, interleaved so both see the same machine state:

1. Activation: ``Fleet.activate(name, node="n2")`` (placement: an offer from each node's agent, then the start by
   n2's agent) against the single-box ``runtime.activate`` of the same entry on the controller's root; each
   activation is followed by its stop, which is not timed. Overhead = fleet median - single-box median.
2. Request latency of a non-streaming chat completion (time to last byte), p50 and p95:
   direct httpx to the slot's backend (the baseline), ``Fleet.forward`` through n2's agent (the slot known, as
   the proxy holds it), ``Fleet.route`` + ``Fleet.forward`` (looked up per request), direct httpx to the
   single-port backend, and the single-box API proxy (``imageworks-models serve``) in front of it.

Ratios are against the direct request to the same kind of backend in the same run.
Run: ``uv run python bench/fleet.py [--activations N] [--requests N]`` (needs the fleet extra: ``uv sync --extra
fleet``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from api_server import api_server  # noqa: E402
from conftest import REPO, free_port, seed_root  # noqa: E402
from fleet_rig import demo_entry, fleet_on_loopback  # noqa: E402

from imageworks_core import runtime  # noqa: E402
from imageworks_core.settings import Settings  # noqa: E402

NAME = "bench-fleet"
SERVED = "bench/fleet"
BODY = {"model": SERVED, "messages": [{"role": "user", "content": "hello there operator"}], "max_tokens": 16}


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def activations(fleet: object, settings: Settings, n: int) -> tuple[list[float], list[float]]:
    """(fleet activation times, single-box activation times), interleaved; each followed by an untimed stop."""
    in_fleet, single = [], []
    for _ in range(n):
        in_fleet.append(timed(lambda: fleet.activate(NAME, node="n2")))  # type: ignore[attr-defined]
        fleet.stop(NAME, reason="bench")  # type: ignore[attr-defined]
        single.append(timed(lambda: runtime.activate(settings, NAME)))
        runtime.stop(settings, reason="bench")
    return in_fleet, single


def latencies(fleet: object, settings: Settings, n: int) -> dict[str, list[float]]:
    """Milliseconds per request for each path, interleaved, after a warm-up."""
    from imageworks_core.fleet import Fleet

    assert isinstance(fleet, Fleet)
    slot = fleet.activate(NAME, node="n2")
    body = json.dumps(BODY).encode()
    headers = [("content-type", "application/json")]
    with api_server(settings.root, env={"CHAT_PROXY_VLLM_PORT": str(settings.vllm_port)}) as base:
        httpx.post(f"{base}/v1/activate", json={"name": NAME}, timeout=60).raise_for_status()
        try:
            with httpx.Client(timeout=30, trust_env=False) as client:

                def ok(response: object) -> None:
                    assert getattr(response, "status", None) == 200 or getattr(response, "status_code", None) == 200

                paths: dict[str, Callable[[], None]] = {
                    "direct to the slot's backend": lambda: ok(
                        client.post(f"http://127.0.0.1:{slot.port}/v1/chat/completions", json=BODY)
                    ),
                    "Fleet.forward via n2's agent": lambda: ok(
                        fleet.forward(slot, "POST", "/v1/chat/completions", headers=headers, body=body)
                    ),
                    "Fleet.route + Fleet.forward": lambda: ok(
                        fleet.forward(fleet.route(SERVED), "POST", "/v1/chat/completions", headers=headers, body=body)
                    ),
                    "direct to the single-port backend": lambda: ok(
                        client.post(f"http://127.0.0.1:{settings.vllm_port}/v1/chat/completions", json=BODY)
                    ),
                    "single-box API proxy": lambda: ok(
                        client.post(f"{base}/v1/chat/completions", json={**BODY, "model": NAME})
                    ),
                }
                for _ in range(20):
                    for call in paths.values():
                        call()
                results: dict[str, list[float]] = {label: [] for label in paths}
                for _ in range(n):
                    for label, call in paths.items():
                        results[label].append(timed(call) * 1000)
        finally:
            httpx.post(f"{base}/v1/deactivate", timeout=30)
    fleet.stop(NAME, reason="bench")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", type=int, default=8, help="activations per method (default 8)")
    parser.add_argument("--requests", type=int, default=300, help="requests per path (default 300)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iw-fleet-bench-") as tmp:
        base = Path(tmp)
        port = free_port()
        seed_root(base / "controller")
        settings = Settings(IMAGEWORKS_ROOT=base / "controller", CHAT_PROXY_VLLM_PORT=port)
        roots = {name: base / name for name in ("head", "n2")}
        for node_root in roots.values():
            shutil.copytree(REPO / "demo", node_root / "demo")
        settings.curated_path.write_text(json.dumps([demo_entry(NAME, SERVED)], indent=2))
        (settings.configs_dir / "fleet.json").write_text(
            json.dumps({"nodes": {name: {"root": str(path)} for name, path in roots.items()}})
        )
        began = time.perf_counter()
        with fleet_on_loopback(settings, roots, {"n2": {}}) as (rig, _cluster):
            print(f"2-node cluster on loopback (head + n2) up in {time.perf_counter() - began:.1f} s")
            fleet = rig.fleet
            fleet.ensure_agents()
            fleet.activate(NAME, node="n2")  # warm up: n2's agent imports the runtime once
            fleet.stop(NAME, reason="bench warm-up")
            in_fleet, single = activations(fleet, settings, args.activations)
            requests = latencies(fleet, settings, args.requests)

    print()
    print(f"activation of the demo backend, until ready ({args.activations} each, interleaved)")
    fleet_s, single_s = statistics.median(in_fleet), statistics.median(single)
    table(
        [
            ["method", "median s", "min s", "max s"],
            ["Fleet.activate(node='n2')", f"{fleet_s:.3f}", f"{min(in_fleet):.3f}", f"{max(in_fleet):.3f}"],
            ["single-box runtime.activate", f"{single_s:.3f}", f"{min(single):.3f}", f"{max(single):.3f}"],
        ]
    )
    print(f"fleet overhead per activation: {fleet_s - single_s:+.3f} s (ratio {fleet_s / single_s:.2f}x single-box)")
    print()
    print(f"non-streaming chat completion, time to last byte ({args.requests} per path, interleaved)")
    rows = [["path", "p50 ms", "p95 ms", "p50 ratio", "p50 added ms"]]
    for label, values in requests.items():
        peer = requests["direct to the single-port backend" if "single" in label else "direct to the slot's backend"]
        p50, p95, peer50 = pct(values, 50), pct(values, 95), pct(peer, 50)
        rows.append([label, f"{p50:.2f}", f"{p95:.2f}", f"{p50 / peer50:.2f}x", f"{p50 - peer50:+.2f}"])
    table(rows)
    print("(ratios: the fleet paths against the direct request to the slot's backend, the single-box ones against")
    print(" the direct request to the single-port backend)")
    return 0


if __name__ == "__main__":
    os.environ.pop("IMAGEWORKS_RAY_ADDRESS", None)
    sys.exit(main())
