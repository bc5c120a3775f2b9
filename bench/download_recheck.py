"""Benchmark: what re-checking a downloaded model costs, against the fake Hub of the tests (loopback, no network).

Serves a ~1 GiB repo (two 512 MiB LFS shards, a config, a 4 MiB tokenizer) from ``tests/hub_server.py``, downloads
it once, then times: a re-run on the unchanged directory (the history DB's stat cache vouches for every file, so
nothing is read), a first check of an existing copy with no cache (every byte hashed by the engine), and a re-run
without ``settings`` (no persistent cache). The fake Hub's own per-request hashing is memoised so the timings are
the downloader's. Needs ~2.5 GiB of RAM and ~2 GiB of disk under ``--dir``.

Run: ``uv run python bench/download_recheck.py [--shard-mib 512] [--dir /tmp]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hub_server import FakeRepo, HubServer  # noqa: E402

from imageworks_core.download import DownloadResult, download_repo  # noqa: E402
from imageworks_core.settings import Settings  # noqa: E402

MIB = 1024 * 1024


def timed(label: str, call: Callable[[], DownloadResult]) -> None:
    started = time.perf_counter()
    result = call()
    print(f"{label}: {time.perf_counter() - started:.3f} s ({len(result.reused_files)} files reused)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shard-mib", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    files = {
        "model-00001-of-00002.safetensors": os.urandom(args.shard_mib * MIB),
        "model-00002-of-00002.safetensors": os.urandom(args.shard_mib * MIB),
        "config.json": b'{"architectures": ["Bench"]}',
        "tokenizer.json": os.urandom(2 * MIB).hex().encode(),
    }
    repo = FakeRepo(files)
    repo.sha256 = functools.lru_cache(None)(repo.sha256)  # type: ignore[method-assign]
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="download-recheck-"))
    settings = Settings(IMAGEWORKS_ROOT=work / "root")
    try:
        with HubServer({"bench/model": repo}) as hub:
            target = work / "weights"

            def run(where: Path = target, **kw: Any) -> DownloadResult:
                return download_repo("bench/model", where, endpoint=hub.url, **kw)

            timed("fresh download", lambda: run(settings=settings))
            for attempt in range(3):
                timed(f"re-check, unchanged (stat cache) #{attempt + 1}", lambda: run(settings=settings))
            copy = work / "copy"
            shutil.copytree(target, copy, ignore=shutil.ignore_patterns(".cache"))
            timed("first check of an existing copy (no cache)", lambda: run(copy, settings=settings))
            timed("re-check without settings (no persistent cache)", lambda: run())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
