"""A tiny OpenAI-compatible inference server that really looks at images: the demo registry's CPU backend.

It plays the part llama-swap's ``cmd/simple-responder`` plays in its tests. For users without a GPU it is a
working backend that can be activated and vision-probed; for the process-manager tests it is a peer with
switches for slow start, crashes, ignored signals, leaked children, bad health and failing requests.

Run it as::

    python -m imageworks_demo.server --host 127.0.0.1 --port 24001 --served-model-name demo-vision

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``
(both with ``stream: true`` as server-sent events). Images arrive as ``data:`` URLs and are described from
their pixels by :func:`imageworks_demo.vision.describe_image`.

Only the standard library and Pillow are used, and Pillow is imported on first use, so the server binds and
answers ``/health`` within a few tens of milliseconds of the interpreter starting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .vision import decode_image_data_url, describe_image

DEFAULT_SERVED_NAME = "demo-vision"
OWNED_BY = "imageworks-demo"
# What an image "costs" in prompt tokens; vision models charge a fixed-ish block of tokens per image.
IMAGE_PROMPT_TOKENS = 256
MAX_BODY_BYTES = 64 * 1024 * 1024
EXIT_CRASH_AT_START = 3
EXIT_BIND_FAILED = 1
TEXT_ONLY_MESSAGE = "This model does not support image input"
# The command --spawn-child runs: a long sleeper standing in for an inference worker process.
CHILD_COMMAND: tuple[str, ...] = (sys.executable, "-c", "import time; time.sleep(3600)")


# ---------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP server
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendOptions:
    """Server behaviour, including the fault-injection switches the process-manager tests use."""

    served_names: tuple[str, ...] = (DEFAULT_SERVED_NAME,)
    unhealthy: bool = False
    text_only: bool = False
    response_delay_s: float = 0.0
    stream_delay_s: float = 0.0
    fail_chat_status: int | None = None


class _ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error", **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": error_type, "param": None, "code": None, **extra}}


def _log(line: str) -> None:
    # Flushed per line so a process manager tailing our stderr sees it live.
    sys.stderr.write(f"demo_backend: {line}\n")
    sys.stderr.flush()


def _word_count(text: str) -> int:
    return len(text.split())


def _word_pieces(text: str) -> list[str]:
    """Split text into streaming deltas, one word each with its leading whitespace (they re-join exactly)."""
    return re.findall(r"\s*\S+(?:\s+$)?", text) or ([text] if text else [])


def _truncate_words(text: str, limit: Any) -> tuple[str, bool]:
    """Cut text to ``limit`` words (a word stands for a token here); report whether it was cut."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return text, False
    pieces = _word_pieces(text)
    if len(pieces) <= limit:
        return text, False
    return "".join(pieces[:limit]), True


@dataclass
class _ChatInput:
    texts: list[str] = field(default_factory=list)
    image_urls: list[str] = field(default_factory=list)


def _parse_messages(messages: Any) -> _ChatInput:
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "'messages' must be a non-empty list", param="messages")
    parsed = _ChatInput()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise _ApiError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        content = message.get("content")
        if content is None:
            continue
        if isinstance(content, str):
            parsed.texts.append(content)
            continue
        if not isinstance(content, list):
            raise _ApiError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parsed.texts.append(part["text"])
            elif kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str):
                    raise _ApiError(400, f"messages[{i}].content[{j}].image_url.url must be a string", param="messages")
                parsed.image_urls.append(url)
            else:
                raise _ApiError(400, f"messages[{i}].content[{j}] has unsupported part type {kind!r}", param="messages")
    return parsed


