"""Where requests for an entry go and with which credentials: the one rule the proxy, the probe and the
runtime's health checks share.

The key rule: an entry whose ``backend_config.api_key_env`` names a set, non-empty environment variable gets
``Authorization: Bearer <value>`` on every request to its backend, whatever the backend (a remote OpenAI-style
endpoint, an ollama behind a gateway, a vLLM started with ``--api-key``). An entry without ``api_key_env``, or
whose variable is unset or empty, gets no Authorization header. The key is read from the environment at call
time and is never logged, recorded in history or written to the state file; an error message names the
variable, never its value.

Adversary: the key goes wherever the entry's endpoint points. For a process backend that is the single port on
loopback; activation refuses a port held by a stranger before it starts, but a local process that binds the
port in the moment between that check and the backend's own bind would receive the readiness checks, key
included. Give such a backend a key only on a host whose local users you trust with it.
"""

from __future__ import annotations

import os

from .schema import ModelEntry
from .settings import Settings


def single_port_endpoint(settings: Settings) -> str:
    """The one OpenAI-compatible base URL every single-port process backend is served on."""
    return f"http://{settings.vllm_host}:{settings.vllm_port}/v1"


def endpoint_for(entry: ModelEntry, settings: Settings) -> str:
    """Where requests for ``entry`` go: remote base_url, ollama host:port, or the single port."""
    config = entry.backend_config
    if entry.backend == "openai":
        return str(config.base_url).rstrip("/")
    if entry.backend == "ollama":
        if config.base_url:
            return config.base_url.rstrip("/")
        return f"http://{config.host or '127.0.0.1'}:{config.port or 11434}/v1"
    # vllm / lmdeploy: always the single port, never a stale per-entry port.
    return single_port_endpoint(settings)


def auth_headers(entry: ModelEntry | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <key>"}`` when the entry's ``api_key_env`` is set and non-empty, else ``{}``."""
    return key_env_headers(entry.backend_config.api_key_env if entry is not None else None)


def key_env_headers(key_env: str | None) -> dict[str, str]:
    """The same rule for a bare variable name (a front end testing an endpoint several entries share)."""
    key = os.environ.get(key_env) if key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}
