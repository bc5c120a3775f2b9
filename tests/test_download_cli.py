"""``imageworks-download`` against a real local fake Hub: downloads land in the discovered overlay and the history.

Every test runs in a temporary deployment root (the ``root`` fixture) with the demo registry; downloads go to a
``--location`` under tmp_path. The curated file is checked byte for byte wherever the downloader writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, CliResult, free_port
from hub_server import FakeRepo, HubServer, gguf_bytes, safetensors_bytes

from imageworks_core import download, history
from imageworks_core.cli.download_cmds import DownloadProgress, app
from imageworks_core.discovery import entry_name_for
from imageworks_core.download import MARKER_PATH, download_repo
from imageworks_core.formats import FormatInfo
from imageworks_core.registry import load_registry, update_entry
from imageworks_core.settings import Settings

REPO_ID = "acme/tiny-vlm"
NAME = "tiny-vlm"
WEIGHTS = "model.safetensors"
EXTRA = "extra/pytorch_model.bin"


def tiny_files() -> dict[str, bytes]:
    weights = safetensors_bytes({"lm_head.weight": ("BF16", [64 * 1024, 1])})
    return {
        "config.json": json.dumps({"architectures": ["TinyVLM"], "torch_dtype": "bfloat16"}).encode(),
        "tokenizer/tokenizer.json": b'{"model": {"vocab": {}}}',
        WEIGHTS: weights,
        EXTRA: b"\x80\x02" + bytes(2000),
    }


def awq_files() -> dict[str, bytes]:
    config = {"architectures": ["Qwen2ForCausalLM"], "quantization_config": {"quant_method": "awq", "bits": 4}}
    weights = safetensors_bytes(
        {
            "model.layers.0.mlp.down_proj.qweight": ("I32", [128, 16]),
            "model.layers.0.mlp.down_proj.qzeros": ("I32", [1, 16]),
            "model.layers.0.mlp.down_proj.scales": ("F16", [1, 128]),
        }
    )
    return {"config.json": json.dumps(config).encode(), "model.safetensors": weights}


@pytest.fixture(autouse=True)
def _isolated_hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.0)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "IMAGEWORKS_MODEL_ROOT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def repo() -> FakeRepo:
    return FakeRepo(tiny_files())


@pytest.fixture
def hub(repo: FakeRepo, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """The fake Hub serving acme/tiny-vlm plus a GGUF, an AWQ and the demo registry's curated AWQ repo."""
    repos = {
        REPO_ID: repo,
        "acme/Tiny-GGUF": FakeRepo({"Tiny-Q4_K_M.gguf": gguf_bytes(15, tail=4096), "README.md": b"# tiny"}),
        "acme/Tiny-AWQ": FakeRepo(awq_files()),
        "Qwen/Qwen2.5-VL-7B-Instruct-AWQ": FakeRepo(awq_files()),
    }
    with HubServer(repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)  # the CLI reads it at call time
        yield server


@pytest.fixture
def dl(capsys: pytest.CaptureFixture[str]):
    """Run ``imageworks-download`` in-process; returns exit code, stdout and stderr."""
    from imageworks_core.cli.app import run

    def invoke(*args: str) -> CliResult:
        capsys.readouterr()
        code = run(app, list(args), "imageworks-download")
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def location(tmp_path: Path) -> Path:
    return tmp_path / "weights"


def discovered(settings: Settings) -> dict[str, dict]:
    """The discovered file's raw entries by name."""
    return {e["name"]: e for e in json.loads(settings.discovered_path.read_text(encoding="utf-8"))}


def model_files(path: Path) -> dict[str, bytes]:
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.relative_to(path).parts[0] != ".cache"
    }


