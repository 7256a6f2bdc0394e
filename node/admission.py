"""Admission of incoming tensors: header checks before any payload is read, replays, the inbox.

``admit`` decides from a tensor's header alone (sender, run, receiver, epoch, pipeline
neighbour, step, micro-batch range, dtype and shape, replay), so that nothing is read or
buffered for a tensor this stage would refuse. ``deliver`` takes a fully verified tensor into
the inbox of its step, where the schedule picks it up, and through the statistical screen.
Each (step, direction, micro-batch) is accepted once: the seen set, forgotten with the step,
bounds the inbox to 2 x micro-batches tensors per step.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pipeguard.compression import WIRE_NAMES, decompress
from pipeguard.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from pipeguard.identity import PublicIdentity
from pipeguard.tensors import ReceivedTensor
from pipeguard.v1 import pipeguard_pb2 as pb
from node.screen import Screen

if TYPE_CHECKING:
    from node.stage import Assignment

log = logging.getLogger(__name__)

FORWARD, BACKWARD = pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD


class Admission:
    """Which tensors this stage accepts, and the ones it accepted but has not used yet."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        self.banned: set[str] = set()
        """Nodes whose tensors are refused (the coordinator's list, from heartbeats)."""
        self.inbox: dict[tuple[int, int, int], ReceivedTensor] = {}
        """(step, direction, micro_batch) -> an accepted tensor not yet used by the schedule."""
        self.seen: dict[tuple[int, int, int], bytes] = {}
        """(step, direction, micro_batch) -> payload digest of what was accepted (replays are refused)."""
        self.arrived = asyncio.Event()
        """Set on each delivery (the schedule waits on it)."""
        self.screen = Screen()
        self.flags: dict[int, list[pb.ScreenFlag]] = {}
        """step -> received tensors the screen flagged."""
        self.attempts = _Attempts()
        """Which attempt of the step at hand tensors must carry."""

    def admit(self, header: pb.TensorHeader, a: "Assignment | None", expected_step: int,
              lookup: dict[str, PublicIdentity]) -> PublicIdentity:
        """Check a tensor header before any payload is read; return the sender's key."""
        if a is None:
            raise FailedPrecondition("this node serves no stage")
        if header.sender in self.banned:
            raise PermissionDenied(f"sender {header.sender} is banned")
        sender = lookup.get(header.sender)
        if sender is None:
            raise Unauthenticated(f"unknown sender {header.sender!r}")
        if header.run_id != a.run_id:
            raise FailedPrecondition(f"tensor is for run {header.run_id!r}, this node runs {a.run_id!r}")
        if header.receiver != self.node_id:
            raise InvalidArgument(f"tensor is addressed to {header.receiver!r}, not this node")
        if header.epoch != a.epoch:
            raise FailedPrecondition(f"tensor from assignment epoch {header.epoch}, this node is in epoch {a.epoch}")
        if header.direction == FORWARD:
            if a.prev is None or header.sender != a.prev.node_id or header.stage != a.prev.stage:
                raise PermissionDenied(f"{header.sender} is not the previous stage of this pipeline")
        elif header.direction == BACKWARD:
            if a.next is None or header.sender != a.next.node_id or header.stage != a.next.stage:
                raise PermissionDenied(f"{header.sender} is not the next stage of this pipeline")
        if header.step != expected_step:
            raise FailedPrecondition(f"tensor for step {header.step}, but this stage is at step {expected_step}")
        self.attempts.check(header)
        if header.micro_batch >= a.setup.micro_batches:
            raise InvalidArgument(f"micro-batch {header.micro_batch} out of range (0..{a.setup.micro_batches - 1})")
        if header.dtype != a.setup.wire or list(header.shape) != a.setup.activation_shape:
            raise InvalidArgument(
                f"expected {WIRE_NAMES[a.setup.wire_dtype]} {a.setup.activation_shape}, got dtype {header.dtype} "
                f"shape {list(header.shape)}"
            )
        if (header.step, header.direction, header.micro_batch) in self.seen:
            raise _replay_error(header)
        return sender

    def deliver(self, rt: ReceivedTensor) -> None:
        """Accept a fully verified tensor into the inbox of its step, and screen it."""
        h = rt.commitment.header
        key = (h.step, h.direction, h.micro_batch)
        if key in self.seen:  # a concurrent duplicate that passed admission at the same time
            raise _replay_error(h)
        self.seen[key] = rt.commitment.payload_digest
        self.inbox[key] = rt
        reason = self.screen.observe(h.direction, decompress(rt.tensor), h.step, h.micro_batch)
        if reason is not None:
            log.info("screen flagged step %d micro-batch %d from %s: %s", h.step, h.micro_batch, h.sender[:8], reason)
            self.flags.setdefault(h.step, []).append(
                pb.ScreenFlag(direction=h.direction, micro_batch=h.micro_batch, reason=reason))
        self.arrived.set()

    def flags_of(self, step: int) -> list[pb.ScreenFlag]:
        """The screen's flags on ``step`` (for its report): one per (direction, micro-batch)."""
        return _merge_flags(self.flags.pop(step, []), self.screen.cross_check(step))

    def reset(self) -> None:
        """A new assignment: new neighbours (or a new history), so new screen baselines and nothing pending."""
        self.screen = Screen()
        self.inbox.clear()
        self.seen.clear()
        self.attempts = _Attempts()

    def begin(self, step: int, attempt: int) -> None:
        """``attempt`` of ``step`` starts: refused if it is not newer than one run or aborted already;
        tensors of the step that arrived early for another attempt are dropped."""
        self.attempts.begin(step, attempt)
        for key in [k for k in self.seen if k[0] == step and (
                k not in self.inbox or self.inbox[k].commitment.header.attempt != attempt)]:
            self.seen.pop(key, None)
            self.inbox.pop(key, None)

    @property
    def running(self) -> bool:
        return self.attempts.running

    @running.setter
    def running(self, value: bool) -> None:
        """False once the attempt has ended: it never runs again."""
        if not value and self.attempts.running:
            self.attempts.running = False
            self.attempts.floor += 1

    def aborted(self, step: int, attempt: int) -> bool:
        """The coordinator aborted ``attempt`` of ``step``: its tensors (and earlier attempts') are
        dropped, only later attempts are accepted. False, dropping nothing, for a stale abort (of an
        attempt older than the last one run or aborted: a replayed order)."""
        t = self.attempts
        if t.step == step and attempt + 1 < t.floor:
            return False
        for key in [k for k in self.seen if k[0] == step and (
                k not in self.inbox or self.inbox[k].commitment.header.attempt <= attempt)]:
            self.seen.pop(key, None)
            self.inbox.pop(key, None)
        self.flags.pop(step, None)  # what the screen flagged in the aborted attempt is no report's
        if t.step != step:
            t.step, t.floor, t.running = step, attempt + 1, False
        t.floor = max(t.floor, attempt + 1)
        return True

    def drop_step(self, step: int) -> None:
        """An aborted step: its tensors may be sent again, byte for byte, by the retry."""
        for key in [k for k in self.inbox if k[0] == step]:
            del self.inbox[key]
        for key in [k for k in self.seen if k[0] == step]:
            del self.seen[key]

    def forget_before(self, next_step: int) -> None:
        for key in [k for k in self.seen if k[0] < next_step]:
            del self.seen[key]
        for key in [k for k in self.inbox if k[0] < next_step]:
            del self.inbox[key]
        for step in [k for k in self.flags if k < next_step]:
            del self.flags[step]


