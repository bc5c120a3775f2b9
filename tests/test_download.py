"""The downloader against a real local fake Hub: verified, resumable, atomic with --force, never clobbering."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, wait_for_clock_tick_past
from filelock import FileLock
from hub_server import FakeRepo, HubServer, gguf_bytes, safetensors_bytes
from huggingface_hub import constants, snapshot_download

from imageworks_core import download, history
from imageworks_core.download import MARKER_PATH, download_repo, read_marker, resolve_location
from imageworks_core.errors import BackendError, UsageError, WeightsError
from imageworks_core.hashing import GIT_BLOB_SHA1, hash_directory
from imageworks_core.settings import Settings

REPO_ID = "acme/tiny-vlm"
WEIGHTS = "model.safetensors"
BIG = 256 * 1024  # big enough to arrive in several socket reads


def tiny_files() -> dict[str, bytes]:
    weights = safetensors_bytes({"lm_head.weight": ("BF16", [BIG // 2, 1])})
    return {
        "config.json": json.dumps({"architectures": ["TinyVLM"], "torch_dtype": "bfloat16"}).encode(),
        "tokenizer/tokenizer.json": b'{"model": {"vocab": {}}}',
        WEIGHTS: weights,
        "extra/pytorch_model.bin": b"\x80\x02" + bytes(2000),
    }


@pytest.fixture(autouse=True)
def _isolated_hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # No retry sleeps, no inherited offline switch or endpoint from the developer's shell.
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.0)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def repo() -> FakeRepo:
    return FakeRepo(tiny_files())


@pytest.fixture
def hub(repo: FakeRepo) -> Iterator[HubServer]:
    with HubServer({REPO_ID: repo}) as server:
        yield server


def target_of(tmp_path: Path) -> Path:
    return tmp_path / "weights" / "acme" / "tiny-vlm"


def model_files(root: Path) -> dict[str, bytes]:
    """Files a model consumer would see (tool state under .cache/ excluded)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != ".cache"
    }


# Clean download, reuse ------------------------------------------------------------------------------------------


def test_clean_download_verifies_every_file_and_records_the_commit(
    hub: HubServer, repo: FakeRepo, tmp_path: Path
) -> None:
    target = target_of(tmp_path)
    events: list[dict] = []
    result = download_repo(REPO_ID, target, endpoint=hub.url, progress=events.append)

    assert model_files(target) == repo.files
    assert result.commit_sha == repo.commit_sha
    assert result.total_bytes == sum(len(b) for b in repo.files.values())
    assert result.downloaded_bytes == result.total_bytes
    by_path = {f.path: f for f in result.files}
    assert by_path[WEIGHTS].lfs and by_path[WEIGHTS].sha256 == repo.sha256(WEIGHTS)
    assert not by_path["config.json"].lfs and by_path["config.json"].blob_id == repo.blob_id("config.json")
    assert all(f.sha256 == hashlib.sha256(repo.files[f.path]).hexdigest() for f in result.files)
    assert (result.format.format, result.format.quantization) == ("safetensors", "bf16")

    marker = read_marker(target)
    assert marker is not None and marker.commit_sha == repo.commit_sha
    assert result.marker_path == target / MARKER_PATH
    assert not (target / ".cache/imageworks/partial").exists()

    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan" and kinds[-1] == "done"
    last_bytes = [e for e in events if e["event"] == "bytes"][-1]
    assert last_bytes["done"] == last_bytes["total"] == result.total_bytes
    assert {e["path"] for e in events if e["event"] == "file_done"} == set(repo.files)


