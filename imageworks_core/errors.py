"""One exception hierarchy for the whole core, with the two tables front ends map it through.

Every error carries a one-line, operator-facing message that names the file, field or value at fault and
the fix. Each class's ``exit_code`` is the CLI's contract (the ``EXIT_*`` table below, documented in the
README); :data:`STATUS_FOR` is the HTTP API's. Every error the core raises on purpose is defined here; other
modules may re-export one under its old name (``gpu.GpuUnavailable``, ``runtime.ActivationError``,
``runtime.ActivationCancelled``, ``proxy.SwitchInProgress``, ``dashboard_data.DownloadCancelled``).
"""

from __future__ import annotations

from pathlib import Path

NO_GPU_MESSAGE = "No NVIDIA GPU visible"
"""What front ends show where GPU figures would be; :class:`GpuUnavailable` messages start with it."""

# The CLI's table: each class below sets one of these as its ``exit_code``.
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_DRIFT = 2
EXIT_REGISTRY_INVALID = 3
EXIT_UNKNOWN_NAME = 4
EXIT_CAPABILITY = 5
EXIT_BACKEND = 6
EXIT_WEIGHTS = 7
EXIT_FLEET = 8
EXIT_USAGE = 64


class ImageWorksError(Exception):
    """Base of every error the core raises on purpose."""

    exit_code: int = EXIT_UNEXPECTED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def lines(self) -> list[str]:
        """The error as printable lines (one per problem)."""
        return [self.message]

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries intact (a fleet node's error reaches the controller through Ray's
        # pickling): the class, its message and its attributes, without calling a subclass's own __init__.
        return (_rebuild_error, (type(self), self.args, dict(self.__dict__)))


def _rebuild_error(cls: type[ImageWorksError], args: tuple[object, ...], state: dict[str, object]) -> ImageWorksError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class UsageError(ImageWorksError):
    """Bad arguments or bad input file given by the operator (not a registry problem)."""

    exit_code = EXIT_USAGE


class RegistryError(ImageWorksError):
    """The registry cannot be loaded or written; ``problems`` lists every problem found."""

    exit_code = EXIT_REGISTRY_INVALID

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]

    def lines(self) -> list[str]:
        return list(self.problems)


class ValidationError(RegistryError):
    """Registry content violates the schema (unknown key, bad value, duplicate name, ...)."""


