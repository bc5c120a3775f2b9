"""`verify`, `lock --set-expected`, `unlock`: exit codes, drift reports, lock files, history and audit lines."""

from __future__ import annotations

import difflib
import json
import os
import sqlite3

import pytest
from conftest import free_port, wait_for_clock_tick_past

from imageworks_core import history, runtime
from imageworks_core.registry import load_registry
from imageworks_core.settings import Settings
from imageworks_core.verification import lock_entry, verify_entry

DEMO = "demo-vision_(CPU)"


def weights(root: Settings):
    return root.root / "demo" / "models" / "imageworks-demo-vision"


def audit_events(root: Settings, event: str) -> list[dict]:
    lines = root.audit_log_path.read_text().splitlines() if root.audit_log_path.exists() else []
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_verify_unpinned_prints_hash_and_how_to_lock(root: Settings, cli) -> None:
    result = cli("verify", DEMO)
    assert result.code == 0, result.err
    assert "aggregate sha256:" in result.out
    assert "imageworks-models lock 'demo-vision_(CPU)' --set-expected" in result.out
    rows = history.list_verifications(root, DEMO)
    assert rows[0]["result"] == "unlocked" and rows[0]["mode"] == "full"


def test_lock_writes_small_curated_diff_and_manifest_then_verify_matches(root: Settings, cli) -> None:
    before = root.curated_path.read_text()
    result = cli("lock", DEMO, "--set-expected")
    assert result.code == 0, result.err
    after = root.curated_path.read_text()
    # The rest of the file is byte-for-byte unchanged: the only removed line is the one that gains a comma.
    diff = [d for d in difflib.ndiff(before.splitlines(), after.splitlines()) if d[:2] in ("- ", "+ ")]
    removed = [d[2:] for d in diff if d.startswith("- ")]
    added = [d[2:] for d in diff if d.startswith("+ ")]
    assert len(removed) == 1 and added[0] == removed[0] + ","
    assert added[1].strip() == '"version_lock": {' and all(
        "version_lock" in a or a.startswith("      ") or a.strip() == "}" for a in added[1:]
    )
    entry = load_registry(settings=root).get(DEMO)
    assert entry.locked and entry.version_lock.algorithm == "sha256"
    manifest = json.loads((root.root / entry.version_lock.manifest_path).read_text())
    assert manifest["aggregate"] == entry.version_lock.expected_aggregate_sha256
    assert {f["path"] for f in manifest["files"]} >= {"model.safetensors", "LICENSE", "config.json"}
    assert "LICENSE" in manifest["text_files"] and ".git/" in manifest["ignore"]
    assert cli("verify", DEMO).code == 0
    assert audit_events(root, "lock")[0]["name"] == DEMO
    assert history.list_revisions(root, DEMO)[0]["command"] == f"lock {DEMO} --set-expected"


def test_drift_exits_2_with_per_file_report_text_diff_and_lock_violation(root: Settings, cli) -> None:
    cli("lock", DEMO, "--set-expected")
    with open(weights(root) / "LICENSE", "a") as handle:
        handle.write("Additional restriction: no commercial use.\n")
    (weights(root) / "extra.bin").write_bytes(b"\0" * 10)
    (weights(root) / "tokenizer_config.json").unlink()
    result = cli("verify", DEMO)
    assert result.code == 2
    assert "modified  LICENSE" in result.out
    assert "added     extra.bin" in result.out
    assert "removed   tokenizer_config.json" in result.out
    assert "+Additional restriction: no commercial use." in result.out
    violation = audit_events(root, "lock_violation")[-1]
    assert violation["name"] == DEMO and set(violation["files"]) == {"LICENSE", "extra.bin", "tokenizer_config.json"}
    data = json.loads(cli("verify", DEMO, "--json").out)
    assert data["result"] == "drift" and data["report"]["modified"][0]["path"] == "LICENSE"
    assert history.latest_verifications(root)[DEMO]["result"] == "drift"