def test_second_run_reuses_verified_files_without_fetching(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    target = target_of(tmp_path)
    download_repo(REPO_ID, target, endpoint=hub.url)
    repo.clear_log()
    again = download_repo(REPO_ID, target, endpoint=hub.url, revision="main")
    assert sorted(again.reused_files) == sorted(repo.files)
    assert again.downloaded_bytes == 0
    assert all(repo.get_count(path) == 0 for path in repo.files)
    assert again.revision == "main" and read_marker(target).revision == "main"


def test_in_place_tamper_with_restored_mtime_is_rehashed_not_reused(
    hub: HubServer, repo: FakeRepo, tmp_path: Path
) -> None:
    target = target_of(tmp_path)
    download_repo(REPO_ID, target, endpoint=hub.url)
    weights = target / WEIGHTS
    before = weights.stat()
    with open(weights, "r+b") as handle:  # same size, bytes changed in place, mtime put back (touch -r)
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 0xFF]))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    # The cache key's ctime changed: hashed again and found to differ (old code reused it as verified).
    with pytest.raises(WeightsError, match=f"differ from {REPO_ID}.*{WEIGHTS}"):
        download_repo(REPO_ID, target, endpoint=hub.url)


def test_operator_files_that_match_are_reused(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    target = target_of(tmp_path)
    (target).mkdir(parents=True)
    (target / WEIGHTS).write_bytes(repo.files[WEIGHTS])
    result = download_repo(REPO_ID, target, endpoint=hub.url)
    assert result.reused_files == [WEIGHTS]
    assert repo.get_count(WEIGHTS) == 0


# The stat cache (history DB, shared with verify --fast) --------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(IMAGEWORKS_ROOT=tmp_path / "root")


def checked(events: list[dict]) -> set[str]:
    """Files the run read to decide whether they could be reused."""
    return {e["path"] for e in events if e["event"] == "check"}


def test_rechecks_use_the_verifiers_stat_cache_in_the_history_db(
    hub: HubServer, repo: FakeRepo, tmp_path: Path, settings: Settings
) -> None:
    target = target_of(tmp_path)
    download_repo(REPO_ID, target, endpoint=hub.url, settings=settings)
    key = str(target.resolve())
    sha256 = history.stat_entries(settings, key, "sha256")
    assert {p: e.digest for p, e in sha256.items()} == {p: hashlib.sha256(b).hexdigest() for p, b in repo.files.items()}
    git = history.stat_entries(settings, key, GIT_BLOB_SHA1)
    assert {p: e.digest for p, e in git.items()} == {p: repo.blob_id(p) for p in repo.files if not repo.is_lfs(p)}
    assert not (target / ".cache/imageworks/verified.json").exists()

    events: list[dict] = []
    again = download_repo(REPO_ID, target, endpoint=hub.url, settings=settings, progress=events.append)
    assert sorted(again.reused_files) == sorted(repo.files)
    assert checked(events) == set(), "unchanged files are not read again"
    # The verifier's fast mode trusts the same rows: nothing to re-hash right after a download.
    assert hash_directory(target, mode="fast", cache=sha256).rehashed == []


def test_without_settings_every_present_file_is_read_and_no_history_db_appears(
    hub: HubServer, repo: FakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMAGEWORKS_ROOT", raising=False)
    target = target_of(tmp_path)
    download_repo(REPO_ID, target, endpoint=hub.url)
    events: list[dict] = []
    download_repo(REPO_ID, target, endpoint=hub.url, progress=events.append)
    last = [e for e in events if e["event"] == "check" and e["algorithm"] == "sha256"][-1]
    assert last["done"] == last["total"] == sum(len(b) for b in repo.files.values()), "every file read again"
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("path", [WEIGHTS, "config.json"], ids=["lfs-sha256", "git-blob"])
def test_in_place_tamper_with_restored_mtime_misses_the_history_cache(
    hub: HubServer, repo: FakeRepo, tmp_path: Path, settings: Settings, path: str
) -> None:
    target = target_of(tmp_path)
    download_repo(REPO_ID, target, endpoint=hub.url, settings=settings)
    tampered = target / path
    before = tampered.stat()
    wait_for_clock_tick_past(tampered)
    with open(tampered, "r+b") as handle:  # same size, bytes changed in place, mtime put back (touch -r)
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 0xFF]))
    os.utime(tampered, ns=(before.st_atime_ns, before.st_mtime_ns))
    events: list[dict] = []
    detail = "local sha256" if path == WEIGHTS else "local git blob"
    with pytest.raises(WeightsError, match=f"differ from {REPO_ID}.*{path} \\({detail}"):
        download_repo(REPO_ID, target, endpoint=hub.url, settings=settings, progress=events.append)
    assert checked(events) == {path}, "only the file whose ctime moved is read again"