class _DemoServer(ThreadingHTTPServer):
    daemon_threads = True  # in-flight streams must not hold up shutdown

    def __init__(self, address: tuple[str, int], options: BackendOptions) -> None:
        self.options = options
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Small header + body writes must not wait for delayed ACKs (Nagle): keeps loopback latency at ~1 ms.
    disable_nagle_algorithm = True
    server_version = "imageworks-demo/0.1"
    server: _DemoServer

    _status: int = 0

    # Routing --------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch({"/health": self._health, "/v1/models": self._models})

    def do_POST(self) -> None:
        self._dispatch({"/v1/chat/completions": self._chat, "/v1/completions": self._completions})

    def do_PUT(self) -> None:
        self._dispatch({})  # JSON 404/405 instead of the stdlib's HTML 501 page

    do_DELETE = do_PATCH = do_PUT

    def _dispatch(self, routes: dict[str, Any]) -> None:
        started = time.perf_counter()
        self._status = 0
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            handler = routes.get(path)
            if handler is None:
                known = path in ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions")
                if known:
                    raise _ApiError(405, f"Method {self.command} not allowed on {path}")
                raise _ApiError(404, f"No route {self.command} {path}", error_type="not_found_error")
            handler()
        except _ApiError as exc:
            self._send_json(exc.status, exc.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in the demo must still answer, like a real server's 500
            _log(f"error: {type(exc).__name__}: {exc}")
            if not self._status:
                self._send_json(500, _ApiError(500, "Internal error in the demo backend", "server_error").body)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            _log(f"{self.command} {self.path} {self._status} {elapsed_ms:.1f}ms")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self._status = int(code) if isinstance(code, int) else 0  # HTTPStatus is an int too

    def log_message(self, format: str, *args: Any) -> None:
        _log(format % args)

    # Helpers --------------------------------------------------------------------------------------------
    def _send_json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_json(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise _ApiError(411, "A Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would corrupt the next request
            raise _ApiError(413, f"Request body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _ApiError(400, f"Request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise _ApiError(400, "Request body must be a JSON object")
        return body

    def _check_model(self, body: dict[str, Any]) -> str:
        names = self.server.options.served_names
        model = body.get("model", names[0])
        if model not in names:
            raise _ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return str(model)

    def _delay(self) -> None:
        if self.server.options.response_delay_s > 0:
            time.sleep(self.server.options.response_delay_s)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _send_event(self, payload: Any) -> None:
        data = b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send_events(self, events: Iterable[Any]) -> bool:
        """Send each event (``--stream-delay-ms`` apart, as a model generating tokens would); False, with a log
        line, when the client went away mid-stream (a real server then stops generating)."""
        sent = 0
        try:
            for event in events:
                if sent and self.server.options.stream_delay_s > 0:
                    time.sleep(self.server.options.stream_delay_s)
                self._send_event(event)
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            _log(f"stream abandoned by the client after {sent} events")
            self.close_connection = True
            return False
        return True

    def _end_stream(self) -> None:
        self._send_event(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # Endpoints ------------------------------------------------------------------------------------------
    def _health(self) -> None:
        if self.server.options.unhealthy:
            self._send_json(503, {"status": "unhealthy"})
        else:
            self._send_json(200, {"status": "ok"})

    def _models(self) -> None:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY, "root": name, "parent": None}
            for name in self.server.options.served_names
        ]
        self._send_json(200, {"object": "list", "data": data})

    def _chat(self) -> None:
        body = self._read_json()
        self._delay()
        options = self.server.options
        if options.fail_chat_status is not None:
            raise _ApiError(
                options.fail_chat_status, f"Injected failure (--fail-chat {options.fail_chat_status})", "server_error"
            )
        model = self._check_model(body)
        chat = _parse_messages(body.get("messages"))
        if chat.image_urls and options.text_only:
            raise _ApiError(400, TEXT_ONLY_MESSAGE)
        descriptions = []
        for url in chat.image_urls:
            try:
                descriptions.append(describe_image(decode_image_data_url(url)))
            except ValueError as exc:
                raise _ApiError(400, str(exc), param="messages") from exc

        if not descriptions:
            words = sum(_word_count(t) for t in chat.texts)
            # Deliberately no echo of the prompt: an answer must never pass a vision probe without pixels.
            content = (
                f"I am the ImageWorks demo backend ({model}). Your message had {words} words and no image; "
                "send an image and I will describe what I see."
            )
            reasoning = "Reasoning: no image in the request, so there is nothing to describe."
        elif len(descriptions) == 1:
            content, reasoning = descriptions[0].summary, descriptions[0].reasoning
        else:
            content = " ".join(f"Image {i}: {d.summary}" for i, d in enumerate(descriptions, 1))
            reasoning = " ".join(f"Image {i}: {d.reasoning}" for i, d in enumerate(descriptions, 1))

        content, truncated = _truncate_words(content, body.get("max_completion_tokens", body.get("max_tokens")))
        finish_reason = "length" if truncated else "stop"
        prompt_tokens = sum(_word_count(t) for t in chat.texts) + IMAGE_PROMPT_TOKENS * len(descriptions)
        reasoning_tokens = _word_count(reasoning)
        completion_tokens = _word_count(content) + reasoning_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        }
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.get("stream"):
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            self._send_json(
                200,
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                },
            )
            return

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }

        self._start_stream()
        events = [
            chunk({"role": "assistant", "content": ""}),
            *(chunk({"reasoning_content": piece}) for piece in _word_pieces(reasoning)),
            *(chunk({"content": piece}) for piece in _word_pieces(content)),
            chunk({}, finish_reason),
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            tail = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
            events.append({**tail, "choices": [], "usage": usage})
        if self._send_events(events):
            self._end_stream()

    def _completions(self) -> None:
        body = self._read_json()
        self._delay()
        model = self._check_model(body)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            prompt = "\n".join(prompt)
        if not isinstance(prompt, str):
            raise _ApiError(400, "'prompt' must be a string or a list of strings", param="prompt")
        words = prompt.split()
        quoted = " ".join(words[:16]) + (" ..." if len(words) > 16 else "")
        text = f' Demo completion of "{quoted}" ({len(words)} words).'
        text, truncated = _truncate_words(text, body.get("max_tokens"))
        finish_reason = "length" if truncated else "stop"
        usage = {
            "prompt_tokens": len(words),
            "completion_tokens": _word_count(text),
            "total_tokens": len(words) + _word_count(text),
        }
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def completion(text_part: str, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": text_part, "logprobs": None, "finish_reason": finish}
            return {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [choice]}

        if not body.get("stream"):
            self._send_json(200, {**completion(text, finish_reason), "usage": usage})
            return
        self._start_stream()
        events = [*(completion(piece, None) for piece in _word_pieces(text)), completion("", finish_reason)]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**completion("", None), "choices": [], "usage": usage})
        if self._send_events(events):
            self._end_stream()


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (flag names follow ``vllm serve`` where they overlap)."""
    parser = argparse.ArgumentParser(
        prog="python -m imageworks_demo.server",
        description="OpenAI-compatible demo backend that describes images with Pillow; with fault injection.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=24001, help="0 picks a free port (printed on start)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=[DEFAULT_SERVED_NAME],
        metavar="NAME",
        help="model id(s) accepted in requests and listed by /v1/models",
    )
    faults = parser.add_argument_group("fault injection (for process-manager and proxy tests)")
    faults.add_argument("--slow-start", type=float, default=0.0, metavar="SECONDS", help="sleep before binding")
    faults.add_argument(
        "--crash-at-start", action="store_true", help=f"log an error and exit {EXIT_CRASH_AT_START} before binding"
    )
    faults.add_argument("--ignore-sigterm", action="store_true", help="ignore SIGTERM (only SIGKILL stops it)")
    faults.add_argument(
        "--spawn-child",
        action="store_true",
        help="start a sleeping child in our process group and leave it running on exit, like a leaky worker",
    )
    faults.add_argument("--unhealthy", action="store_true", help="answer /health with 503 forever")
    faults.add_argument("--text-only", action="store_true", help=f"refuse images with 400 {TEXT_ONLY_MESSAGE!r}")
    faults.add_argument(
        "--response-delay-ms", type=int, default=0, metavar="N", help="sleep before answering completions"
    )
    faults.add_argument(
        "--stream-delay-ms", type=int, default=0, metavar="N", help="sleep between streamed events (a slow model)"
    )
    faults.add_argument(
        "--fail-chat", type=int, default=None, metavar="STATUS", help="answer chat completions with this HTTP status"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fail_chat is not None and not 100 <= args.fail_chat <= 599:
        parser.error(f"--fail-chat must be an HTTP status code (100-599), not {args.fail_chat}")
    options = BackendOptions(
        served_names=tuple(args.served_model_name),
        unhealthy=args.unhealthy,
        text_only=args.text_only,
        response_delay_s=max(0, args.response_delay_ms) / 1000,
        stream_delay_s=max(0, args.stream_delay_ms) / 1000,
        fail_chat_status=args.fail_chat,
    )
    _log(f"starting pid={os.getpid()} pgid={os.getpgrp()} models={','.join(options.served_names)}")

    if args.spawn_child:
        # Spawned before any SIGTERM change so the child keeps the default disposition; its output goes
        # nowhere so it cannot hold our caller's pipes open after we are gone.
        child = subprocess.Popen(
            CHILD_COMMAND, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _log(f"spawned child pid={child.pid} pgid={os.getpgid(child.pid)}")

    stop = threading.Event()
    server: _DemoServer | None = None

    def request_stop(signum: int, _frame: Any) -> None:
        _log(f"received {signal.Signals(signum).name}, shutting down")
        stop.set()
        if server is not None:
            # shutdown() waits for serve_forever to return, which runs on this (the main) thread.
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, request_stop)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _log("ignoring SIGTERM")
    else:
        signal.signal(signal.SIGTERM, request_stop)

    if args.slow_start > 0:
        _log(f"slow start: sleeping {args.slow_start:g}s before binding")
        if stop.wait(args.slow_start):
            return 0
    if args.crash_at_start:
        _log(f"error: simulated crash at start (--crash-at-start), exiting {EXIT_CRASH_AT_START}")
        return EXIT_CRASH_AT_START

    try:
        server = _DemoServer((args.host, args.port), options)
    except (OSError, OverflowError) as exc:
        _log(f"error: cannot listen on {args.host}:{args.port}: {exc}")
        return EXIT_BIND_FAILED
    host, port = server.server_address[:2]
    _log(f"listening on http://{host}:{port}")
    try:
        if not stop.is_set():
            server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    _log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
