"""Models → Registry → Import: scan a folder (offline) and download owner/repo from the Hub, with progress and Cancel.

AppTest drives the Import tab against the local fake Hub (``hub_server``; HF_ENDPOINT points at it): the files
land, the run appears in Download History and the discovered entry is offered for import; a Cancel aborts the
download mid-file, leaves no download marker and records the run as cancelled (not failed) with the reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apptest_pages import APP, TIMEOUT_S, joined, run
from hub_server import FakeRepo, HubServer, safetensors_bytes
from streamlit.testing.v1 import AppTest

from imageworks_core import dashboard_data, download, history
from imageworks_core.download import MARKER_PATH
from imageworks_core.settings import Settings

REPO_ID = "acme/tiny-vlm"
WEIGHTS = "model.safetensors"


def tiny_files() -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"architectures": ["TinyVLM"], "torch_dtype": "bfloat16"}).encode(),
        WEIGHTS: safetensors_bytes({"lm_head.weight": ("BF16", [256 * 1024, 1])}),
    }


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.0)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def repo() -> FakeRepo:
    return FakeRepo(tiny_files())


@pytest.fixture
def hub(repo: FakeRepo, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer({REPO_ID: repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)  # Settings.hf_endpoint, read when the download starts
        yield server


def import_tab() -> AppTest:
    at = run(AppTest.from_file(str(APP), default_timeout=TIMEOUT_S))
    at.session_state["registry_tab"] = "Import from Download History"
    return run(at)


def until(at: AppTest, done: Any, timeout_s: float = 60.0) -> AppTest:
    """Rerun the page (as its one-second fragment does) until ``done(at)``."""
    deadline = time.monotonic() + timeout_s
    while not done(run(at)):
        assert time.monotonic() < deadline, f"page never got there: {joined(at.markdown)[-2000:]}"
        time.sleep(0.2)
    return at


def progress_text(at: AppTest) -> str:
    return "\n".join(str(p.proto.text) for p in at.get("progress"))


def history_table(at: AppTest) -> Any:
    return next(t.value for t in at.dataframe if "detail" in t.value.columns)


def start_download(at: AppTest, location: Path) -> AppTest:
    at.text_input(key="download_repo").input(REPO_ID)
    at.text_input(key="download_location").input(str(location))
    next(b for b in at.button if b.label == "Download").click()
    return run(at)


def test_download_from_the_import_tab_lands_the_files_and_the_history_row(
    root: Settings, hub: HubServer, repo: FakeRepo, tmp_path: Path
) -> None:
    location = tmp_path / "weights"
    at = start_download(import_tab(), location)
    until(at, lambda at: "Downloaded acme/tiny-vlm@" in joined(at.success))
    target = location / "acme" / "tiny-vlm"
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == repo.files
    assert (target / MARKER_PATH).is_file()
    rows = history_table(at)
    assert list(rows["status"]) == ["ok"] and list(rows["repo"]) == [REPO_ID]
    assert list(rows["path"]) == [str(target)] and list(rows["exists"]) == ["yes"]
    assert "Discovered entry **tiny-vlm** (created): import it below." in joined(at.success)
    picked = next(w for w in at.selectbox if w.label == "Entry to import")
    assert picked.value == "discovered:tiny-vlm", "the new entry is ready to import"
    assert not any(b.label == "Cancel download" for b in at.button)


def test_cancel_aborts_mid_file_leaves_no_marker_and_records_the_run(
    root: Settings, hub: HubServer, repo: FakeRepo, tmp_path: Path
) -> None:
    release = repo.hold(WEIGHTS)
    location = tmp_path / "weights"
    try:
        at = start_download(import_tab(), location)
        until(at, lambda at: repo.bytes_served(WEIGHTS) > 0 and "files ·" in progress_text(at))
        assert next(b for b in at.button if b.label == "Download").disabled, "one download at a time"
        cancel = next(b for b in at.button if b.label == "Cancel download")
        cancel.click()
        run(at)
        # Either the bar says so, or the download already met its next chunk and stopped (the rest of the held
        # file's first half can still be in flight when Cancel is clicked).
        assert "cancelling…" in progress_text(at) or "cancelled" in joined(at.warning)
    finally:
        release.set()
    until(at, lambda at: "cancelled" in joined(at.warning))
    assert "no download marker written" in joined(at.warning)
    target = location / "acme" / "tiny-vlm"
    assert not (target / MARKER_PATH).exists()
    rows = history.list_downloads(root)
    assert [(r["status"], r["repo_id"]) for r in rows] == [("cancelled", REPO_ID)]
    assert "cancelled by the operator" in rows[0]["detail"]
    assert list(history_table(at)["status"]) == ["cancelled"]
    assert not root.discovered_path.exists() or "tiny-vlm" not in root.discovered_path.read_text(encoding="utf-8")


def test_scan_adopts_a_folder_offline_and_offers_it_for_import(root: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "disk" / "Tiny-Local"
    folder.mkdir(parents=True)
    for name, data in tiny_files().items():
        (folder / name).write_bytes(data)
    at = import_tab()
    at.text_input(key="scan_dir").input(str(folder))
    next(b for b in at.button if b.label == "Scan").click()
    run(at)
    assert "Scanned" in joined(at.success) and str(folder) in joined(at.success)
    discovered = {e["name"]: e for e in json.loads(root.discovered_path.read_text(encoding="utf-8"))}
    name = next(n for n, e in discovered.items() if e.get("download_path") == str(folder))
    assert next(w for w in at.selectbox if w.label == "Entry to import").value == f"discovered:{name}"
    assert sorted(p.name for p in folder.iterdir()) == sorted(tiny_files()), "nothing written inside the folder"


def test_scan_of_a_missing_folder_shows_the_error(root: Settings, tmp_path: Path) -> None:
    at = import_tab()
    at.text_input(key="scan_dir").input(str(tmp_path / "nope"))
    next(b for b in at.button if b.label == "Scan").click()
    run(at)
    assert "is not a directory" in joined(at.error)


# The tracker, directly ----------------------------------------------------------------------------------------
def test_tracker_gives_bytes_files_rate_and_eta_and_cancel_raises() -> None:
    now = [100.0]
    tracker = dashboard_data.DownloadTracker(clock=lambda: now[0])
    assert tracker.snapshot().text == "asking the Hub for the file list…"
    tracker({"event": "plan", "files": 3, "reused_files": ["a"], "to_download_bytes": 4 * 2**20, "total_bytes": 0})
    tracker({"event": "file_start", "path": "w.safetensors", "size": 3 * 2**20, "resume_from": 0})
    tracker(
        {"event": "bytes", "path": "w", "file_done": 2**20, "file_size": 3 * 2**20, "done": 2**20, "total": 4 * 2**20}
    )
    now[0] = 101.0
    tracker(
        {
            "event": "bytes",
            "path": "w",
            "file_done": 2 * 2**20,
            "file_size": 3 * 2**20,
            "done": 2 * 2**20,
            "total": 4 * 2**20,
        }
    )
    snap = tracker.snapshot()
    assert snap.fraction == 0.5 and snap.eta_s == 2.0
    assert snap.text == "2.0 MiB / 4.0 MiB · 0/2 files · 1.0 MiB/s · ETA 2 s · w.safetensors"
    tracker.cancel()
    with pytest.raises(dashboard_data.DownloadCancelled):
        tracker({"event": "bytes", "path": "w", "file_done": 0, "file_size": 1, "done": 0, "total": 1})
    assert tracker.snapshot().text.startswith("cancelling… ")
    assert [dashboard_data.eta_text(s) for s in (None, 5, 125, 3725)] == ["?", "5 s", "2 min 05 s", "1 h 02 min"]


def test_a_cancelled_download_is_recorded_cancelled_and_any_other_abort_failed(
    hub: HubServer, root: Settings, tmp_path: Path
) -> None:
    """The core records the outcome: the operator's Cancel is ``cancelled`` (history row and audit line), a
    download that broke for another reason stays ``failed``; neither writes a discovered entry."""
    from imageworks_core.discovery import download_and_register
    from imageworks_core.errors import DownloadCancelled

    tracker = dashboard_data.DownloadTracker()
    tracker.cancel()
    with pytest.raises(DownloadCancelled):
        download_and_register(root, REPO_ID, location=str(tmp_path / "w1"), progress=tracker)

    def broken(event: dict[str, Any]) -> None:
        raise OSError("disk went away")

    with pytest.raises(OSError):
        download_and_register(root, REPO_ID, location=str(tmp_path / "w2"), progress=broken)
    rows = history.list_downloads(root)
    assert [(r["status"], r["detail"]) for r in reversed(rows)] == [
        ("cancelled", "download cancelled by the operator; partial bytes kept for a resume"),
        ("failed", "disk went away"),
    ]
    audit = [json.loads(line) for line in root.audit_log_path.read_text(encoding="utf-8").splitlines()]
    assert [a["status"] for a in audit if a["event"] == "download"] == ["cancelled", "failed"]
    assert not root.discovered_path.exists() or "tiny-vlm" not in root.discovered_path.read_text(encoding="utf-8")
    assert dashboard_data.DownloadCancelled is DownloadCancelled, "one class, re-exported for the pages"