class UnknownModelError(ImageWorksError):
    """No entry answers to the requested name, alias or served id."""

    exit_code = EXIT_UNKNOWN_NAME

    def __init__(self, message: str, name: str = "", close_matches: list[str] | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.close_matches = close_matches or []


class FilteredModelError(UnknownModelError):
    """The entry exists but is hidden here (profile, testing, deprecated); ``reason`` says which."""

    def __init__(self, message: str, name: str = "", reason: str = "") -> None:
        super().__init__(message, name=name)
        self.reason = reason


class CapabilityError(ImageWorksError):
    """The entry lacks capabilities the caller requires; ``missing`` names them."""

    exit_code = EXIT_CAPABILITY

    def __init__(self, message: str, name: str = "", missing: list[str] | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.missing = missing or []


class HashDriftError(ImageWorksError):
    """Weights on disk differ from the locked manifest; ``report`` holds the drift report."""

    exit_code = EXIT_DRIFT

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class LockViolationError(HashDriftError):
    """An operation was refused because a locked entry drifted; ``reason`` is ``locked_drift``."""

    def __init__(self, message: str, report: object | None = None, reason: str = "locked_drift") -> None:
        super().__init__(message, report)
        self.reason = reason


class BackendError(ImageWorksError):
    """A backend failed to start, stop, answer or be reached."""

    exit_code = EXIT_BACKEND


class ProbeError(BackendError):
    """The vision probe could not run or the model failed it.

    ``inactive`` names a process-backed entry that is not the active backend (``summary`` says what runs
    instead): each front end names its own way to activate it; the message names the CLI's.
    """

    def __init__(self, message: str, *, inactive: str | None = None, summary: str | None = None) -> None:
        super().__init__(message)
        self.inactive = inactive
        self.summary = summary or message


class ActivationError(BackendError):
    """A backend did not become ready; the message ends with the last lines of its log."""

    def __init__(self, message: str, *, name: str, log_path: Path, log_tail: list[str]) -> None:
        header = f"--- last {len(log_tail)} lines of {log_path} ---"
        super().__init__(
            "\n".join([message, header, *log_tail]) if log_tail else f"{message} (log {log_path} is empty)"
        )
        self.summary = message
        self.name = name
        self.log_path = log_path
        self.log_tail = log_tail


class ActivationCancelled(BackendError):
    """A start was cancelled (``activate-model --stop``, the dashboard's Cancel) before it became ready; what it
    had started is stopped and history records ``cancelled``."""


class SwitchInProgress(BackendError):
    """Another model is being activated on the single port (or, in fleet mode, ``target`` is starting or stopping
    in a slot of the fleet: ``where`` names the slot); retry after ``RETRY_AFTER_S``."""

    def __init__(self, target: str, where: str | None = None) -> None:
        doing = f"{target!r} is starting or stopping in {where}" if where else f"switching the single port to {target!r}"
        super().__init__(f"{doing}; retry in {RETRY_AFTER_S} s")
        self.target = target
        self.where = where


class GpuUnavailable(ImageWorksError):
    """NVML cannot be used here (library missing, no driver, no device); ``reason`` says which."""

    exit_code = EXIT_BACKEND

    def __init__(self, reason: str) -> None:
        super().__init__(f"{NO_GPU_MESSAGE} ({reason})")
        self.reason = reason


class WeightsError(ImageWorksError):
    """Weights are missing, unreadable, empty, or escape their directory."""

    exit_code = EXIT_WEIGHTS


class DownloadCancelled(ImageWorksError):
    """The operator cancelled a download (partial bytes kept for a resume, no marker written); the download
    history records it as ``cancelled``, not ``failed``."""


class FleetError(ImageWorksError):
    """Fleet mode cannot do what was asked (exit 8): Ray missing or unreachable, no node can take the model, a
    node or its agent is gone."""

    exit_code = EXIT_FLEET


class FleetUnavailable(FleetError):
    """Fleet mode was asked for but cannot start: the ``fleet`` extra (Ray) is not installed, or no Ray cluster
    answers at the configured address."""


class PlacementError(FleetError):
    """No node can take the model (unknown node, no room under ``max_models``, too few free GPUs or too little GPU
    memory, weights absent there); the message gives each node's reason."""


class SlotLost(FleetError):
    """The node serving a slot died, or its agent stopped answering; ``node`` names it."""

    def __init__(self, message: str, *, node: str = "") -> None:
        super().__init__(message)
        self.node = node


class UnknownRevisionError(UnknownModelError):
    """No registry revision has the requested number (exit 4 and HTTP 404, like an unknown name)."""

    def __init__(self, rev: int) -> None:
        super().__init__(f"no revision {rev} (see `imageworks-models history`)")
        self.rev = rev


# The HTTP API's table ------------------------------------------------------------------------------------
RETRY_AFTER_S = 5
"""The ``Retry-After`` a client gets while the single port switches to another model."""

STATUS_FOR: list[tuple[type[Exception], int]] = [
    (SwitchInProgress, 503),
    (SlotLost, 503),
    (PlacementError, 409),
    (FleetError, 503),
    (FilteredModelError, 404),
    (UnknownModelError, 404),
    (CapabilityError, 409),
    (LockViolationError, 423),
    (HashDriftError, 409),
    (UsageError, 400),
    (WeightsError, 424),
    (RegistryError, 503),
    (BackendError, 502),
    (ImageWorksError, 400),
]
"""Error class -> HTTP status, most specific first: the first matching class decides."""
