"""Helpers for e2e tests that start the real inference backend: `transformers serve` on CPU with a tiny LLaVA.

Not a test module. Set it up once with ``scripts/setup_inference_venv.sh`` (see docs/real-backend.md).

Facts the helpers encode (transformers 5.24.0, verified):

* The model is given as the positional ``FORCE_MODEL`` argument; it is preloaded before the port opens,
  so ``GET /health`` answering ``{"status":"ok"}`` means the model is loaded.
* ``transformers serve`` has no ``--served-model-name``. A pinned server lists exactly one model in
  ``/v1/models`` whose ``id`` is the positional argument verbatim, and it rejects (HTTP 400) any request whose
  ``"model"`` differs from that string. Hence **served_model_id must be the exact model_path string**
  (use the absolute path, e.g. ``served_model_id_for(tiny_llava_path())``).
* ``usage.prompt_tokens`` is reported; an image adds ``TINY_LLAVA_IMAGE_TOKENS`` (+1 newline) prompt tokens.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INFERENCE_VENV = REPO / ".venvs" / "transformers-serve"
INFERENCE_VENV = Path(os.environ.get("IMAGEWORKS_INFERENCE_VENV") or DEFAULT_INFERENCE_VENV).expanduser().resolve()
SETUP_HINT = "run scripts/setup_inference_venv.sh"

HEALTH_PATH = "/health"  # 200 {"status": "ok"} once the forced model is loaded
MODELS_PATH = "/v1/models"  # {"object": "list", "data": [{"id": <model_path>, "owned_by": "local", ...}]}
CHAT_PATH = "/v1/chat/completions"

TINY_LLAVA_IMAGE_TOKENS = 64  # (112 // 14) ** 2 placeholders per image (scripts/build_tiny_llava.py)
TINY_LLAVA_MARKER = "tiny-llava.json"  # written last by the builder: the build is complete

# Launch argv template for the registry's backend_config.launch. {served_model_id} is deliberately absent:
# transformers serve has no flag for it; the id it serves is the positional {model_path} string itself.
TRANSFORMERS_SERVE_LAUNCH: list[str] = [
    str(INFERENCE_VENV / "bin" / "transformers"),
    "serve",
    "{model_path}",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--device",
    "cpu",
    "--log-level",
    "info",
]


def serve_executable() -> Path:
    return INFERENCE_VENV / "bin" / "transformers"


def tiny_llava_path() -> Path:
    """Where the setup script builds the tiny LLaVA (``IMAGEWORKS_TINY_LLAVA`` overrides)."""
    override = os.environ.get("IMAGEWORKS_TINY_LLAVA")
    return Path(override).expanduser().resolve() if override else INFERENCE_VENV / "tiny-llava"


def served_model_id_for(model_path: str | os.PathLike[str]) -> str:
    """The id transformers serve lists and accepts for ``model_path``: the same string that is passed on argv."""
    return str(model_path)


def inference_backend_available() -> tuple[bool, str]:
    """(True, "") when the venv and the tiny model are in place, else (False, one-line reason)."""
    if not INFERENCE_VENV.is_dir():
        return False, f"transformers-serve venv absent at {INFERENCE_VENV}: {SETUP_HINT}"
    exe = serve_executable()
    if not os.access(exe, os.X_OK):
        return False, f"{exe} missing or not executable (incomplete venv): {SETUP_HINT}"
    if not (INFERENCE_VENV / "bin" / "python").exists():
        return False, f"{INFERENCE_VENV}/bin/python missing (broken venv): {SETUP_HINT}"
    model = tiny_llava_path()
    if not (model / TINY_LLAVA_MARKER).is_file() or not (model / "model.safetensors").is_file():
        return False, f"tiny LLaVA model not built at {model}: {SETUP_HINT}"
    return True, ""


def transformers_serve_argv(model_path: str, host: str, port: int, served_model_id: str) -> list[str]:
    """Exact launch argv. Raises ValueError when served_model_id would not be what the server lists/accepts."""
    if served_model_id != str(model_path):
        raise ValueError(
            f"transformers serve lists and accepts only the positional model string; "
            f"served_model_id must equal model_path ({model_path!r}), got {served_model_id!r}"
        )
    values = {"model_path": str(model_path), "host": host, "port": str(port), "served_model_id": served_model_id}
    return [arg.format(**values) for arg in TRANSFORMERS_SERVE_LAUNCH]


def launch_env(inherit: bool = False) -> dict[str, str]:
    """Environment overrides for the server (no Hub access at all). ``inherit=True`` merges them into os.environ."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    return {**os.environ, **env} if inherit else env


def png_data_url(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (10, 200, 30)) -> str:
    """A small solid PNG as a ``data:image/png;base64,...`` URL for image_url content parts."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_request(model: str, image: bool, prompt: str = "Describe the image.", max_tokens: int = 16) -> dict:
    """An OpenAI chat-completions body (temperature 0) with a text part and, if ``image``, a PNG data URL part."""
    content: list[dict] = [{"type": "text", "text": prompt}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": png_data_url()}})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
