"""Benchmark: weight-hashing throughput of ``imageworks_core.hashing`` against its peers, page cache warm.

Builds a model-like directory (default 4 GiB: a few multi-GB shards, the last one smaller as Hugging Face
shards are, plus small json/tokenizer files), reads it once to warm the page cache, then times in one run:
our full sha256 manifest, our blake3, our fast mode on the unchanged tree, single-threaded hashlib sha256
(same 1 MiB buffer), ``sha256sum``, ``b3sum`` (if installed), ``cat`` to /dev/null, and the ``model_signing``
package's digest of the same directory (if importable). A second scenario times fast re-verification of an
unchanged tree of many small files.

Targets (2-core machine): sha256 full >= 1.7x single-threaded hashlib and >= 1.0x model_signing; blake3 >=
0.7x cat; fast re-verify of 10,000 files < 0.3 s.

Run: ``uv run python bench/hash_throughput.py [--size-gb 4] [--dir PATH] [--fast-files 10000] [--repeat 3]``.
With model_signing (kept out of the project venv; its 1.1 release imports pyOpenSSL without declaring it):
``uv run --with model-signing --with pyopenssl python bench/hash_throughput.py --size-gb 1``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from imageworks_core.hashing import StatCache, hash_directory

GB = 1e9
BLOCK = 16 * 1024 * 1024
SMALL_FILES = {
    "config.json": 2_000,
    "generation_config.json": 300,
    "tokenizer_config.json": 50_000,
    "special_tokens_map.json": 600,
    "tokenizer.json": 7_000_000,
    "model.safetensors.index.json": 60_000,
    "chat_template.jinja": 4_000,
    "README.md": 12_000,
    "LICENSE": 11_000,
}


def _write_random(path: Path, size: int, block: bytes) -> None:
    """``size`` bytes that differ per block (a counter prefix) without paying for os.urandom per byte."""
    with open(path, "wb") as fh:
        written, counter = 0, 0
        while written < size:
            chunk = counter.to_bytes(8, "little") + block[8:]
            n = min(len(chunk), size - written)
            fh.write(chunk[:n])
            written += n
            counter += 1


def build_model(root: Path, size_gb: float) -> None:
    """A model-like tree of about ``size_gb`` GiB: 3 shards (two equal, the last half size) + small files."""
    root.mkdir(parents=True, exist_ok=True)
    total = int(size_gb * 1024**3)
    shard = total * 2 // 5
    sizes = [shard, shard, total - 2 * shard]
    block = os.urandom(BLOCK)
    for i, size in enumerate(sizes, start=1):
        path = root / f"model-{i:05d}-of-{len(sizes):05d}.safetensors"
        if not path.exists() or path.stat().st_size != size:
            _write_random(path, size, block)
    for name, size in SMALL_FILES.items():
        path = root / name
        if not path.exists() or path.stat().st_size != size:
            path.write_bytes(os.urandom(size // 2).hex().encode()[:size])


def build_small_tree(root: Path, count: int) -> None:
    """``count`` files of 1-4 KiB spread over 100 directories (a dataset-like or many-adapter tree)."""
    for i in range(count):
        d = root / f"d{i % 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}.json").write_bytes(os.urandom(512 + (i % 4) * 512))


def model_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def single_thread_sha256(files: list[Path]) -> None:
    buf = memoryview(bytearray(1024 * 1024))  # the same read size as ours
    for path in files:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(buf[:n])
        h.hexdigest()


def run_tool(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def model_signing_digest(algorithm: str) -> Callable[..., object] | None:
    """model_signing's file-level manifest of a directory (its default serialization), or None if not importable."""
    try:
        import model_signing.hashing as ms_hashing  # type: ignore[import-not-found]
    except ImportError as exc:
        print(
            f"model_signing: not importable ({exc}); to include it run `uv run --with model-signing --with pyopenssl "
            "python bench/hash_throughput.py ...` (kept out of the project venv)"
        )
        return None
    return lambda root, workers=None: (
        ms_hashing.Config().use_file_serialization(hashing_algorithm=algorithm, max_workers=workers).hash(root)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0, help="model tree size in GiB (default 4)")
    parser.add_argument("--dir", type=Path, help="build (or reuse) the model tree here and keep it")
    parser.add_argument("--fast-files", type=int, default=10_000, help="files in the small-file scenario (0: skip)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every measurement; the best is kept")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="hash-bench-", dir="/tmp"))
    model_dir = args.dir or tmp / "model"
    try:
        started = time.perf_counter()
        build_model(model_dir, args.size_gb)
        files = model_files(model_dir)
        total = sum(p.stat().st_size for p in files)
        print(
            f"tree: {model_dir} ({len(files)} files, {total / GB:.2f} GB) built in {time.perf_counter() - started:.1f} s"
        )
        print(
            f"cpus: {os.cpu_count()}, repeat: best of {args.repeat}, page cache warmed by one cat pass, "
            f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        names = [str(p) for p in files]
        run_tool(["cat", *names])

        cache: StatCache = hash_directory(model_dir).cache
        variants: dict[str, Callable[[], object]] = {
            "ours sha256 (full)": lambda: hash_directory(model_dir),
            "ours blake3 (full)": lambda: hash_directory(model_dir, algorithm="blake3"),
            "ours fast (unchanged)": lambda: hash_directory(model_dir, mode="fast", cache=cache),
            "hashlib sha256, 1 thread": lambda: single_thread_sha256(files),
            "sha256sum": lambda: run_tool(["sha256sum", *names]),
        }
        if shutil.which("b3sum"):
            variants["b3sum"] = lambda: run_tool(["b3sum", *names])
        else:
            print("b3sum: not installed (apt-get install b3sum, or cargo install b3sum); skipped")
        variants["cat > /dev/null"] = lambda: run_tool(["cat", *names])
        ms_sha256 = model_signing_digest("sha256")
        ms_blake3 = model_signing_digest("blake3") if ms_sha256 is not None else None
        if ms_sha256 is not None and ms_blake3 is not None:
            variants["model_signing sha256 (file)"] = lambda: ms_sha256(model_dir)
            # Its default pool is min(32, cpus + 4) threads, which on a busy box also wins it a bigger CPU share.
            variants["model_signing sha256, cpus"] = lambda: ms_sha256(model_dir, workers=os.cpu_count())
            variants["model_signing blake3 (file)"] = lambda: ms_blake3(model_dir)

        # Round-robin: every round runs every variant once, so a burst of other load hits all of them alike.
        timings: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeat):
            for name, fn in list(variants.items()):
                started = time.perf_counter()
                try:
                    fn()
                except ValueError as exc:  # model_signing releases before 1.1 know no blake3
                    print(f"{name}: failed ({exc}); dropped")
                    del variants[name], timings[name]
                    continue
                timings[name].append(time.perf_counter() - started)
        results = {name: min(times) for name, times in timings.items()}

        print(f"\n{'what':<30}{'best s':>10}{'GB/s':>10}{'median GB/s':>14}")
        for name, times in timings.items():
            median = statistics.median(times)
            print(f"{name:<30}{min(times):>10.3f}{total / min(times) / GB:>10.2f}{total / median / GB:>14.2f}")

        def ratio(ours: str, peer: str, target: float) -> None:
            if peer not in results:
                print(f"{ours} / {peer}: n/a ({peer} not measured)")
                return
            value = results[peer] / results[ours]  # throughput ratio = inverse time ratio
            verdict = "PASS" if value >= target else "MISS"
            print(f"{ours} / {peer}: {value:.2f}x (target >= {target}x) {verdict}")

        print()
        ratio("ours sha256 (full)", "hashlib sha256, 1 thread", 1.7)
        ratio("ours sha256 (full)", "model_signing sha256 (file)", 1.0)
        ratio("ours sha256 (full)", "model_signing sha256, cpus", 1.0)
        ratio("ours sha256 (full)", "sha256sum", 1.0)
        ratio("ours blake3 (full)", "cat > /dev/null", 0.7)
        ratio("ours blake3 (full)", "b3sum", 1.0)
        ratio("ours blake3 (full)", "model_signing blake3 (file)", 1.0)
        print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (other work skews figures)")

        if args.fast_files:
            small = tmp / "small"
            build_small_tree(small, args.fast_files)
            first = hash_directory(small)
            full_s = best_of(args.repeat, lambda: hash_directory(small))
            fast_s = best_of(max(args.repeat, 3), lambda: hash_directory(small, mode="fast", cache=first.cache))
            verdict = "PASS" if fast_s < 0.3 else "MISS"
            print(
                f"\n{args.fast_files} small files: full {full_s:.3f} s, fast re-verify (unchanged) {fast_s:.3f} s "
                f"(target < 0.3 s) {verdict}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
