"""Download a Hugging Face model repo into a directory: pinned, verified, resumable, never clobbering.

One call, :func:`download_repo`, does the whole job; the CLI and the dashboard are thin shells over it and the
registry write is theirs, not ours. The steps, in order, and why:

1. Validate ``owner/repo`` and refuse offline mode before any I/O.
2. Ask the Hub once (``HfApi.model_info(files_metadata=True)``) for the commit sha and every file's size, git
   blob id and LFS sha256. Everything after is pinned to that commit (``resolve/<sha>/...``), so a push during
   the download cannot mix two revisions.
3. Filter by include/exclude globs, then look at what is already on disk. A file already at its path whose digest
   matches is *reused*; one that differs is the operator's and is never overwritten without ``force``.
4. Check free disk space against the bytes still to fetch, then take a lock so two runs cannot interleave.
5. Fetch each missing file with huggingface_hub's HTTP session (auth, proxies, offline switch, user agent) into
   ``.cache/imageworks/partial/<digest>.part``, streaming it through SHA-256 (and git's blob SHA-1 for non-LFS
   files, checked against the blob id), with the hashing engine's hashers. Only a verified file is renamed to its
   final path, so a corrupted download never appears in the model directory; a mismatching part is deleted so a
   re-run fetches it again.
6. Write the completion marker (``.cache/imageworks/download.json``) only after every file verified.
   With ``force`` the whole download happens in a staging directory next to the target and is swapped in
   (old renamed away, new renamed in, old removed) only once verified.

Why not ``snapshot_download``/``hf_hub_download``: in huggingface_hub 2.x they download into a per-process
``<etag>.<uuid>.incomplete`` file that is deleted on failure, so nothing resumes across runs; they also move a
file into place before anyone can verify it, and a differing pre-existing file is unlinked. Verification is ours:
the Hub client only compares sizes, so a same-size corrupted transfer passes it.

Resume: the part file survives any failure (network drop, Ctrl-C, crash); the next run hashes the bytes it has
and asks for the rest with ``Range``. Transient drops inside one run are retried the same way.

Re-checks: digests of files already on disk come from :func:`imageworks_core.hashing.hash_files` in fast mode,
over the stat cache in the history DB that ``verify --fast`` uses, under the same key (the resolved directory,
the file's relative path; valid while size, mtime_ns, inode and ctime_ns match: see "Fast mode" in
:mod:`imageworks_core.hashing` for what that catches and what it cannot). A fetched file's row is its streamed
digest with the stat taken right after it was renamed into place, so a fast verify right after a download reads
nothing; a write that lands between that rename and the stat (milliseconds, by someone who can write into the
model directory while we hold its lock) would be missed by fast mode, never by a full verify. Without
``settings`` nothing is cached across runs: every file already on disk is read again. The old per-directory
cache (``.cache/imageworks/verified.json``) is ignored and deleted.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict

import httpx2  # huggingface_hub 2.x's HTTP client: the exceptions its session and HfApi raise
from filelock import FileLock, Timeout
from huggingface_hub import HfApi, constants, get_session, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, filter_repo_objects, hf_raise_for_status
from pydantic import BaseModel, Field

from . import history
from .errors import BackendError, ImageWorksError, UsageError, WeightsError
from .formats import FormatInfo, scan_directory
from .hashing import (
    GIT_BLOB_SHA1,
    Hasher,
    StatCache,
    StatEntry,
    hash_files,
    new_hasher,
    update_from_file,
)
from .hashing import ProgressCallback as HashProgress
from .registry_file import atomic_write_text
from .settings import Settings, get_settings
from .units import format_bytes

STATE_DIR = PurePosixPath(".cache/imageworks")
MARKER_PATH = STATE_DIR / "download.json"
_PARTIAL_DIR = STATE_DIR / "partial"
# Where an earlier version kept its own stat cache; deleted on sight (the history DB holds it now).
_OLD_VERIFIED_PATH = STATE_DIR / "verified.json"
# Digests cached per file: sha256 for every file (shared with the verifier), git's blob id for non-LFS files.
_CACHED_DIGESTS = ("sha256", GIT_BLOB_SHA1)
# Consecutive failed attempts (no new bytes) before a file's download gives up for this run.
MAX_FAILURES_WITHOUT_PROGRESS = 3
RETRY_BACKOFF_S = 1.0
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

DEFAULT_LOCATION = "linux_wsl"
"""Where downloads go unless told otherwise (``IMAGEWORKS_MODEL_ROOT`` moves it)."""
DEFAULT_LOCATIONS: dict[str, str] = {
    "linux_wsl": "~/ai-models/weights",
    "windows_lmstudio": "/mnt/c/Users/{user}/.lmstudio/models",
}

ProgressCallback = Callable[[dict[str, Any]], None]


class DownloadOptions(TypedDict, total=False):
    """The keyword options of :func:`download_repo` (see it for each), for callers that pass them on."""

    revision: str | None
    include: list[str] | None
    exclude: list[str] | None
    force: bool
    endpoint: str | None
    token: str | None
    progress: ProgressCallback | None


class DownloadedFile(BaseModel):
    """One file of a completed download."""

    path: str = Field(description="relative POSIX path inside the target")
    size: int
    sha256: str | None = Field(
        default=None, description="SHA-256 of the bytes on disk; for LFS files the Hub's LFS oid, verified"
    )
    lfs: bool = False
    blob_id: str | None = Field(default=None, description="git blob id from the Hub (verified for non-LFS files)")
    reused: bool = Field(default=False, description="already on disk and verified; not fetched this run")


class DownloadResult(BaseModel):
    """What :func:`download_repo` did; the same data is written to the completion marker."""

    repo_id: str
    revision: str | None = Field(default=None, description="as requested (None = the default branch)")
    commit_sha: str
    endpoint: str
    target: Path
    include: list[str] | None = None
    exclude: list[str] | None = None
    files: list[DownloadedFile]
    total_bytes: int
    downloaded_bytes: int = Field(description="bytes received over the network this run")
    reused_files: list[str] = Field(default_factory=list)
    format: FormatInfo
    started_at: datetime
    finished_at: datetime
    marker_path: Path


@dataclass(frozen=True)
class _RemoteFile:
    path: str
    size: int
    blob_id: str | None
    sha256: str | None  # LFS oid; None for files git stores directly

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def part_name(self) -> str:
        key = self.sha256 or self.blob_id or hashlib.sha256(self.path.encode()).hexdigest()
        return f"{key}.part"


@dataclass(frozen=True)
class _Digests:
    sha256: str
    git_blob: str | None = None  # taken only for files the Hub stores without LFS (it gives their blob id)


class _StreamHashers:
    """The engine's hashers fed a file's bytes as they arrive: SHA-256, plus git's blob SHA-1 for a non-LFS file."""

    def __init__(self, remote: _RemoteFile) -> None:
        self.remote = remote
        self.reset()

    def reset(self) -> None:
        self.sha256 = new_hasher("sha256")
        self.git: Hasher | None = None if self.remote.lfs else new_hasher(GIT_BLOB_SHA1, self.remote.size)
        self.length = 0

    def resume_from(self, part: Path) -> None:
        """Start over from the bytes already in ``part`` (a resumed download)."""
        self.reset()
        self.length = update_from_file(part, [h for h in (self.sha256, self.git) if h is not None])

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        if self.git is not None:
            self.git.update(chunk)
        self.length += len(chunk)

    def digests(self) -> _Digests:
        return _Digests(self.sha256.hexdigest(), self.git.hexdigest() if self.git is not None else None)


