"""`imageworks-models list/show/validate/select/schema` on the demo registry, and the exit-code contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from imageworks_core.settings import Settings

DEMO = "demo-vision_(CPU)"


def test_list_shows_demo_entries_with_weights_state(root: Settings, cli) -> None:
    result = cli("list")
    assert result.code == 0, result.err
    assert DEMO in result.out
    line = next(line for line in result.out.splitlines() if line.startswith("qwen2.5-vl-7b-instruct_(AWQ)"))
    assert "missing" in line  # weights not downloaded here: shown as missing, not a crash
    demo_line = next(line for line in result.out.splitlines() if line.startswith(DEMO))
    assert "present" in demo_line and "unlocked" in demo_line
    assert "qwen3-vl-8b-instruct_(FP8)" not in result.out  # testing entries hidden by default
    assert "qwen3-vl-8b-instruct_(FP8) [testing]" in cli("list", "--include-testing").out


def test_list_filters_and_json(root: Settings, cli) -> None:
    rows = json.loads(cli("list", "--capability", "vision", "--json").out)
    assert all("vision" in r["capabilities"] for r in rows)
    assert "demo-text_(CPU)" not in {r["name"] for r in rows}
    rows = json.loads(cli("list", "--backend", "ollama", "--json").out)
    assert [r["name"] for r in rows] == ["llava-7b_(ollama)"]
    rows = json.loads(cli("list", "--role", "narration", "--json").out)
    assert [r["name"] for r in rows] == ["demo-text_(CPU)"]
    rows = json.loads(cli("list", "--profile", "edge", "--json").out)
    assert "gpt-4o-mini_(remote)" not in {r["name"] for r in rows}  # profiles: ["cloud"]


def test_show_prints_layers_and_exact_launch_argv(root: Settings, cli) -> None:
    result = cli("show", "demo-vision", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["entry"]["name"] == DEMO
    assert data["provenance"]["backend_config.launch"] == "curated"
    assert data["launch_argv"][0] == sys.executable
    assert data["launch_argv"][-2:] == ["--served-model-name", "imageworks/demo-vision"]
    assert data["endpoint"] == "http://127.0.0.1:24001/v1"
    text = cli("show", "qwen3-vl-8b-instruct_(FP8)").out
    # vllm entry without launch: the default `vllm serve` argv plus extra_args, expanded
    assert '["vllm", "serve", ' in text and '"--port", "24001"' in text and '"--max-model-len", "32768"]' in text


def test_show_unknown_name_exits_4_with_suggestion(root: Settings, cli) -> None:
    result = cli("show", "demo-visoin")
    assert result.code == 4
    assert "did you mean 'demo-vision'" in result.err


def test_select_by_role_is_deterministic_and_uses_single_port(root: Settings, cli, monkeypatch) -> None:
    monkeypatch.setenv("CHAT_PROXY_VLLM_PORT", "25000")
    data = json.loads(cli("select", "--role", "caption", "--json").out)
    # highest role_priority wins among visible entries: qwen2.5 (10) over demo-vision (1)
    assert data["name"] == "qwen2.5-vl-7b-instruct_(AWQ)"
    assert data["endpoint"] == "http://127.0.0.1:25000/v1"
    remote = json.loads(cli("select", "gpt-4o-mini_(remote)", "--json").out)
    assert remote["endpoint"] == "https://api.openai.com/v1"
    ollama = json.loads(cli("select", "llava-7b_(ollama)", "--json").out)
    assert ollama["endpoint"] == "http://127.0.0.1:11434/v1"


def test_select_failures_have_distinct_exit_codes(root: Settings, cli, monkeypatch) -> None:
    result = cli("select", "demo-text_(CPU)", "--require", "vision")
    assert result.code == 5 and "lacks capability vision" in result.err
    result = cli("select", "qwen3-vl-8b-instruct_(FP8)")
    assert result.code == 4 and "testing" in result.err
    result = cli("select", "no-such-model")
    assert result.code == 4 and "unknown model" in result.err
    result = cli("select", "--role", "embedding")
    assert result.code == 4
    monkeypatch.setenv("IMAGEWORKS_PROFILE", "edge")
    result = cli("select", "gpt-4o-mini_(remote)")
    assert result.code == 4 and "profile" in result.err


def test_usage_errors_exit_64_not_2(root: Settings, cli) -> None:
    assert cli("list", "--no-such-flag").code == 64
    assert cli("select").code == 64
    assert cli("list", "--capability", "telepathy").code == 64


def test_schema_is_written_for_editors(root: Settings, cli, tmp_path) -> None:
    out = tmp_path / "schema.json"
    assert cli("schema", "-o", str(out)).code == 0
    schema = json.loads(out.read_text())
    assert "served_model_id" in schema["$defs"]["ModelEntry"]["properties"]


def test_console_script_exit_codes_are_real(root: Settings) -> None:
    env = {**os.environ, "IMAGEWORKS_ROOT": str(root.root)}
    ok = subprocess.run([sys.executable, "-m", "imageworks_core.cli", "validate"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    root.curated_path.write_text("[{,]")
    bad = subprocess.run([sys.executable, "-m", "imageworks_core.cli", "list"], env=env, capture_output=True, text=True)
    assert bad.returncode == 3
    assert bad.stderr.startswith(f"error: {root.curated_path}:1:3: invalid JSON")
    assert "Traceback" not in bad.stderr


def test_global_root_option(root: Settings, cli, monkeypatch) -> None:
    monkeypatch.delenv("IMAGEWORKS_ROOT")
    assert DEMO in cli("--root", str(root.root), "list").out
    assert DEMO in cli("list", "--root", str(root.root)).out
