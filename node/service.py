"""The Node gRPC service: orders from the coordinator, tensors from neighbours.

Every order is checked against the coordinator's key and addressed to this node; every
tensor's first chunk must carry a header addressed to this node and signed by the neighbour it
names (``claims.tensor_header``) before anything else is read, then goes through
``receive_tensor`` (size, header, digest, signature) and the stage's admission rules before it
is used. Rejections are answered with a precise status, logged, and never disturb the daemon;
one is counted against a sender only when that sender signed the header and the reason is one
an honest sender never gives (``UNCHARGED``, ``ANONYMOUS``), so nobody without a neighbour's key,
and no slow link, adds to what refusal attribution counts. Only a verified neighbour takes a
stream slot: at most half of ``net.max_inflight_streams`` streams per neighbour are received at
once (one more is refused at once, marked busy) and each must finish within the request
timeout, so neither many nor idle streams can pile up buffers, and streams naming a neighbour
without its key never hold a slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

from pipeguard.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    PipeguardError,
    ResourceExhausted,
    Unauthenticated,
    abort_on_error,
)
from pipeguard import claims
from pipeguard.identity import Identity, PublicIdentity
from pipeguard.model import lr_at
from pipeguard.rpc import BUSY, parses_requests_with
from pipeguard.signing import sign
from pipeguard.tensors import parse_chunk, payload_nbytes, receive_tensor, signed_chunks, state_chunks, wire_nbytes
from pipeguard.audit import MAX_FETCH_TENSORS
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from node.membership import Membership
from node.stage import Assignment, StageRuntime

log = logging.getLogger(__name__)


ANONYMOUS = "unknown"
"""``peer_stats`` key of refusals charged to nobody: the stream carried no valid header signature of
the sender it named (an outsider, a forger, junk), so naming a sender proves nothing."""

UNCHARGED = frozenset({"FAILED_PRECONDITION", "ALREADY_EXISTS", "DEADLINE_EXCEEDED"})
"""Refusals of a signed stream that an honest sender gets too, so they are charged to nobody: a
stale or early run, epoch, step or attempt (a late push of an aborted attempt, a retry racing the
next order), a replay (a retry whose first reply was lost), a timeout (a slow link). A busy
refusal (too many streams at once) is not counted at all."""


FETCH_QUEUE = 8
"""State fetches one requester may have waiting or being served here at once; one more is refused
(RESOURCE_EXHAUSTED, marked busy). Each requester's fetches are served one at a time, so a node
flooding ``FetchState`` queues behind itself: at most one copy of the state per requester is
being made or streamed, and the others' fetches (other auditors') go on. The coordinator's own
fetches (checkpoints, exports, the judge) are never queued."""


@dataclass
class PeerStats:
    accepted: int = 0
    rejected: int = 0
    """Refused streams this peer signed the header of, for a reason an honest sender never gives."""
    last_reason: str = ""
    unattributed: int = 0
    """Refused streams this peer signed the header of, for a reason in ``UNCHARGED``."""


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, identity: Identity, runtime: StageRuntime, membership: Membership, max_tensor_bytes: int,
                 chunk_bytes: int, *, max_inflight_streams: int = 16, stream_timeout: float = 30.0,
                 link_mbit: float = 10.0):
        self.identity = identity
        self.chunk_bytes = chunk_bytes
        self.auditor = None
        """node.auditor.NodeAuditor, set by the daemon."""
        self.runtime = runtime
        self.membership = membership
        self.max_tensor_bytes = max_tensor_bytes
        self.epoch = -1
        self.peer_keys: dict[str, PublicIdentity] = {}
        self.peer_stats: dict[str, PeerStats] = defaultdict(PeerStats)
        self.rejected_by_reason: Counter[str] = Counter()
        """Refused tensors by the gRPC status the sender got (for metrics)."""
        self.max_inflight_streams = max_inflight_streams
        self.slots_per_sender = max(1, max_inflight_streams // 2)
        """Streams one neighbour may have in flight at once (its two neighbours share the budget)."""
        self.stream_timeout = stream_timeout
        self.link_mbit = link_mbit
        """``timeouts.link_mbit``: receiving a tensor may take its transfer time at this rate on top of
        ``stream_timeout``."""
        """Seconds an inbound tensor stream may take, so that idle streams cannot hold their slots."""
        self._fetching: dict[str, asyncio.Semaphore] = {}
        """Requester ("" = the coordinator) -> its one state fetch served at a time."""
        self._fetch_queue: Counter[str] = Counter()
        """Requester -> its state fetches waiting or being served (at most ``FETCH_QUEUE``)."""
        self._slots: dict[str, asyncio.Semaphore] = {}
        """Sender -> its stream slots; only a sender whose header signature verified takes one."""

    # -- helpers -------------------------------------------------------------------------------

    def _check_order(self, order, what: str) -> None:
        """An order must be signed by the coordinator we registered with, for this node and run."""
        claims.order(order, self.membership.coordinator_key, node_id=self.identity.node_id,
                     run_id=self.membership.run_id, what=what)

    def heartbeat_stats(self) -> pb.HeartbeatRequest:
        req = pb.HeartbeatRequest(
            tensors_sent=self.runtime.peers.sent,
            tensors_received=sum(s.accepted for s in self.peer_stats.values()),
            tensors_rejected=sum(s.rejected + s.unattributed for s in self.peer_stats.values()),
        )
        for peer, s in sorted(self.peer_stats.items()):
            req.peers.add(peer=peer, accepted=s.accepted, rejected=s.rejected, last_reason=s.last_reason,
                          unattributed=s.unattributed)
        return req

    # -- orders --------------------------------------------------------------------------------

    @abort_on_error
    async def Assign(self, request: pb.AssignRequest, context) -> pb.AssignReply:
        self._check_order(request, "assign")
        if request.epoch <= self.epoch:
            raise FailedPrecondition(f"assignment epoch {request.epoch} is not newer than {self.epoch}")
        a = Assignment.from_request(request)
        keys = {}
        for peer in (a.prev, a.next):
            if peer is not None:
                keys[peer.node_id] = claims.peer_key(peer, unbound=InvalidArgument)
        dataset = await self.membership.dataset(request.data_digest)
        digest, n = await self.runtime.assign(a, dataset, request.start_step)
        self.epoch = request.epoch
        self.peer_keys = keys
        return pb.AssignReply(state_digest=digest, num_params=n)

    @abort_on_error
    async def RunStep(self, request: pb.RunStepRequest, context) -> pb.StepReport:
        self._check_order(request, "run-step")
        self._check_epoch(request.epoch)
        report = await self.runtime.run_step(request.step, request.attempt)
        return sign(report, self.identity)

    @abort_on_error
    async def ApplyUpdate(self, request: pb.ApplyUpdateRequest, context) -> pb.UpdateReport:
        self._check_order(request, "apply-update")
        self._check_epoch(request.epoch)
        a = self.runtime.assignment
        assert a is not None
        expected_lr = lr_at(request.step, a.setup.optim)
        if not abs(request.lr - expected_lr) <= 1e-12 * max(1.0, expected_lr):  # NaN fails this too
            raise InvalidArgument(f"lr {request.lr} for step {request.step} does not follow the schedule ({expected_lr})")
        digest = await self.runtime.apply_update(request.step, request.global_grad_norm, request.lr, request.attempt)
        report = pb.UpdateReport(run_id=a.run_id, step=request.step, stage=a.stage, node_id=self.identity.node_id,
                                 state_digest=digest, epoch=a.epoch, attempt=request.attempt,
                                 assignment_digest=a.digest)
        return sign(report, self.identity)

    @abort_on_error
    async def AbortStep(self, request: pb.AbortStepRequest, context) -> pb.Ack:
        self._check_order(request, "abort-step")
        self._check_epoch(request.epoch)
        await self.runtime.abort(request.step, request.attempt)
        return pb.Ack()

    async def _check_fetch(self, request, what: str) -> None:
        """Retained data goes to the coordinator and to registered, non-banned nodes only."""
        if request.node_id != self.identity.node_id:
            raise InvalidArgument(f"{what} request is addressed to {request.node_id!r}, not this node")
        if request.requester:
            if request.requester in self.runtime.banned:
                raise PermissionDenied(f"{request.requester} is banned")
            key = self.membership.members.get(request.requester)
            if key is None:  # it may have registered since our last heartbeat: ask once
                await self.membership.refresh()
                key = self.membership.members.get(request.requester)
            if key is None:
                raise Unauthenticated(f"{request.requester!r} is not a registered node")
        else:
            key = self.membership.coordinator_key
            if key is None:
                raise FailedPrecondition("not registered with a coordinator yet")
        claims.fetch_request(request, key, what=f"{what} request")
        if request.run_id != self.membership.run_id:
            raise FailedPrecondition(f"{what} request is for run {request.run_id!r}")

    @abort_on_error
    async def FetchState(self, request: pb.FetchStateRequest, context):
        await self._check_fetch(request, "fetch-state")
        a = self.runtime.assignment
        if a is None or a.stage != request.stage:
            raise FailedPrecondition(f"this node does not serve stage {request.stage}")
        who = request.requester
        if not who:  # the coordinator's own (signed) fetches: checkpoints, exports, the judge's audits
            return await self._serve_state(request, a, context)
        if self._fetch_queue[who] >= FETCH_QUEUE:
            context.set_trailing_metadata((BUSY,))
            raise ResourceExhausted(f"{FETCH_QUEUE} state fetches of {who[:8] or 'the coordinator'} already "
                                    "waiting here; retry shortly")
        self._fetch_queue[who] += 1
        try:
            async with self._fetching.setdefault(who, asyncio.Semaphore(1)):
                await self._serve_state(request, a, context)
        finally:
            self._fetch_queue[who] -= 1

    async def _serve_state(self, request: pb.FetchStateRequest, a: Assignment, context) -> None:
        named, digest, epoch = await self.served_state(request)
        items = [(n, t) for n, t in named.items() if request.include_optimizer or n.startswith("param/")]
        chunks = state_chunks(items, a.stage, request.step, self.chunk_bytes)
        for chunk in chunks:
            await self._write(context, chunk)
        attestation = sign(pb.StateAttestation(run_id=a.run_id, node_id=self.identity.node_id, stage=a.stage,
                                               step=request.step, state_digest=digest, epoch=epoch), self.identity)
        await self._write(context, pb.StateChunk(attestation=attestation, stage=a.stage))

    async def _write(self, context, chunk) -> None:
        """One chunk of a served stream; a requester that reads nothing for the request timeout is
        dropped (DEADLINE_EXCEEDED), so an unread stream holds its slot and its copy no longer."""
        try:
            await asyncio.wait_for(context.write(chunk), self.stream_timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the requester read nothing for {self.stream_timeout:g}s") from None

    @abort_on_error
    async def FetchTensor(self, request: pb.FetchTensorRequest, context):
        await self._check_fetch(request, "fetch-tensor")
        if len(request.more) >= MAX_FETCH_TENSORS:
            raise InvalidArgument(f"fetch-tensor request names {len(request.more) + 1} tensors; at most "
                                  f"{MAX_FETCH_TENSORS} per call")
        # every tensor named is looked up before any is sent: all of them or an error, never part
        served = [self.served_tensor(request)]
        for ref in request.more:
            one = pb.FetchTensorRequest()
            one.CopyFrom(request)
            one.ClearField("more")
            one.micro_batch, one.direction, one.sent = ref.micro_batch, ref.direction, ref.sent
            served.append(self.served_tensor(one))
        for commitment, tensor in served:
            if request.commitment_only:
                await self._write(context, pb.TensorChunk(header=commitment.header, payload_digest=commitment.payload_digest,
                                                          signature=commitment.signature))
                continue
            for chunk in signed_chunks(commitment, tensor, self.chunk_bytes):
                await self._write(context, chunk)

    @abort_on_error
    async def Audit(self, request: pb.AuditRequest, context) -> pb.AuditVerdict:
        claims.audit_order(request, self.membership.coordinator_key, auditor=self.identity.node_id)
        if self.auditor is None:
            raise FailedPrecondition("this node does not audit")
        remaining = context.time_remaining()  # None without a deadline
        return await self.auditor.audit(request, remaining)

    async def served_state(self, request: pb.FetchStateRequest):
        """(named state, digest, epoch) served for a FetchState that passed its checks."""
        return await self.runtime.state_at(request.step)

    def served_tensor(self, request: pb.FetchTensorRequest):
        """(commitment, tensor) served for a FetchTensor that passed its checks."""
        kept = self.runtime.kept_tensor(request.step, request.direction, request.micro_batch, request.sent)
        return kept.commitment, kept.tensor

    def accept(self, rt) -> None:
        """Take a fully verified tensor into the stage (node/seams.py shows it to an attacker too)."""
        self.runtime.deliver(rt)

    def _check_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            raise FailedPrecondition(f"order for assignment epoch {epoch}, this node holds epoch {self.epoch}")

    # -- tensors -------------------------------------------------------------------------------

    @abort_on_error
    @parses_requests_with(parse_chunk)  # chunks arrive as WireChunks: the payload is not copied
    async def PushTensor(self, request_iterator, context) -> pb.PushReply:
        return await self._receive(request_iterator, context)

    def slots_of(self, sender: str) -> asyncio.Semaphore:
        """Streams ``sender`` may have in flight here at once: half of ``net.max_inflight_streams``
        (at least one) each, so one neighbour cannot crowd out the other."""
        if sender not in self._slots:
            self._slots[sender] = asyncio.Semaphore(self.slots_per_sender)
        return self._slots[sender]

    async def _first_chunk(self, stream) -> pb.TensorChunk:
        """The stream's first chunk, whose header must name this node and be signed by the
        neighbour it names (``claims.tensor_header``); nothing is charged to anyone before that."""
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.stream_timeout)
        except StopAsyncIteration:
            raise InvalidArgument("empty tensor stream") from None
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no first chunk after {self.stream_timeout:g}s") from None
        if not first.HasField("header"):
            raise InvalidArgument("first chunk of a tensor stream must carry the header")
        header = first.header
        if header.receiver != self.identity.node_id:  # a stream for someone else (or replayed from there)
            raise InvalidArgument(f"tensor is addressed to {header.receiver!r}, not this node")
        if self.runtime.assignment is None:
            raise FailedPrecondition("this node serves no stage")
        key = self.peer_keys.get(header.sender)
        if key is None:
            raise Unauthenticated(f"unknown sender {header.sender!r}")
        claims.tensor_header(header, first.header_signature, key)
        return first

    async def _receive(self, request_iterator, context=None) -> pb.PushReply:
        """Receive one tensor stream. A refusal is charged (``PeerStats.rejected``, which refusal
        attribution counts) only to a sender whose signature over the header verified, and only for
        what an honest sender never does; refusals an honest but slow or retrying sender also gets
        (``UNCHARGED``) are noted as ``unattributed``; the rest are nobody's (``ANONYMOUS``)."""
        stream = request_iterator.__aiter__()
        signer = ""  # the sender whose header signature verified
        busy = False

        async def chunks(first: pb.TensorChunk):
            yield first
            async for chunk in stream:
                yield chunk

        def admit(header: pb.TensorHeader) -> PublicIdentity:
            return self.runtime.admit(header, self.peer_keys)

        try:
            first = await self._first_chunk(stream)
            signer = first.header.sender
            slots = self.slots_of(signer)
            if slots.locked():  # refuse now rather than queue another stream's buffers
                busy = True
                if context is not None:
                    context.set_trailing_metadata((BUSY,))
                raise ResourceExhausted(f"{self.slots_per_sender} tensor streams from {signer[:8]} already in "
                                        "flight; retry shortly")
            async with slots:
                # The claimed size (bounded by max_tensor_bytes) at the slowest link allowed for.
                claimed = min(payload_nbytes(first.header.dtype, first.header.shape), self.max_tensor_bytes)
                limit = self.stream_timeout + claimed * 8 / (self.link_mbit * 1e6)
                try:
                    rt = await asyncio.wait_for(
                        receive_tensor(chunks(first), max_tensor_bytes=self.max_tensor_bytes, admit=admit), limit)
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(f"tensor stream not complete after {limit:g}s") from None
                self.accept(rt)
        except PipeguardError as exc:
            if busy:  # momentary, and the sender retries: nobody's fault, not even a refusal to count
                raise
            self.rejected_by_reason[exc.code.name] += 1
            if not signer:
                stats = self.peer_stats[ANONYMOUS]
                stats.rejected += 1
            elif exc.code.name in UNCHARGED:
                stats = self.peer_stats[signer]
                stats.unattributed += 1
            else:
                stats = self.peer_stats[signer]
                stats.rejected += 1
            stats.last_reason = exc.code.name
            raise
        self.peer_stats[rt.commitment.header.sender].accepted += 1
        return pb.PushReply(received_bytes=wire_nbytes(rt.tensor))