class _VerifiedFiles:
    """Digests of the files under one directory, reused while their stat key matches: the history DB's stat cache.

    Rows are keyed like the verifier's (resolved directory, relative path, algorithm), so both reuse each other's
    work. Without settings the rows live for this run only and nothing is written.
    """

    def __init__(self, settings: Settings | None, directory: Path) -> None:
        self.settings = settings
        self.directory = str(directory.resolve())
        self.rows: dict[str, StatCache] = {
            algorithm: history.stat_entries(settings, self.directory, algorithm) if settings else {}
            for algorithm in _CACHED_DIGESTS
        }
        self._changed: set[str] = set()  # algorithms whose rows differ from the DB's

    def digests(self, work: Path, remotes: list[_RemoteFile], emit: Callable[..., None]) -> dict[str, _Digests]:
        """Digests of ``remotes`` as they are on disk under ``work``; only files whose stat changed are read."""
        sizes = {r.path: r.size for r in remotes}

        def reporter(algorithm: str) -> HashProgress:
            def report(done: int, total: int, files_done: int, files_total: int, path: str) -> None:
                emit("check", path=path, size=sizes[path], algorithm=algorithm, done=done, total=total)

            return report

        sha256 = hash_files(
            work, list(sizes), algorithm="sha256", cache=self.rows["sha256"], progress=reporter("sha256")
        )
        git = hash_files(
            work,
            [r.path for r in remotes if not r.lfs],
            algorithm=GIT_BLOB_SHA1,
            cache=self.rows[GIT_BLOB_SHA1],
            progress=reporter(GIT_BLOB_SHA1),
        )
        for algorithm, fresh in (("sha256", sha256), (GIT_BLOB_SHA1, git)):
            if any(self.rows[algorithm].get(path) != row for path, row in fresh.items()):
                self.rows[algorithm].update(fresh)
                self._changed.add(algorithm)
        return {path: _Digests(row.digest, git[path].digest if path in git else None) for path, row in sha256.items()}

    def record(self, path: str, dest: Path, digests: _Digests) -> None:
        """Remember the streamed digests of a file just renamed to ``dest`` (stat taken now, after the rename)."""
        st = dest.stat()
        key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        self.rows["sha256"][path] = StatEntry(*key, "sha256", digests.sha256)
        self._changed.add("sha256")
        if digests.git_blob is not None:
            self.rows[GIT_BLOB_SHA1][path] = StatEntry(*key, GIT_BLOB_SHA1, digests.git_blob)
            self._changed.add(GIT_BLOB_SHA1)
        self.save()

    def save(self) -> None:
        """Write the rows that changed (a re-check that only hit the cache writes nothing)."""
        if self.settings is not None:
            for algorithm in sorted(self._changed):
                history.save_stat_entries(self.settings, self.directory, algorithm, self.rows[algorithm])
        self._changed.clear()

    def move_to(self, target: Path, keep: set[str]) -> None:
        """After ``--force`` swapped the staging directory in: its rows now describe ``target`` (renaming a directory
        leaves the inode and ctime of the files inside alone); the old target's rows go, its files are gone."""
        staging = self.directory
        self.directory = str(target.resolve())
        self.rows = {algorithm: {p: e for p, e in rows.items() if p in keep} for algorithm, rows in self.rows.items()}
        self._changed.update(_CACHED_DIGESTS)
        self.save()
        if self.settings is not None:
            for algorithm in _CACHED_DIGESTS:
                history.save_stat_entries(self.settings, staging, algorithm, {})


