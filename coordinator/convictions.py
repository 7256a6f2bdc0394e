"""The one conviction sequence: every path that bans a node goes through ``Convictions.convict``.

The judge convicts with an evidence bundle already on disk (a confirmed audit, equivocation, a
false accusation or clearance), an operator without one (``coordinator/admin.py``; the reason
says who). Either way: the node is banned in the registry, its bundle joins the run's evidence,
the active pipeline is marked for re-formation (and, when the node held a stage, for a rollback
to before the first step its output may have touched), the run is saved, and a ``banned`` event
is emitted.
"""

from __future__ import annotations

from pathlib import Path

from pipeguard.v1 import pipeguard_pb2 as pb
from coordinator.pipeline import Pipeline
from coordinator.registry import Registry
from coordinator.state import EventLog, RunState, RunStore


class Convictions:
    def __init__(self, registry: Registry, state: RunState, store: RunStore, events: EventLog, pipeline: Pipeline):
        self.registry = registry
        self.state = state
        self.store = store
        self.events = events
        self.pipeline = pipeline
        self._reserved: set[str] = set()
        """Nodes whose conviction is being written (its bundle): one bundle per ban."""

    def banned(self, node_id: str) -> bool:
        """Banned already, or its conviction is under way."""
        rec = self.registry.nodes.get(node_id)
        return node_id in self._reserved or (rec is not None and rec.role == pb.ROLE_BANNED)

    def reserve(self, node_id: str) -> bool:
        """Claim the conviction of ``node_id`` before writing its bundle; False if someone has it already."""
        if self.banned(node_id):
            return False
        self._reserved.add(node_id)
        return True

    def convict(self, node_id: str, step: int, reason: str, bundle: Path | None = None) -> None:
        """Ban ``node_id`` for what it did at ``step`` (-1: not tied to a step; the run's current
        step is the first suspect one)."""
        rec = self.registry.nodes.get(node_id)
        if rec is None or rec.role == pb.ROLE_BANNED:
            return
        self.registry.ban(rec, reason)
        if bundle is not None:
            self.state.evidence.append(str(bundle))
        if rec in self.pipeline:
            # Roll back to before the first step the convicted node's output may have touched.
            self.pipeline.suspect(step if step >= 0 else self.state.step)
        self.pipeline.reform()
        self.store.save_run(self.state, self.registry)
        self.events.emit("banned", f"node {node_id[:8]} banned: {reason}" + (f"; evidence {bundle}" if bundle else ""),
                         node_id=node_id, step=step if step >= 0 else None)
