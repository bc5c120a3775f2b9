"""Weight hashing: a deterministic per-file manifest of a model directory, its aggregate, and drift reports.

Pure functions that take paths and return plain data (pydantic models, named tuples); nothing here touches the
registry, the CLI or SQLite. ``verify``/``lock`` are thin shells over :func:`hash_directory`,
:func:`verify_directory` and :func:`compare_manifests`; the downloader digests the files it may reuse with
:func:`hash_files` (same fast mode, same stat-cache rows) and the bytes it fetches with :func:`new_hasher`.

What is hashed
    Every regular file under the model directory that no ignore rule matches, walked deterministically and
    recorded under its POSIX path relative to the directory. Each file gets its size and a digest of its raw
    bytes: SHA-256 by default (so a weight file's digest equals its Hugging Face LFS ``sha256``), or BLAKE3
    (``algorithm="blake3"``, faster, same 64-hex-digit length).

Manifest line format (format version 1)
    One UTF-8 line per file::

        {path}\\t{size}\\t{algorithm}\\t{digest}\\n

    ``path`` is the relative POSIX path, ``size`` the byte count in decimal, ``algorithm`` is ``sha256`` or
    ``blake3``, ``digest`` the lowercase hex digest. Lines are ordered by path (Unicode code point order, which
    is also ``LC_ALL=C sort`` order of the lines because paths may not contain control characters).

Aggregate
    ``aggregate = sha256(concatenation of all lines)`` as lowercase hex. It is always SHA-256, whatever the
    per-file algorithm. Recompute it from a manifest JSON with shell tools::

        jq -r '.files[] | "\\(.path)\\t\\(.size)\\t\\(.algorithm)\\t\\(.digest)"' manifest.json \\
            | LC_ALL=C sort | sha256sum

    or straight from a directory with no ignored files (sha256 mode)::

        cd MODEL_DIR && find -L . -type f -printf '%P\\n' | LC_ALL=C sort | while IFS= read -r f; do
            printf '%s\\t%s\\tsha256\\t%s\\n' "$f" "$(stat -L -c %s "$f")" "$(sha256sum < "$f" | cut -d' ' -f1)"
        done | sha256sum

Ignore rules
    Defaults :data:`DEFAULT_IGNORE` plus the entry's ``hash_ignore`` patterns. Simple gitignore-like semantics:
    a pattern ending in ``/`` matches directories only (and everything under them); any other pattern matches
    files and directories; a pattern is matched with :func:`fnmatch.fnmatchcase` against the entry's basename
    and against its relative path; a leading ``/`` anchors it to the relative path only. The rules used are
    stored in the manifest so a re-verification applies exactly the same ones.

Symlinks
    A link whose target resolves inside the model directory is hashed as its target and recorded under the
    link's path. A link that escapes the directory, a broken link and a link loop raise :class:`WeightsError`
    (so a Hugging Face cache ``snapshots/<rev>`` directory, whose files link into ``../../blobs``, is refused:
    hash a ``local_dir`` download). A fifo, socket or device file in the tree is refused too.

Readability
    A regular file whose mode has no read bit for anyone (``chmod 000``, ``chmod 200``) is refused in both
    modes, even when we run as root and could read it: the backend usually runs as another user and could not
    load it, so such a file is broken or tampered with and never "OK". (Whether one *specific* other user can
    read a file is not checked: we do not know which user the backend runs as.) A file this process cannot open
    fails with "cannot read".

Fast mode
    A stat cache maps relative path -> :class:`StatEntry` ``(size, mtime_ns, inode, ctime_ns, algorithm,
    digest)``, taken by ``fstat`` on the open file just before its first byte is read. A file is read again when
    it is new, when any of ``(size, mtime_ns, inode, ctime_ns, algorithm)`` differs from its row, or when this
    process may not read it (``os.access``); only then is its digest taken from the cache. A row of an older
    layout (no ``ctime_ns``) never matches, so it is re-hashed, not an error. A file whose size, mtime or ctime
    moves while it is read fails the run ("changed while it was being hashed").

    What it catches: any write through the filesystem by a non-root user, including an in-place write whose
    mtime was put back (``touch -r``, ``os.utime``) and a same-size, same-mtime replacement by rename or
    delete-and-recreate (which may even reuse the inode number): each sets the inode's ctime to the current
    time, and only the kernel sets ctime. ``chmod``/``chown`` move the ctime too (then the file is re-read).

    What it cannot catch: someone who controls the clock or the disk below the filesystem (root setting the
    system time, or editing the block device, a disk image or an NFS export directly); a write in the same
    clock tick as the hash's ``fstat`` on a kernel with coarse timestamps (up to a few ms; kernels with
    multigrain timestamps, Linux 6.13+ on ext4/xfs/btrfs/tmpfs, close this); filesystems that do not keep a
    ctime, or keep it coarsely (FAT, some network filesystems). Fast mode trusts the stat cache in the history
    DB, so whoever can write that DB can forge it. Full mode reads every byte, trusts nothing but the lock
    manifest, and is the one to set a lock with and to use after an incident.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import heapq
import operator
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypedDict, Unpack

import blake3
from pydantic import BaseModel, ConfigDict, Field, computed_field

from .errors import UsageError, WeightsError
from .units import format_bytes

__all__ = [
    "ALGORITHMS",
    "DEFAULT_IGNORE",
    "GIT_BLOB_SHA1",
    "MANIFEST_VERSION",
    "TEXT_FILE_MAX_BYTES",
    "TEXT_FILE_PATTERNS",
    "Algorithm",
    "DigestName",
    "DriftReport",
    "FileChange",
    "FileDigest",
    "HashMode",
    "Hasher",
    "HashResult",
    "Manifest",
    "ProgressCallback",
    "StatCache",
    "StatEntry",
    "aggregate_of",
    "collect_text_files",
    "compare_manifests",
    "digest_file",
    "hash_directory",
    "hash_files",
    "ignore_rules",
    "is_ignored",
    "manifest_line",
    "new_hasher",
    "update_from_file",
    "verify_directory",
]

Algorithm = Literal["sha256", "blake3"]
HashMode = Literal["full", "fast"]

ALGORITHMS: tuple[str, ...] = ("sha256", "blake3")
GIT_BLOB_SHA1 = "git-blob-sha1"
"""git's object id of a file, ``sha1(b"blob <size>\\0" + content)``: the Hub's ``blobId`` for a file it stores
without LFS. Not a manifest algorithm (SHA-1 is not collision-resistant); the downloader checks small files with it."""
DigestName = Literal["sha256", "blake3", "git-blob-sha1"]
MANIFEST_VERSION = 1
DEFAULT_IGNORE: tuple[str, ...] = (".git/", ".cache/", "*.lock", "*.incomplete", ".DS_Store")

# Small text files whose content is kept in the manifest so drift on them can be shown as a diff.
# Matched case-insensitively against the basename.
TEXT_FILE_PATTERNS: tuple[str, ...] = (
    "readme*",
    "license*",
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer*.json",
    "special_tokens_map.json",
    "vocab*",
    "merges*",
    "*.jinja",
    "chat_template*",
)
TEXT_FILE_MAX_BYTES = 256 * 1024

# 1 MiB per read: hashlib drops the GIL for the whole update and syscalls are amortised; with two threads it
# measured a little faster than 8 MiB (the chunk is still in cache when it is hashed).
_CHUNK_BYTES = 1024 * 1024
# Below this, mmap setup costs more than it saves, and BLAKE3 threads have nothing to split.
_MMAP_MIN_BYTES = 4 * 1024 * 1024
_PROGRESS_EVERY_BYTES = 64 * 1024 * 1024
# A worker hands its file back only when another has this much more left (see _Scheduler).
_SWITCH_BYTES = 64 * 1024 * 1024
# A tree of many small files would otherwise call the callback once per file.
_PROGRESS_MIN_INTERVAL_S = 0.1
# A file none of owner, group and others may read: only root's override reads it, a backend user cannot.
_ANY_READ_BITS = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
# Control characters would break the line format (and its sort order); lone surrogates are how Python spells
# bytes that are not UTF-8 in a file name.
_BAD_NAME_CHARS = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


class ProgressCallback(Protocol):
    """``progress(bytes_done, bytes_total, files_done, files_total, current_path)``.

    Called from worker threads, one call at a time (serialized by a lock), at most every 64 MiB read or at the
    end of a file (throttled to 10 calls/s for trees of small files); the last call has ``bytes_done ==
    bytes_total``. Totals count only the bytes and files this run reads (in fast mode: the re-hashed ones).
    """

    def __call__(
        self, bytes_done: int, bytes_total: int, files_done: int, files_total: int, current_path: str
    ) -> None: ...


class Hasher(Protocol):
    """What :func:`new_hasher` returns (a hashlib or blake3 object)."""

    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


class StatEntry(NamedTuple):
    """One stat-cache row: what a file looked like when it was last hashed (persist it as a table row).

    The first five fields are the cache key (see "Fast mode" in the module docstring); ``digest`` is the value.
    """

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int
    algorithm: str
    digest: str


StatCache = dict[str, StatEntry]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileDigest(_Model):
    """One manifest line: a file's relative POSIX path, size in bytes and hex digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int = Field(ge=0)
    algorithm: Algorithm
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Model):
    """The result of hashing a model directory; its JSON form is what a lock stores."""

    manifest_version: Literal[1] = MANIFEST_VERSION
    root: str = Field(description="Directory that was hashed (informational; not part of the aggregate).")
    algorithm: Algorithm
    ignore: list[str] = Field(description="Ignore rules applied; re-verification applies the same ones.")
    files: list[FileDigest]
    aggregate: str = Field(description="sha256 over the manifest lines (see the module docstring).")
    total_bytes: int
    file_count: int
    duration_s: float
    mode: HashMode
    rehashed: list[str] = Field(
        default_factory=list,
        description="Fast mode: files read again because the stat cache missed. Empty in full mode (all read).",
    )
    text_files: dict[str, str] = Field(
        default_factory=dict, description="Content of small text files (README, LICENSE, configs) for diffs."
    )

    def by_path(self) -> dict[str, FileDigest]:
        """Files keyed by relative path."""
        return {f.path: f for f in self.files}