class _RetryableTransfer(Exception):
    """A transfer attempt failed in a way a retry (with ``Range``) may fix."""


# Public API -----------------------------------------------------------------------------------------------------


def download_repo(
    repo_id: str,
    target_dir: Path,
    *,
    revision: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    force: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    progress: ProgressCallback | None = None,
    settings: Settings | None = None,
) -> DownloadResult:
    """Download ``repo_id`` at ``revision`` into ``target_dir``, verifying every file against the Hub's digests.

    ``include``/``exclude`` are Hub-style globs (``*`` crosses ``/``). ``force`` re-downloads everything into a
    staging directory and swaps it in atomically once verified (the old directory stays intact on failure).
    ``endpoint`` defaults to ``HF_ENDPOINT`` (read now, not at import); ``token`` defaults to the saved token.
    ``settings`` (default: read from the environment now) gives ``HF_ENDPOINT``, the offline switches and the
    history DB whose stat cache spares re-reading unchanged files; only a given ``settings`` enables that cache
    (a library call never creates a history DB in the current directory by surprise).
    ``progress`` receives one dict per event, ``{"event": name, ...}``:

    - ``check``: ``path``, ``size``, ``algorithm``, ``done``, ``total`` (bytes over the files this pass reads) —
      hashing files already on disk (only those the stat cache does not vouch for) to see whether they can be
      reused: a ``sha256`` pass, then a ``git-blob-sha1`` pass over non-LFS files. The hashing engine's progress
      (from its worker threads, one call at a time, throttled; a pass's last has ``done == total``); none when
      the cache vouches for every file;
    - ``plan``: ``repo_id``, ``commit_sha``, ``files``, ``total_bytes``, ``to_download_bytes``, ``reused_files``;
    - ``file_start``: ``path``, ``size``, ``resume_from`` (bytes kept from an earlier run);
    - ``bytes``: ``path``, ``file_done``, ``file_size``, ``done``, ``total`` (run totals over files to fetch,
      partial bytes included) — once per received chunk;
    - ``retry``: ``path``, ``attempt``, ``error``; ``verify_failed``: ``path``, ``expected``, ``actual``;
    - ``file_done``: ``path``, ``size``, ``sha256``; ``done``: ``commit_sha``, ``total_bytes``, ``downloaded_bytes``.

    An exception raised by ``progress`` aborts the run (no marker) and keeps the partial bytes for a resume.

    Raises UsageError (bad repo id / revision / patterns, conflicting files, lock held), BackendError (Hub
    unreachable, offline, HTTP failure) or WeightsError (digest mismatch, not enough disk, unsafe path).
    """
    started = datetime.now(UTC)
    _validate_repo_id(repo_id)
    env = settings or get_settings()
    endpoint = (endpoint or env.hf_endpoint or constants.ENDPOINT).rstrip("/")
    _refuse_offline(endpoint, env)
    target = Path(os.path.abspath(Path(target_dir).expanduser()))
    if target.exists() and not target.is_dir():
        raise UsageError(f"download target {target} exists and is not a directory")

    def emit(event: str, **fields: Any) -> None:
        if progress is not None:
            progress({"event": event, **fields})

    commit_sha, remote_files = _fetch_manifest(repo_id, revision, endpoint, token)
    selected = _select(remote_files, include, exclude)

    staging = target.parent / f".{target.name}.imageworks-staging"
    work = staging if force else target
    verified = _VerifiedFiles(settings, work)
    local, reused, to_fetch, conflicts = _check_existing(work, selected, verified, emit)
    if conflicts and not force:
        raise WeightsError(_conflict_message(target, repo_id, commit_sha, conflicts))
    partial_bytes = {f.path: _size_or_zero(work / _PARTIAL_DIR / f.part_name) for f in to_fetch}
    needed = sum(f.size - min(partial_bytes[f.path], f.size) for f in to_fetch)
    _check_disk_space(work, needed)

    emit(
        "plan",
        repo_id=repo_id,
        commit_sha=commit_sha,
        files=len(selected),
        total_bytes=sum(f.size for f in selected),
        to_download_bytes=needed,
        reused_files=[f.path for f in reused],
    )
    # The lock lives in the target's own state dir: nothing appears next to the model directory, and with --force
    # the lock file leaves together with the old directory.
    lock_path = target / STATE_DIR / "download.lock"
    created_target = not target.exists()
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(lock_path, timeout=0)
        lock.acquire()
    except Timeout:
        raise UsageError(f"another download is writing to {target} (lock {lock_path}); wait for it") from None
    try:
        work.mkdir(parents=True, exist_ok=True)
        if force:
            _prune_staging(work, selected, [f.path for f in conflicts])
        (work / _OLD_VERIFIED_PATH).unlink(missing_ok=True)
        verified.save()  # keep the hashes just computed for reused files
        # No marker while files are changing: an interrupted run must not look complete.
        (work / MARKER_PATH).unlink(missing_ok=True)
        downloaded_bytes, fetched, failures = _fetch_all(
            repo_id, commit_sha, endpoint, token, work, to_fetch, verified, emit
        )
        digests = {**local, **fetched}
        if failures:
            raise WeightsError(_mismatch_message(repo_id, commit_sha, failures))
        result = DownloadResult(
            repo_id=repo_id,
            revision=revision,
            commit_sha=commit_sha,
            endpoint=endpoint,
            target=target,
            include=include,
            exclude=exclude,
            files=[_downloaded_file(f, digests[f.path], f in reused) for f in selected],
            total_bytes=sum(f.size for f in selected),
            downloaded_bytes=downloaded_bytes,
            reused_files=[f.path for f in reused],
            format=scan_directory(work).format,
            started_at=started,
            finished_at=datetime.now(UTC),
            marker_path=target / MARKER_PATH,
        )
        _remove_empty_dir(work / _PARTIAL_DIR)
        atomic_write_text(work / MARKER_PATH, result.model_dump_json(indent=2) + "\n")
        if force:
            _swap_into_place(work, target)
            verified.move_to(target, keep={f.path for f in selected})
    except BaseException:
        if force and created_target:
            # A failed --force into a new directory leaves only our lock behind there; the resumable state is in
            # the staging directory. Do not leave an empty model directory that looks like a download.
            lock.release()
            _remove_state_only_dir(target)
        raise
    finally:
        lock.release()
    emit("done", commit_sha=commit_sha, total_bytes=result.total_bytes, downloaded_bytes=downloaded_bytes)
    return result


