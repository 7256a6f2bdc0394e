"""One pipeline stage at work: build it, run a step's forward and backward, apply the update.

Torch compute runs on a single worker thread, never on the event loop, so heartbeats and
tensor streams keep flowing during a long backward. The schedule is GPipe with an in-flight
bound: a stage forwards micro-batches as their inputs arrive (stage i works on m while
stage i+1 works on m-1), runs a backward as soon as its gradient is in, and never holds more
than ``max_in_flight`` forward graphs. Forwards and backwards each run in micro-batch order,
so gradients accumulate in the same order as in a single process and every result can be
replayed bit for bit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from pipeguard.computation import Forward, StageComputation, StageSetup
from pipeguard.data import Dataset
from pipeguard.errors import AlreadyExists, DataLoss, DeadlineExceeded, FailedPrecondition, NotFound, InvalidArgument, PermissionDenied, Unauthenticated
from pipeguard.identity import Identity, PublicIdentity
from pipeguard.tensors import ReceivedTensor, make_header
from pipeguard.v1 import pipeguard_pb2 as pb
from node.attacks import HOOKS, NO_MICRO_BATCH, AttackContext, Behaviour, overrides
from node.peers import PeerPool
from node.screen import Screen

log = logging.getLogger(__name__)

FORWARD, BACKWARD = pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD
DEFAULT_RETENTION = 4
"""Steps of snapshots and tensors kept when the run does not say (TrainSpec.retention_steps)."""
ABORT_WAIT_S = 2.0
"""How long AbortStep waits for the step it aborts to stop running (the coordinator cancelled
that RunStep call just before; the cancellation may reach this node after the abort order)."""


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
            state_digest=req.state_digest,
        )

    @property
    def stage(self) -> int:
        """The stage this node serves."""
        return self.setup.stage


class StageRuntime:
    """The state and schedule of the stage this node serves."""

    def __init__(self, identity: Identity, peers: PeerPool, behaviour: Behaviour, step_timeout: float):
        self.identity = identity
        self.peers = peers
        self.behaviour = behaviour
        self.attacks = {hook for hook in HOOKS if overrides(behaviour, hook)}
        """The hooks the behaviour changes; honest nodes skip the others' set-up entirely."""
        self.step_timeout = step_timeout
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeguard-compute")
        self.assignment: Assignment | None = None
        self.computation: StageComputation | None = None
        """The stage's module and optimizer; touched only on the compute thread."""
        self.dataset: Dataset | None = None
        self.completed_step = -1
        """Last step whose update has been applied."""
        self.state_commitment = b""
        """Digest of weights + optimizer state now (the next step's commitment)."""
        self.banned: set[str] = set()
        self._inbox: dict[tuple[int, int, int], ReceivedTensor] = {}
        self._seen: dict[tuple[int, int, int], bytes] = {}
        self._wake = asyncio.Event()
        self._running: int | None = None
        self._idle = asyncio.Event()
        """Set while no step runs."""
        self._idle.set()
        self._grads_for: int | None = None
        self.snapshots: dict[int, Snapshot] = {}
        """step -> state at the start of that step, for the retention window."""
        self.kept: dict[tuple[int, int, int, bool], Kept] = {}
        """(step, direction, micro_batch, sent) -> tensor, for what this stage sent and received."""
        self.screen = Screen()
        self.flags: dict[int, list[pb.ScreenFlag]] = {}
        """step -> received tensors the screen flagged."""
        self.fetch_checkpoint = None
        """async (stage, step) -> named tensors; set by the daemon (pulls from the coordinator)."""
        self.steps_computed = 0
        self.compute_seconds = 0.0
        """Steps whose forward and backward finished here, and their compute time (for metrics)."""

    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def attack_context(self, step: int, micro_batch: int = NO_MICRO_BATCH, direction: int = 0,
                       peer: str = "") -> AttackContext:
        stage = self.assignment.stage if self.assignment is not None else -1
        return AttackContext(step, micro_batch, stage, self.identity.node_id, direction, peer, self.identity)

    async def pause(self, what: str, step: int, micro_batch: int = NO_MICRO_BATCH, direction: int = 0,
                    peer: str = "") -> None:
        """The behaviour's ``pause`` hook (node:slow, node:silent) before a send, RPC or heartbeat."""
        if "pause" in self.attacks:
            await self.behaviour.pause(self.attack_context(step, micro_batch, direction, peer), what)

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
        how = ""
        if same_stage and self.completed_step == start_step - 1 and want in (b"", self.state_commitment):
            await self._compute(self.computation.zero_grad)
            how = "keeping"
        elif same_stage and start_step in self.snapshots and want in (b"", self.snapshots[start_step].commitment):
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
                computation = StageComputation.build(a.setup, named)
                return computation, computation.digest()

            computation, digest = await self._compute(build)
            if want and digest != want:
                raise DataLoss(f"checkpoint of stage {a.stage} at step {start_step} hashes to "
                               f"{digest.hex()[:16]}…, not the committed {want.hex()[:16]}…")
            self.computation = computation
            self.snapshots.clear()
            self.completed_step = start_step - 1
            self.state_commitment = digest
            how = "loaded checkpoint for" if want else "built"
        self.assignment, self.dataset = a, dataset
        self.screen = Screen()  # new neighbours (or a new history): new baselines
        self._inbox.clear()
        self._seen.clear()
        self.kept = {k: v for k, v in self.kept.items() if k[0] < start_step}
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
        a = self.assignment
        if a is None:
            raise FailedPrecondition("this node serves no stage")
        if header.sender in self.banned:
            raise PermissionDenied(f"sender {header.sender} is banned")
        sender = lookup.get(header.sender)
        if sender is None:
            raise Unauthenticated(f"unknown sender {header.sender!r}")
        if header.run_id != a.run_id:
            raise FailedPrecondition(f"tensor is for run {header.run_id!r}, this node runs {a.run_id!r}")
        if header.receiver != self.identity.node_id:
            raise InvalidArgument(f"tensor is addressed to {header.receiver!r}, not this node")
        if header.epoch != a.epoch:
            raise FailedPrecondition(f"tensor from assignment epoch {header.epoch}, this node is in epoch {a.epoch}")
        if header.direction == FORWARD:
            if a.prev is None or header.sender != a.prev.node_id or header.stage != a.prev.stage:
                raise PermissionDenied(f"{header.sender} is not the previous stage of this pipeline")
        elif header.direction == BACKWARD:
            if a.next is None or header.sender != a.next.node_id or header.stage != a.next.stage:
                raise PermissionDenied(f"{header.sender} is not the next stage of this pipeline")
        expected_step = self.completed_step + 1
        if header.step != expected_step:
            raise FailedPrecondition(f"tensor for step {header.step}, but this stage is at step {expected_step}")
        if header.micro_batch >= a.setup.micro_batches:
            raise InvalidArgument(f"micro-batch {header.micro_batch} out of range (0..{a.setup.micro_batches - 1})")
        if header.dtype != pb.DTYPE_FLOAT32 or list(header.shape) != a.setup.activation_shape:
            raise InvalidArgument(
                f"expected float32 {a.setup.activation_shape}, got dtype {header.dtype} shape {list(header.shape)}"
            )
        if (header.step, header.direction, header.micro_batch) in self._seen:
            raise _replay_error(header)
        return sender

    def deliver(self, rt: ReceivedTensor) -> None:
        """Accept a fully verified tensor into the inbox of its step."""
        h = rt.commitment.header
        key = (h.step, h.direction, h.micro_batch)
        if key in self._seen:  # a concurrent duplicate that passed admission at the same time
            raise _replay_error(h)
        self._seen[key] = rt.commitment.payload_digest
        self._inbox[key] = rt
        self.kept[(*key, False)] = Kept(rt.commitment, rt.tensor)
        reason = self.screen.observe(h.direction, rt.tensor, h.step, h.micro_batch)
        if reason is not None:
            log.info("screen flagged step %d micro-batch %d from %s: %s", h.step, h.micro_batch, h.sender[:8], reason)
            self.flags.setdefault(h.step, []).append(
                pb.ScreenFlag(direction=h.direction, micro_batch=h.micro_batch, reason=reason))
        self._wake.set()

    # -- one step ------------------------------------------------------------------------------

    async def run_step(self, step: int) -> pb.StepReport:
        a = self.assignment
        if a is None or self.computation is None:
            raise FailedPrecondition("this node serves no stage")
        if step != self.completed_step + 1:
            raise FailedPrecondition(f"asked for step {step}, but this stage is at step {self.completed_step + 1}")
        if self._running is not None:
            raise FailedPrecondition(f"step {self._running} is still running")
        self._running = step
        self._idle.clear()
        try:
            return await self._run_step(a, step)
        finally:
            self._running = None
            self._idle.set()

    async def _run_step(self, a: Assignment, step: int) -> pb.StepReport:
        deadline = time.monotonic() + self.step_timeout
        commitment = self.state_commitment
        first, last = a.setup.is_first, a.setup.is_last
        M = a.setup.micro_batches
        saved: dict[int, Forward] = {}
        sends: list[asyncio.Task] = []
        fwd = bwd = 0
        loss_sum = 0.0
        compute = 0.0

        def launch_send(direction: int, mb: int, tensor: torch.Tensor) -> None:
            peer = a.next if direction == FORWARD else a.prev
            assert peer is not None
            header = make_header(run_id=a.run_id, step=step, micro_batch=mb, stage=a.stage, direction=direction,
                                 sender=self.identity.node_id, receiver=peer.node_id, tensor=tensor, epoch=a.epoch)
            task = asyncio.create_task(self._send(peer.address, header, tensor))
            task.add_done_callback(lambda _t: self._wake.set())
            sends.append(task)

        while bwd < M:
            for t in sends:
                if t.done() and t.exception() is not None:
                    raise t.exception()
            self._wake.clear()
            t0 = time.perf_counter()
            if bwd < fwd and (last or (step, BACKWARD, bwd) in self._inbox):
                grad_in = None if last else self._inbox.pop((step, BACKWARD, bwd)).tensor
                loss, grad_out = await self._compute(self._backward, a, saved.pop(bwd), grad_in)
                loss_sum += loss
                if grad_out is not None:
                    launch_send(BACKWARD, bwd, grad_out)
                bwd += 1
            elif fwd < M and fwd - bwd < a.max_in_flight and (first or (step, FORWARD, fwd) in self._inbox):
                x_in = None if first else self._inbox.pop((step, FORWARD, fwd)).tensor
                saved[fwd], out = await self._compute(self._forward, a, step, fwd, x_in)
                if out is not None:
                    launch_send(FORWARD, fwd, out)
                fwd += 1
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(
                        f"step {step} timed out waiting for micro-batch inputs (fwd {fwd}/{M}, bwd {bwd}/{M})"
                    ) from None
                continue
            compute += time.perf_counter() - t0
        await asyncio.gather(*sends)
        sq = await self._compute(self.computation.grad_sq_norm)
        self._grads_for = step
        self.steps_computed += 1
        self.compute_seconds += compute
        report = pb.StepReport(
            run_id=a.run_id, step=step, stage=a.stage, node_id=self.identity.node_id, state_digest=commitment,
            loss=loss_sum / M if last else 0.0, grad_sq_norm=sq, compute_seconds=compute, micro_batches=M,
            flags=_merge_flags(self.flags.pop(step, []), self.screen.cross_check(step)),
        )
        return report

    async def _send(self, address: str, header: pb.TensorHeader, tensor: torch.Tensor) -> None:
        await self.pause("send", header.step, header.micro_batch, header.direction, header.receiver)
        rewrite = None
        if "on_send" in self.attacks:  # experiments: wire:bad-signature, wire:replay
            ctx = self.attack_context(header.step, header.micro_batch, header.direction, header.receiver)
            rewrite = lambda chunks: self.behaviour.on_send(ctx, chunks)  # noqa: E731
        commitment = await self.peers.push(address, header, tensor, rewrite=rewrite)
        self.kept[(header.step, header.direction, header.micro_batch, True)] = Kept(commitment, tensor)

    def _forward(self, a: Assignment, step: int, mb: int, x_in: torch.Tensor | None
                 ) -> tuple[Forward, torch.Tensor | None]:
        """Compute thread: forward one micro-batch; returns (the pass, kept for its backward; the
        activation to send, None on the last stage)."""
        assert self.computation is not None and self.dataset is not None
        x = a.setup.batch(self.dataset, step, mb)[0] if a.setup.is_first else x_in  # (B, T) or (B, T, C)
        fwd = self.computation.forward(step, mb, x)
        if a.setup.is_last:
            return fwd, None
        ctx = self.attack_context(step, mb, FORWARD, a.next.node_id if a.next is not None else "")
        sent = self.behaviour.on_forward(ctx, fwd.output)
        return fwd, sent.contiguous()

    def _backward(self, a: Assignment, fwd: Forward, grad_in: torch.Tensor | None
                  ) -> tuple[float, torch.Tensor | None]:
        """Compute thread: backward one micro-batch; returns (its loss, 0.0 except on the last
        stage; the input gradient to send, None on the first stage)."""
        assert self.computation is not None and self.dataset is not None
        g = a.setup.batch(self.dataset, fwd.step, fwd.micro_batch)[1] if a.setup.is_last else grad_in
        loss, grad = self.computation.backward(fwd, g)  # grad: (B, T, C) or None
        if grad is None:
            return loss, None
        ctx = self.attack_context(fwd.step, fwd.micro_batch, BACKWARD, a.prev.node_id if a.prev is not None else "")
        sent = self.behaviour.on_backward(ctx, grad)
        return loss, sent.contiguous()

    # -- update ----------------------------------------------------------------------------------

    async def apply_update(self, step: int, global_norm: float, lr: float) -> bytes:
        a = self.assignment
        comp = self.computation
        if a is None or comp is None:
            raise FailedPrecondition("this node serves no stage")
        if self._grads_for != step:
            raise FailedPrecondition(f"no finished gradients for step {step}")

        def update():
            # Runs on the compute thread, like every other reader of the state (state_at), so
            # nobody ever sees new weights paired with the old commitment or the reverse.
            self.snapshots[step] = Snapshot(comp.snapshot(), self.state_commitment, a.epoch)
            for old in sorted(self.snapshots)[:-a.retention]:
                del self.snapshots[old]
            comp.update(global_norm, lr)
            if "on_update" in self.attacks:  # update:skip / update:poison: before the node commits
                self.behaviour.on_update(self.attack_context(step), comp.module, comp.opt,
                                         self.snapshots[step].named)
            self.state_commitment = comp.digest()
            self.completed_step = step
            return self.state_commitment

        digest = await self._compute(update)
        self._grads_for = None
        self._forget_before(step + 1)
        return digest

    async def rollback(self, step: int) -> None:
        """Restore the state this stage held at the start of ``step`` (kept for the retention window)."""
        snap = self.snapshots.get(step)
        if snap is None or self.computation is None:
            raise FailedPrecondition(f"no snapshot of the state at step {step} (kept: {sorted(self.snapshots)})")

        def restore():
            self.computation.load(snap.named)
            for later in [s for s in self.snapshots if s > step]:
                del self.snapshots[later]
            log.warning("rolled back from step %d to the start of step %d", self.completed_step + 1, step)
            self.completed_step = step - 1
            self.state_commitment = snap.commitment

        await self._compute(restore)
        self._grads_for = None

    async def abort(self, step: int) -> None:
        """Drop a failed step's partial work so it can be run again from the same state.

        Waits up to ABORT_WAIT_S for that step to stop running (its RunStep call was cancelled
        just before), and is refused if it still runs then: its gradients and inbox are in use.
        Refusing it would leave the step's received tensors marked as seen, so that the next
        attempt's identical (deterministically signed) streams would be refused as replays.
        """
        if self._running == step:
            try:
                await asyncio.wait_for(self._idle.wait(), ABORT_WAIT_S)
            except asyncio.TimeoutError:
                pass
        if self._running == step:
            raise FailedPrecondition(f"step {step} is still running; it cannot be aborted now")
        if self.computation is not None and step == self.completed_step + 1:
            await self._compute(self.computation.zero_grad)
            self._grads_for = None
            for key in [k for k in self._inbox if k[0] == step]:
                del self._inbox[key]
            for key in [k for k in self._seen if k[0] == step]:
                del self._seen[key]

    async def state_at(self, step: int) -> tuple[dict[str, torch.Tensor], bytes, int]:
        """The stage state at the start of ``step`` (a retained snapshot or the current state),
        its digest and the epoch it began that step in. Names follow ``StageComputation.state``."""
        if self.computation is None:
            raise FailedPrecondition("this node serves no stage")

        def lookup():  # on the compute thread: consistent with apply_update's update()
            if step in self.snapshots:
                snap = self.snapshots[step]
                return snap.named, snap.commitment, snap.epoch
            if step == self.completed_step + 1:
                return self.computation.snapshot(), self.state_commitment, self.assignment.epoch
            return None

        found = await self._compute(lookup)
        if found is None:
            raise FailedPrecondition(f"the state at step {step} is not retained (retained: {sorted(self.snapshots)}, "
                                     f"current {self.completed_step + 1})")
        return found

    def kept_tensor(self, step: int, direction: int, micro_batch: int, sent: bool) -> Kept:
        found = self.kept.get((step, direction, micro_batch, sent))
        if found is None:
            raise NotFound(f"no retained tensor for step {step} micro-batch {micro_batch} direction {direction} "
                           f"({'sent' if sent else 'received'})")
        return found

    def _forget_before(self, next_step: int) -> None:
        for key in [k for k in self._seen if k[0] < next_step]:
            del self._seen[key]
        for key in [k for k in self._inbox if k[0] < next_step]:
            del self._inbox[key]
        retention = self.assignment.retention if self.assignment else DEFAULT_RETENTION
        for key in [k for k in self.kept if k[0] < next_step - retention]:
            del self.kept[key]
        for step in [k for k in self.flags if k < next_step]:
            del self.flags[step]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


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
