"""Long dashboard actions of one session (verify, lock, probe) as background jobs kept in session state.

Activation is not one of them: it belongs to the root, not to a session (the runtime's background activation,
seen by every session through the state file; see ``pages/active_model.py``).

A job runs the core function in a thread and records its progress, result or error. The script run that starts
it waits with a live progress display; a rerun in between (the operator clicked something) finds the job still
running and keeps showing its progress instead of starting a second one. Buttons pass ``disabled=busy()``, so a
long action cannot be double-submitted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

Work = Callable[[Callable[..., None]], Any]
"""A job's body: called with the progress callback, returns the result the page shows."""
_PREFIX = "job::"
POLL_S = 0.2


@dataclass
class Job:
    """One background action: ``progress`` holds the latest arguments its progress callback received."""

    key: str
    label: str
    started: float = field(default_factory=time.monotonic)
    progress: tuple[Any, ...] | None = None
    result: Any = None
    error: BaseException | None = None
    finished: float | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def report(self, *args: Any) -> None:
        """The progress callback handed to the core function."""
        self.progress = args


def get(key: str) -> Job | None:
    """The job stored under ``key`` (running or finished and not yet taken)."""
    return st.session_state.get(_PREFIX + key)


def running() -> Job | None:
    """The job of this session that is still running, if any."""
    return next((v for k, v in st.session_state.items() if k.startswith(_PREFIX) and not v.done), None)


def busy() -> bool:
    """True while any job of this session is running."""
    return running() is not None


def start(key: str, label: str, work: Work) -> Job:
    """Run ``work(report)`` in a thread unless a job is already running (then that job is returned)."""
    for name, existing in list(st.session_state.items()):
        if name.startswith(_PREFIX) and not existing.done:
            return existing
    job = Job(key, label)

    def target() -> None:
        try:
            job.result = work(job.report)
        except BaseException as exc:  # every failure becomes the job's error, shown by the page
            job.error = exc
        finally:
            job.finished = time.monotonic()
            job._done.set()

    st.session_state[_PREFIX + key] = job
    threading.Thread(target=target, name=f"dashboard-{key}", daemon=True).start()
    return job


def wait(key: str, render: Callable[[Job], None]) -> Job | None:
    """Show ``render(job)`` until the job under ``key`` finishes, then pop and return it (None: no such job)."""
    job = get(key)
    if job is None:
        return None
    placeholder = st.empty()
    while not job._done.wait(POLL_S):
        with placeholder.container():
            render(job)
    placeholder.empty()
    st.session_state.pop(_PREFIX + key, None)
    return job