def read_marker(target_dir: Path) -> DownloadResult | None:
    """The completion marker of a finished download in ``target_dir``, or None (never completed, or unreadable)."""
    path = Path(target_dir) / MARKER_PATH
    try:
        return DownloadResult.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def location_roots(settings: Settings) -> dict[str, Path]:
    """Named download roots: built-in defaults, overridden/extended by ``configs/locations.json``.

    ``IMAGEWORKS_MODEL_ROOT`` (``settings.model_root``) wins for ``linux_wsl`` over both.
    """
    raw: dict[str, str] = {name: value.format(user=getpass.getuser()) for name, value in DEFAULT_LOCATIONS.items()}
    path = settings.locations_path
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not valid JSON ({exc})") from exc
        configured = data.get("locations") if isinstance(data, dict) else None
        if not isinstance(configured, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in configured.items()
        ):
            raise UsageError(f'{path}: expected {{"locations": {{"name": "/path", ...}}}}')
        raw.update(configured)
    roots = {name: settings.resolve_path(value) for name, value in raw.items()}
    if settings.model_root is not None:
        roots["linux_wsl"] = settings.resolve_path(settings.model_root)
    return roots


def resolve_location(location: str, repo_id: str, settings: Settings) -> Path:
    """The directory a download of ``repo_id`` goes to: ``<root of location>/<owner>/<repo>``.

    ``location`` is a name from :func:`location_roots` or a path (anything with a slash, or starting with ``~``
    or ``.``); a relative path is taken from the current directory, as a shell user expects.
    """
    _validate_repo_id(repo_id)
    owner, name = repo_id.split("/")
    roots = location_roots(settings)
    if location in roots:
        root = roots[location]
    elif "/" in location or "\\" in location or location.startswith(("~", ".")):
        root = Path(os.path.abspath(Path(os.path.expandvars(location)).expanduser()))
    else:
        raise UsageError(
            f"unknown location {location!r}: use one of {', '.join(sorted(roots))} or a path "
            f"(names come from built-in defaults and {settings.locations_path})"
        )
    return root / owner / name


