"""CI wheel check: the wheel alone, installed outside the checkout, serves the dashboard and the API.

Steps, all under one fresh temporary directory (removed afterwards; the checkout is only read):

1. ``uv build --wheel`` from the checkout;
2. a fresh venv with the wheel installed, its dependencies from the package registry, pinned by ``uv.lock``
   (as constraints: a dependency the wheel forgot to declare is missing here too, and the check fails);
3. a deployment root seeded with the bundled demo registry and demo weights;
4. ``imageworks-dashboard`` and ``imageworks-models serve`` started from the venv's ``bin/``, cwd outside the
   checkout, on free loopback ports; checks: dashboard ``/`` and ``/_stcore/health`` answer 200, the installed app
   reads its own ``.streamlit/config.toml``; API ``/healthz`` 200 and ``/v1/models`` lists the demo entries; the
   demo entry activates (the wheel's ``imageworks_demo`` backend) and answers a chat completion through the proxy.

Adversary: a failed or interrupted check (Ctrl-C, SIGTERM). Each server runs in a session (process group) of its own that only
this script created; on any exit those groups, and the backend the API started (stopped through the root's own
state, ``activate-model --stop``), are stopped by id, never by name. Stdlib only; needs ``uv``.
Run: ``python3 scripts/check_wheel.py [--keep]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0
DEMO_ENTRIES = ("demo-vision_(CPU)", "demo-text_(CPU)")
# Loopback only: a proxy from the environment must never see these requests.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def _run(argv: list[str], **kwargs) -> str:
    """Run a setup command; on failure print its output and stop the check."""
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kwargs)
    if done.returncode != 0:
        sys.stderr.write(f"{' '.join(argv)} failed with exit {done.returncode}:\n{done.stdout}{done.stderr}")
        raise SystemExit(1)
    return done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, str]:
    """(status, text) of a GET, or a JSON POST when ``body`` is given; (0, reason) when nothing answered."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with _HTTP.open(request, timeout=timeout) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, urllib.error.URLError) as exc:
        return 0, str(exc)


