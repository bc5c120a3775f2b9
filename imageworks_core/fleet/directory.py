"""The fleet directory: each node's last published slot table, kept on the head node.

A node's agent publishes its table whenever a slot starts, becomes ready, fails or stops. When the node dies,
its agent and its state files go with it; the directory still holds what the node was serving, so every
controller (a CLI run started after the death included) can report those slots as ``lost`` and the proxy can
name the node. Records of a dead node stay until the operator stops them or the model is activated elsewhere.

Runs as a detached Ray actor (:data:`~.cluster.DIRECTORY_NAME`) pinned to the head node: it lives as long as
the cluster does. It holds no process and signals nothing; whoever can call it can only make the fleet list
wrong slots (the same trust as the Ray cluster itself: see :mod:`imageworks_core.fleet`).
"""

from __future__ import annotations

import threading
import time
from typing import Any


class FleetDirectory:
    """Slot tables by node id (plain dicts of :class:`~.slots.SlotInfo` fields)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[str, dict[str, Any]] = {}

    def publish(self, node_id: str, node_name: str, slots: list[dict[str, Any]], version: str = "") -> None:
        """Replace the node's table (its agent calls this after every slot change). ``version`` orders one agent's
        tables (calls from its threads may arrive out of order): an older one than held is ignored."""
        with self._lock:
            held = self._tables.get(node_id)
            if held is not None and version and held["version"].split(":")[0] == version.split(":")[0]:
                if version <= held["version"]:
                    return
            self._tables[node_id] = {
                "node_name": node_name,
                "slots": list(slots),
                "published_at": time.time(),
                "version": version,
            }

    def tables(self) -> dict[str, dict[str, Any]]:
        """Every node's last table: ``{node_id: {"node_name", "slots", "published_at"}}``."""
        with self._lock:
            return {node: dict(table, slots=list(table["slots"])) for node, table in self._tables.items()}

    def forget(self, node_id: str, slot_ids: list[str] | None = None) -> int:
        """Drop slots of a node's table (all when ``slot_ids`` is None); returns how many were dropped."""
        with self._lock:
            table = self._tables.get(node_id)
            if table is None:
                return 0
            before = len(table["slots"])
            if slot_ids is None:
                table["slots"] = []
            else:
                table["slots"] = [s for s in table["slots"] if s.get("slot_id") not in set(slot_ids)]
            return before - len(table["slots"])

    def drop(self, node_id: str) -> bool:
        """Forget a node altogether (a dead node with nothing left to report)."""
        with self._lock:
            return self._tables.pop(node_id, None) is not None
