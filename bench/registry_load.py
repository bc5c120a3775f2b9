"""Benchmark: load + validate + merge of a generated registry (default 5,000 entries), cold and cached.

Prints milliseconds per load. Targets on a 2-core machine: cached reload < 1 ms, cold < 300 ms.
Run: ``uv run python bench/registry_load.py [--entries N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from imageworks_core.registry import load_registry
from imageworks_core.settings import get_settings


def generate(root: Path, n: int) -> None:
    """A realistic pair: every entry curated (decisions) and discovered (machine facts)."""
    configs = root / "configs"
    configs.mkdir(parents=True)
    curated, discovered = [], []
    for i in range(n):
        name = f"model-{i:05d}_(AWQ)"
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
            }
        )
        discovered.append(
            {
                "name": name,
                "download_path": f"~/ai-models/weights/org/model-{i}",
                "download_format": "awq",
                "quantization": "awq-4bit",
                "download_size_bytes": 5_000_000_000 + i,
                "source": {"provider": "huggingface", "repo_id": f"org/model-{i}", "revision": "0" * 40},
            }
        )
    (configs / "model_registry.curated.json").write_text(json.dumps(curated, indent=2))
    (configs / "model_registry.discovered.json").write_text(json.dumps(discovered, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root, args.entries)
        settings = get_settings(root)
        cold = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            registry = load_registry(force=True, settings=settings)
            cold.append((time.perf_counter() - start) * 1000)
        assert len(registry) == args.entries
        cached = []
        for _ in range(args.repeat * 100):
            start = time.perf_counter()
            load_registry(settings=settings)
            cached.append((time.perf_counter() - start) * 1000)
    cold_ms, cached_ms = statistics.median(cold), statistics.median(cached)
    print(f"entries: {args.entries} (curated + discovered, merged and validated)")
    print(f"cold load:   median {cold_ms:8.1f} ms  (min {min(cold):.1f}, max {max(cold):.1f})  target < 300 ms")
    print(f"cached load: median {cached_ms:8.4f} ms  (max {max(cached):.4f})  target < 1 ms")
    print(f"ratio cold/cached: {cold_ms / cached_ms:,.0f}x")


if __name__ == "__main__":
    main()
