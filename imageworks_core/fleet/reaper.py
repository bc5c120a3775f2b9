"""The reaper: a backend must not outlive the node agent that started it.

Each agent starts one reaper (``python -m imageworks_core.fleet.reaper``), which detaches at once (double fork,
own session: it is nobody's child, so neither Ray's clean-up of the agent's worker nor a signal to its group
reaches it) and watches the agent's pid with its create time every :data:`POLL_S`. When the agent is gone —
killed, crashed, or its node's raylet died and Ray ended its workers — the reaper stops every slot the agent
recorded (:func:`~.slotdirs.stop_agent_dir`: the runtime's stop, which signals only processes proven to be ours)
and exits. While the agent lives it does nothing else.

Adversary: a process of the same user may kill the reaper; then the agent's backends survive its death until
the next agent on that root starts and stops the leftovers (:func:`~.slotdirs.stale_agent_dirs`). A machine
that loses power loses everything at once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

POLL_S = 0.25
"""How often the reaper checks that its agent still runs."""


def start(root: Path, directory: Path, log_path: Path) -> None:
    """Start the reaper of the agent running this function (returns once it has detached)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", __name__, "--root", str(root), "--agent-dir", str(directory)]
    with log_path.open("ab") as log:
        subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, check=True
        )


def _watch(root: Path, directory: Path) -> int:
    from ..audit import log_event
    from ..settings import get_settings
    from .slotdirs import AGENT_FILE, REAPER_FILE, process_record, read_json, record_alive, stop_agent_dir, write_json

    settings = get_settings(root)
    agent = read_json(directory / AGENT_FILE)
    if agent is None:
        print(f"reaper: no {AGENT_FILE} in {directory}; nothing to watch", flush=True)
        return 1
    write_json(directory / REAPER_FILE, process_record())
    while record_alive(agent):
        time.sleep(POLL_S)
    problems = stop_agent_dir(settings, directory, "the node agent that started it is gone")
    log_event(settings, "fleet_reaper", agent_pid=agent.get("pid"), directory=str(directory), problems=problems)
    for problem in problems:
        print(f"reaper: {problem}", flush=True)
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> None:
    """Detach, then watch the agent named by ``--agent-dir``'s ``agent.json``."""
    parser = argparse.ArgumentParser(prog="python -m imageworks_core.fleet.reaper")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--agent-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if os.fork() > 0:  # the starter waits only for this first process; the watcher is re-parented
        os._exit(0)
    os.setsid()
    sys.exit(_watch(args.root, args.agent_dir))


if __name__ == "__main__":
    main()
