"""Benchmark: AppTest run time of the Registry page for generated registries of 100 / 1,000 / 5,000 entries.

For each size, a fresh deployment root gets a curated + discovered pair (every entry in both layers, a quarter
locked, verification and probe history for half of them), then the Registry page (the dashboard's default page)
is run under ``streamlit.testing.v1.AppTest``:

- ``cold``: the first run on that root (registry read, merged and validated; history read; table built),
- ``warm``: the median of the following runs (registry cached by file stat, as on every rerun in a session).

Target: 1,000 entries render in under 1.5 s (cold). One warm-up run on a tiny root first, so the figures do not
include importing pandas and streamlit. Run: ``uv run python bench/dashboard_render.py [--sizes 100 1000 5000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from imageworks_core import history
from imageworks_core.settings import get_settings

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
TARGET_S = {1000: 1.5}


def generate(root: Path, n: int) -> None:
    """A realistic registry of ``n`` entries plus history rows for half of them."""
    configs = root / "configs"
    configs.mkdir(parents=True)
    weights = root / "weights"
    curated, discovered = [], []
    for i in range(n):
        name = f"model-{i:05d}_(AWQ)"
        if i % 3 == 0:
            (weights / f"model-{i}").mkdir(parents=True)
        curated.append(
            {
                "name": name,
                "display_name": f"Model {i}",
                "backend": "vllm",
                "served_model_id": f"org/model-{i}",
                "roles": ["caption", "chat"] if i % 2 else ["keywords"],
                "role_priority": i % 7,
                "capabilities": {"text": True, "vision": bool(i % 3), "tools": bool(i % 5)},
                "backend_config": {"extra_args": ["--max-model-len", "8192"], "startup_timeout_s": 600},
                "generation_defaults": {"temperature": 0.2, "max_tokens": 512},
                "version_lock": {"locked": i % 4 == 0, "expected_aggregate_sha256": "ab" * 32},
                "testing": i % 10 == 0,
            }
        )
        discovered.append(
            {
                "name": name,
                "download_path": f"weights/model-{i}",
                "download_format": "awq",
                "quantization": "awq-4bit",
                "download_size_bytes": 5_000_000_000 + i,
                "source": {"provider": "huggingface", "repo_id": f"org/model-{i}", "revision": "0" * 40},
            }
        )
    (configs / "model_registry.curated.json").write_text(json.dumps(curated, indent=2))
    (configs / "model_registry.discovered.json").write_text(json.dumps(discovered, indent=2))
    settings = get_settings(root)
    with history.connect(settings) as conn:
        conn.executemany(
            "INSERT INTO verifications (name, at, mode, algorithm, result, aggregate) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    f"model-{i:05d}_(AWQ)",
                    history.now_iso(),
                    "full",
                    "sha256",
                    "drift" if i % 8 == 0 else "ok",
                    "ab" * 32,
                )
                for i in range(0, n, 2)
            ],
        )
        conn.executemany(
            "INSERT INTO probes (name, at, vision_ok, grounded, latency_ms, result_json) VALUES (?, ?, ?, ?, ?, ?)",
            [(f"model-{i:05d}_(AWQ)", history.now_iso(), i % 4 != 0, 1, 120.0, "{}") for i in range(0, n, 2)],
        )


def render(root: Path) -> float:
    """Seconds for one AppTest run of the Registry page on ``root``; fails loudly if the page raised."""
    os.environ["IMAGEWORKS_ROOT"] = str(root)
    at = AppTest.from_file(str(APP), default_timeout=120)
    started = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - started
    if at.exception or not at.dataframe:
        raise SystemExit(f"the Registry page failed on {root}: {[e.value for e in at.exception]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--warm-runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        warmup = Path(tmp) / "warmup"
        generate(warmup, 5)
        render(warmup)
        print(f"{'entries':>8}  {'cold (s)':>9}  {'warm median (s)':>16}  target")
        for size in args.sizes:
            root = Path(tmp) / f"root-{size}"
            generate(root, size)
            cold = render(root)
            warm = statistics.median(render(root) for _ in range(args.warm_runs))
            target = TARGET_S.get(size)
            verdict = "" if target is None else f"< {target} s: {'met' if cold < target else 'MISSED'}"
            print(f"{size:>8}  {cold:>9.3f}  {warm:>16.3f}  {verdict}")


if __name__ == "__main__":
    main()