def test_fast_rehashes_only_changed_files_and_full_catches_a_restored_mtime_flip(root: Settings) -> None:
    lock_entry(root, DEMO, set_expected=True)
    fast = verify_entry(root, DEMO, fast=True)
    assert fast.result == "ok" and fast.rehashed == [] and fast.bytes_read == 0
    target = weights(root) / "model.safetensors"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size; restore mtime
    wait_for_clock_tick_past(target)  # coarse timestamps, see imageworks_core.hashing
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify_entry(root, DEMO, fast=True).result == "drift"  # the ctime moved: the stat cache misses it
    full = verify_entry(root, DEMO)
    assert full.result == "drift" and [c.path for c in full.report.modified] == ["model.safetensors"]
    with open(weights(root) / "config.json", "a") as handle:
        handle.write(" ")
    fast = verify_entry(root, DEMO, fast=True)
    assert "config.json" in fast.rehashed and fast.result == "drift"


def test_tampered_lock_manifest_is_drift(root: Settings, cli) -> None:
    cli("lock", DEMO, "--set-expected")
    entry = load_registry(settings=root).get(DEMO)
    path = root.root / entry.version_lock.manifest_path
    manifest = json.loads(path.read_text())
    manifest["files"][0]["digest"] = "0" * 64
    path.write_text(json.dumps(manifest))
    result = cli("verify", DEMO)
    assert result.code == 2
    assert "tampered" in result.out


def test_missing_or_empty_weights_exit_7(root: Settings, cli) -> None:
    result = cli("verify", "qwen2.5-vl-7b-instruct_(AWQ)")
    assert result.code == 7 and "Qwen2.5-VL-7B-Instruct-AWQ" in result.err
    for child in weights(root).iterdir():
        child.unlink()
    assert cli("verify", DEMO).code == 7
    assert cli("verify", "gpt-4o-mini_(remote)").code == 7  # no download_path at all


def test_lock_toggle_and_unlock_rules(root: Settings, cli) -> None:
    assert cli("lock", DEMO).code == 64  # nothing expected yet: must --set-expected first
    cli("lock", DEMO, "--set-expected")
    assert cli("unlock", DEMO).code == 64  # a reason is mandatory
    result = cli("unlock", DEMO, "--reason", "INC-7: new quant")
    assert result.code == 0
    entry = load_registry(settings=root).get(DEMO)
    assert not entry.locked and entry.version_lock.unlock_reason == "INC-7: new quant"
    assert entry.version_lock.expected_aggregate_sha256  # unlocking keeps the pin
    assert audit_events(root, "unlock")[0]["reason"] == "INC-7: new quant"
    expected = entry.version_lock.expected_aggregate_sha256
    assert cli("lock", DEMO).code == 0  # only toggles
    entry = load_registry(settings=root).get(DEMO)
    assert entry.locked and entry.version_lock.expected_aggregate_sha256 == expected


def test_blake3_lock_verifies_with_blake3(root: Settings, cli) -> None:
    assert cli("lock", DEMO, "--set-expected", "--algorithm", "blake3").code == 0
    data = json.loads(cli("verify", DEMO, "--json").out)
    assert data["algorithm"] == "blake3" and data["result"] == "ok"
    assert cli("verify", DEMO, "--algorithm", "sha256").code == 64
    assert cli("verify", DEMO, "--algorithm", "md5").code == 64


