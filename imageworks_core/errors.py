"""One exception hierarchy for the whole core; the CLI maps each class to one exit code.

Every error carries a one-line, operator-facing message that names the file, field or value at fault and
the fix. ``exit_code`` is the CLI's contract (documented in the README).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_DRIFT = 2
EXIT_REGISTRY_INVALID = 3
EXIT_UNKNOWN_NAME = 4
EXIT_CAPABILITY = 5
EXIT_BACKEND = 6
EXIT_WEIGHTS = 7
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
    """The vision probe could not run or the model failed it."""


class WeightsError(ImageWorksError):
    """Weights are missing, unreadable, empty, or escape their directory."""

    exit_code = EXIT_WEIGHTS