class Servers:
    """The processes this check starts, each the leader of its own new session; stopped by process group."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.started.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for _name, proc in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc in reversed(self.started):
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in the group (pgid == our child's pid)
            except ProcessLookupError:
                pass
            proc.wait()


def _shield_cleanup() -> None:
    """Cleanup runs to the end: a second Ctrl-C or SIGTERM during it would leave servers or files behind."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _wait_for(what: str, ok: Callable[[], str | None], servers: Servers) -> None:
    """Poll ``ok`` (None = passed, else the latest reason) until it passes or a server dies or time runs out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    delay = 0.05
    while True:
        reason = ok()
        if reason is None:
            return
        for name, proc in servers.started:
            if proc.poll() is not None:
                raise SystemExit(f"FAIL {what}: {name} exited with {proc.returncode}:\n{servers.log(name)}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name}\n{servers.log(name)}" for name, _ in servers.started)
            raise SystemExit(f"FAIL {what} within {STARTUP_TIMEOUT_S:.0f} s: {reason}\n{logs}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _build_venv(work: Path) -> Path:
    """Build the wheel and install it into a fresh venv under ``work``; returns the venv's bin/ directory."""
    uv = _uv()
    _run([*uv, "build", "--wheel", "--out-dir", str(work / "dist"), str(REPO)], cwd=REPO)
    (wheel,) = (work / "dist").glob("*.whl")
    constraints = work / "constraints.txt"
    _run([*uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "-q", "-o", str(constraints)],
         cwd=REPO)  # fmt: skip
    requires = re.search(r'^requires-python\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    python = requires.group(1) if requires else "3"
    _run([*uv, "venv", "-q", "--python", python, str(work / "venv")], cwd=work)
    _run([*uv, "pip", "install", "-q", "--python", str(work / "venv" / "bin" / "python"), "-c", str(constraints),
          str(wheel)], cwd=work)  # fmt: skip
    return work / "venv" / "bin"


def _check_installed(bin_dir: Path, work: Path, env: dict[str, str]) -> None:
    """The venv imports the wheel's copies (not the checkout's), Streamlit reads the app's config there, and the
    app's first page renders (AppTest: the pages and their ``ui``/``jobs`` imports are found in the install)."""
    code = (
        "import json, streamlit.config as c, imageworks_core, imageworks_demo\n"
        "from imageworks_core.dashboard_launcher import DASHBOARD_APP\n"
        "c._main_script_path = str(DASHBOARD_APP)  # as `streamlit run` sets it before reading config files\n"
        "c.get_config_options(force_reparse=True)\n"
        "from streamlit.testing.v1 import AppTest\n"
        "at = AppTest.from_file(str(DASHBOARD_APP), default_timeout=60).run()\n"
        "print(json.dumps({'core': imageworks_core.__file__, 'demo': imageworks_demo.__file__,\n"
        "  'app': str(DASHBOARD_APP), 'maxUploadSize': c.get_option('server.maxUploadSize'),\n"
        "  'showErrorDetails': c.get_option('client.showErrorDetails'),\n"
        "  'xsrf': c.get_option('server.enableXsrfProtection'),\n"
        "  'page_errors': [str(e.value) for e in [*at.exception, *at.error]], 'page_title': at.title[0].value if at.title else None}))\n"
    )
    found = json.loads(_run([str(bin_dir / "python"), "-c", code], cwd=work, env=env))
    site = str(bin_dir.parent)
    for key in ("core", "demo", "app"):
        if not found[key].startswith(site):
            raise SystemExit(f"FAIL: {key} is imported from {found[key]}, not from the fresh venv {site}")
    expected = {"maxUploadSize": 20, "showErrorDetails": "none", "xsrf": True}
    actual = {key: found[key] for key in expected}
    if actual != expected:
        raise SystemExit(f"FAIL: the installed dashboard's config is {actual}, expected {expected}")
    if found["page_errors"]:
        raise SystemExit(f"FAIL: the installed dashboard's first page shows errors: {found['page_errors']}")
    print(f"ok  installed from the wheel: {found['app']} (config: {actual}); first page renders {found['page_title']!r}")


def check(work: Path) -> None:
    t0 = time.monotonic()
    bin_dir = _build_venv(work)
    print(f"ok  wheel built and installed in a fresh venv ({time.monotonic() - t0:.1f} s): {work / 'venv'}")

    root = work / "root"
    (root / "configs").mkdir(parents=True)
    for name in ("model_registry.curated.json", "model_registry.discovered.json"):
        shutil.copy(REPO / "configs" / name, root / "configs" / name)
    shutil.copytree(REPO / "demo", root / "demo")
    (work / "home").mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("IMAGEWORKS_", "CHAT_PROXY_", "STREAMLIT_", "PYTHON", "VIRTUAL_ENV"))
    }
    # HOME: no user-level ~/.streamlit config or credentials prompt; the backend gets a port of its own.
    env.update(HOME=str(work / "home"), IMAGEWORKS_ROOT=str(root), CHAT_PROXY_VLLM_PORT=str(_free_port()))
    _check_installed(bin_dir, work, env)

    servers = Servers(work)
    models = str(bin_dir / "imageworks-models")
    try:
        dash_port, api_port = _free_port(), _free_port()
        servers.start("dashboard", [str(bin_dir / "imageworks-dashboard"), "--port", str(dash_port)], work, env)
        servers.start("api", [models, "serve", "--port", str(api_port)], work, env)
        dash, api = f"http://127.0.0.1:{dash_port}", f"http://127.0.0.1:{api_port}"

        def dashboard_ok() -> str | None:
            health = _request(f"{dash}/_stcore/health")
            if health != (200, "ok"):
                return f"/_stcore/health answered {health}"
            page = _request(f"{dash}/")
            return None if page[0] == 200 else f"/ answered {page[0]}"

        def api_ok() -> str | None:
            health = _request(f"{api}/healthz")
            if health[0] != 200:
                return f"/healthz answered {health}"
            status, text = _request(f"{api}/v1/models")
            listed = [card.get("id") for card in json.loads(text)["data"]] if status == 200 else []
            missing = [name for name in DEMO_ENTRIES if name not in listed]
            return f"/v1/models answered {status}, missing {missing}" if missing else None

        _wait_for("dashboard answers", dashboard_ok, servers)
        print(f"ok  imageworks-dashboard on {dash}: / 200, /_stcore/health ok")
        _wait_for("API answers", api_ok, servers)
        print(f"ok  imageworks-models serve on {api}: /healthz 200, /v1/models lists {', '.join(DEMO_ENTRIES)}")

        status, text = _request(f"{api}/v1/activate", {"name": DEMO_ENTRIES[0]}, timeout=60)
        if status != 200:
            raise SystemExit(f"FAIL: activating {DEMO_ENTRIES[0]} answered {status}: {text}\n{servers.log('api')}")
        chat = {"model": DEMO_ENTRIES[0], "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
        status, text = _request(f"{api}/v1/chat/completions", chat, timeout=30)
        if status != 200:
            raise SystemExit(f"FAIL: chat through the proxy answered {status}: {text}")
        _request(f"{api}/v1/deactivate", {}, timeout=30)
        print(f"ok  {DEMO_ENTRIES[0]} activated (the wheel's imageworks_demo backend) and answered a chat completion")
    finally:
        _shield_cleanup()
        # The backend belongs to the root's runtime, not to our process groups: stop it through its state file.
        try:
            subprocess.run([models, "activate-model", "--stop"], cwd=work, env=env, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"warning: activate-model --stop failed: {exc}", file=sys.stderr)
        servers.stop_all()
    print(f"PASS wheel check in {time.monotonic() - t0:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (venv, root, logs)")
    args = parser.parse_args()
    # A CI timeout sends SIGTERM: unwind through the finally blocks so the servers are stopped too.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="imageworks-wheel-check-"))
    if work.resolve().is_relative_to(REPO):
        raise SystemExit(f"the temporary directory {work} must be outside the checkout {REPO}")
    try:
        check(work)
    finally:
        _shield_cleanup()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