def test_an_old_verified_json_is_never_trusted_and_is_removed(
    hub: HubServer, repo: FakeRepo, tmp_path: Path, settings: Settings
) -> None:
    target = target_of(tmp_path)
    (target / ".cache/imageworks").mkdir(parents=True)
    weights = target / WEIGHTS
    weights.write_bytes(bytes(len(repo.files[WEIGHTS])))  # same size, different content
    st = weights.stat()
    old_cache = target / ".cache/imageworks/verified.json"
    stat_key = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    old_cache.write_text(json.dumps({WEIGHTS: {"stat": stat_key, "sha256": repo.sha256(WEIGHTS), "git_blob": ""}}))
    with pytest.raises(WeightsError, match="--force"):
        download_repo(REPO_ID, target, endpoint=hub.url, settings=settings)

    weights.write_bytes(repo.files[WEIGHTS])
    result = download_repo(REPO_ID, target, endpoint=hub.url, settings=settings)
    assert WEIGHTS in result.reused_files
    assert not old_cache.exists()


def test_force_hands_the_staging_rows_to_the_target(
    hub: HubServer, repo: FakeRepo, tmp_path: Path, settings: Settings
) -> None:
    target = target_of(tmp_path)
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("operator notes")
    download_repo(REPO_ID, target, endpoint=hub.url, settings=settings)
    download_repo(REPO_ID, target, endpoint=hub.url, settings=settings, force=True)
    staging = target.parent / f".{target.name}.imageworks-staging"
    assert history.stat_entries(settings, str(staging.resolve()), "sha256") == {}
    rows = history.stat_entries(settings, str(target.resolve()), "sha256")
    assert set(rows) == set(repo.files), "the old directory's rows are gone with it"

    events: list[dict] = []
    download_repo(REPO_ID, target, endpoint=hub.url, settings=settings, progress=events.append)
    assert checked(events) == set()