# Hub metadata ---------------------------------------------------------------------------------------------------


def _validate_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise UsageError(f"invalid repo id {repo_id!r}: expected 'owner/repo' (letters, digits, '-', '_', '.')")


def _refuse_offline(endpoint: str, env: Settings) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; the environment is checked again here so a variable
    # set later (or by a test) still stops us before any request or any write.
    if constants.is_offline_mode() or env.hub_offline:
        raise BackendError(
            f"Hugging Face Hub unreachable (offline?): offline mode is on (HF_HUB_OFFLINE), so {endpoint} is not "
            "contacted; unset HF_HUB_OFFLINE to download"
        )


def _fetch_manifest(
    repo_id: str, revision: str | None, endpoint: str, token: str | None
) -> tuple[str, list[_RemoteFile]]:
    """Commit sha and per-file metadata (size, blob id, LFS sha256) for ``revision``."""
    api = HfApi(endpoint=endpoint, token=token, library_name="imageworks")
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - mapped to our hierarchy; unknown errors re-raised inside
        raise _hub_error(exc, endpoint, repo_id, revision) from exc
    if not info.sha or info.siblings is None:
        raise BackendError(f"{endpoint} answered model info for {repo_id} without a commit sha or file list")
    files = []
    for sibling in info.siblings:
        size = sibling.lfs.size if sibling.lfs is not None else sibling.size
        if size is None:
            raise BackendError(f"{endpoint} gave no size for {repo_id}:{sibling.rfilename} (files metadata missing)")
        files.append(
            _RemoteFile(
                path=sibling.rfilename,
                size=size,
                blob_id=sibling.blob_id,
                sha256=sibling.lfs.sha256 if sibling.lfs is not None else None,
            )
        )
    return info.sha, files


