"""The one upstream rule: an entry's endpoint and the API key from ``api_key_env``, whatever its backend."""

from __future__ import annotations

import pytest

from imageworks_core.schema import ModelEntry
from imageworks_core.settings import Settings
from imageworks_core.upstream import auth_headers, endpoint_for


def entry(backend: str, **config: object) -> ModelEntry:
    launch = {"launch": ["{python}", "-m", "server", "--port", "{port}"]} if backend in ("vllm", "lmdeploy") else {}
    return ModelEntry.model_validate(
        {"name": f"m-{backend}", "backend": backend, "backend_config": {**launch, **config}}
    )


@pytest.mark.parametrize(
    ("backend", "config"),
    [
        ("openai", {"base_url": "https://api.example.test/v1"}),
        ("ollama", {}),
        ("vllm", {}),
        ("lmdeploy", {}),
    ],
)
def test_the_key_goes_to_any_backend_that_names_one(
    backend: str, config: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_TEST_KEY", "s3cret")
    assert auth_headers(entry(backend, api_key_env="UPSTREAM_TEST_KEY", **config)) == {"Authorization": "Bearer s3cret"}
    assert auth_headers(entry(backend, **config)) == {}


def test_an_unset_or_empty_key_sends_no_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UPSTREAM_TEST_KEY", raising=False)
    assert auth_headers(entry("ollama", api_key_env="UPSTREAM_TEST_KEY")) == {}
    monkeypatch.setenv("UPSTREAM_TEST_KEY", "")
    assert auth_headers(entry("ollama", api_key_env="UPSTREAM_TEST_KEY")) == {}
    assert auth_headers(None) == {}


def test_process_backends_are_reached_on_the_single_port(root: Settings) -> None:
    assert endpoint_for(entry("vllm", port=9999), root) == f"http://{root.vllm_host}:{root.vllm_port}/v1"
    assert endpoint_for(entry("ollama"), root) == "http://127.0.0.1:11434/v1"
    assert endpoint_for(entry("openai", base_url="https://api.example.test/v1/"), root) == (
        "https://api.example.test/v1"
    )
