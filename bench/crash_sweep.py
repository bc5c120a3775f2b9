"""Crash sweep: kill every registry mutation at every write point, then check what the next load leaves.

Each case copies a prepared root, runs one mutation in a subprocess with ``IMAGEWORKS_CRASH_AT=<point>`` (the
process ``os._exit``s when it reaches that point; a point the mutation never reaches lets it finish), then
loads the registry once in this process (which runs recovery) and counts:

- torn files: a registry/manifest file that does not parse, or whose content is neither the before nor the after
  text its change's status says, or a change left half applied;
- orphan history rows: rows still pending, or marked applied while the file does not hold their change;
- missing audit lines: an applied change without every audit line it announced;
- unreported mismatches: a pinned entry whose lock manifest disagrees with the curated hash and no warning says so;
- leftover temp files and stale merged snapshots.

Run: ``uv run python bench/crash_sweep.py`` (prints the figures; the test suite runs the same sweep).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from imageworks_core.registry import load_registry, snapshot_text, update_entry
from imageworks_core.registry_file import CRASH_EXIT_CODE, CRASH_POINTS
from imageworks_core.settings import Settings, get_settings
from imageworks_core.verification import lock_entry

REPO = Path(__file__).resolve().parent.parent
DEMO = "demo-vision_(CPU)"
LEGACY = REPO / "tests" / "fixtures" / "legacy" / "model_registry.json"
KILL_POINTS = [f"{point}:1" for point in CRASH_POINTS] + ["replace:2"]

_PRELUDE = """
import sys
from pathlib import Path
from imageworks_core.settings import get_settings
settings = get_settings(sys.argv[1])
"""
MUTATIONS: dict[str, str] = {
    "edit": "from imageworks_core.registry import update_entry\n"
    f"update_entry(settings, {DEMO!r}, {{'notes': 'crash sweep'}}, command='sweep edit')",
    "re-pin": f"from imageworks_core.verification import lock_entry\nlock_entry(settings, {DEMO!r}, set_expected=True)",
    "unlock": f"from imageworks_core.verification import unlock_entry\nunlock_entry(settings, {DEMO!r}, reason='sweep')",
    "rollback": "from imageworks_core.registry import rollback\nrollback(settings, int(sys.argv[2]))",
    "import-legacy --force": "from imageworks_core.legacy import import_legacy\n"
    f"import_legacy(Path({str(LEGACY)!r}), settings, force=True)",
}


def prepare(template: Path) -> tuple[Settings, int]:
    """A root with DEMO pinned and locked, one edit to roll back, and changed weights to re-pin."""
    (template / "configs").mkdir(parents=True)
    for name in ("model_registry.curated.json", "model_registry.discovered.json"):
        shutil.copy(REPO / "configs" / name, template / "configs" / name)
    shutil.copytree(REPO / "demo", template / "demo")
    settings = get_settings(template)
    lock_entry(settings, DEMO, set_expected=True)
    update_entry(settings, DEMO, {"notes": "edit to roll back"}, command="prepare edit")
    with sqlite3.connect(settings.history_db_path) as conn:
        rollback_rev = conn.execute("SELECT MAX(id) FROM revisions").fetchone()[0]
    config = template / "demo" / "models" / "imageworks-demo-vision" / "config.json"
    config.write_text(config.read_text() + "\n")
    return settings, rollback_rev


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def check(settings: Settings, after_rev: int, details: list[str], label: str) -> dict[str, int]:
    """Load once (recovery), then count what is wrong on disk, in history and in the audit log."""
    counts = dict.fromkeys(
        ("torn_files", "orphan_history_rows", "missing_audit_lines", "unreported_mismatches", "leftover_tmp_files"),
        0,
    )
    counts["stale_snapshots"] = 0
    try:
        registry = load_registry(force=True, settings=settings)
    except Exception as exc:  # noqa: BLE001 - an unloadable root is a torn root
        details.append(f"{label}: registry does not load: {exc}")
        counts["torn_files"] += 1
        return counts
    for folder in (settings.configs_dir, settings.locks_dir):
        for path in folder.glob("*"):
            if path.name.endswith(".tmp"):
                counts["leftover_tmp_files"] += 1
                details.append(f"{label}: leftover {path.name}")
            elif path.suffix == ".json":
                try:
                    json.loads(path.read_text(encoding="utf-8"))
                except json.JSONDecodeError:
                    counts["torn_files"] += 1
                    details.append(f"{label}: {path.name} does not parse")
    if _text(settings.snapshot_path) not in (None, snapshot_text(registry)):
        counts["stale_snapshots"] += 1
        details.append(f"{label}: the merged snapshot is stale")
    with sqlite3.connect(settings.history_db_path) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM revisions WHERE id > ? ORDER BY id", (after_rev,))]
    audit_lines = [json.loads(line) for line in _text(settings.audit_log_path).splitlines()]  # type: ignore[union-attr]
    changes: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        changes.setdefault(row["change_id"], []).append(row)
    for change_id, members in changes.items():
        states = set()
        for row in members:
            current = _text(settings.root / row["file"])
            before = row["before_text"] if row["before_exists"] else None
            state = "after" if current == row["after_text"] else "before" if current == before else "other"
            states.add(state)
            wanted = {"applied": "after", "not_applied": "before"}.get(row["status"])
            if wanted is None:
                counts["orphan_history_rows"] += 1
                details.append(f"{label}: rev {row['id']} still {row['status']}")
            elif state != wanted:
                key = "orphan_history_rows" if row["status"] == "applied" else "torn_files"
                counts[key] += 1
                details.append(f"{label}: rev {row['id']} is {row['status']} but {row['file']} holds {state}")
        if len(states) > 1:
            counts["torn_files"] += 1
            details.append(f"{label}: change {change_id} is half applied ({sorted(states)})")
        if members[0]["status"] == "applied":
            announced = json.loads(members[0]["audit_json"] or "[]")
            logged = {line["event"] for line in audit_lines if line.get("change") == change_id}
            for event in announced:
                if event["event"] not in logged:
                    counts["missing_audit_lines"] += 1
                    details.append(f"{label}: change {change_id} applied without its {event['event']!r} audit line")
    for name, raw in registry.curated.items():
        lock = raw.get("version_lock") or {}
        expected = lock.get("expected_aggregate_sha256")
        if not expected:
            continue
        manifest = _text(settings.resolve_path(lock.get("manifest_path") or ""))
        aggregate = json.loads(manifest).get("aggregate") if manifest else None
        if aggregate != expected and not any(name in w for w in registry.warnings):
            counts["unreported_mismatches"] += 1
            details.append(f"{label}: {name} manifest {aggregate} != curated {expected}, not reported")
    return counts


def run_sweep(workdir: Path) -> dict[str, Any]:
    """Every mutation x every kill point; returns the figures (and a line per problem in ``details``)."""
    template, rollback_rev = prepare(workdir / "template")
    with sqlite3.connect(template.history_db_path) as conn:
        after_rev = conn.execute("SELECT MAX(id) FROM revisions").fetchone()[0]
    summary: dict[str, Any] = {
        "mutations": len(MUTATIONS),
        "kill_points": len(KILL_POINTS),
        "cases": 0,
        "killed": 0,
        "torn_files": 0,
        "orphan_history_rows": 0,
        "missing_audit_lines": 0,
        "unreported_mismatches": 0,
        "leftover_tmp_files": 0,
        "stale_snapshots": 0,
        "details": [],
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEWORKS_")}
    for m_index, (mutation, code) in enumerate(MUTATIONS.items()):
        for p_index, point in enumerate(KILL_POINTS):
            label = f"{mutation} @ {point}"
            case = workdir / f"case-{m_index}-{p_index}"
            shutil.copytree(template.root, case)
            argv = [sys.executable, "-c", _PRELUDE + code, str(case), str(rollback_rev)]
            proc = subprocess.run(
                argv, env={**env, "IMAGEWORKS_CRASH_AT": point}, capture_output=True, text=True, timeout=120
            )
            summary["cases"] += 1
            if proc.returncode == CRASH_EXIT_CODE:
                summary["killed"] += 1
            elif proc.returncode != 0:
                summary["details"].append(f"{label}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
                summary["torn_files"] += 1
            for key, value in check(get_settings(case), after_rev, summary["details"], label).items():
                summary[key] += value
    return summary


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_sweep(Path(tmp))
    print(
        f"crash sweep: {summary['kill_points']} kill points x {summary['mutations']} mutations = "
        f"{summary['cases']} cases, {summary['killed']} killed mid-write"
    )
    for key in (
        "torn_files",
        "orphan_history_rows",
        "missing_audit_lines",
        "unreported_mismatches",
        "leftover_tmp_files",
        "stale_snapshots",
    ):
        print(f"  {key.replace('_', ' ')}: {summary[key]}")
    for line in summary["details"]:
        print(f"  - {line}")
    bad = sum(
        summary[k]
        for k in summary
        if isinstance(summary[k], int) and k not in ("mutations", "kill_points", "cases", "killed")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