def _hub_error(exc: Exception, endpoint: str, repo_id: str, revision: str | None) -> ImageWorksError:
    """Our error for a huggingface_hub/httpx2 failure (re-raises anything unrecognised)."""
    if isinstance(exc, OfflineModeIsEnabled):
        return BackendError(f"Hugging Face Hub unreachable (offline?): {exc}")
    if isinstance(exc, httpx2.TransportError):
        return BackendError(
            f"Hugging Face Hub unreachable (offline?) at {endpoint}: {type(exc).__name__}: {exc}; "
            "check the network, HF_ENDPOINT and proxy settings, then re-run"
        )
    if isinstance(exc, GatedRepoError):
        return BackendError(f"{repo_id} is gated: accept its terms on the Hub and pass a token that has access")
    if isinstance(exc, RevisionNotFoundError):
        return UsageError(f"revision {revision!r} not found in {repo_id}")
    if isinstance(exc, RepositoryNotFoundError):
        return UsageError(f"repository {repo_id} not found at {endpoint} (private? pass a token with access)")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return BackendError(f"Hugging Face Hub at {endpoint} answered HTTP {status} for {repo_id}: {exc}")
    raise exc


def _select(files: list[_RemoteFile], include: list[str] | None, exclude: list[str] | None) -> list[_RemoteFile]:
    # Our own state and git internals live under these; a repo file there would collide with them.
    candidates = [f for f in files if not f.path.startswith((".cache/", ".git/"))]
    selected = list(filter_repo_objects(candidates, allow_patterns=include, ignore_patterns=exclude, key=_path_of))
    if not selected:
        raise UsageError(
            f"no files selected (include={include!r}, exclude={exclude!r}) out of {len(candidates)} in the repo"
        )
    for remote in selected:
        _check_safe_path(remote.path)
    return sorted(selected, key=_path_of)


def _path_of(remote: _RemoteFile) -> str:
    return remote.path


def _check_safe_path(path: str) -> None:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")) or "\\" in path:
        raise WeightsError(f"refusing repo file path {path!r}: it would escape the target directory")


# Local state ----------------------------------------------------------------------------------------------------


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _matches(remote: _RemoteFile, digests: _Digests) -> bool:
    """Whether bytes of the Hub's size have the Hub's digest (the caller has checked the size)."""
    if remote.sha256 is not None:
        return digests.sha256 == remote.sha256
    if remote.blob_id is not None:
        return digests.git_blob == remote.blob_id
    return True  # nothing but the size to check against


@dataclass(frozen=True)
class _Conflict:
    path: str
    detail: str


def _check_existing(
    work: Path, selected: list[_RemoteFile], verified: _VerifiedFiles, emit: Callable[..., None]
) -> tuple[dict[str, _Digests], list[_RemoteFile], list[_RemoteFile], list[_Conflict]]:
    """Split ``selected`` into reused (present and verified; with their digests), to fetch, and conflicting
    (present but different)."""
    same_size: list[_RemoteFile] = []
    problems: dict[str, str] = {}
    for remote in selected:
        dest = work / remote.path
        if not dest.exists() and not dest.is_symlink():
            continue
        if not dest.is_file():
            problems[remote.path] = "exists but is not a regular file"
        elif (size := dest.stat().st_size) != remote.size:
            problems[remote.path] = f"local size {size}, Hub size {remote.size}"
        else:
            same_size.append(remote)
    local = verified.digests(work, same_size, emit)
    reused: list[_RemoteFile] = []
    to_fetch: list[_RemoteFile] = []
    conflicts: list[_Conflict] = []
    for remote in selected:
        digests = local.get(remote.path)
        if digests is not None and _matches(remote, digests):
            reused.append(remote)
            continue
        detail = problems.get(remote.path)
        if digests is not None:
            detail = (
                f"local sha256 {digests.sha256}, Hub sha256 {remote.sha256}"
                if remote.lfs
                else f"local git blob {digests.git_blob}, Hub blob {remote.blob_id}"
            )
        if detail is not None:
            conflicts.append(_Conflict(remote.path, detail))
        to_fetch.append(remote)
    return {r.path: local[r.path] for r in reused}, reused, to_fetch, conflicts