class _Attempts:
    """The attempt of the step at hand: while it runs, tensors must carry exactly it; between
    attempts, any later one (the retry's tensors may arrive before its RunStep order)."""

    def __init__(self) -> None:
        self.step = -1
        """Step whose attempts are tracked (-1: none begun since the assignment)."""
        self.floor = 0
        """While running: the attempt running; otherwise the lowest attempt still to come."""
        self.running = False

    def begin(self, step: int, attempt: int) -> None:
        if step == self.step and attempt < self.floor:
            raise FailedPrecondition(f"attempt {attempt} of step {step} is not newer than the attempts this node "
                                     f"ran or had aborted (next: {self.floor})")
        self.step, self.floor, self.running = step, attempt, True

    def check(self, header: pb.TensorHeader) -> None:
        if header.step != self.step:
            return
        if self.running and header.attempt != self.floor:
            raise FailedPrecondition(f"tensor from attempt {header.attempt} of step {header.step}, but this node "
                                     f"runs attempt {self.floor}")
        if not self.running and header.attempt < self.floor:
            raise FailedPrecondition(f"tensor from attempt {header.attempt} of step {header.step}, an attempt that "
                                     f"has ended (next: {self.floor})")


def _replay_error(header: pb.TensorHeader) -> AlreadyExists:
    return AlreadyExists(
        f"replay: step {header.step} micro-batch {header.micro_batch} direction {header.direction} already received"
    )


def _merge_flags(*groups: list[pb.ScreenFlag]) -> list[pb.ScreenFlag]:
    """One flag per (direction, micro-batch), the first reason kept."""
    out: dict[tuple[int, int], pb.ScreenFlag] = {}
    for group in groups:
        for f in group:
            out.setdefault((f.direction, f.micro_batch), f)
    return [out[k] for k in sorted(out)]
