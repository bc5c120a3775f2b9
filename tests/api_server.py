"""Start ``imageworks-models serve`` as a real uvicorn process on a free loopback port (test helper)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from conftest import free_port


@contextmanager
def api_server(root: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Yield the base URL of a running API server for ``root``; stops it (and its group) afterwards."""
    port = free_port()
    proc_env = {**os.environ, "IMAGEWORKS_ROOT": str(root), **(env or {})}
    log = open(root / f"api-{port}.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "imageworks_core.cli", "serve", "--port", str(port)],
        env=proc_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1, headers=_auth(env)).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"API server did not start: {(root / f'api-{port}.log').read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _auth(env: dict[str, str] | None) -> dict[str, str]:
    token = (env or {}).get("IMAGEWORKS_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}
