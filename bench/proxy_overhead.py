"""Benchmark: latency the single-port proxy adds over calling the demo backend directly (same run).

Starts a real API server (uvicorn) and the demo backend behind it, then measures, interleaved so both see the
same machine state: p50/p99 of non-streaming and streaming chat requests (time to last byte), direct vs through
the proxy, and requests/s at concurrency 16. Target: p50 added < 2 ms.
Run: ``uv run python bench/proxy_overhead.py [--requests N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from api_server import api_server  # noqa: E402
from conftest import free_port, seed_root  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "hello there operator"}], "max_tokens": 16}


def timed(client: httpx.Client, url: str, body: dict, stream: bool) -> float:
    start = time.perf_counter()
    if stream:
        with client.stream("POST", url, json={**body, "stream": True}) as response:
            for _ in response.iter_bytes():
                pass
    else:
        client.post(url, json=body).raise_for_status()
    return (time.perf_counter() - start) * 1000


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


async def throughput(url: str, body: dict, total: int, concurrency: int) -> float:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        queue = asyncio.Queue()
        for _ in range(total):
            queue.put_nowait(None)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                (await client.post(url, json=body)).raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = seed_root(Path(tmp) / "root")
        port = free_port()
        with api_server(root.root, env={"CHAT_PROXY_VLLM_PORT": str(port)}) as base:
            httpx.post(f"{base}/v1/activate", json={"name": "demo-vision_(CPU)"}, timeout=60).raise_for_status()
            try:
                measure(base, port, args)
            finally:
                # The backend runs in its own session and would outlive the API server.
                httpx.post(f"{base}/v1/deactivate", timeout=30)


def measure(base: str, port: int, args: argparse.Namespace) -> None:
    """Interleaved latency series (non-streaming, streaming), then throughput at the given concurrency."""
    direct_url = f"http://127.0.0.1:{port}/v1/chat/completions"
    proxy_url = f"{base}/v1/chat/completions"
    direct_body = {**BODY, "model": "imageworks/demo-vision"}
    proxy_body = {**BODY, "model": "demo-vision_(CPU)"}
    print(f"requests per series: {args.requests} (interleaved direct/proxy), demo backend on :{port}")
    print(f"{'series':<24}{'p50 ms':>10}{'p99 ms':>10}{'added p50':>12}{'added p99':>12}")
    with httpx.Client(timeout=30) as client:
        for stream in (False, True):
            for _ in range(30):  # warm up connections and code paths
                timed(client, direct_url, direct_body, stream)
                timed(client, proxy_url, proxy_body, stream)
            direct, proxied = [], []
            for _ in range(args.requests):
                direct.append(timed(client, direct_url, direct_body, stream))
                proxied.append(timed(client, proxy_url, proxy_body, stream))
            label = "streaming" if stream else "non-streaming"
            d50, d99, p50, p99 = pct(direct, 50), pct(direct, 99), pct(proxied, 50), pct(proxied, 99)
            print(f"{label + ' direct':<24}{d50:>10.2f}{d99:>10.2f}")
            print(f"{label + ' proxy':<24}{p50:>10.2f}{p99:>10.2f}{p50 - d50:>12.2f}{p99 - d99:>12.2f}")
    total = args.requests * 2
    rps_direct = asyncio.run(throughput(direct_url, direct_body, total, args.concurrency))
    rps_proxy = asyncio.run(throughput(proxy_url, proxy_body, total, args.concurrency))
    print(
        f"throughput at concurrency {args.concurrency}: direct {rps_direct:,.0f} req/s, "
        f"proxy {rps_proxy:,.0f} req/s (ratio {rps_proxy / rps_direct:.2f})"
    )


if __name__ == "__main__":
    main()