def _conflict_message(target: Path, repo_id: str, commit: str, conflicts: list[_Conflict]) -> str:
    shown = "; ".join(f"{c.path} ({c.detail})" for c in conflicts[:5])
    more = f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
    return (
        f"{target} already holds {len(conflicts)} file(s) that differ from {repo_id}@{commit[:12]}: {shown}{more}; "
        "nothing was changed. Re-run with --force to replace the directory (the old copy stays until the new one "
        "verifies) or choose another location"
    )


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def _check_disk_space(work: Path, needed: int) -> None:
    where = _nearest_existing(work)
    free = shutil.disk_usage(where).free
    if needed > free:
        raise WeightsError(
            f"not enough free disk space under {where}: {format_bytes(needed)} still to download, {format_bytes(free)} free; "
            "free some space or choose another location"
        )


def _prune_staging(staging: Path, selected: list[_RemoteFile], conflicting: Iterable[str]) -> None:
    """Make a reused staging dir hold only verified files of this selection (it is ours; nothing else is kept)."""
    wanted = {f.path for f in selected} - set(conflicting)
    for path in sorted(staging.rglob("*"), reverse=True):
        rel = path.relative_to(staging)
        if rel.parts[0] == ".cache":
            continue
        if path.is_dir() and not path.is_symlink():
            _remove_empty_dir(path)
        elif rel.as_posix() not in wanted:
            path.unlink()


