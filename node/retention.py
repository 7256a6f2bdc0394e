"""What a stage keeps for audits and rollback: state snapshots and the tensors it sent and received.

Both are kept for the run's retention window (``TrainSpec.retention_steps``): a snapshot of the
state at the start of each of the last R steps, and every tensor of the last R steps with the
signed commitment that came with it. Lookups answer auditors, the judge and rollbacks; what
falls outside the window is forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeguard.errors import NotFound
from pipeguard.v1 import pipeguard_pb2 as pb

DEFAULT_RETENTION = 4
"""Steps of snapshots and tensors kept when the run does not say (``TrainSpec.retention_steps`` 0).

A protocol default, not a node setting: the window is a property of the run, signed in the
train spec the coordinator sends, because the coordinator's audit timing relies on it (it waits
for the audits of step ``step - audit.retention`` before applying an update). A node-side config
field could only make a node disagree with its coordinator; the coordinator's
``audit.retention`` (default 4) is the field an operator sets."""


@dataclass
class Snapshot:
    """The stage's state at the start of a step, kept for audits and rollback."""

    named: dict[str, torch.Tensor]
    """Weights and optimizer state, as ``StageComputation.state`` names them."""
    commitment: bytes
    """Its digest (what the step's report committed to)."""
    epoch: int
    """Assignment epoch in which this state began its step."""


@dataclass
class Kept:
    """A tensor this stage sent or received, with the signed commitment that came with it."""

    commitment: pb.TensorCommitment
    tensor: torch.Tensor


class Retention:
    """Snapshots and kept tensors of the last ``window`` steps."""

    def __init__(self, window: int = DEFAULT_RETENTION):
        self.window = window
        """Steps kept (the assignment's ``retention``)."""
        self.snapshots: dict[int, Snapshot] = {}
        """step -> state at the start of that step."""
        self.kept: dict[tuple[int, int, int, bool], Kept] = {}
        """(step, direction, micro_batch, sent) -> tensor, for what this stage sent and received."""

    def snapshot(self, step: int, snap: Snapshot) -> None:
        """Keep the state at the start of ``step``; the oldest beyond the window go."""
        self.snapshots[step] = snap
        for old in sorted(self.snapshots)[:-self.window]:
            del self.snapshots[old]

    def keep(self, step: int, direction: int, micro_batch: int, sent: bool, commitment: pb.TensorCommitment,
             tensor: torch.Tensor) -> None:
        self.kept[(step, direction, micro_batch, sent)] = Kept(commitment, tensor)

    def kept_tensor(self, step: int, direction: int, micro_batch: int, sent: bool) -> Kept:
        found = self.kept.get((step, direction, micro_batch, sent))
        if found is None:
            raise NotFound(f"no retained tensor for step {step} micro-batch {micro_batch} direction {direction} "
                           f"({'sent' if sent else 'received'})")
        return found

    def drop_from(self, step: int) -> None:
        """A rollback to the start of ``step``: later snapshots describe a history that is gone, and
        the one of ``step`` itself is now the current state, which belongs to the new assignment
        (its epoch; ``StageRuntime.state_at`` serves the current state for the step it is at)."""
        for later in [s for s in self.snapshots if s >= step]:
            del self.snapshots[later]

    def restart_at(self, start_step: int) -> None:
        """A new assignment starting at ``start_step``: tensors of that step on are of another history."""
        self.kept = {k: v for k, v in self.kept.items() if k[0] < start_step}

    def forget_before(self, next_step: int) -> None:
        """Tensors of steps before the window ending at ``next_step`` are no longer kept."""
        for key in [k for k in self.kept if k[0] < next_step - self.window]:
            del self.kept[key]
