"""A local fake of the Hugging Face Hub: the part of its HTTP protocol a model download uses.

Real sockets on loopback, a stdlib ``ThreadingHTTPServer`` in a background thread (starts in milliseconds).
Implemented for model repos (``/api/models/...``), matching what huggingface_hub 2.x sends and reads:

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: repo info with ``sha`` and
  ``siblings``; with ``?blobs=true`` each sibling carries ``size``, ``blobId`` and, for LFS files,
  ``lfs: {sha256, size, pointerSize}`` (what ``HfApi.model_info(files_metadata=True)`` parses).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...``: the tree listing ``snapshot_download`` and
  ``list_repo_tree`` page through (``type``, ``oid``, ``size``, ``path``, ``lfs: {oid, size, pointerSize}``).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: regular files answer 200 with ``ETag`` (git blob id),
  ``X-Repo-Commit`` and ``Content-Length``; LFS files answer ``302`` to a "CDN" URL on another host name
  (``localhost`` instead of ``127.0.0.1``, so the client treats it as off-Hub, like the real CDN) with
  ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and ``X-Repo-Commit``. Set ``redirect_lfs=False`` to
  serve LFS bytes directly with the sha256 as ``ETag``.
- ``GET /cdn/{repo}/{commit}/{path}``: the LFS bytes; ``Range: bytes=N-[M]`` answers 206 with ``Content-Range``.
- Unknown repo / revision / file: 404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound``, which huggingface_hub turns into its typed errors.

Fault knobs live on :class:`FakeRepo` (per file path): :meth:`FakeRepo.corrupt` serves same-size wrong bytes
while metadata keeps advertising the true sha256; :meth:`FakeRepo.cut_after` sends N body bytes then drops the
connection; :meth:`FakeRepo.fail` answers an error status. Faults queue per path and each is consumed by one body
GET. Every request is logged (:attr:`FakeRepo.log`) so tests can count requests and bytes served per path.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath
from types import TracebackType
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_LFS_PATTERNS = ("*.safetensors", "*.gguf", "*.bin")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class ServedRequest:
    """One request the server answered (body GETs record how many bytes were actually sent)."""

    method: str
    kind: str  # "info", "tree", "resolve", "cdn"
    path: str | None
    status: int
    range_start: int | None = None
    bytes_sent: int = 0  # body bytes handed to the socket (a client that hangs up early may read fewer)


@dataclass(frozen=True)
class _Fault:
    kind: str  # "cut" or "status"
    value: int


def git_blob_id(data: bytes) -> str:
    """The git object id of ``data`` as a blob (what the Hub reports as ``blobId``/``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    """A model repo at one commit. ``files`` maps repo paths (POSIX, nested allowed) to content."""

    files: dict[str, bytes]
    commit_sha: str = ""
    lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS
    refs: dict[str, str] = field(default_factory=dict)
    redirect_lfs: bool = True
    log: list[ServedRequest] = field(default_factory=list)
    _corrupt: set[str] = field(default_factory=set)
    _faults: dict[str, list[_Fault]] = field(default_factory=dict)
    _holds: dict[str, threading.Event] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not self.commit_sha:
            digest = hashlib.sha1()
            for path in sorted(self.files):
                digest.update(path.encode() + b"\0" + git_blob_id(self.files[path]).encode())
            self.commit_sha = digest.hexdigest()
        self.refs.setdefault("main", self.commit_sha)

    # Metadata ---------------------------------------------------------------------------------------------------
    def is_lfs(self, path: str) -> bool:
        name = PurePosixPath(path).name
        return any(fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(path, pattern) for pattern in self.lfs_patterns)

    def sha256(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()

    def pointer(self, path: str) -> bytes:
        """The git-lfs pointer file committed in place of an LFS file."""
        size = len(self.files[path])
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256(path)}\nsize {size}\n".encode()

    def blob_id(self, path: str) -> str:
        """Git blob id of what git stores: the pointer for LFS files, the content otherwise."""
        return git_blob_id(self.pointer(path) if self.is_lfs(path) else self.files[path])

    def resolve(self, revision: str) -> str | None:
        """Commit sha for a branch/tag name or (full or abbreviated, 7+ chars) commit sha."""
        if revision in self.refs:
            return self.refs[revision]
        if len(revision) >= 7 and self.commit_sha.startswith(revision):
            return self.commit_sha
        return None

    # Fault knobs ------------------------------------------------------------------------------------------------
    def corrupt(self, path: str) -> None:
        """Serve same-size wrong bytes for ``path`` from now on; metadata still advertises the true digest."""
        self._corrupt.add(path)

    def cut_after(self, path: str, nbytes: int, times: int = 1) -> None:
        """The next ``times`` body GETs of ``path`` send ``nbytes`` body bytes, then drop the connection."""
        with self._lock:
            self._faults.setdefault(path, []).extend([_Fault("cut", nbytes)] * times)

    def fail(self, path: str, status: int = 503, times: int = 1) -> None:
        """The next ``times`` body GETs of ``path`` answer ``status`` with no body."""
        with self._lock:
            self._faults.setdefault(path, []).extend([_Fault("status", status)] * times)

    def hold(self, path: str) -> threading.Event:
        """Body GETs of ``path`` send half their bytes, then wait (at most 60 s) until the returned event is set:
        a download stays in flight, mid-file, while a test acts on it."""
        release = threading.Event()
        with self._lock:
            self._holds[path] = release
        return release

    def held(self, path: str) -> threading.Event | None:
        with self._lock:
            return self._holds.get(path)

    def clear_faults(self) -> None:
        """Serve every file correctly again (corruption and queued faults dropped; the log is kept)."""
        with self._lock:
            self._corrupt.clear()
            self._faults.clear()

    def content_served(self, path: str) -> bytes:
        data = self.files[path]
        if path in self._corrupt and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        return data

    def next_fault(self, path: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.pop(0) if queue else None

    def record(self, entry: ServedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    # Counters for tests -----------------------------------------------------------------------------------------
    def body_gets(self, path: str) -> list[ServedRequest]:
        """GETs of ``path``'s bytes (resolve or CDN; redirects excluded, injected failures included), in order."""
        with self._lock:
            return [
                r
                for r in self.log
                if r.method == "GET" and r.kind in ("resolve", "cdn") and r.path == path and r.status != 302
            ]

    def get_count(self, path: str) -> int:
        return len(self.body_gets(path))

    def bytes_served(self, path: str) -> int:
        return sum(r.bytes_sent for r in self.body_gets(path))

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    # JSON shapes ------------------------------------------------------------------------------------------------
    def sibling(self, path: str, blobs: bool) -> dict[str, object]:
        entry: dict[str, object] = {"rfilename": path}
        if blobs:
            entry["size"] = len(self.files[path])
            entry["blobId"] = self.blob_id(path)
            if self.is_lfs(path):
                entry["lfs"] = {
                    "sha256": self.sha256(path),
                    "size": len(self.files[path]),
                    "pointerSize": len(self.pointer(path)),
                }
        return entry

    def tree_entry(self, path: str) -> dict[str, object]:
        entry: dict[str, object] = {
            "type": "file",
            "oid": self.blob_id(path),
            "size": len(self.files[path]),
            "path": path,
        }
        if self.is_lfs(path):
            entry["lfs"] = {
                "oid": self.sha256(path),
                "size": len(self.files[path]),
                "pointerSize": len(self.pointer(path)),
            }
        return entry

    def tree(self, prefix: str, recursive: bool) -> list[dict[str, object]]:
        """Entries under ``prefix`` (directories first, like the Hub), one level unless ``recursive``."""
        base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        dirs: set[str] = set()
        files: list[str] = []
        for path in sorted(self.files):
            if not path.startswith(base):
                continue
            rest = path[len(base) :].split("/")
            for depth in range(1, len(rest)):
                if depth == 1 or recursive:
                    dirs.add(base + "/".join(rest[:depth]))
            if len(rest) == 1 or recursive:
                files.append(path)
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d} for d in sorted(dirs)]
        return folders + [self.tree_entry(path) for path in files]


class HubServer:
    """Serve ``repos`` (``{"owner/name": FakeRepo}``) on an ephemeral loopback port while the context is open."""

    def __init__(self, repos: dict[str, FakeRepo]) -> None:
        self.repos = repos
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        # A short poll interval makes shutdown() (each test's teardown) take milliseconds, not the default 0.5 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-hub", daemon=True
        )

    @property
    def url(self) -> str:
        """The endpoint to hand to huggingface_hub (``endpoint=``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_url(self) -> str:
        # Same socket, different host name: huggingface_hub treats it as a foreign (CDN) host.
        return f"http://localhost:{self.port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        server_hub = hub

    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so a cut transfer is simply a closed socket.
    protocol_version = "HTTP/1.0"
    server_hub: HubServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self._route(head=True)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._route(head=False)

    # Routing ----------------------------------------------------------------------------------------------------
    def _route(self, head: bool) -> None:
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            repo_id = f"{parts[2]}/{parts[3]}"
            rest = parts[4:]
            if not rest:
                return self._info(repo_id, "main", query, head)
            if rest[0] == "revision" and len(rest) == 2:
                return self._info(repo_id, rest[1], query, head)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        if len(parts) >= 5 and parts[0] == "cdn":
            return self._cdn(f"{parts[1]}/{parts[2]}", parts[3], "/".join(parts[4:]), head)
        self._error(404, "NotFound", f"no route for {split.path}", head)

    def _repo(self, repo_id: str, revision: str, head: bool) -> tuple[FakeRepo, str] | None:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
            return None
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            return None
        return repo, commit

    def _info(self, repo_id: str, revision: str, query: dict[str, list[str]], head: bool) -> None:
        found = self._repo(repo_id, revision, head)
        if found is None:
            return
        repo, commit = found
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        body = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [repo.sibling(path, blobs) for path in sorted(repo.files)],
        }
        repo.record(ServedRequest(self.command, "info", None, 200))
        self._json(body, head)

    def _tree(self, repo_id: str, revision: str, prefix: str, query: dict[str, list[str]], head: bool) -> None:
        found = self._repo(repo_id, revision, head)
        if found is None:
            return
        repo, _ = found
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        repo.record(ServedRequest(self.command, "tree", prefix or None, 200))
        self._json(repo.tree(prefix, recursive), head)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        found = self._repo(repo_id, revision, head)
        if found is None:
            return
        repo, commit = found
        if path not in repo.files:
            self._error(404, "EntryNotFound", f"{path} does not exist at {commit}", head, commit=commit)
            return
        if repo.is_lfs(path) and repo.redirect_lfs:
            location = f"{self.server_hub.cdn_url}/cdn/{repo_id}/{commit}/{quote(path)}"
            repo.record(ServedRequest(self.command, "resolve", path, 302))
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("ETag", f'"{repo.blob_id(path)}"')
            self.send_header("X-Linked-Etag", f'"{repo.sha256(path)}"')
            self.send_header("X-Linked-Size", str(len(repo.files[path])))
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        etag = repo.sha256(path) if repo.is_lfs(path) else repo.blob_id(path)
        self._serve_bytes(repo, "resolve", path, commit, etag, head)

    def _cdn(self, repo_id: str, commit: str, path: str, head: bool) -> None:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None or repo.commit_sha != commit or path not in repo.files:
            self._error(404, "EntryNotFound", "no such object", head)
            return
        self._serve_bytes(repo, "cdn", path, commit, repo.sha256(path), head)

    # Responses --------------------------------------------------------------------------------------------------
    def _serve_bytes(self, repo: FakeRepo, kind: str, path: str, commit: str, etag: str, head: bool) -> None:
        data = repo.content_served(path)
        total = len(data)
        start, end = 0, total - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            match = _RANGE.match(range_header.strip())
            if match is None or int(match.group(1)) >= max(total, 1):
                repo.record(ServedRequest(self.command, kind, path, 416))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(match.group(1))
            end = min(int(match.group(2)), total - 1) if match.group(2) else total - 1
            status = 206
        fault = None if head else repo.next_fault(path)
        range_start = start if range_header else None
        if fault is not None and fault.kind == "status":
            repo.record(ServedRequest(self.command, kind, path, fault.value, range_start))
            self._error(fault.value, "Injected", f"injected {fault.value}", head)
            return
        body = data[start : end + 1]
        # What this response will put on the wire: all of the range, or the part before an injected cut.
        wire = b"" if head else body[: fault.value] if fault is not None else body
        # Logged before sending: a client may finish (and a test assert) before this thread runs again.
        repo.record(ServedRequest(self.command, kind, path, status, range_start, len(wire)))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", commit)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.end_headers()
        try:
            release = None if head else repo.held(path)
            if release is not None:
                self.wfile.write(wire[: len(wire) // 2])
                self.wfile.flush()
                release.wait(60)
                wire = wire[len(wire) // 2 :]
            self.wfile.write(wire)
            self.wfile.flush()
        except OSError:
            pass  # the client went away mid-body
        if fault is not None:
            self._drop_connection()

    def _drop_connection(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _json(self, payload: object, head: bool) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if not head:
            self.wfile.write(raw)

    def _error(self, status: int, code: str, message: str, head: bool, commit: str | None = None) -> None:
        raw = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if not head:
            self.wfile.write(raw)


# Sample model files -----------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "I8": 1, "U8": 1}
_DTYPE_BYTES |= {"F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], metadata: dict[str, str] | None = None) -> bytes:
    """A valid safetensors file: 8-byte little-endian header length, JSON header, zeroed tensor data."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        size = count * _DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(file_type: int | None = 15, tail: int = 64) -> bytes:
    """A GGUF v3 header (``general.architecture``, a token array, ``general.file_type``) plus ``tail`` zero bytes.

    ``file_type`` 15 is llama.cpp's Q4_K_M; None leaves the key out (detection then falls back to the name).
    """
    kvs = [
        _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama"),
        _gguf_string("tokenizer.ggml.tokens")
        + struct.pack("<I", 9)
        + struct.pack("<IQ", 8, 3)
        + b"".join(_gguf_string(t) for t in ("<s>", "</s>", "hi")),
    ]
    if file_type is not None:
        kvs.append(_gguf_string("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", file_type))
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs) + bytes(tail)