def test_revision_pins_the_commit(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    result = download_repo(REPO_ID, target_of(tmp_path), endpoint=hub.url, revision=repo.commit_sha[:10])
    assert result.commit_sha == repo.commit_sha
    with pytest.raises(UsageError, match="revision 'nope' not found"):
        download_repo(REPO_ID, tmp_path / "other", endpoint=hub.url, revision="nope")


def test_lfs_served_directly_without_cdn_redirect(tmp_path: Path) -> None:
    repo = FakeRepo(tiny_files(), redirect_lfs=False)
    with HubServer({REPO_ID: repo}) as hub:
        download_repo(REPO_ID, target_of(tmp_path), endpoint=hub.url)
    assert model_files(target_of(tmp_path)) == repo.files


# Verification ---------------------------------------------------------------------------------------------------


def test_corrupted_same_size_file_is_rejected_and_refetched_on_rerun(
    hub: HubServer, repo: FakeRepo, tmp_path: Path
) -> None:
    target = target_of(tmp_path)
    repo.corrupt(WEIGHTS)
    with pytest.raises(WeightsError) as caught:
        download_repo(REPO_ID, target, endpoint=hub.url)
    message = caught.value.message
    assert WEIGHTS in message and repo.sha256(WEIGHTS) in message
    bad = hashlib.sha256(repo.content_served(WEIGHTS)).hexdigest()
    assert bad in message
    assert not (target / MARKER_PATH).exists()
    assert not (target / WEIGHTS).exists(), "unverified bytes must never land at the model path"
    assert (target / "config.json").read_bytes() == repo.files["config.json"]

    repo.clear_faults()
    repo.clear_log()
    result = download_repo(REPO_ID, target, endpoint=hub.url)
    assert model_files(target) == repo.files
    assert repo.get_count(WEIGHTS) == 1
    assert repo.get_count("config.json") == 0
    assert WEIGHTS not in result.reused_files and "config.json" in result.reused_files


def test_corrupted_regular_file_fails_its_git_blob_check(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    repo.corrupt("config.json")
    with pytest.raises(WeightsError, match=f"config.json: expected git blob {repo.blob_id('config.json')}"):
        download_repo(REPO_ID, target_of(tmp_path), endpoint=hub.url)


def test_differing_operator_file_is_never_overwritten(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    target = target_of(tmp_path)
    target.mkdir(parents=True)
    mine = bytes(len(repo.files[WEIGHTS]))  # same size, different content
    (target / WEIGHTS).write_bytes(mine)
    with pytest.raises(WeightsError, match="--force") as caught:
        download_repo(REPO_ID, target, endpoint=hub.url)
    assert WEIGHTS in caught.value.message
    assert (target / WEIGHTS).read_bytes() == mine
    assert all(repo.get_count(path) == 0 for path in repo.files)
    assert not (target / MARKER_PATH).exists()


# Resume ---------------------------------------------------------------------------------------------------------


def test_dropped_connection_resumes_with_range_in_the_same_run(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    size = len(repo.files[WEIGHTS])
    repo.cut_after(WEIGHTS, 10_000)
    download_repo(REPO_ID, target_of(tmp_path), endpoint=hub.url)
    gets = repo.body_gets(WEIGHTS)
    assert [g.range_start for g in gets] == [None, 10_000]
    assert repo.bytes_served(WEIGHTS) == size, "nothing fetched twice"
    assert (target_of(tmp_path) / WEIGHTS).read_bytes() == repo.files[WEIGHTS]


def test_interrupted_download_leaves_no_marker_and_rerun_resumes(
    hub: HubServer, repo: FakeRepo, tmp_path: Path
) -> None:
    target = target_of(tmp_path)
    size = len(repo.files[WEIGHTS])
    repo.cut_after(WEIGHTS, 10_000)
    repo.fail(WEIGHTS, 503, times=download.MAX_FAILURES_WITHOUT_PROGRESS)
    with pytest.raises(BackendError, match="re-run to resume"):
        download_repo(REPO_ID, target, endpoint=hub.url)
    assert not (target / MARKER_PATH).exists()
    assert not (target / WEIGHTS).exists()

    repo.clear_log()
    result = download_repo(REPO_ID, target, endpoint=hub.url)
    assert [g.range_start for g in repo.body_gets(WEIGHTS)] == [10_000]
    assert repo.bytes_served(WEIGHTS) == size - 10_000
    assert (target / WEIGHTS).read_bytes() == repo.files[WEIGHTS]
    assert read_marker(target).commit_sha == result.commit_sha


def test_aborted_by_the_caller_resumes_where_it_stopped(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    target = target_of(tmp_path)

    def abort_mid_file(event: dict) -> None:
        if event["event"] == "bytes" and event["path"] == WEIGHTS:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_repo(REPO_ID, target, endpoint=hub.url, progress=abort_mid_file)
    assert not (target / MARKER_PATH).exists()
    kept = sum(p.stat().st_size for p in (target / ".cache/imageworks/partial").iterdir())
    assert 0 < kept <= len(repo.files[WEIGHTS])

    repo.clear_log()
    download_repo(REPO_ID, target, endpoint=hub.url)
    assert repo.bytes_served(WEIGHTS) == len(repo.files[WEIGHTS]) - kept
    assert model_files(target) == repo.files


# --force --------------------------------------------------------------------------------------------------------


def test_force_keeps_the_old_directory_when_verification_fails_and_swaps_on_success(
    hub: HubServer, repo: FakeRepo, tmp_path: Path
) -> None:
    target = target_of(tmp_path)
    target.mkdir(parents=True)
    (target / WEIGHTS).write_bytes(b"old weights")
    (target / "notes.txt").write_text("operator notes")
    (target / MARKER_PATH).parent.mkdir(parents=True)
    (target / MARKER_PATH).write_text('{"old": true}')
    before = model_files(target)

    repo.corrupt(WEIGHTS)
    with pytest.raises(WeightsError, match=WEIGHTS):
        download_repo(REPO_ID, target, endpoint=hub.url, force=True)
    assert model_files(target) == before
    assert (target / MARKER_PATH).read_text() == '{"old": true}'

    repo.clear_faults()
    repo.clear_log()
    result = download_repo(REPO_ID, target, endpoint=hub.url, force=True)
    assert model_files(target) == repo.files, "old files (notes.txt) are gone, new ones in place"
    assert read_marker(target).commit_sha == repo.commit_sha
    assert set(result.reused_files) == set(repo.files) - {WEIGHTS}, "staging from the failed run was resumed"
    assert repo.get_count(WEIGHTS) == 1
    leftovers = [p.name for p in target.parent.iterdir() if p.name != target.name]
    assert leftovers == [], f"no staging/old/lock left behind: {leftovers}"


def test_force_into_a_new_directory(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    target = target_of(tmp_path)
    repo.corrupt(WEIGHTS)
    with pytest.raises(WeightsError):
        download_repo(REPO_ID, target, endpoint=hub.url, force=True)
    assert not target.exists(), "a failed --force leaves no model directory behind"

    repo.clear_faults()
    download_repo(REPO_ID, target, endpoint=hub.url, force=True)
    assert model_files(target) == repo.files
    assert read_marker(target) is not None


def test_a_second_concurrent_download_is_refused(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    target = target_of(tmp_path)
    (target / ".cache/imageworks").mkdir(parents=True)
    with FileLock(target / ".cache/imageworks/download.lock"):
        with pytest.raises(UsageError, match="another download is writing"):
            download_repo(REPO_ID, target, endpoint=hub.url)
    assert model_files(target) == {}


# Selection ------------------------------------------------------------------------------------------------------


def test_include_and_exclude(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    only_json = download_repo(REPO_ID, tmp_path / "a", endpoint=hub.url, include=["*.json"])
    assert sorted(model_files(tmp_path / "a")) == ["config.json", "tokenizer/tokenizer.json"]
    assert only_json.include == ["*.json"]

    download_repo(REPO_ID, tmp_path / "b", endpoint=hub.url, exclude=["*.bin", "tokenizer/*"])
    assert sorted(model_files(tmp_path / "b")) == ["config.json", WEIGHTS]

    with pytest.raises(UsageError, match="no files selected"):
        download_repo(REPO_ID, tmp_path / "c", endpoint=hub.url, include=["*.gguf"])
    assert not (tmp_path / "c").exists()


# Failures before anything is written ----------------------------------------------------------------------------


def test_offline_env_is_refused_before_any_request(
    hub: HubServer, repo: FakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackendError, match=r"unreachable \(offline\?\)"):
        download_repo(REPO_ID, target_of(tmp_path), endpoint=hub.url)
    assert repo.log == []
    assert not (tmp_path / "weights").exists()


def test_offline_constant_is_refused(
    hub: HubServer, repo: FakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub snapshots HF_HUB_OFFLINE at import; a process started offline has only the constant set.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackendError, match="offline"):
        download_repo(REPO_ID, target_of(tmp_path), endpoint=hub.url)
    assert not (tmp_path / "weights").exists()


def test_unreachable_endpoint(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"unreachable \(offline\?\)"):
        download_repo(REPO_ID, target_of(tmp_path), endpoint=f"http://127.0.0.1:{free_port()}")
    assert not (tmp_path / "weights").exists()


def test_hf_endpoint_env_is_read_at_call_time(
    hub: HubServer, repo: FakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert download_repo(REPO_ID, target_of(tmp_path)).endpoint == hub.url


def test_bad_repo_ids_and_unknown_repos(hub: HubServer, tmp_path: Path) -> None:
    for bad in ("no-slash", "a/b/c", "../x", "a/b..c", ""):
        with pytest.raises(UsageError, match="invalid repo id"):
            download_repo(bad, tmp_path / "x", endpoint=hub.url)
    with pytest.raises(UsageError, match="not found"):
        download_repo("acme/missing", tmp_path / "x", endpoint=hub.url)
    assert not (tmp_path / "x").exists()


def test_not_enough_disk_space(hub: HubServer, repo: FakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Usage:
        free = 100

    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(WeightsError, match="not enough free disk space"):
        download_repo(REPO_ID, target_of(tmp_path), endpoint=hub.url)
    assert not (tmp_path / "weights").exists()


def test_persistent_server_error_is_a_backend_error(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    repo.fail(WEIGHTS, 500, times=10)
    with pytest.raises(BackendError, match="re-run to resume"):
        download_repo(REPO_ID, target_of(tmp_path), endpoint=hub.url)
    assert not (target_of(tmp_path) / MARKER_PATH).exists()


# Formats through a download -------------------------------------------------------------------------------------


def test_gguf_repo_is_detected(tmp_path: Path) -> None:
    repo = FakeRepo({"Tiny-Q4_K_M.gguf": gguf_bytes(15, tail=4096), "README.md": b"# tiny"})
    with HubServer({"acme/tiny-gguf": repo}) as hub:
        result = download_repo("acme/tiny-gguf", tmp_path / "g", endpoint=hub.url)
    assert (result.format.format, result.format.quantization) == ("gguf", "Q4_K_M")
    assert read_marker(tmp_path / "g").format.format == "gguf"


def test_awq_repo_is_detected(tmp_path: Path) -> None:
    config = {"architectures": ["Qwen2ForCausalLM"], "quantization_config": {"quant_method": "awq", "bits": 4}}
    weights = safetensors_bytes(
        {
            "model.layers.0.mlp.down_proj.qweight": ("I32", [128, 16]),
            "model.layers.0.mlp.down_proj.qzeros": ("I32", [1, 16]),
            "model.layers.0.mlp.down_proj.scales": ("F16", [1, 128]),
        }
    )
    repo = FakeRepo({"config.json": json.dumps(config).encode(), "model.safetensors": weights})
    with HubServer({"acme/tiny-awq": repo}) as hub:
        result = download_repo("acme/tiny-awq", tmp_path / "a", endpoint=hub.url)
    assert (result.format.format, result.format.quantization) == ("awq", "awq-4bit")


# The fake Hub itself --------------------------------------------------------------------------------------------


def test_fake_hub_speaks_the_protocol_snapshot_download_uses(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    local = tmp_path / "snap"
    snapshot_download(REPO_ID, local_dir=local, cache_dir=tmp_path / "hf-cache", endpoint=hub.url, token=False)
    assert model_files(local) == repo.files
    assert any(r.method == "HEAD" and r.status == 302 for r in repo.log), "LFS files go through the CDN redirect"


# Locations ------------------------------------------------------------------------------------------------------


def test_locations_defaults_overrides_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(download.getpass, "getuser", lambda: "alice")
    settings = Settings(IMAGEWORKS_ROOT=tmp_path / "root")

    assert resolve_location("linux_wsl", REPO_ID, settings) == tmp_path / "home/ai-models/weights/acme/tiny-vlm"
    assert resolve_location("windows_lmstudio", REPO_ID, settings) == Path(
        "/mnt/c/Users/alice/.lmstudio/models/acme/tiny-vlm"
    )
    assert resolve_location(str(tmp_path / "disk"), REPO_ID, settings) == tmp_path / "disk/acme/tiny-vlm"

    settings.configs_dir.mkdir(parents=True)
    settings.locations_path.write_text(
        json.dumps({"locations": {"windows_lmstudio": "/mnt/d/lms", "nas": "/srv/nas/models"}})
    )
    assert resolve_location("windows_lmstudio", REPO_ID, settings) == Path("/mnt/d/lms/acme/tiny-vlm")
    assert resolve_location("nas", REPO_ID, settings) == Path("/srv/nas/models/acme/tiny-vlm")

    with_root = Settings(IMAGEWORKS_ROOT=tmp_path / "root", IMAGEWORKS_MODEL_ROOT=tmp_path / "models")
    assert resolve_location("linux_wsl", REPO_ID, with_root) == tmp_path / "models/acme/tiny-vlm"

    with pytest.raises(UsageError, match="linux_wsl, nas, windows_lmstudio"):
        resolve_location("nowhere", REPO_ID, settings)
    settings.locations_path.write_text("{broken")
    with pytest.raises(UsageError, match="locations.json"):
        resolve_location("linux_wsl", REPO_ID, settings)
