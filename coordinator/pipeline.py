"""The active pipeline, and what faults reported from elsewhere ask of it before the next step.

The step loop owns it: it forms the pipeline (``formed``) and runs steps on it. Everything else
only marks it, through this one small interface: a conviction or a distrusted node asks for the
pipeline to be formed again (``reform``), a conviction of a stage holder also for a rollback to a
checkpoint at or before the first step it may have touched (``suspect``), and the liveness monitor
reports a silent stage holder (``node_lost``), which gives up the step in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from coordinator.registry import NodeRecord


class Pipeline:
    def __init__(self, skipped: Iterable[int] = ()):
        self.nodes: list[NodeRecord] = []
        """Active pipeline, in order."""
        self.slots: list[int] = []
        """Partition slot (stage index) of each active node; a skipped slot is missing."""
        self.skipped: set[int] = set(skipped)
        self.reform_needed = False
        """Form the pipeline again before the next step."""
        self.suspect_step: int | None = None
        """Set by a conviction of a stage holder: roll back to a checkpoint at or before this step."""
        self.stage_lost = asyncio.Event()
        """Set when a node of the active pipeline goes silent: the step in flight is given up."""

    def __contains__(self, rec: NodeRecord) -> bool:
        return rec in self.nodes

    def ids(self) -> list[str]:
        return [r.node_id for r in self.nodes]

    def reform(self) -> None:
        self.reform_needed = True

    def suspect(self, step: int) -> None:
        """Roll back to before ``step`` (the earliest of all suspect steps) at the next formation."""
        self.suspect_step = step if self.suspect_step is None else min(self.suspect_step, step)
        self.reform_needed = True

    def node_lost(self, rec: NodeRecord) -> None:
        if rec in self.nodes:
            self.reform_needed = True
            self.stage_lost.set()

    def formed(self, nodes: list[NodeRecord], slots: list[int], skipped: set[int]) -> None:
        """A new pipeline of nodes alive now is the run's: nothing is pending any more."""
        self.nodes, self.slots, self.skipped = nodes, slots, skipped
        self.suspect_step = None
        self.reform_needed = False
        self.stage_lost.clear()