def tamper_in_place_keeping_mtime(path) -> None:
    """What `dd conv=notrunc` + `touch -r` do: new bytes, same inode, same size, the old mtime put back."""
    st = path.stat()
    wait_for_clock_tick_past(path)  # coarse timestamps, see imageworks_core.hashing
    with open(path, "r+b") as fh:
        fh.seek(100)
        fh.write(b"TAMPERED")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def test_in_place_tamper_with_restored_mtime_fails_fast_verify_and_the_activation_lock_check(
    root: Settings, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHAT_PROXY_VLLM_PORT", str(free_port()))
    assert cli("lock", DEMO, "--set-expected").code == 0
    assert cli("verify", DEMO, "--fast").code == 0  # the stat cache is warm and matches
    tamper_in_place_keeping_mtime(weights(root) / "model.safetensors")

    result = cli("verify", DEMO, "--fast")
    assert result.code == 2, result.out
    assert "modified  model.safetensors" in result.out
    assert "re-hashed 1 of" in result.out

    try:
        refused = cli("activate-model", DEMO)
        assert refused.code == 2, refused.err
        assert "is locked and its weights failed fast verification (drift" in refused.err
        assert history.list_activations(root)[0]["result"] == "refused"
        assert not root.active_state_path.exists()
    finally:
        runtime.stop(root)  # only matters if the check let it through


def test_a_weights_file_with_no_read_bits_fails_fast_verify(root: Settings, cli) -> None:
    lock_entry(root, DEMO, set_expected=True)
    target = weights(root) / "config.json"
    target.chmod(0o000)
    try:
        result = cli("verify", DEMO, "--fast")
        assert result.code == 7, result.out
        assert "OK" not in result.out
        assert "config.json" in result.err and "no read permission" in result.err
    finally:
        target.chmod(0o644)
    assert cli("verify", DEMO, "--fast").code == 0


def test_stat_cache_from_an_older_history_db_is_a_miss_not_a_crash(root: Settings) -> None:
    # The stat_cache table as it was before ctime_ns joined the key, with a row that would otherwise match.
    lock_entry(root, DEMO, set_expected=True)
    directory = str(weights(root).resolve())
    with sqlite3.connect(root.history_db_path) as conn:
        rows = conn.execute("SELECT path, size, mtime_ns, inode, digest FROM stat_cache").fetchall()
        conn.execute("DROP TABLE stat_cache")
        conn.execute(
            "CREATE TABLE stat_cache (directory TEXT NOT NULL, path TEXT NOT NULL, algorithm TEXT NOT NULL,"
            " size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, digest TEXT NOT NULL,"
            " PRIMARY KEY (directory, path, algorithm))"
        )
        conn.executemany(
            "INSERT INTO stat_cache VALUES (?, ?, 'sha256', ?, ?, ?, ?)", [(directory, *row) for row in rows]
        )
    assert len(rows) == 5
    first = verify_entry(root, DEMO, fast=True)
    assert first.result == "ok" and sorted(first.rehashed) == sorted(r[0] for r in rows)  # all missed: re-read
    second = verify_entry(root, DEMO, fast=True)
    assert second.result == "ok" and second.rehashed == []  # the migrated table now holds full keys


def test_accept_new_weights_unlocks_with_the_reason_and_relocks_at_the_new_hash(root: Settings) -> None:
    from imageworks_core.errors import UsageError, WeightsError
    from imageworks_core.service import ImageWorks

    iw = ImageWorks(root)
    old = lock_entry(root, DEMO, set_expected=True).aggregate
    with open(weights(root) / "LICENSE", "a", encoding="utf-8") as handle:
        handle.write("patch release\n")
    assert iw.verify(DEMO).result == "drift" and iw.status(DEMO).drifted
    with pytest.raises(UsageError, match="needs a reason"):
        iw.accept_new_weights(DEMO, reason="  ")
    assert load_registry(force=True, settings=root).get(DEMO).locked, "no reason, nothing changed"
    result = iw.accept_new_weights(DEMO, reason="CHG-7: licence text updated upstream")
    lock = load_registry(force=True, settings=root).get(DEMO).version_lock
    assert lock is not None and lock.locked and lock.expected_aggregate_sha256 == result.aggregate != old
    assert [e["reason"] for e in audit_events(root, "unlock")] == ["CHG-7: licence text updated upstream"]
    relock = audit_events(root, "lock")[-1]
    assert relock["set_expected"] and relock["expected"] == result.aggregate
    assert relock["reason"] == "CHG-7: licence text updated upstream"
    assert iw.verify(DEMO).result == "ok" and not iw.status(DEMO).drifted, "the service serves the new lock at once"
    with pytest.raises(UsageError, match="no expected hash to replace"):
        iw.accept_new_weights("demo-text_(CPU)", reason="x")
    (weights(root) / "LICENSE").unlink()
    for child in weights(root).iterdir():
        child.unlink()
    weights(root).rmdir()
    with pytest.raises(WeightsError, match="missing"):
        iw.accept_new_weights(DEMO, reason="x")
    assert load_registry(force=True, settings=root).get(DEMO).locked, "missing weights: refused before unlocking"