def expected_files(repo: FakeRepo) -> list[dict]:
    return [
        {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for path, data in sorted(repo.files.items())
    ]


# A clean download -----------------------------------------------------------------------------------------------


def test_clean_download_writes_the_discovered_entry_and_a_history_row(
    root: Settings, hub: HubServer, repo: FakeRepo, location: Path, dl, cli
) -> None:
    curated_before = root.curated_path.read_bytes()
    result = dl("download", REPO_ID, "--location", str(location))
    assert result.code == 0, result.err
    target = location / "acme" / "tiny-vlm"
    assert model_files(target) == repo.files

    assert f"discovered entry: {NAME} — created" in result.out
    assert f"imageworks-models show {NAME}" in result.out
    assert "Import from Download History" in result.out and str(root.curated_path) in result.out
    assert f"imageworks-models verify {NAME}" in result.out
    assert f"imageworks-models lock {NAME} --set-expected" in result.out

    entry = discovered(root)[NAME]
    assert entry["download_path"] == str(target)
    assert entry["download_location"] == str(location)
    assert (entry["download_format"], entry["quantization"]) == ("safetensors", "bf16")
    assert entry["download_size_bytes"] == sum(len(b) for b in repo.files.values())
    assert entry["download_files"] == expected_files(repo)
    assert entry["source"] == {"provider": "huggingface", "repo_id": REPO_ID, "revision": repo.commit_sha}
    assert entry["downloaded_at"].endswith("+00:00")
    assert not {"backend", "roles", "capabilities", "version_lock"} & set(entry), "machine facts only"
    assert root.curated_path.read_bytes() == curated_before

    rows = history.list_downloads(root)
    assert len(rows) == 1
    row = rows[0]
    assert (row["repo_id"], row["status"], row["commit_sha"]) == (REPO_ID, "ok", repo.commit_sha)
    assert (row["path"], row["location"], row["format"], row["quantization"]) == (
        str(target),
        str(location),
        "safetensors",
        "bf16",
    )
    assert row["total_bytes"] == entry["download_size_bytes"]
    assert json.loads(row["files_json"]) == expected_files(repo)
    assert row["actor"]

    listed = cli("list", "--json")
    assert listed.code == 0
    summary = {r["name"]: r for r in json.loads(listed.out)}[NAME]
    assert (summary["weights"], summary["layer"], summary["backend"]) == ("present", "discovered", None)
    verify = cli("verify", NAME)
    assert verify.code == 0, verify.err

    again = dl("normalize-formats")
    assert again.code == 0 and "no changes" in again.out, "a download and a re-scan agree on every fact"
    events = [json.loads(line) for line in root.audit_log_path.read_text().splitlines()]
    assert any(e["event"] == "download" and e["status"] == "ok" and e["name"] == NAME for e in events)


def test_download_json_output(root: Settings, hub: HubServer, repo: FakeRepo, location: Path, dl) -> None:
    result = dl("download", REPO_ID, "--location", str(location), "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["commit_sha"] == repo.commit_sha
    assert data["discovered"]["name"] == NAME and data["discovered"]["status"] == "created"
    assert data["format"] == "safetensors" and data["path"] == str(location / "acme" / "tiny-vlm")
    assert data["next_steps"][0] == f"imageworks-models show {NAME}"


def test_second_download_updates_the_same_entry(
    root: Settings, hub: HubServer, repo: FakeRepo, location: Path, dl
) -> None:
    assert dl("download", REPO_ID, "--location", str(location)).code == 0
    repo.clear_log()
    again = dl("download", REPO_ID, "--location", str(location))
    assert again.code == 0
    assert "matched an existing entry by download_path" in again.out
    assert all(repo.get_count(path) == 0 for path in repo.files), "verified files are reused, not fetched"
    assert list(discovered(root)) == [NAME]
    assert [r["status"] for r in history.list_downloads(root)] == ["ok", "ok"]


def test_a_repo_the_curated_file_knows_updates_that_entry_and_leaves_curated_alone(
    root: Settings, hub: HubServer, location: Path, dl
) -> None:
    curated_before = root.curated_path.read_bytes()
    result = dl("download", "Qwen/Qwen2.5-VL-7B-Instruct-AWQ", "--location", str(location))
    assert result.code == 0, result.err
    name = "qwen2.5-vl-7b-instruct_(AWQ)"
    assert f"discovered entry: {name}" in result.out and "matched an existing entry by repo_id" in result.out
    assert "overrides" in result.out, "the curated download_path wins over this download's path: say so"
    assert discovered(root)[name]["download_path"] == str(location / "Qwen" / "Qwen2.5-VL-7B-Instruct-AWQ")
    assert root.curated_path.read_bytes() == curated_before
    merged = load_registry(force=True, settings=root).get(name)
    assert merged.backend == "vllm" and merged.download_size_bytes == discovered(root)[name]["download_size_bytes"]


# Failures -------------------------------------------------------------------------------------------------------


def test_corrupted_file_of_the_right_size_exits_7_and_adds_no_entry(
    root: Settings, hub: HubServer, repo: FakeRepo, location: Path, dl
) -> None:
    discovered_before = root.discovered_path.read_bytes()
    repo.corrupt(WEIGHTS)
    result = dl("download", REPO_ID, "--location", str(location))
    assert result.code == 7
    error = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and WEIGHTS in error[0] and repo.sha256(WEIGHTS) in error[0]
    assert f"checksum mismatch: {WEIGHTS}" in result.err, "the progress log names the failing file as it happens"
    assert root.discovered_path.read_bytes() == discovered_before
    assert not (location / "acme/tiny-vlm" / WEIGHTS).exists()
    [row] = history.list_downloads(root)
    assert row["status"] == "failed" and repo.sha256(WEIGHTS) in row["detail"]


def test_interrupted_transfer_then_rerun_completes(
    root: Settings, hub: HubServer, repo: FakeRepo, location: Path, dl
) -> None:
    size = len(repo.files[WEIGHTS])
    repo.cut_after(WEIGHTS, 10_000)
    repo.fail(WEIGHTS, 503, times=download.MAX_FAILURES_WITHOUT_PROGRESS)
    first = dl("download", REPO_ID, "--location", str(location))
    assert first.code == 6 and "re-run to resume" in first.err
    assert NAME not in discovered(root)
    assert not (location / "acme/tiny-vlm" / MARKER_PATH).exists()

    repo.clear_faults()
    repo.clear_log()
    second = dl("download", REPO_ID, "--location", str(location))
    assert second.code == 0, second.err
    assert [g.range_start for g in repo.body_gets(WEIGHTS)] == [10_000], "resumed, not restarted"
    assert repo.bytes_served(WEIGHTS) == size - 10_000
    assert discovered(root)[NAME]["source"]["revision"] == repo.commit_sha
    assert [r["status"] for r in history.list_downloads(root)] == ["ok", "failed"]


def test_force_replaces_drifted_weights_and_keeps_the_entry(
    root: Settings, hub: HubServer, repo: FakeRepo, location: Path, dl
) -> None:
    target = location / "acme/tiny-vlm"
    assert dl("download", REPO_ID, "--location", str(location)).code == 0
    tampered = bytes(len(repo.files[WEIGHTS]))  # same size, different bytes: drift
    (target / WEIGHTS).write_bytes(tampered)

    refused = dl("download", REPO_ID, "--location", str(location))
    assert refused.code == 7 and "--force" in refused.err
    assert (target / WEIGHTS).read_bytes() == tampered, "an operator's differing file is never overwritten"

    forced = dl("download", REPO_ID, "--location", str(location), "--force")
    assert forced.code == 0, forced.err
    assert model_files(target) == repo.files
    assert f"discovered entry: {NAME} — " in forced.out and "matched an existing entry by download_path" in forced.out
    assert list(discovered(root)) == [NAME]
    assert [p.name for p in target.parent.iterdir()] == ["tiny-vlm"], "no staging or old copy left behind"
    assert [r["status"] for r in history.list_downloads(root)] == ["ok", "failed", "ok"]


def test_offline_exits_6_with_a_clear_message_and_writes_nothing(
    root: Settings, hub: HubServer, repo: FakeRepo, location: Path
) -> None:
    """The real console script (a subprocess): HF_HUB_OFFLINE=1 stops it before any request or write."""
    discovered_before = root.discovered_path.read_bytes()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IMAGEWORKS_ROOT": str(root.root), "HF_ENDPOINT": hub.url}
    proc = subprocess.run(
        [sys.executable, "-m", "imageworks_core.cli.download_cmds", "download", REPO_ID, "--location", str(location)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 6, proc.stderr
    assert "error: Hugging Face Hub unreachable (offline?)" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert repo.log == []
    assert not location.exists()
    assert root.discovered_path.read_bytes() == discovered_before
    [row] = history.list_downloads(root)
    assert row["status"] == "failed" and "offline" in row["detail"]


def test_a_fast_verify_right_after_a_download_reads_nothing(
    root: Settings, hub: HubServer, repo: FakeRepo, location: Path, dl, cli
) -> None:
    # The downloader records each verified file in the history DB's stat cache, the one verify --fast reads.
    assert dl("download", REPO_ID, "--location", str(location)).code == 0
    verify = cli("verify", NAME, "--fast", "--json")
    assert verify.code == 0, verify.err
    report = json.loads(verify.out)
    assert (report["file_count"], report["rehashed"], report["bytes_read"]) == (len(repo.files), [], 0)


def test_unreachable_hub_exits_6(root: Settings, location: Path, dl, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    result = dl("download", REPO_ID, "--location", str(location))
    assert result.code == 6 and "unreachable (offline?)" in result.err
    assert not location.exists()
    assert [r["status"] for r in history.list_downloads(root)] == ["failed"]


def test_usage_errors_exit_64_before_any_transfer(root: Settings, hub: HubServer, location: Path, dl) -> None:
    assert dl("download", "not-a-repo", "--location", str(location)).code == 64
    unknown = dl("download", REPO_ID, "--location", "nowhere")
    assert unknown.code == 64 and "linux_wsl" in unknown.err
    assert dl("download").code == 64
    assert not root.history_db_path.exists(), "argument errors are not downloads"
    missing_repo = dl("download", "acme/missing", "--location", str(location))
    assert missing_repo.code == 64 and "not found" in missing_repo.err


# Formats --------------------------------------------------------------------------------------------------------


def test_gguf_and_awq_repos_get_their_format_and_name(root: Settings, hub: HubServer, location: Path, dl) -> None:
    assert dl("download", "acme/Tiny-GGUF", "--location", str(location)).code == 0
    assert dl("download", "acme/Tiny-AWQ", "--location", str(location)).code == 0
    entries = discovered(root)
    gguf, awq = entries["tiny_(Q4_K_M)"], entries["tiny_(AWQ)"]
    assert (gguf["download_format"], gguf["quantization"]) == ("gguf", "Q4_K_M")
    assert gguf["download_path"] == str(location / "acme" / "Tiny-GGUF")
    assert (awq["download_format"], awq["quantization"]) == ("awq", "awq-4bit")
    assert awq["source"]["repo_id"] == "acme/Tiny-AWQ"


@pytest.mark.parametrize(
    ("source", "fmt", "quant", "name"),
    [
        ("Qwen/Qwen2.5-VL-7B-Instruct-AWQ", "awq", "awq-4bit", "qwen2.5-vl-7b-instruct_(AWQ)"),
        ("Qwen/Qwen3-VL-8B-Instruct-FP8", "fp8", "fp8", "qwen3-vl-8b-instruct_(FP8)"),
        ("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", "gptq", "gptq-4bit", "qwen2.5-7b-instruct_(GPTQ)"),
        ("unsloth/Qwen3-8B-GGUF", "gguf", "Q4_K_M", "qwen3-8b_(Q4_K_M)"),
        ("acme/multi-GGUF", "gguf", "Q4_K_M,Q8_0", "multi_(GGUF)"),
        ("acme/tiny-vlm", "safetensors", "bf16", "tiny-vlm"),
        ("/srv/models/My Model", "pytorch", None, "my-model"),
        ("acme/AWQ", "awq", "awq", "awq_(AWQ)"),
    ],
)
def test_entry_names_follow_the_registry_convention(source: str, fmt: str, quant: str | None, name: str) -> None:
    assert entry_name_for(source, FormatInfo(format=fmt, quantization=quant)) == name


# normalize-formats ----------------------------------------------------------------------------------------------


def test_normalize_after_deleting_a_file_dry_run_merge_and_rebuild(
    root: Settings, hub: HubServer, repo: FakeRepo, location: Path, dl, cli
) -> None:
    target = location / "acme/tiny-vlm"
    assert dl("download", REPO_ID, "--location", str(location)).code == 0
    assert cli("lock", NAME, "--set-expected").code == 0
    update_entry(root, NAME, {"notes": "stale machine note"}, layer="discovered", command="test")
    curated_before = root.curated_path.read_bytes()
    (target / EXTRA).unlink()
    remaining = {p: b for p, b in repo.files.items() if p != EXTRA}

    before = root.discovered_path.read_bytes()
    dry = dl("normalize-formats", "--dry-run")
    assert dry.code == 0
    assert f'-        "path": "{EXTRA}",' in dry.out and "+++ " in dry.out and "--- " in dry.out
    assert "dry run: nothing written" in dry.out
    assert root.discovered_path.read_bytes() == before

    merged = dl("normalize-formats")
    assert merged.code == 0 and f'"path": "{EXTRA}"' in merged.out and "wrote" in merged.out
    entry = discovered(root)[NAME]
    assert entry["download_size_bytes"] == sum(len(b) for b in remaining.values())
    assert [f["path"] for f in entry["download_files"]] == sorted(remaining)
    assert entry["download_files"] == [f for f in expected_files(repo) if f["path"] != EXTRA], "Hub sha256 kept"
    assert entry["notes"] == "stale machine note", "merge mode only recomputes the derived keys"

    rebuilt = dl("normalize-formats", "--rebuild")
    assert rebuilt.code == 0 and '-    "notes": "stale machine note"' in rebuilt.out
    entry = discovered(root)[NAME]
    assert "notes" not in entry, "--rebuild drops keys a scan cannot recompute"
    assert entry["source"] == {"provider": "huggingface", "repo_id": REPO_ID, "revision": repo.commit_sha}
    assert entry["download_size_bytes"] == sum(len(b) for b in remaining.values())
    assert root.curated_path.read_bytes() == curated_before, "the curated file (and its lock) is never touched"
    assert load_registry(force=True, settings=root).get(NAME).locked

    assert "no changes" in dl("normalize-formats", "--rebuild").out


def test_a_deleted_directory_shows_as_missing(root: Settings, hub: HubServer, location: Path, dl, cli) -> None:
    target = location / "acme/tiny-vlm"
    assert dl("download", REPO_ID, "--location", str(location)).code == 0
    shutil.rmtree(target)

    result = dl("normalize-formats", "--rebuild", "--json")
    assert result.code == 0
    report = json.loads(result.out)
    assert report["missing"] == [NAME] and report["written"] is True
    [row] = report["entries"]
    assert row["status"] == "missing" and "fix download_path" in row["note"]
    entry = discovered(root)[NAME]
    assert entry["download_size_bytes"] is None and entry["download_files"] == []
    assert entry["download_format"] == "safetensors", "the last known format is kept"
    assert entry["download_path"] == str(target)

    text = dl("normalize-formats")
    assert f"{NAME}  missing" in text.out and "fix download_path" in text.out
    summary = {r["name"]: r for r in json.loads(cli("list", "--json").out)}[NAME]
    assert summary["weights"] == "missing"
    assert json.loads(dl("list", "--json").out)[0]["exists"] is False


# scan -----------------------------------------------------------------------------------------------------------


def _snapshot(path: Path) -> dict[str, tuple[int, int, int]]:
    return {
        p.relative_to(path).as_posix(): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
        for p in [path, *sorted(path.rglob("*"))]
    }


def test_scan_adopts_a_read_only_directory_without_writing_inside_it(root: Settings, tmp_path: Path, dl) -> None:
    folder = tmp_path / "lmstudio" / "Tiny-Local-AWQ"
    folder.mkdir(parents=True)
    files = awq_files()
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text("{}")
    for path in [folder, folder / "sub"]:
        for child in path.iterdir():
            child.chmod(0o555 if child.is_dir() else 0o444)
    folder.chmod(0o555)
    before = _snapshot(folder)
    try:
        assert not os.access(folder, os.W_OK) or os.geteuid() == 0
        result = dl("scan", str(folder))
        assert result.code == 0, result.err
        assert "discovered entry: tiny-local_(AWQ) — created" in result.out
        entry = discovered(root)["tiny-local_(AWQ)"]
        assert entry["download_path"] == str(folder)
        assert entry["download_location"] == "scan"
        assert entry["source"] == {"provider": "local"}
        assert (entry["download_format"], entry["quantization"]) == ("awq", "awq-4bit")
        assert entry["download_files"] == [
            {"path": "config.json", "size": len(files["config.json"])},
            {"path": "model.safetensors", "size": len(files["model.safetensors"])},
            {"path": "sub/tokenizer.json", "size": 2},
        ]
        assert "downloaded_at" not in entry, "a scan does not know when the folder was downloaded"
        assert _snapshot(folder) == before, "nothing new, changed or re-moded inside the folder (we run as root)"

        again = dl("scan", str(folder), "--json")
        data = json.loads(again.out)
        assert (data["name"], data["status"], data["matched_by"]) == ("tiny-local_(AWQ)", "unchanged", "download_path")
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_scan_of_a_downloaded_copy_reads_repo_and_commit_from_its_marker(
    root: Settings, hub: HubServer, repo: FakeRepo, location: Path, tmp_path: Path, dl
) -> None:
    assert dl("download", REPO_ID, "--location", str(location)).code == 0
    copy = tmp_path / "copy" / "tiny"
    shutil.copytree(location / "acme/tiny-vlm", copy)

    result = dl("scan", str(copy), "--name", "tiny-copy")
    assert result.code == 0, result.err
    entry = discovered(root)["tiny-copy"]
    assert entry["source"] == {"provider": "huggingface", "repo_id": REPO_ID, "revision": repo.commit_sha}
    assert entry["download_files"] == expected_files(repo)
    assert list(discovered(root)) == [NAME, "tiny-copy"], "the original download's entry is left alone"


def test_scan_names_do_not_collide_and_bad_input_is_refused(root: Settings, tmp_path: Path, dl) -> None:
    for parent in ("a", "b"):
        (tmp_path / parent / "tiny").mkdir(parents=True)
        (tmp_path / parent / "tiny" / "model.bin").write_bytes(b"\x80\x02" + parent.encode())
    assert "discovered entry: tiny — created" in dl("scan", str(tmp_path / "a/tiny")).out
    assert "discovered entry: tiny-2 — created" in dl("scan", str(tmp_path / "b/tiny")).out

    assert dl("scan", str(tmp_path / "nope")).code == 64
    (tmp_path / "empty").mkdir()
    assert dl("scan", str(tmp_path / "empty")).code == 7
    assert dl("scan", str(tmp_path / "a/tiny"), "--name", "bad name").code == 64
    assert list(discovered(root)) == ["tiny", "tiny-2"]


# list -----------------------------------------------------------------------------------------------------------


def test_list_shows_history_newest_first_with_existence(
    root: Settings, hub: HubServer, repo: FakeRepo, location: Path, dl
) -> None:
    assert dl("list").out.strip() == "no downloads recorded yet"
    assert not root.history_db_path.exists(), "listing never creates the history DB"
    repo.corrupt(WEIGHTS)
    assert dl("download", REPO_ID, "--location", str(location)).code == 7
    repo.clear_faults()
    assert dl("download", REPO_ID, "--location", str(location)).code == 0

    rows = json.loads(dl("list", "--json").out)
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[0]["id"] > rows[1]["id"]
    assert rows[0]["commit_sha"] == repo.commit_sha and rows[0]["exists"] is True
    assert rows[0]["files"] == expected_files(repo)
    assert rows[1]["files"] == [] and WEIGHTS in rows[1]["detail"]

    text = dl("list").out
    assert text.splitlines()[0].split() == [
        "ID", "AT", "STATUS", "REPO", "COMMIT", "FORMAT", "QUANT", "SIZE", "EXISTS", "PATH",
    ]  # fmt: skip
    assert repo.commit_sha[:12] in text and "failed" in text


# Progress -------------------------------------------------------------------------------------------------------


def test_progress_on_a_terminal_and_in_a_log(hub: HubServer, repo: FakeRepo, tmp_path: Path) -> None:
    terminal, log = io.StringIO(), io.StringIO()
    download_repo(REPO_ID, tmp_path / "t", endpoint=hub.url, progress=DownloadProgress(terminal, tty=True))
    download_repo(REPO_ID, tmp_path / "l", endpoint=hub.url, progress=DownloadProgress(log, tty=False))

    drawn = terminal.getvalue()
    assert "[4/4] " in drawn
    assert "| total " in drawn and "/s" in drawn and "\r" in drawn
    assert f"  ok {WEIGHTS}" in drawn

    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith(f"{REPO_ID}@{repo.commit_sha[:12]}: 4 file(s)")
    assert lines[-1].startswith("done: ") and len(lines) == 2, "a log gets a few plain lines, not a bar"


def test_the_console_script_module_exposes_main_with_argv(capsys: pytest.CaptureFixture[str]) -> None:
    from imageworks_core.cli.download_cmds import main

    with pytest.raises(SystemExit) as exited:
        main(["normalize-formats", "--bogus"])
    assert exited.value.code == 64
    assert "usage error" in capsys.readouterr().err
