"""Weight hashing, as a specification: manifests, aggregate, ignore rules, symlinks, fast mode, drift reports."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import blake3
import pytest
from conftest import wait_for_clock_tick_past

from imageworks_core import hashing
from imageworks_core.errors import EXIT_WEIGHTS, UsageError, WeightsError
from imageworks_core.hashing import (
    DEFAULT_IGNORE,
    GIT_BLOB_SHA1,
    DriftReport,
    FileDigest,
    Manifest,
    StatEntry,
    aggregate_of,
    collect_text_files,
    compare_manifests,
    digest_file,
    hash_directory,
    hash_files,
    ignore_rules,
    is_ignored,
    new_hasher,
    update_from_file,
    verify_directory,
)

SHARD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and 4 bytes: the last read is a short one


def make_model(root: Path) -> Path:
    """A small model-like directory: two shards, configs, a tokenizer, a README and a LICENSE."""
    (root / "sub").mkdir(parents=True)
    (root / "model-00001-of-00002.safetensors").write_bytes(SHARD)
    (root / "model-00002-of-00002.safetensors").write_bytes(SHARD[::-1])
    (root / "config.json").write_text(json.dumps({"architectures": ["Demo"], "hidden_size": 64}, indent=2) + "\n")
    (root / "tokenizer_config.json").write_text('{"model_max_length": 4096}\n')
    (root / "README.md").write_text("# Demo model\n\nFor tests.\n")
    (root / "LICENSE").write_text("Apache License\nVersion 2.0\n")
    (root / "sub" / "extra.bin").write_bytes(b"\x00" * 100)
    return root


def full(root: Path, **kwargs: Any) -> Manifest:
    return hash_directory(root, **kwargs).manifest


def drift(expected: Manifest, root: Path) -> DriftReport:
    return compare_manifests(expected, full(root, ignore=expected.ignore))


def assert_weights_error(excinfo: pytest.ExceptionInfo[WeightsError], *fragments: str) -> None:
    err = excinfo.value
    assert err.exit_code == EXIT_WEIGHTS == 7
    assert "\n" not in err.message
    for fragment in fragments:
        assert fragment in err.message


# Manifest and aggregate ------------------------------------------------------------------------------------------


def test_same_tree_on_two_paths_gives_the_same_aggregate(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    ma, mb = full(a), full(b)
    assert ma.aggregate == mb.aggregate
    assert ma.files == mb.files
    assert compare_manifests(ma, mb).ok


def test_files_are_sorted_posix_relative_paths_with_size(tmp_path: Path) -> None:
    m = full(make_model(tmp_path / "m"))
    paths = [f.path for f in m.files]
    assert paths == sorted(paths)
    assert "sub/extra.bin" in paths
    assert m.file_count == len(m.files) == 7
    assert (
        m.total_bytes
        == sum(f.size for f in m.files)
        == sum(p.stat().st_size for p in (tmp_path / "m").rglob("*") if p.is_file())
    )
    assert m.mode == "full" and m.algorithm == "sha256" and m.duration_s >= 0


def test_file_digest_is_sha256_of_raw_bytes_like_hf_lfs(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    m = full(root)
    shard = m.by_path()["model-00001-of-00002.safetensors"]
    assert shard.digest == hashlib.sha256(SHARD).hexdigest()
    assert shard.size == len(SHARD)
    assert digest_file(root / "model-00001-of-00002.safetensors") == shard.digest


def test_aggregate_is_recomputable_from_the_documented_line_format(tmp_path: Path) -> None:
    m = full(make_model(tmp_path / "m"))
    lines = "".join(f"{f.path}\t{f.size}\t{f.algorithm}\t{f.digest}\n" for f in sorted(m.files, key=lambda f: f.path))
    assert m.aggregate == hashlib.sha256(lines.encode("utf-8")).hexdigest()
    assert aggregate_of(reversed(m.files)) == m.aggregate  # order of input does not matter


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    m = full(make_model(tmp_path / "m"))
    again = Manifest.model_validate_json(m.model_dump_json())
    assert again == m
    assert compare_manifests(again, m).ok


def test_blake3_mode_records_blake3_digests(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    big = root / "big.safetensors"
    big.write_bytes(os.urandom(5 * 1024 * 1024))  # above the mmap threshold: multi-threaded path
    m = full(root, algorithm="blake3")
    assert m.algorithm == "blake3"
    assert {f.algorithm for f in m.files} == {"blake3"}
    files = m.by_path()
    assert files["model-00001-of-00002.safetensors"].digest == blake3.blake3(SHARD).hexdigest()
    assert files["big.safetensors"].digest == blake3.blake3(big.read_bytes()).hexdigest()
    assert m.aggregate != full(root).aggregate  # the algorithm is part of every line


def test_unknown_algorithm_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        hash_directory(make_model(tmp_path / "m"), algorithm="md5")  # type: ignore[arg-type]


def test_progress_reaches_total_bytes(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    calls: list[tuple[int, int, int, int, str]] = []
    m = hash_directory(root, progress=lambda *args: calls.append(args)).manifest
    assert calls
    bytes_done, bytes_total, files_done, files_total, _ = calls[-1]
    assert bytes_done == bytes_total == m.total_bytes
    assert files_done == files_total == m.file_count
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)  # monotonic: calls are serialized


def test_files_interleaved_across_workers_still_hash_to_their_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny chunks and switch threshold make workers hand files back and forth many times per file.
    monkeypatch.setattr(hashing, "_CHUNK_BYTES", 4096)
    monkeypatch.setattr(hashing, "_SWITCH_BYTES", 8192)
    root = tmp_path / "m"
    root.mkdir()
    blobs = {f"shard-{i}.bin": os.urandom(50_000 + i * 7_919) for i in range(6)}
    for name, data in blobs.items():
        (root / name).write_bytes(data)
    files = hash_directory(root, max_workers=3).manifest.by_path()
    assert {name: f.digest for name, f in files.items()} == {
        name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()
    }


def test_single_worker_gives_the_same_manifest(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    assert full(root, max_workers=1).files == full(root, max_workers=4).files


# Drift ------------------------------------------------------------------------------------------------------------


def test_unchanged_tree_reports_ok(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    result, report = verify_directory(root, full(root))
    assert report.ok
    assert report.to_dict()["ok"] is True
    assert report.format_text().startswith("OK: 7 files")


def test_appending_a_byte_is_a_modification(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    expected = full(root)
    with open(root / "model-00002-of-00002.safetensors", "ab") as fh:
        fh.write(b"\x00")
    report = drift(expected, root)
    assert not report.ok
    assert [c.path for c in report.modified] == ["model-00002-of-00002.safetensors"]
    change = report.modified[0]
    assert change.new_size == change.old_size + 1
    assert change.old_digest != change.new_digest
    assert not report.added and not report.removed
    assert "modified  model-00002-of-00002.safetensors" in report.format_text()


def test_truncating_a_file_is_a_modification(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    expected = full(root)
    os.truncate(root / "model-00001-of-00002.safetensors", 10)
    report = drift(expected, root)
    assert [(c.path, c.new_size) for c in report.modified] == [("model-00001-of-00002.safetensors", 10)]


def test_renaming_a_file_shows_as_removed_plus_added(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    expected = full(root)
    (root / "sub" / "extra.bin").rename(root / "sub" / "renamed.bin")
    report = drift(expected, root)
    assert [f.path for f in report.removed] == ["sub/extra.bin"]
    assert [f.path for f in report.added] == ["sub/renamed.bin"]
    assert not report.modified
    assert any("looks like a rename" in note for note in report.notes)


def test_adding_and_removing_files_are_reported(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    expected = full(root)
    (root / "new.bin").write_bytes(b"new")
    (root / "README.md").unlink()
    report = drift(expected, root)
    assert [f.path for f in report.added] == ["new.bin"]
    assert [f.path for f in report.removed] == ["README.md"]
    payload = report.to_dict()
    assert payload["ok"] is False
    assert payload["added"][0]["path"] == "new.bin"
    assert DriftReport.model_validate(payload) == report


def test_changed_license_shows_a_unified_text_diff(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    expected = full(root)
    assert expected.text_files["LICENSE"] == "Apache License\nVersion 2.0\n"
    (root / "LICENSE").write_text("MIT License\nVersion 2.0\n")
    report = drift(expected, root)
    diff = report.text_diffs["LICENSE"]
    assert "--- expected/LICENSE" in diff and "+++ actual/LICENSE" in diff
    assert "-Apache License\n" in diff and "+MIT License\n" in diff
    assert "+MIT License" in report.format_text()


def test_text_files_are_small_known_text_files_only(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    (root / "chat_template.jinja").write_text("{{ messages }}")
    (root / "vocab.json").write_bytes(b"\xff\xfe not utf-8")
    (root / "README-big.md").write_text("x" * (256 * 1024))
    m = full(root)
    assert set(m.text_files) == {"LICENSE", "README.md", "config.json", "tokenizer_config.json", "chat_template.jinja"}
    assert collect_text_files(root, m) == m.text_files


def test_comparing_different_algorithms_is_refused(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    with pytest.raises(UsageError, match="sha256"):
        compare_manifests(full(root), full(root, algorithm="blake3"))


# Ignore rules -----------------------------------------------------------------------------------------------------


def test_default_ignore_rules_are_honoured_and_recorded(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    baseline = full(root)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: main\n")
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "x.metadata").write_text("meta")
    (root / "model.safetensors.incomplete").write_bytes(b"partial")
    (root / "sub" / "download.lock").write_text("")
    (root / "sub" / ".DS_Store").write_bytes(b"mac")
    m = full(root)
    assert m.files == baseline.files
    assert m.ignore == list(DEFAULT_IGNORE)


def test_extra_ignore_patterns_match_basename_relative_path_and_directories(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    (root / "original").mkdir()
    (root / "original" / "consolidated.pth").write_bytes(b"dup")
    (root / "notes.txt").write_text("local notes")
    m = full(root, extra_ignore=["original/", "*.txt", "sub/extra.bin"])
    paths = {f.path for f in m.files}
    assert not {"original/consolidated.pth", "notes.txt", "sub/extra.bin"} & paths
    assert m.ignore == [*DEFAULT_IGNORE, "original/", "*.txt", "sub/extra.bin"]
    # Re-verification applies the manifest's rules, so the ignored files do not show as added.
    assert verify_directory(root, m)[1].ok


def test_ignore_rule_semantics() -> None:
    rules = ignore_rules(["original/", "/top.bin", "*.pt"])
    assert is_ignored("a/b/.git", rules, is_dir=True)
    assert not is_ignored("a/.git", rules)  # a .git *file* (worktree pointer) is not the .git/ directory
    assert is_ignored("original", rules, is_dir=True)
    assert not is_ignored("original", rules)
    assert is_ignored("top.bin", rules) and not is_ignored("sub/top.bin", rules)
    assert is_ignored("deep/dir/x.pt", rules)
    assert ignore_rules(["*.lock", " x "]) == [*DEFAULT_IGNORE, "x"]


# Symlinks ---------------------------------------------------------------------------------------------------------


def test_symlink_inside_is_hashed_as_its_target_under_the_link_path(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    (root / "alias.safetensors").symlink_to("model-00001-of-00002.safetensors")
    (root / "linked-dir").symlink_to("sub", target_is_directory=True)
    files = full(root).by_path()
    assert files["alias.safetensors"].digest == files["model-00001-of-00002.safetensors"].digest
    assert files["linked-dir/extra.bin"].digest == files["sub/extra.bin"].digest


def test_symlink_escaping_the_directory_is_refused_naming_the_link(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not part of the model")
    (root / "sub" / "sneaky.bin").symlink_to(outside)
    with pytest.raises(WeightsError) as excinfo:
        hash_directory(root)
    assert_weights_error(excinfo, "sub/sneaky.bin", str(outside), "outside")


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    (root / "sub" / "again").symlink_to("..", target_is_directory=True)
    with pytest.raises(WeightsError) as excinfo:
        hash_directory(root)
    assert_weights_error(excinfo, "sub/again", "loop")


# Fast mode --------------------------------------------------------------------------------------------------------


def test_fast_mode_on_an_unchanged_tree_rehashes_nothing(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    first = hash_directory(root)
    assert set(first.cache) == {f.path for f in first.manifest.files}
    assert all(isinstance(row, StatEntry) for row in first.cache.values())
    # Rows persisted in SQLite come back as plain tuples.
    stored = {path: tuple(row) for path, row in first.cache.items()}
    again = hash_directory(root, mode="fast", cache=stored)  # type: ignore[arg-type]
    assert again.rehashed == [] and again.manifest.rehashed == []
    assert again.manifest.mode == "fast"
    assert again.manifest.aggregate == first.manifest.aggregate


def test_fast_mode_catches_a_size_change_and_rehashes_only_changed_files(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    first = hash_directory(root)
    with open(root / "sub" / "extra.bin", "ab") as fh:
        fh.write(b"more")
    (root / "added.json").write_text("{}")
    result = hash_directory(root, mode="fast", cache=first.cache)
    assert result.rehashed == ["added.json", "sub/extra.bin"]
    assert result.manifest.rehashed == result.rehashed
    report = compare_manifests(first.manifest, result.manifest)
    assert [c.path for c in report.modified] == ["sub/extra.bin"]
    assert [f.path for f in report.added] == ["added.json"]
    assert result.manifest.files == full(root).files  # fast and full agree when metadata changed


def flip_byte_keeping_mtime(path: Path, offset: int = 1000) -> None:
    """Tamper as a user can: edit in place (same inode, same size), then put the mtime back (``touch -r``)."""
    st = path.stat()
    # On kernels with coarse file timestamps a change in the same clock tick as the hash keeps the ctime (the
    # documented racy window); wait it out so the test checks the key, not the clock.
    wait_for_clock_tick_past(path)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_fast_mode_catches_an_in_place_edit_whose_mtime_was_restored(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    shard = root / "model-00001-of-00002.safetensors"
    first = hash_directory(root)
    flip_byte_keeping_mtime(shard)

    # Size, mtime and inode all match the cache; the ctime (which no user can set) does not.
    fast = hash_directory(root, mode="fast", cache=first.cache)
    assert fast.rehashed == [shard.name]
    report = compare_manifests(first.manifest, fast.manifest)
    assert [c.path for c in report.modified] == [shard.name] and not report.ok
    assert fast.cache[shard.name].digest == hashlib.sha256(shard.read_bytes()).hexdigest()

    fresh = hash_directory(root, mode="full")
    assert compare_manifests(first.manifest, fresh.manifest).modified == report.modified


def test_fast_mode_rehashes_a_file_replaced_by_rename_with_same_size_and_mtime(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    target = root / "sub" / "extra.bin"
    first = hash_directory(root)
    st = target.stat()
    forged = root / "sub" / ".forged"
    forged.write_bytes(b"\x01" * st.st_size)
    os.utime(forged, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(forged, target)
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert target.stat().st_ino != st.st_ino

    fast = hash_directory(root, mode="fast", cache=first.cache)
    assert fast.rehashed == ["sub/extra.bin"]
    assert [c.path for c in compare_manifests(first.manifest, fast.manifest).modified] == ["sub/extra.bin"]


def test_fast_mode_cache_key_is_size_mtime_inode_ctime_and_algorithm(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    first = hash_directory(root)
    row = first.cache["LICENSE"]
    st = (root / "LICENSE").stat()
    assert row == StatEntry(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, "sha256", row.digest)
    # A row whose ctime differs is a miss even though size, mtime and inode agree.
    stale = dict(first.cache)
    stale["LICENSE"] = row._replace(ctime_ns=row.ctime_ns - 1)
    assert hash_directory(root, mode="fast", cache=stale).rehashed == ["LICENSE"]


def test_fast_mode_treats_rows_from_an_older_cache_layout_as_misses(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    first = hash_directory(root)
    # The previous layout, (size, mtime_ns, inode, algorithm, digest), as an old history DB hands it back.
    old = {path: (r.size, r.mtime_ns, r.inode, r.algorithm, r.digest) for path, r in first.cache.items()}
    result = hash_directory(root, mode="fast", cache=old)  # type: ignore[arg-type]
    assert result.rehashed == sorted(first.cache)
    assert result.manifest.aggregate == first.manifest.aggregate
    # Rows with an unknown (NULL) ctime, as a migrated table holds them, miss too.
    nulls = {path: (r.size, r.mtime_ns, r.inode, None, r.algorithm, r.digest) for path, r in first.cache.items()}
    assert hash_directory(root, mode="fast", cache=nulls).rehashed == sorted(first.cache)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_a_file_with_no_read_permission_for_anyone_is_refused_even_as_root(tmp_path: Path, mode: str) -> None:
    # Root reads a mode-000 file anyway, but the backend (often another user) cannot: a weights file nobody may
    # read is broken or tampered with, so both modes refuse it rather than report OK.
    root = make_model(tmp_path / "m")
    first = hash_directory(root)
    (root / "config.json").chmod(0o000)
    with pytest.raises(WeightsError) as excinfo:
        hash_directory(root, mode=mode, cache=first.cache)  # type: ignore[arg-type]
    assert_weights_error(excinfo, "config.json", "no read permission", "0o000")
    # Write-only or execute-only is just as unreadable; any single read bit is enough.
    (root / "config.json").chmod(0o333)
    with pytest.raises(WeightsError):
        hash_directory(root, mode=mode, cache=first.cache)  # type: ignore[arg-type]
    (root / "config.json").chmod(0o400)
    result = hash_directory(root, mode=mode, cache=first.cache)  # type: ignore[arg-type]
    assert result.manifest.aggregate == first.manifest.aggregate


def test_fast_mode_rehashes_when_the_cache_used_another_algorithm(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    first = hash_directory(root, algorithm="blake3")
    result = hash_directory(root, mode="fast", cache=first.cache)
    assert len(result.rehashed) == result.manifest.file_count
    assert result.manifest.algorithm == "sha256"


# Refusals ---------------------------------------------------------------------------------------------------------


def test_missing_directory_is_a_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as excinfo:
        hash_directory(tmp_path / "nope")
    assert_weights_error(excinfo, "not found", "nope")


def test_a_file_instead_of_a_directory_is_a_weights_error(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(WeightsError) as excinfo:
        hash_directory(tmp_path / "model.bin")
    assert_weights_error(excinfo, "not a directory")


def test_empty_directory_is_a_weights_error_never_a_hash_of_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError) as excinfo:
        hash_directory(tmp_path / "empty")
    assert_weights_error(excinfo, "no files to hash")


def test_directory_with_only_ignored_files_is_a_weights_error(tmp_path: Path) -> None:
    root = tmp_path / "m"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("x")
    (root / "weights.incomplete").write_bytes(b"partial")
    with pytest.raises(WeightsError) as excinfo:
        hash_directory(root)
    assert_weights_error(excinfo, "no files to hash", "*.incomplete")


def test_broken_symlink_is_an_unreadable_file(tmp_path: Path) -> None:
    # chmod 000 does not stop root (the tests run as root); a dangling link fails for everyone.
    root = make_model(tmp_path / "m")
    (root / "model-00003-of-00003.safetensors").symlink_to("gone.safetensors")
    with pytest.raises(WeightsError) as excinfo:
        hash_directory(root)
    assert_weights_error(excinfo, "broken symlink", "model-00003-of-00003.safetensors")


def test_fifo_in_the_tree_is_refused_instead_of_blocking(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    os.mkfifo(root / "pipe.bin")
    with pytest.raises(WeightsError) as excinfo:
        hash_directory(root)
    assert_weights_error(excinfo, "pipe.bin", "fifo")


def test_file_vanishing_before_it_is_read_is_a_weights_error(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    victim = root / "LICENSE"

    def delete_victim(*_: object) -> None:
        # Largest files are hashed first, so the shard finishes before LICENSE is opened.
        victim.unlink(missing_ok=True)

    with pytest.raises(WeightsError) as excinfo:
        hash_directory(root, progress=delete_victim, max_workers=1)
    assert_weights_error(excinfo, "cannot read LICENSE")


def test_unreadable_file_in_a_parallel_run_is_a_weights_error(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    for i in range(20):
        (root / f"shard-{i:02d}.bin").write_bytes(SHARD)
    deleted = False

    def delete_small_files(*_: object) -> None:
        nonlocal deleted
        if not deleted:
            deleted = True
            (root / "sub" / "extra.bin").unlink()

    with pytest.raises(WeightsError) as excinfo:
        hash_directory(root, progress=delete_small_files, max_workers=2)
    assert_weights_error(excinfo, "sub/extra.bin")


def test_digest_file_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as excinfo:
        digest_file(tmp_path)
    assert_weights_error(excinfo, "not a regular file (directory)")


def test_file_digest_model_is_the_manifest_line() -> None:
    f = FileDigest(path="a b/ü.bin", size=3, algorithm="sha256", digest="ab" * 32)
    assert aggregate_of([f]) == hashlib.sha256(f"a b/ü.bin\t3\tsha256\t{'ab' * 32}\n".encode()).hexdigest()


# Named files, git blob ids, streaming ----------------------------------------------------------------------------


def test_git_blob_digest_is_gits_object_id(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert digest_file(empty, GIT_BLOB_SHA1) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # `git hash-object`
    config = tmp_path / "config.json"
    config.write_bytes(b'{"a": 1}\n')
    assert digest_file(config, GIT_BLOB_SHA1) == hashlib.sha1(b'blob 9\0{"a": 1}\n').hexdigest()


def test_hash_files_reads_only_the_named_files_the_cache_does_not_vouch_for(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    shard, config = "model-00001-of-00002.safetensors", "config.json"
    first = hash_files(root, [shard, config])
    assert {p: e.digest for p, e in first.items()} == {p: digest_file(root / p) for p in (shard, config)}

    read: list[str] = []

    def progress(done: int, total: int, files_done: int, files_total: int, path: str) -> None:
        read.append(path)

    assert hash_files(root, [shard, config], cache=first, progress=progress) == first
    assert read == []
    flip_byte_keeping_mtime(root / shard)
    again = hash_files(root, [shard, config], cache=first, progress=progress)
    assert set(read) == {shard}
    assert again[shard].digest == hashlib.sha256((root / shard).read_bytes()).hexdigest() != first[shard].digest
    # The algorithm is part of the key: a sha256 row never stands in for a git blob id.
    git = hash_files(root, [config], algorithm=GIT_BLOB_SHA1, cache=again)
    assert git[config].digest == digest_file(root / config, GIT_BLOB_SHA1) and git[config].algorithm == GIT_BLOB_SHA1


def test_hash_files_refuses_what_hash_directory_refuses(tmp_path: Path) -> None:
    root = make_model(tmp_path / "m")
    with pytest.raises(WeightsError, match="not a regular file"):
        hash_files(root, ["sub"])
    with pytest.raises(WeightsError, match="cannot read missing.bin"):
        hash_files(root, ["missing.bin"])
    with pytest.raises(UsageError, match="unknown hash algorithm"):
        hash_files(root, ["config.json"], algorithm="md5")  # type: ignore[arg-type]


def test_a_digest_continued_from_a_file_prefix_equals_the_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "part"
    path.write_bytes(SHARD[:300_000])
    hashers = [new_hasher("sha256"), new_hasher("blake3"), new_hasher(GIT_BLOB_SHA1, len(SHARD))]
    assert update_from_file(path, hashers) == 300_000
    for hasher in hashers:
        hasher.update(SHARD[300_000:])  # the rest, as a resumed download streams it
    path.write_bytes(SHARD)
    assert [h.hexdigest() for h in hashers] == [digest_file(path, a) for a in ("sha256", "blake3", GIT_BLOB_SHA1)]