@dataclass(frozen=True)
class HashResult:
    """What :func:`hash_directory` returns: the manifest, the new stat cache, and the files actually read."""

    manifest: Manifest
    cache: StatCache
    rehashed: list[str] = field(default_factory=list)


class FileChange(_Model):
    """A file present in both manifests whose size or digest differs."""

    path: str
    old_size: int
    old_digest: str
    new_size: int
    new_digest: str


class DriftReport(_Model):
    """Differences between an expected (locked) manifest and the one just computed."""

    # "ignore" so a dict from to_dict() (which carries the computed "ok") loads back.
    model_config = ConfigDict(extra="ignore")

    algorithm: Algorithm
    expected_aggregate: str
    actual_aggregate: str
    file_count: int
    total_bytes: int
    modified: list[FileChange] = Field(default_factory=list)
    added: list[FileDigest] = Field(default_factory=list)
    removed: list[FileDigest] = Field(default_factory=list)
    text_diffs: dict[str, str] = Field(default_factory=dict, description="Unified diff per changed text file.")
    notes: list[str] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """True when nothing drifted and both aggregates agree."""
        return not (self.modified or self.added or self.removed) and self.expected_aggregate == self.actual_aggregate

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (includes ``ok``)."""
        return self.model_dump(mode="json")

    def format_text(self) -> str:
        """Human-readable report for the CLI: a summary line, one line per changed file, then text diffs."""
        if self.ok:
            return (
                f"OK: {self.file_count} files, {format_bytes(self.total_bytes)}, "
                f"aggregate sha256 {self.actual_aggregate}"
            )
        lines = [
            f"DRIFT: {len(self.modified)} modified, {len(self.added)} added, {len(self.removed)} removed "
            f"(expected aggregate {self.expected_aggregate[:16]}…, actual {self.actual_aggregate[:16]}…)"
        ]
        for change in self.modified:
            lines.append(
                f"  modified  {change.path}  size {change.old_size} -> {change.new_size}  "
                f"{self.algorithm} {change.old_digest[:16]}… -> {change.new_digest[:16]}…"
            )
        lines.extend(f"  added     {f.path}  ({f.size} bytes)" for f in self.added)
        lines.extend(f"  removed   {f.path}  ({f.size} bytes)" for f in self.removed)
        lines.extend(f"  note: {note}" for note in self.notes)
        for path, diff in self.text_diffs.items():
            lines.append(f"--- diff of {path} ---")
            lines.append(diff.rstrip("\n"))
        return "\n".join(lines)


# Manifest lines and aggregate -------------------------------------------------------------------------------


_by_path = operator.attrgetter("path")


def manifest_line(file: FileDigest) -> str:
    """The exact manifest line for one file: ``f"{path}\\t{size}\\t{algorithm}\\t{digest}\\n"``."""
    return f"{file.path}\t{file.size}\t{file.algorithm}\t{file.digest}\n"


def aggregate_of(files: Iterable[FileDigest]) -> str:
    """SHA-256 hex over the UTF-8 manifest lines of ``files`` sorted by path."""
    lines = "".join(map(manifest_line, sorted(files, key=_by_path)))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


# Ignore rules ---------------------------------------------------------------------------------------------------


def ignore_rules(extra: Iterable[str] = (), base: Iterable[str] = DEFAULT_IGNORE) -> list[str]:
    """The effective rule list: ``base`` (defaults) then ``extra`` (an entry's ``hash_ignore``), de-duplicated."""
    rules: list[str] = []
    for raw in (*base, *extra):
        pattern = raw.strip()
        if pattern and pattern not in rules:
            rules.append(pattern)
    return rules


class _IgnoreMatcher:
    """Compiled ignore rules: one regex per (kind, target) so a 10,000-file walk stays cheap."""

    def __init__(self, rules: Sequence[str]) -> None:
        any_name, any_rel, dir_name, dir_rel = [], [], [], []
        for rule in rules:
            dir_only = rule.endswith("/")
            core = rule.rstrip("/")
            anchored = core.startswith("/")
            core = core.lstrip("/")
            if not core:
                continue
            regex = fnmatch.translate(core)
            (dir_rel if dir_only else any_rel).append(regex)
            if not anchored:
                (dir_name if dir_only else any_name).append(regex)
        self.any_name = _compile_any(any_name)
        self.any_rel = _compile_any(any_rel)
        self.dir_name = _compile_any(dir_name)
        self.dir_rel = _compile_any(dir_rel)

    def matches(self, rel: str, name: str, is_dir: bool) -> bool:
        if self.any_name(name) or self.any_rel(rel):
            return True
        return is_dir and bool(self.dir_name(name) or self.dir_rel(rel))


def _compile_any(regexes: list[str]) -> Callable[[str], re.Match[str] | None]:
    # "(?!)" never matches: an empty rule set costs one failed match instead of a None check per file.
    return re.compile("|".join(f"(?:{r})" for r in regexes) or "(?!)").match


def is_ignored(rel_path: str, rules: Sequence[str], *, is_dir: bool = False) -> bool:
    """Whether ``rel_path`` (POSIX, relative to the model directory) is excluded by ``rules``.

    Only the entry itself is tested; the walk never descends into an ignored directory.
    """
    return _IgnoreMatcher(rules).matches(rel_path, rel_path.rsplit("/", 1)[-1], is_dir)


# Walking ---------------------------------------------------------------------------------------------------------


class _Job(NamedTuple):
    rel: str
    path: str
    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int


_by_name = operator.attrgetter("name")


def _check_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise WeightsError(f"weights directory not found: {path}")
    if not path.is_dir():
        raise WeightsError(f"weights path is not a directory: {path}")
    return path.resolve()


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk(root: Path, matcher: _IgnoreMatcher) -> list[_Job]:
    """Every file to hash, sorted by relative path; raises WeightsError on escaping/broken links and odd files."""
    root_real = str(root)
    jobs: list[_Job] = []
    # Bound once: this loop runs per file, and fast mode on 10,000 files is mostly this loop.
    bad_name, any_name, any_rel, dir_name, dir_rel = (
        _BAD_NAME_CHARS.search,
        matcher.any_name,
        matcher.any_rel,
        matcher.dir_name,
        matcher.dir_rel,
    )
    is_dir_mode, is_reg_mode = stat.S_ISDIR, stat.S_ISREG
    # (directory on disk, its relative path, (device, inode) of it and its ancestors for loop detection)
    root_st = os.stat(root_real)
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [
        (root_real, "", frozenset({(root_st.st_dev, root_st.st_ino)}))
    ]
    while stack:
        directory, rel_dir, ancestors = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=_by_name)
        except OSError as exc:
            raise WeightsError(f"cannot list {rel_dir or '.'} in {root}: {exc.strerror or exc}") from exc
        for entry in entries:
            name = entry.name
            rel = rel_dir + name
            if bad_name(name):
                raise WeightsError(
                    f"file name {rel!r} in {root} contains a control character or is not valid UTF-8; rename it"
                )
            if any_name(name) or any_rel(rel):
                continue
            is_link = entry.is_symlink()
            try:
                st = entry.stat()
            except OSError as exc:
                if is_link:
                    target = os.readlink(entry.path)
                    raise WeightsError(f"broken symlink {rel} -> {target} in {root}: {exc.strerror}") from exc
                raise WeightsError(f"cannot read {rel} in {root}: {exc.strerror or exc}") from exc
            is_dir = is_dir_mode(st.st_mode)
            if is_dir and (dir_name(name) or dir_rel(rel)):
                continue
            path = entry.path
            if is_link:
                path = os.path.realpath(path)
                if not _within(path, root_real):
                    raise WeightsError(
                        f"symlink {rel} points outside the model directory {root}: {os.readlink(entry.path)} "
                        f"(resolves to {path})"
                    )
            if is_dir:
                identity = (st.st_dev, st.st_ino)
                if identity in ancestors:
                    raise WeightsError(f"symlink loop at {rel} in {root}: it leads back to one of its parents")
                stack.append((entry.path, rel + "/", ancestors | {identity}))
            elif is_reg_mode(st.st_mode):
                if not st.st_mode & _ANY_READ_BITS:
                    raise WeightsError(_no_read_bits(rel, root, st.st_mode))
                jobs.append(_Job(rel, path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
            else:
                raise WeightsError(f"{rel} in {root} is not a regular file ({_kind(st.st_mode)}); remove it")
    jobs.sort()  # by rel, the first field
    return jobs


def _no_read_bits(rel: str, root: Path | str, mode: int) -> str:
    return (
        f"{rel} in {root} has no read permission for anyone (mode 0o{stat.S_IMODE(mode):03o}): a backend not "
        "running as root could not load it; restore it with `chmod a+r` after checking why it changed, or re-download"
    )


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    if stat.S_ISCHR(mode):
        return "character device"
    return "block device" if stat.S_ISBLK(mode) else "special file"


# Hashing -------------------------------------------------------------------------------------------------------


class _Progress:
    """Thread-safe byte/file counter that forwards throttled updates to the caller's callback."""

    def __init__(self, callback: ProgressCallback | None, bytes_total: int, files_total: int) -> None:
        self._callback = callback
        self._lock = threading.Lock()
        self.bytes_total = bytes_total
        self.files_total = files_total
        self.bytes_done = 0
        self.files_done = 0
        self._reported_bytes = 0
        self._reported_at = 0.0

    def add_bytes(self, n: int, rel: str) -> None:
        if self._callback is None:
            return
        with self._lock:
            self.bytes_done += n
            if self.bytes_done - self._reported_bytes >= _PROGRESS_EVERY_BYTES:
                self._report(rel)

    def file_done(self, rel: str) -> None:
        if self._callback is None:
            return
        with self._lock:
            self.files_done += 1
            now = time.monotonic()
            if self.files_done == self.files_total or now - self._reported_at >= _PROGRESS_MIN_INTERVAL_S:
                self._report(rel)

    def _report(self, rel: str) -> None:
        assert self._callback is not None
        self._reported_bytes = self.bytes_done
        self._reported_at = time.monotonic()
        self._callback(self.bytes_done, self.bytes_total, self.files_done, self.files_total, rel)


_thread_state = threading.local()


def _buffer() -> memoryview:
    """A read buffer reused by every file this thread hashes (no allocation per chunk or per file)."""
    buf = getattr(_thread_state, "buffer", None)
    if buf is None:
        buf = _thread_state.buffer = memoryview(bytearray(_CHUNK_BYTES))
    return buf


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    # ctime too: an in-place write whose mtime was put back during the read still moves it.
    stamp = (before.st_size, before.st_mtime_ns, before.st_ctime_ns)
    return stamp != (after.st_size, after.st_mtime_ns, after.st_ctime_ns)


def _row(st: os.stat_result, algorithm: str, digest: str) -> StatEntry:
    """The cache row for a file hashed while it had stat ``st`` (taken before its first byte was read)."""
    return StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, algorithm, digest)


def _unreadable(job: _Job, exc: OSError) -> WeightsError:
    return WeightsError(f"cannot read {job.rel} ({job.path}): {exc.strerror or exc}")


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


class _FileTask:
    """One file being hashed; any worker may advance it by a chunk, never two at once."""

    __slots__ = ("job", "algorithm", "fh", "hasher", "before", "done")

    def __init__(self, job: _Job, algorithm: str) -> None:
        self.job = job
        self.algorithm = algorithm
        self.fh: Any = None
        self.hasher: Any = None
        self.before: os.stat_result | None = None
        self.done = 0

    @property
    def remaining(self) -> int:
        return self.job.size - self.done

    def step(self, buf: memoryview, progress: _Progress) -> StatEntry | None:
        """Hash the next chunk; return the cache row once the whole file is read, else None."""
        job = self.job
        try:
            if self.fh is None:
                # O_NONBLOCK: a fifo swapped in after the walk must fail the fstat check below, not hang open().
                self.fh = open(job.path, "rb", buffering=0, opener=_open_nonblocking)
                self.before = os.fstat(self.fh.fileno())
                if not stat.S_ISREG(self.before.st_mode):
                    raise WeightsError(f"{job.rel} is not a regular file ({_kind(self.before.st_mode)}); remove it")
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self.fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self.hasher = new_hasher(self.algorithm, self.before.st_size)
            assert self.before is not None
            n = self.fh.readinto(buf)
            if n:
                self.hasher.update(buf[:n])
                self.done += n
                progress.add_bytes(n, job.rel)
                if self.done < self.before.st_size:
                    return None
            after = os.fstat(self.fh.fileno())
        except OSError as exc:
            self.close()
            raise _unreadable(job, exc) from exc
        except BaseException:
            self.close()
            raise
        self.close()
        if _changed(self.before, after):
            raise WeightsError(f"{job.rel} changed while it was being hashed; retry once writes to it have finished")
        progress.file_done(job.rel)
        return _row(self.before, self.algorithm, self.hasher.hexdigest())

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class _Scheduler:
    """Hands files to workers longest-remaining-first, switching files between chunks to balance the tail.

    SHA-256 of one file is sequential, so a pool that finishes each file before starting the next leaves cores
    idle at the end (2 cores, shards of 5, 5 and 1 GB: 6 GB of wall time for 11 GB of work). Advancing the file
    with the most bytes left, and handing a file back when another has ``_SWITCH_BYTES`` more left, keeps every
    core busy until the last few chunks (5.5 GB in that example). The threshold keeps switches rare.
    """

    def __init__(self, tasks: list[_FileTask]) -> None:
        self._cond = threading.Condition()
        self._heap = [(-t.remaining, t.job.rel, t) for t in tasks]
        heapq.heapify(self._heap)
        self._busy = 0
        self.results: dict[str, StatEntry] = {}
        self.error: BaseException | None = None
        self._tasks = tasks

    def take(self) -> _FileTask | None:
        """The available file with the most bytes left; None once everything is done or a worker failed."""
        with self._cond:
            while not self._heap and self._busy and self.error is None:
                self._cond.wait()
            if not self._heap or self.error is not None:
                return None
            self._busy += 1
            return heapq.heappop(self._heap)[2]

    def swap(self, task: _FileTask) -> _FileTask:
        """Keep ``task`` unless a waiting file has clearly more left; then hand it back and take that one."""
        with self._cond:
            if not self._heap or -self._heap[0][0] <= task.remaining + _SWITCH_BYTES:
                return task
            return heapq.heapreplace(self._heap, (-task.remaining, task.job.rel, task))[2]

    def finish(self, task: _FileTask, entry: StatEntry) -> None:
        with self._cond:
            self.results[task.job.rel] = entry
            self._busy -= 1
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        """A worker's file failed: that worker is done, and every other one stops after its current chunk."""
        with self._cond:  # a re-entrant lock: stop() takes it again
            self._busy -= 1
            self.stop(exc)

    def stop(self, exc: BaseException) -> None:
        """Make every worker stop after its current chunk."""
        with self._cond:
            if self.error is None:
                self.error = exc
            self._cond.notify_all()

    def close_all(self) -> None:
        for task in self._tasks:
            task.close()

    def work(self, progress: _Progress) -> None:
        """Worker loop: advance files chunk by chunk until none is left or another worker failed."""
        buf = _buffer()
        task = self.take()
        while task is not None:
            try:
                entry = task.step(buf, progress)
            except BaseException as exc:  # re-raised by the calling thread
                self.fail(exc)
                return
            if entry is not None:
                self.finish(task, entry)
                task = self.take()
            elif self.error is not None:
                self.fail(_Cancelled())
                return
            else:
                task = self.swap(task)


class _Cancelled(Exception):
    """Another worker failed; this one stopped early."""


def _hash_mmap(job: _Job, progress: _Progress) -> StatEntry:
    """BLAKE3 of a large file in one mmap'ed update, which splits the work across all cores."""
    try:
        with open(job.path, "rb", buffering=0, opener=_open_nonblocking) as fh:
            before = os.fstat(fh.fileno())
            if not stat.S_ISREG(before.st_mode):
                raise WeightsError(f"{job.rel} is not a regular file ({_kind(before.st_mode)}); remove it")
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
            hasher.update_mmap(job.path)
            after = os.fstat(fh.fileno())
    except OSError as exc:
        raise _unreadable(job, exc) from exc
    if _changed(before, after):
        raise WeightsError(f"{job.rel} changed while it was being hashed; retry once writes to it have finished")
    progress.add_bytes(before.st_size, job.rel)
    progress.file_done(job.rel)
    return _row(before, "blake3", hasher.hexdigest())


def _hash_jobs(
    jobs: list[_Job], algorithm: str, callback: ProgressCallback | None, max_workers: int | None
) -> dict[str, StatEntry]:
    """Hash ``jobs`` on ``max_workers`` threads (default: one per CPU); raise the first failure."""
    if not jobs:
        return {}
    progress = _Progress(callback, sum(j.size for j in jobs), len(jobs))
    results: dict[str, StatEntry] = {}
    if algorithm == "blake3":
        # Large BLAKE3 files already use every core on their own: hash them one at a time, largest first.
        for job in sorted((j for j in jobs if j.size >= _MMAP_MIN_BYTES), key=lambda j: (-j.size, j.rel)):
            results[job.rel] = _hash_mmap(job, progress)
        jobs = [j for j in jobs if j.size < _MMAP_MIN_BYTES]
        if not jobs:
            return results
    scheduler = _Scheduler([_FileTask(job, algorithm) for job in jobs])
    workers = max(1, min(max_workers or os.cpu_count() or 1, len(jobs)))
    try:
        if workers == 1:
            scheduler.work(progress)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash") as pool:
                futures = [pool.submit(scheduler.work, progress) for _ in range(workers)]
                try:
                    for future in futures:
                        future.result()
                except BaseException as exc:  # e.g. Ctrl-C while waiting: stop the workers after their chunk
                    scheduler.stop(exc)
                    raise
    finally:
        scheduler.close_all()
    if scheduler.error is not None:
        raise scheduler.error
    results.update(scheduler.results)
    return results


def _check_algorithm(algorithm: str, allowed: Sequence[str] = ALGORITHMS) -> None:
    if algorithm not in allowed:
        raise UsageError(f"unknown hash algorithm {algorithm!r}; use one of: {', '.join(allowed)}")


def new_hasher(algorithm: str, size: int = 0) -> Hasher:
    """A fresh hasher for ``algorithm`` (``sha256``, ``blake3`` or :data:`GIT_BLOB_SHA1`): the one construction
    every reader uses, the downloader's streaming check included. ``size`` is the byte count git's blob header
    carries (``git-blob-sha1`` only; the caller must then feed exactly that many bytes)."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        return blake3.blake3()
    if algorithm == GIT_BLOB_SHA1:
        return hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    raise UsageError(f"unknown hash algorithm {algorithm!r}; use one of: sha256, blake3, {GIT_BLOB_SHA1}")


def update_from_file(path: str | os.PathLike[str], hashers: Sequence[Hasher]) -> int:
    """Feed every byte of ``path`` to each of ``hashers`` (the engine's chunk size); return the byte count.

    For continuing a digest over bytes already on disk (a resumed download's partial file); to digest whole files
    use :func:`digest_file` or :func:`hash_files`, which also check that the file did not change while read.
    """
    buf = _buffer()
    total = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            for hasher in hashers:
                hasher.update(buf[:n])
            total += n
    return total


def _split_cached(
    jobs: list[_Job], cache: Mapping[str, StatEntry] | None, algorithm: str
) -> tuple[StatCache, list[_Job]]:
    """Fast mode: (rows reused from ``cache``, jobs to read) -- see "Fast mode" in the module docstring."""
    if not cache:
        return {}, jobs
    reused: StatCache = {}
    to_hash: list[_Job] = []
    access, read_ok = os.access, os.R_OK
    for job in jobs:
        row = cache.get(job.rel)
        # A row of an older layout (no ctime) compares unequal here, so it is a miss, never an error.
        if (
            row is not None
            and tuple(row[:5]) == (job.size, job.mtime_ns, job.inode, job.ctime_ns, algorithm)
            and access(job.path, read_ok)
        ):
            # Rows may come back from SQLite as plain tuples.
            reused[job.rel] = row if isinstance(row, StatEntry) else StatEntry(*row)
        else:
            to_hash.append(job)
    return reused, to_hash


def _digest_bytes(data: bytes, algorithm: str) -> str:
    return hashlib.sha256(data).hexdigest() if algorithm == "sha256" else blake3.blake3(data).hexdigest()


def digest_file(path: str | os.PathLike[str], algorithm: DigestName = "sha256") -> str:
    """Hex digest of one file's raw bytes (the value a manifest records for it, or its git blob id).

    :func:`hash_files` of that one file, with the same refusals (missing, not regular, no read bit for anyone).
    """
    directory, name = os.path.split(os.path.abspath(path))
    return hash_files(directory, [name], algorithm=algorithm, max_workers=1)[name].digest


def hash_directory(
    root: str | os.PathLike[str],
    *,
    algorithm: Algorithm = "sha256",
    extra_ignore: Iterable[str] = (),
    ignore: Iterable[str] | None = None,
    mode: HashMode = "full",
    cache: Mapping[str, StatEntry] | None = None,
    progress: ProgressCallback | None = None,
    max_workers: int | None = None,
    collect_text: bool = True,
) -> HashResult:
    """Hash every non-ignored file under ``root`` into a :class:`Manifest`; also return a fresh stat cache.

    ``ignore`` replaces :data:`DEFAULT_IGNORE` as the base rules (pass ``expected.ignore`` to re-apply a lock's
    rules); ``extra_ignore`` (an entry's ``hash_ignore``) is appended. ``mode="fast"`` reuses digests from
    ``cache`` for files whose size, mtime_ns, inode and ctime_ns are unchanged and which this process may read;
    ``"full"`` reads every byte. Raises :class:`WeightsError` for a missing, non-directory or empty (after
    ignores) ``root``, an unreadable file or one with no read bit for anyone (even when running as root), an odd
    file (fifo, socket, device), or a symlink that is broken, loops or escapes ``root``.
    """
    started = time.perf_counter()
    _check_algorithm(algorithm)
    if mode not in ("full", "fast"):
        raise UsageError(f"unknown hash mode {mode!r}; use full or fast")
    rules = ignore_rules(extra_ignore, DEFAULT_IGNORE if ignore is None else ignore)
    root_path = _check_root(root)
    jobs = _walk(root_path, _IgnoreMatcher(rules))
    if not jobs:
        raise WeightsError(f"no files to hash in {root_path} (after ignore rules: {', '.join(rules) or 'none'})")

    reused, to_hash = _split_cached(jobs, cache if mode == "fast" else None, algorithm)
    hashed = _hash_jobs(to_hash, algorithm, progress, max_workers)

    new_cache: StatCache = {job.rel: hashed.get(job.rel) or reused[job.rel] for job in jobs}
    files = [
        FileDigest(path=rel, size=row.size, algorithm=algorithm, digest=row.digest) for rel, row in new_cache.items()
    ]
    rehashed = [job.rel for job in to_hash]
    manifest = Manifest(
        root=str(root_path),
        algorithm=algorithm,
        ignore=rules,
        files=files,
        aggregate=aggregate_of(files),
        total_bytes=sum(f.size for f in files),
        file_count=len(files),
        duration_s=0.0,
        mode=mode,
        rehashed=rehashed if mode == "fast" else [],
    )
    if collect_text:
        manifest.text_files = collect_text_files(root_path, manifest)
    manifest.duration_s = round(time.perf_counter() - started, 6)
    return HashResult(manifest=manifest, cache=new_cache, rehashed=rehashed)


def hash_files(
    root: str | os.PathLike[str],
    paths: Iterable[str],
    *,
    algorithm: DigestName = "sha256",
    cache: Mapping[str, StatEntry] | None = None,
    progress: ProgressCallback | None = None,
    max_workers: int | None = None,
) -> StatCache:
    """Stat-cache rows for the named files under ``root`` (relative POSIX paths), in fast mode.

    A file is read only when ``cache`` has no row for it whose ``(size, mtime_ns, inode, ctime_ns, algorithm)``
    matches (the rules of :func:`hash_directory`'s fast mode); the returned rows are the reused ones plus the
    new ones, keyed like ``paths``. Unlike :func:`hash_directory` there is no walk and no ignore rule: the caller
    names the files (symlinks are followed). Raises :class:`WeightsError` for a missing, unreadable or
    non-regular file, one with no read bit for anyone, or one that changes while it is read.
    """
    _check_algorithm(algorithm, (*ALGORITHMS, GIT_BLOB_SHA1))
    jobs: list[_Job] = []
    for rel in paths:
        path = os.path.join(root, rel)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise WeightsError(f"cannot read {rel} in {root}: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise WeightsError(f"{rel} in {root} is not a regular file ({_kind(st.st_mode)}); remove it")
        if not st.st_mode & _ANY_READ_BITS:
            raise WeightsError(_no_read_bits(rel, root, st.st_mode))
        jobs.append(_Job(rel, path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    reused, to_hash = _split_cached(jobs, cache, algorithm)
    return {**reused, **_hash_jobs(to_hash, algorithm, progress, max_workers)}


# Text files ------------------------------------------------------------------------------------------------------

_TEXT_FILE_RE = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in TEXT_FILE_PATTERNS))


def _is_text_candidate(file: FileDigest) -> bool:
    return file.size < TEXT_FILE_MAX_BYTES and _TEXT_FILE_RE.match(file.path.rsplit("/", 1)[-1].lower()) is not None


def collect_text_files(root: str | os.PathLike[str], manifest: Manifest) -> dict[str, str]:
    """Content of the manifest's small text files (see :data:`TEXT_FILE_PATTERNS`, < 256 KiB), keyed by path.

    A file is kept only if it decodes as UTF-8 and its bytes still match the manifest digest, so the text
    always corresponds to what was hashed. Best effort: unreadable candidates are skipped, never raised.
    """
    root_real = os.path.realpath(root)
    texts: dict[str, str] = {}
    for file in manifest.files:
        if not _is_text_candidate(file):
            continue
        path = os.path.realpath(os.path.join(root_real, file.path))
        if not _within(path, root_real):
            continue
        try:
            with open(path, "rb") as fh:
                data = fh.read(TEXT_FILE_MAX_BYTES)
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(data) == file.size and _digest_bytes(data, file.algorithm) == file.digest:
            texts[file.path] = text
    return texts


# Drift -----------------------------------------------------------------------------------------------------------


def _unified_diff(path: str, old: str, new: str) -> str:
    out: list[str] = []
    for line in difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), f"expected/{path}", f"actual/{path}"
    ):
        # Keep a change to the final newline visible instead of producing a diff with no visible difference.
        out.append(line if line.endswith("\n") else f"{line}\n\\ No newline at end of file\n")
    return "".join(out)


def compare_manifests(expected: Manifest, actual: Manifest) -> DriftReport:
    """Drift between a locked manifest and a fresh one: modified, added and removed files plus text diffs.

    A renamed file shows as removed + added (with a note when the digest is identical). Raises
    :class:`UsageError` when the manifests use different algorithms, since their digests are not comparable.
    """
    if expected.algorithm != actual.algorithm:
        raise UsageError(
            f"cannot compare a {expected.algorithm} manifest with a {actual.algorithm} one; "
            f"re-hash with algorithm {expected.algorithm}"
        )
    old, new = expected.by_path(), actual.by_path()
    modified = [
        FileChange(
            path=p, old_size=old[p].size, old_digest=old[p].digest, new_size=new[p].size, new_digest=new[p].digest
        )
        for p in sorted(old.keys() & new.keys())
        if (old[p].size, old[p].digest) != (new[p].size, new[p].digest)
    ]
    added = [new[p] for p in sorted(new.keys() - old.keys())]
    removed = [old[p] for p in sorted(old.keys() - new.keys())]

    notes: list[str] = []
    if aggregate_of(expected.files) != expected.aggregate:
        notes.append("the expected manifest is inconsistent: its aggregate does not match its file list")
    if expected.ignore != actual.ignore:
        notes.append(f"ignore rules differ: expected {expected.ignore}, actual {actual.ignore}")
    removed_by_digest = {(f.size, f.digest): f.path for f in removed}
    for f in added:
        source = removed_by_digest.get((f.size, f.digest))
        if source is not None:
            notes.append(f"{source} -> {f.path} looks like a rename (same content)")

    text_diffs: dict[str, str] = {}
    for change in modified:
        before = expected.text_files.get(change.path)
        if before is None:
            continue
        after = actual.text_files.get(change.path)
        if after is None:
            notes.append(f"{change.path}: new content not captured (not UTF-8 or over {TEXT_FILE_MAX_BYTES} bytes)")
            continue
        text_diffs[change.path] = _unified_diff(change.path, before, after)

    return DriftReport(
        algorithm=expected.algorithm,
        expected_aggregate=expected.aggregate,
        actual_aggregate=actual.aggregate,
        file_count=actual.file_count,
        total_bytes=actual.total_bytes,
        modified=modified,
        added=added,
        removed=removed,
        text_diffs=text_diffs,
        notes=notes,
    )


class RehashOptions(TypedDict, total=False):
    """The options of :func:`hash_directory` (see it for each) that :func:`verify_directory` passes on."""

    mode: HashMode
    cache: Mapping[str, StatEntry] | None
    progress: ProgressCallback | None
    max_workers: int | None


def verify_directory(
    root: str | os.PathLike[str], expected: Manifest, **options: Unpack[RehashOptions]
) -> tuple[HashResult, DriftReport]:
    """Re-hash ``root`` with the expected manifest's algorithm and ignore rules, and compare."""
    result = hash_directory(root, algorithm=expected.algorithm, ignore=expected.ignore, **options)
    return result, compare_manifests(expected, result.manifest)
