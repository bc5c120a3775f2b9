"""The single-port runtime: the one package that starts, watches and stops backend processes.

One GPU, one port. Activating an entry stops whatever serves on the port and starts the entry's backend there;
``_staging/active_vllm.json`` (an :class:`ActiveState`, written atomically) says what runs. One concern per
module, each stating the promises it keeps and against whom:

- :mod:`.state`: the state file (read, lenient read, atomic write) and the status report.
- :mod:`.process`: spawn with the launch marker, prove which processes are ours, signal and terminate them.
  We only ever signal a process proven to be ours; the proof rules and the adversary not covered are there.
- :mod:`.readiness`: "ready" means the health path answers 200 *and* ``/v1/models`` lists the served id (a
  stranger on the port is never taken for ours); the readiness poll starts fast and backs off; who holds a port.
- :mod:`.gpu_fit`: does the next backend fit in GPU memory, has the stopped one released its memory.
- :mod:`.lock`: the activation lock, so activations and stops never interleave (bounded wait, holder named).
- :mod:`.inflight`: the activation in progress as every process sees it (phase, elapsed) and the cancel request
  by which a stop aborts a start in any phase: within one health poll, or one progress report of the lock check.
- :mod:`.activate`: activation (preflight, lock verification, GPU fit, stop, start, abort) and stop; crash
  safety (the launch is recorded before the spawn) and the unreadable-state rule.
- :mod:`.status`: :func:`current` and :func:`is_serving`, read-only towards processes (they never signal).
- :mod:`.logs`: each backend's log and its tail.

Every timeout and poll interval is a named constant in the module that uses it, or a setting
(``CHAT_PROXY_VLLM_START_TIMEOUT_S``, ``CHAT_PROXY_VLLM_STOP_TIMEOUT_S``, an entry's ``startup_timeout_s``).
Every activation, stop and failure is an audit-log line and a history row.
"""

from __future__ import annotations

from ..errors import ActivationCancelled, ActivationError
from .activate import Phase, ProgressCallback, StopResult, activate, stop
from .gpu_fit import check_gpu_fit
from .inflight import ActivationProgress
from .inflight import read_progress as activation_in_progress
from .logs import LOG_TAIL_LINES, backend_log_path, tail_backend_log
from .readiness import check_ready, port_holder
from .state import LAUNCH_ID_ENV, ActiveState, ActiveStatus, read_state
from .status import current, is_serving

__all__ = [
    "LAUNCH_ID_ENV",
    "LOG_TAIL_LINES",
    "ActivationCancelled",
    "ActivationError",
    "ActivationProgress",
    "ActiveState",
    "ActiveStatus",
    "Phase",
    "ProgressCallback",
    "StopResult",
    "activate",
    "activation_in_progress",
    "backend_log_path",
    "check_gpu_fit",
    "check_ready",
    "current",
    "is_serving",
    "port_holder",
    "read_state",
    "stop",
    "tail_backend_log",
]