def _remove_state_only_dir(path: Path) -> None:
    """Remove ``path`` if it holds nothing but our ``.cache/`` state (never anything an operator could own)."""
    if path.is_dir() and all(child.name == ".cache" for child in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty, or already gone


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``target`` away, rename ``staging`` in, then delete the old copy (restored if the swap fails)."""
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.imageworks-old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError as exc:
        if old is not None:
            os.rename(old, target)
        raise WeightsError(f"could not move the verified download {staging} into place at {target}: {exc}") from exc
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


# Transfer -------------------------------------------------------------------------------------------------------


def _fetch_all(
    repo_id: str,
    commit_sha: str,
    endpoint: str,
    token: str | None,
    work: Path,
    to_fetch: list[_RemoteFile],
    verified: _VerifiedFiles,
    emit: Callable[..., None],
) -> tuple[int, dict[str, _Digests], list[tuple[_RemoteFile, _Digests]]]:
    """Fetch, verify and place every file; returns (bytes received, digests of placed files by path, mismatches)."""
    headers = build_hf_headers(token=token, library_name="imageworks")
    # Identity encoding: byte offsets in Range requests must mean file offsets.
    headers["Accept-Encoding"] = "identity"
    digests: dict[str, _Digests] = {}
    total = sum(f.size for f in to_fetch)
    # Bytes on disk per file still to fetch (partials from earlier runs count), so "done" can go backwards only
    # when a server ignores a Range request and the file restarts.
    on_disk = {f.path: min(_size_or_zero(work / _PARTIAL_DIR / f.part_name), f.size) for f in to_fetch}
    received = 0
    failures: list[tuple[_RemoteFile, _Digests]] = []
    for remote in to_fetch:
        part = work / _PARTIAL_DIR / remote.part_name
        part.parent.mkdir(parents=True, exist_ok=True)
        url = hf_hub_url(repo_id, remote.path, revision=commit_sha, endpoint=endpoint)
        before = min(_size_or_zero(part), remote.size)
        emit("file_start", path=remote.path, size=remote.size, resume_from=before)

        def on_bytes(count: int, file_done: int, remote: _RemoteFile = remote) -> None:
            nonlocal received
            received += count
            on_disk[remote.path] = file_done
            done = sum(on_disk.values())
            emit("bytes", path=remote.path, file_done=file_done, file_size=remote.size, done=done, total=total)

        got = _fetch_file(url, headers, remote, part, endpoint, on_bytes, emit)
        if not _matches(remote, got):
            expected, actual = (remote.sha256, got.sha256) if remote.lfs else (remote.blob_id, got.git_blob)
            emit("verify_failed", path=remote.path, expected=expected, actual=actual)
            # The bytes are ours and wrong: dropping them makes the next run fetch the file again.
            part.unlink(missing_ok=True)
            failures.append((remote, got))
            continue
        dest = work / remote.path
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, dest)
        except OSError as exc:
            raise WeightsError(f"could not place {remote.path} at {dest}: {exc}") from exc
        digests[remote.path] = got
        verified.record(remote.path, dest, got)
        emit("file_done", path=remote.path, size=remote.size, sha256=got.sha256)
    return received, digests, failures


def _fetch_file(
    url: str,
    headers: dict[str, str],
    remote: _RemoteFile,
    part: Path,
    endpoint: str,
    on_bytes: Callable[[int, int], None],
    emit: Callable[..., None],
) -> _Digests:
    """Bring ``part`` to ``remote.size`` bytes (resuming with Range, retrying drops) and return its digests."""
    hashers: _StreamHashers | None = None
    failures = 0
    while True:
        offset = _size_or_zero(part)
        if offset > remote.size:
            part.unlink()  # longer than the file can be: not a prefix of it
            offset = 0
        if hashers is None or hashers.length != offset:
            # Resuming bytes from an earlier run (or after a truncation): hash what is on disk first.
            hashers = _StreamHashers(remote)
            if offset:
                hashers.resume_from(part)
        if offset == remote.size:
            return hashers.digests()
        try:
            _stream_range(url, headers, remote, part, offset, hashers, on_bytes)
        except (httpx2.TransportError, _RetryableTransfer) as exc:
            failures = 0 if _size_or_zero(part) > offset else failures + 1
            if failures >= MAX_FAILURES_WITHOUT_PROGRESS:
                kept = _size_or_zero(part)
                unreachable = isinstance(exc, httpx2.ConnectError)
                raise BackendError(
                    f"{'Hugging Face Hub unreachable (offline?): ' if unreachable else ''}download of "
                    f"{remote.path} from {endpoint} failed {failures} times in a row ({type(exc).__name__}: {exc}); "
                    f"{kept} of {remote.size} bytes kept, re-run to resume"
                ) from exc
            emit("retry", path=remote.path, attempt=failures, error=f"{type(exc).__name__}: {exc}")
            time.sleep(RETRY_BACKOFF_S * max(failures, 1))
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise BackendError(f"Hub answered HTTP {status} while downloading {remote.path}: {exc}") from exc


def _stream_range(
    url: str,
    headers: dict[str, str],
    remote: _RemoteFile,
    part: Path,
    offset: int,
    hashers: _StreamHashers,
    on_bytes: Callable[[int, int], None],
) -> None:
    """One GET from ``offset`` to the end, appended to ``part`` and fed to ``hashers``."""
    request_headers = dict(headers)
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    with get_session().stream(
        "GET", url, headers=request_headers, follow_redirects=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
    ) as response:
        if response.status_code >= 400:
            response.read()  # error bodies must be read before huggingface_hub formats them
            if response.status_code in _RETRY_STATUS:
                raise _RetryableTransfer(f"HTTP {response.status_code}")
            if response.status_code == 416:
                part.unlink(missing_ok=True)  # our offset is not valid for this object: start over
                raise _RetryableTransfer("HTTP 416 (range not satisfiable); restarting the file")
            hf_raise_for_status(response)
        content_range = response.headers.get("Content-Range", "")
        if offset and (response.status_code != 206 or not content_range.startswith(f"bytes {offset}-")):
            # The server ignored or mangled our Range: restart from zero rather than splice wrong bytes.
            offset = 0
            hashers.reset()
        mode = "ab" if offset else "wb"
        file_done = offset
        try:
            with open(part, mode) as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
                    hashers.update(chunk)
                    file_done += len(chunk)
                    on_bytes(len(chunk), file_done)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise WeightsError(f"could not write {part} while downloading {remote.path}: {exc}") from exc
    if file_done < remote.size:
        raise _RetryableTransfer(f"connection closed after {file_done} of {remote.size} bytes")


def _downloaded_file(remote: _RemoteFile, digests: _Digests, reused: bool) -> DownloadedFile:
    return DownloadedFile(
        path=remote.path,
        size=remote.size,
        sha256=digests.sha256,
        lfs=remote.lfs,
        blob_id=remote.blob_id,
        reused=reused,
    )


def _mismatch_message(repo_id: str, commit: str, failures: list[tuple[_RemoteFile, _Digests]]) -> str:
    parts = []
    for remote, got in failures:
        if remote.lfs:
            parts.append(f"{remote.path}: expected sha256 {remote.sha256}, got {got.sha256}")
        else:
            parts.append(f"{remote.path}: expected git blob {remote.blob_id}, got {got.git_blob}")
    return (
        f"checksum mismatch downloading {repo_id}@{commit[:12]}: {'; '.join(parts)}. The bad bytes were discarded "
        "and no completion marker was written; re-run to fetch again"
    )
