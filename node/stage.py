"""One pipeline stage at work: where its state comes from, its steps, its update, abort and rollback.

``StageRuntime`` composes the node's subsystems: admission of incoming tensors
(node/admission.py), the schedule of one step (node/schedule.py) and what is retained for
audits and rollback (node/retention.py), around the stage computation
(pipeguard/computation.py). Torch compute runs on a single worker thread, never on the event
loop, so heartbeats and tensor streams keep flowing during a long backward.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from pipeguard import claims
from pipeguard.compression import Packed
from pipeguard.computation import Forward, StageComputation, StageSetup, to_wire
from pipeguard.config import TimeoutConfig
from pipeguard.data import Dataset
from pipeguard.errors import DataLoss, FailedPrecondition, InvalidArgument
from pipeguard.identity import Identity, PublicIdentity
from pipeguard.tensors import ReceivedTensor, make_header
from pipeguard.v1 import pipeguard_pb2 as pb
from node.admission import Admission
from node.peers import PeerPool
from node.retention import DEFAULT_RETENTION, Kept, Retention, Snapshot
from node.schedule import Schedule, StepWork

log = logging.getLogger(__name__)

FORWARD = pb.DIRECTION_FORWARD
BuildComputation = Callable[[StageSetup, "dict[str, torch.Tensor] | None", "torch.device | None"], StageComputation]
"""How the runtime builds its stage on its device (``StageComputation.build``; node/seams.py wraps it
for attackers)."""


@dataclass(frozen=True)
class Assignment:
    """A verified AssignRequest, in the shapes the runtime uses."""

    run_id: str
    epoch: int
    setup: StageSetup
    """What the stage computes (shared with every party that recomputes it)."""
    max_in_flight: int
    retention: int
    prev: pb.PeerInfo | None
    next: pb.PeerInfo | None
    state_digest: bytes
    digest: bytes = b""
    """``claims.assignment_digest``: what this node agreed to compute, signed into every tensor and report."""

    @classmethod
    def from_request(cls, req: pb.AssignRequest) -> "Assignment":
        setup = StageSetup.from_specs(req.model, req.train, req.stage, req.num_stages)
        if not setup.is_first and not (req.HasField("prev") and req.prev.stage < req.stage):
            raise InvalidArgument("a stage after the first needs a previous peer with a lower stage")
        if not setup.is_last and not (req.HasField("next") and req.next.stage > req.stage):
            raise InvalidArgument("a stage before the last needs a next peer with a higher stage")
        t = req.train
        return cls(
            run_id=req.run_id, epoch=req.epoch, setup=setup,
            max_in_flight=t.max_in_flight or t.micro_batches, retention=t.retention_steps or DEFAULT_RETENTION,
            prev=req.prev if req.HasField("prev") else None,
            next=req.next if req.HasField("next") else None,
            state_digest=req.state_digest, digest=claims.assignment_digest(req),
        )

    @property
    def stage(self) -> int:
        """The stage this node serves."""
        return self.setup.stage


class StageRuntime:
    """The state and steps of the stage this node serves, composed of admission, the schedule and
    retention."""

    def __init__(self, identity: Identity, peers: PeerPool, timeouts: TimeoutConfig, *,
                 build: BuildComputation = StageComputation.build, device: torch.device | None = None):
        self.identity = identity
        self.device = torch.device("cpu") if device is None else device
        """Where the stage's module, optimizer state, activations and snapshots live (node.device)."""
        self.peers = peers
        """Where outputs are pushed (``PeerPool.push``)."""
        self.build = build
        """Builds the stage computation from a set-up and an optional state."""
        self.step_timeout = timeouts.step
        self.abort_wait = timeouts.abort_wait
        """How long AbortStep waits for the step it aborts to stop running (the coordinator cancelled
        that RunStep call just before; the cancellation may reach this node after the abort order)."""
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeguard-compute")
        self.assignment: Assignment | None = None
        self.computation: StageComputation | None = None
        """The stage's module and optimizer; touched only on the compute thread."""
        self.dataset: Dataset | None = None
        self.completed_step = -1
        """Last step whose update has been applied."""
        self.state_commitment = b""
        """Digest of weights + optimizer state now (the next step's commitment)."""
        self.admission = Admission(identity.node_id)
        self.retention = Retention()
        self._running: int | None = None
        self._idle = asyncio.Event()
        """Set while no step runs."""
        self._idle.set()
        self._grads_for: tuple[int, int] | None = None
        """(step, attempt) whose gradients are ready for the update."""
        self.fetch_checkpoint = None
        """async (stage, step) -> named tensors; set by the daemon (pulls from the coordinator)."""
        self.steps_computed = 0
        self.compute_seconds = 0.0
        """Steps whose forward and backward finished here, and their compute time (for metrics)."""

    @property
    def banned(self) -> set[str]:
        """Nodes whose tensors are refused and who may not fetch retained data."""
        return self.admission.banned

    @banned.setter
    def banned(self, nodes: set[str]) -> None:
        self.admission.banned = nodes

    async def compute(self, fn, *args):
        """Run ``fn(*args)`` on the compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- assignment ----------------------------------------------------------------------------

    async def assign(self, a: Assignment, dataset: Dataset, start_step: int) -> tuple[bytes, int]:
        """Take the stage at ``start_step``; returns (state digest, parameter count).

        Where the state comes from, in order of preference:

        1. this node already holds the stage exactly ``start_step`` steps in, with the digest
           the coordinator expects (a coordinator restart, new neighbours): keep it;
        2. it holds a retained snapshot of that step with that digest (a rollback): restore it;
        3. nothing is expected (``start_step`` 0, empty digest): build it from the run seed;
        4. otherwise fetch the coordinator's checkpoint and check it against the digest.
        """
        old = self.assignment
        same_stage = (old is not None and self.computation is not None and old.run_id == a.run_id
                      and old.stage == a.stage and old.setup.num_stages == a.setup.num_stages
                      and old.setup.gpt == a.setup.gpt and old.setup.seed == a.setup.seed)
        want = a.state_digest
        snapshots = self.retention.snapshots
        how = ""
        if same_stage and self.completed_step == start_step - 1 and want in (b"", self.state_commitment):
            await self.compute(self.computation.zero_grad)
            how = "keeping"
        elif same_stage and start_step in snapshots and want in (b"", snapshots[start_step].commitment):
            await self.rollback(start_step)
            how = "rolled back"
        else:
            named = None
            if want:
                if self.fetch_checkpoint is None:
                    raise FailedPrecondition(f"no way to fetch the state of stage {a.stage} at step {start_step}")
                named = await self.fetch_checkpoint(a.stage, start_step)
            elif start_step != 0:
                raise FailedPrecondition(f"joining at step {start_step} needs the expected state digest")

            def build():
                computation = self.build(a.setup, named, self.device)
                return computation, computation.digest()

            computation, digest = await self.compute(build)
            if want and digest != want:
                raise DataLoss(f"checkpoint of stage {a.stage} at step {start_step} hashes to "
                               f"{digest.hex()[:16]}…, not the committed {want.hex()[:16]}…")
            self.computation = computation
            snapshots.clear()
            self.completed_step = start_step - 1
            self.state_commitment = digest
            how = "loaded checkpoint for" if want else "built"
        self.assignment, self.dataset = a, dataset
        self.retention.window = a.retention
        self.admission.reset()
        self.retention.restart_at(start_step)
        self._running = self._grads_for = None
        assert self.computation is not None
        n = self.computation.num_params
        spec = a.setup.spec
        log.info("%s stage %d/%d (blocks %d-%d, %d params) at step %d, epoch %d", how, a.stage, a.setup.num_stages,
                 spec.first_block, spec.last_block - 1, n, start_step, a.epoch)
        return self.state_commitment, n

    # -- incoming tensors ----------------------------------------------------------------------

    def admit(self, header: pb.TensorHeader, lookup: dict[str, PublicIdentity]) -> PublicIdentity:
        """Check a tensor header before any payload is read; return the sender's key."""
        return self.admission.admit(header, self.assignment, self.completed_step + 1, lookup)

    def deliver(self, rt: ReceivedTensor) -> None:
        """Accept a fully verified tensor into the inbox of its step, and keep it for audits."""
        self.admission.deliver(rt)
        h = rt.commitment.header
        self.retention.keep(h.step, h.direction, h.micro_batch, False, rt.commitment, rt.tensor)

    # -- one step ------------------------------------------------------------------------------

    async def run_step(self, step: int, attempt: int = 0) -> pb.StepReport:
        """Run ``attempt`` of ``step``; each attempt runs at most once (an earlier or repeated attempt
        is refused), so this node never signs two outputs for one (epoch, attempt, step, micro-batch)."""
        a = self.assignment
        if a is None or self.computation is None:
            raise FailedPrecondition("this node serves no stage")
        if step != self.completed_step + 1:
            raise FailedPrecondition(f"asked for step {step}, but this stage is at step {self.completed_step + 1}")
        if self._running is not None:
            raise FailedPrecondition(f"step {self._running} is still running")
        self.admission.begin(step, attempt)  # refuses an attempt already run or aborted
        self._running = step
        self._idle.clear()
        try:
            return await self._run_step(a, step, attempt)
        finally:
            self._running = None
            self.admission.running = False
            self._idle.set()

    async def _run_step(self, a: Assignment, step: int, attempt: int = 0) -> pb.StepReport:
        deadline = time.monotonic() + self.step_timeout
        commitment = self.state_commitment
        M = a.setup.micro_batches
        schedule = Schedule(M, a.max_in_flight, a.setup.is_first, a.setup.is_last)

        async def send(direction: int, mb: int, tensor: "torch.Tensor | Packed") -> None:
            peer = a.next if direction == FORWARD else a.prev
            assert peer is not None
            header = make_header(run_id=a.run_id, step=step, micro_batch=mb, stage=a.stage, direction=direction,
                                 sender=self.identity.node_id, receiver=peer.node_id, tensor=tensor, epoch=a.epoch)
            # What this output binds: the attempt, the assignment, and the inputs it was computed from.
            header.attempt, header.assignment_digest = attempt, a.digest
            if not a.setup.is_first:
                header.input_digest = self.retention.kept_tensor(step, FORWARD, mb, False).commitment.payload_digest
            if direction != FORWARD and not a.setup.is_last:
                header.grad_input_digest = self.retention.kept_tensor(
                    step, direction, mb, False).commitment.payload_digest
            sent = await self.peers.push(peer.address, header, tensor)
            self.retention.keep(step, direction, mb, True, sent, tensor)

        work = StepWork(compute=self.compute, forward=lambda s, mb, x: self._forward(a, s, mb, x),
                        backward=lambda fwd, g: self._backward(a, fwd, g), send=send)
        loss_sum, compute = await schedule.run(step, work, self.admission.inbox, self.admission.arrived, deadline)
        sq = await self.compute(self.computation.grad_sq_norm)
        self._grads_for = (step, attempt)
        self.steps_computed += 1
        self.compute_seconds += compute
        return pb.StepReport(
            run_id=a.run_id, step=step, stage=a.stage, node_id=self.identity.node_id, state_digest=commitment,
            loss=loss_sum / M if a.setup.is_last else 0.0, grad_sq_norm=sq, compute_seconds=compute, micro_batches=M,
            flags=self.admission.flags_of(step), epoch=a.epoch, attempt=attempt, assignment_digest=a.digest,
            received=[pb.ReceivedDigest(direction=d, micro_batch=mb, payload_digest=k.commitment.payload_digest)
                      for (s, d, mb, sent), k in sorted(self.retention.kept.items(), key=lambda item: item[0])
                      if s == step and not sent],
        )

    def _forward(self, a: Assignment, step: int, mb: int, x_in: torch.Tensor | None
                 ) -> tuple[Forward, torch.Tensor | None]:
        """Compute thread: forward one micro-batch; returns (the pass, kept for its backward; the
        activation to send, None on the last stage)."""
        assert self.computation is not None and self.dataset is not None
        x = a.setup.batch(self.dataset, step, mb)[0] if a.setup.is_first else x_in  # (B, T) or (B, T, C)
        fwd = self.computation.forward(step, mb, x)
        return fwd, None if a.setup.is_last else to_wire(fwd.output, a.setup.wire_dtype)  # (B, T, C), on the host

    def _backward(self, a: Assignment, fwd: Forward, grad_in: torch.Tensor | None
                  ) -> tuple[float, torch.Tensor | None]:
        """Compute thread: backward one micro-batch; returns (its loss, 0.0 except on the last
        stage; the input gradient to send, None on the first stage)."""
        assert self.computation is not None and self.dataset is not None
        g = a.setup.batch(self.dataset, fwd.step, fwd.micro_batch)[1] if a.setup.is_last else grad_in
        loss, grad = self.computation.backward(fwd, g)  # grad: (B, T, C) or None
        return loss, to_wire(grad, a.setup.wire_dtype)  # (B, T, C) on the host, or None

    # -- update ----------------------------------------------------------------------------------

    async def apply_update(self, step: int, global_norm: float, lr: float, attempt: int = 0) -> bytes:
        a = self.assignment
        comp = self.computation
        if a is None or comp is None:
            raise FailedPrecondition("this node serves no stage")
        if self._grads_for != (step, attempt):
            raise FailedPrecondition(f"no finished gradients for step {step} attempt {attempt}")

        def update():
            # Runs on the compute thread, like every other reader of the state (state_at), so
            # nobody ever sees new weights paired with the old commitment or the reverse.
            self.retention.snapshot(step, Snapshot(comp.snapshot(), self.state_commitment, a.epoch))
            comp.update(global_norm, lr)
            self.state_commitment = comp.digest()
            self.completed_step = step
            return self.state_commitment

        digest = await self.compute(update)
        self._grads_for = None
        self.admission.forget_before(step + 1)
        self.retention.forget_before(step + 1)
        return digest

    async def rollback(self, step: int) -> None:
        """Restore the state this stage held at the start of ``step`` (kept for the retention window)."""
        snap = self.retention.snapshots.get(step)
        if snap is None or self.computation is None:
            raise FailedPrecondition(f"no snapshot of the state at step {step} "
                                     f"(kept: {sorted(self.retention.snapshots)})")

        def restore():
            self.computation.load(snap.named)
            self.retention.drop_from(step)
            log.warning("rolled back from step %d to the start of step %d", self.completed_step + 1, step)
            self.completed_step = step - 1
            self.state_commitment = snap.commitment

        await self.compute(restore)
        self._grads_for = None

    async def abort(self, step: int, attempt: int = 0) -> None:
        """Drop a failed step's partial work so it can be run again from the same state.

        Waits up to ``abort_wait`` (``timeouts.abort_wait``) for that step to stop running (its
        RunStep call was cancelled just before), and is refused if it still runs then: its
        gradients and inbox are in use. The aborted attempt's tensors are dropped and refused from
        then on (the retry is attempt + 1); an abort of an older attempt than the last one run or
        aborted (a replayed order) changes nothing.
        """
        if self._running == step:
            try:
                await asyncio.wait_for(self._idle.wait(), self.abort_wait)
            except asyncio.TimeoutError:
                pass
        if self._running == step:
            raise FailedPrecondition(f"step {step} is still running; it cannot be aborted now")
        if self.computation is not None and step == self.completed_step + 1 and self.admission.aborted(step, attempt):
            await self.compute(self.computation.zero_grad)
            self._grads_for = None

    # -- retained data -------------------------------------------------------------------------

    async def state_at(self, step: int) -> tuple[dict[str, torch.Tensor], bytes, int]:
        """The stage state at the start of ``step`` (a retained snapshot or the current state),
        its digest and the epoch it began that step in. Names follow ``StageComputation.state``."""
        if self.computation is None:
            raise FailedPrecondition("this node serves no stage")
        snapshots = self.retention.snapshots

        def lookup():  # on the compute thread: consistent with apply_update's update()
            if step in snapshots:
                snap = snapshots[step]
                return snap.named, snap.commitment, snap.epoch
            if step == self.completed_step + 1:
                return self.computation.snapshot(), self.state_commitment, self.assignment.epoch
            return None

        found = await self.compute(lookup)
        if found is None:
            raise FailedPrecondition(f"the state at step {step} is not retained (retained: {sorted(snapshots)}, "
                                     f"current {self.completed_step + 1})")
        return found

    def kept_tensor(self, step: int, direction: int, micro_batch: int, sent: bool) -> Kept:
        """A tensor this stage sent or received in the retention window, with its commitment."""
        return self.retention.kept_tensor(step, direction, micro_batch, sent)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
