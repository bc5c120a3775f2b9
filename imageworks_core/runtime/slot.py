"""A slot: one backend beside others on one machine, each with its own state file, activation lock, logs and port.

The runtime keeps every path it touches on the :class:`~imageworks_core.settings.Settings` it is given (the state
file, the activation lock, the progress and cancel records under ``staging_dir``, the backend logs under
``backend_logs_dir``, the port in ``vllm_port``). :func:`slot_settings` returns those settings with a slot's own
staging directory, log directory and port, so :func:`~imageworks_core.runtime.activate`,
:func:`~imageworks_core.runtime.stop` and :func:`~imageworks_core.runtime.current` run one slot exactly as they
run the single port, with the same proofs and crash safety, without knowing slots exist. Everything else (the
history DB, the audit log, the stat cache, weights paths relative to the root) stays the root's, shared by the
slots of that root. A slot's backend always binds loopback (fleet traffic reaches it through its node agent).

Adversary: the same as the single port's (see :mod:`.process` and :mod:`.activate`); two slots never share a
state file or lock, so a stop of one can never signal another's processes.
"""

from __future__ import annotations

from pathlib import Path

from ..settings import Settings

SLOT_HOST = "127.0.0.1"
"""Where a slot's backend listens: loopback only."""


class SlotSettings(Settings):
    """The settings of one slot: the root's, with the slot's own staging dir, backend log dir and port.

    Built by :func:`slot_settings` (never from the environment: the two directories are not settings)."""

    slot_dir: Path
    slot_logs_dir: Path
    node_name: str = ""
    """The fleet node the slot runs on (named in the hints of errors a slot raises: ``verify NAME --node N``)."""

    @property
    def staging_dir(self) -> Path:
        """The slot's own directory: its state file, activation lock, progress and cancel records."""
        return self.slot_dir

    @property
    def backend_logs_dir(self) -> Path:
        """The slot's own backend logs."""
        return self.slot_logs_dir


def slot_settings(base: Settings, slot_dir: Path, logs_dir: Path, port: int, node_name: str = "") -> SlotSettings:
    """``base`` with the slot's staging directory, log directory and port (on :data:`SLOT_HOST`), on ``node_name``."""
    values = {name: getattr(base, name) for name in Settings.model_fields}
    values.update(vllm_host=SLOT_HOST, vllm_port=port)
    # model_construct: the values are already validated (and the root resolved) in ``base``; reading the
    # environment again could only make a slot disagree with the settings it came from.
    return SlotSettings.model_construct(
        **values, slot_dir=Path(slot_dir), slot_logs_dir=Path(logs_dir), node_name=node_name
    )
