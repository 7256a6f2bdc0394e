"""The Coordinator gRPC service: registration, heartbeats, dataset, status, events, operator orders."""

from __future__ import annotations

import asyncio
import logging
import time

from pipeguard.computation import describe_build
from pipeguard.config import to_toml
from pipeguard.data import Dataset
from pipeguard.errors import (DeadlineExceeded, FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted,
                              Unauthenticated, abort_on_error)
from pipeguard.identity import Identity
from pipeguard import claims
from pipeguard.signing import sign
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from coordinator.admin import Admin
from coordinator.clock import StepClock
from coordinator.config import CoordinatorConfig
from coordinator.registry import Registry
from coordinator.state import WATCH_BACKLOG, EventLog

log = logging.getLogger(__name__)

DEFAULT_HISTORY = 50
"""Losses and events a StatusRequest with history 0 gets (documented in the proto)."""
RESUME_TRAILER = "pipeguard-after-seq"
"""Trailing metadata of a Watch stream ended because the watcher fell behind: the after_seq to resume with."""


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, cfg: CoordinatorConfig, identity: Identity, registry: Registry, clock: StepClock,
                 events: EventLog, dataset: Dataset, admin: Admin | None = None):
        self.cfg = cfg
        self.identity = identity
        self.registry = registry
        self.clock = clock
        self.events = events
        self.dataset = dataset
        self.admin = admin
        """Checks the token of operator orders; None refuses them all."""
        self._exporting = asyncio.Lock()
        """Held while an ExportState is served (one at a time)."""

    @abort_on_error
    async def Hello(self, request: pb.HelloRequest, context) -> pb.HelloReply:
        reply = pb.HelloReply(coordinator_key=self.identity.public_key, run_id=self.clock.state.run_id,
                              challenge=self.registry.issue_challenge(), client_nonce=request.client_nonce[:64])
        return sign(reply, self.identity)

    @abort_on_error
    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterReply:
        rec, is_new = self.registry.register(request)
        what = "registered" if is_new else "re-registered"
        self.events.emit("node_registered", f"node {rec.node_id[:8]} {what} from {rec.address}", node_id=rec.node_id)
        self.clock.persist()
        self.clock.membership_changed.set()
        return pb.RegisterReply(node_id=rec.node_id, run_id=self.clock.state.run_id,
                                heartbeat_interval_ms=int(self.cfg.timeouts.heartbeat_interval * 1000))

    @abort_on_error
    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        was_offline = request.node_id in self.registry.nodes and \
            self.registry.nodes[request.node_id].role == pb.ROLE_OFFLINE
        rec = self.registry.heartbeat(request)
        if was_offline:
            if rec in self.clock.pipeline and rec.stage >= 0:  # it never stopped serving its stage
                rec.role = pb.ROLE_STAGE
            what = f"stage {rec.stage}" if rec.role == pb.ROLE_STAGE else "standby"
            self.events.emit("node_back", f"node {rec.node_id[:8]} is back ({what})", node_id=rec.node_id)
            self.clock.node_back(rec)
        members, encoded, banned = self.registry.members()
        version = self.registry.members_version
        reply = pb.HeartbeatReply(role=rec.role, stage=max(rec.stage, 0), step=self.clock.state.step,
                                  banned=banned, seq=request.seq, members_version=version)
        if request.members_version == version:  # the node's copy is current: O(1), not O(nodes)
            return sign(reply, self.identity)
        reply.members.extend(members)
        return sign(reply, self.identity, preencoded={"members": encoded})  # encoded once per version

    @abort_on_error
    async def FetchData(self, request: pb.FetchDataRequest, context):
        if request.digest != self.dataset.digest:
            raise NotFound(f"this run's dataset is {self.dataset.digest.hex()[:16]}…, not {request.digest.hex()[:16]}…")
        blob, step = self.dataset.blob, self.cfg.net.chunk_bytes
        for start in range(0, len(blob), step):
            chunk = pb.DataChunk(data=blob[start : start + step])
            if start == 0:
                chunk.val_offset, chunk.total_bytes = self.dataset.val_offset, len(blob)
            await context.write(chunk)

    @abort_on_error
    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        return self.status(request.history or DEFAULT_HISTORY)

    def status(self, history: int) -> pb.StatusReply:
        st = self.clock.state
        reply = pb.StatusReply(run_id=st.run_id, phase=st.phase, step=st.step, total_steps=self.cfg.train.steps,
                               num_stages=self.cfg.pipeline.stages, coordinator_key=self.identity.public_key,
                               coordinator_key_hex=self.identity.public_key.hex(),
                               config_toml=to_toml(self.cfg), audit_rate=self.cfg.audit.rate)
        reply.model.CopyFrom(self.cfg.model_spec())
        now = time.monotonic()
        a = self.clock.audits.stats if self.clock.audits is not None else None
        for rec in sorted(self.registry.nodes.values(), key=lambda r: (r.stage < 0, r.stage, r.registered_at)):
            holds = rec.stage >= 0 and rec.role in (pb.ROLE_STAGE, pb.ROLE_OFFLINE)  # NodeStatus.stage's presence
            reply.nodes.add(
                node_id=rec.node_id, address=rec.address, role=rec.role, stage=rec.stage if holds else None,
                heartbeat_age_s=now - rec.last_heartbeat if rec.last_heartbeat else -1.0,
                tensors_sent=rec.tensors_sent, tensors_received=rec.tensors_received,
                tensors_rejected=rec.tensors_rejected, rejected_by_peers=self.registry.rejected_count(rec.node_id),
                ban_reason=rec.ban_reason, distrusted=self.clock.state.distrusted.get(rec.node_id, ""),
                build=describe_build(rec.build) if rec.build.torch_version else "",
                audits_passed=a.passed.get(rec.node_id, 0) if a else 0,
                audits_failed=a.failed.get(rec.node_id, 0) if a else 0,
                audits_done=a.performed.get(rec.node_id, 0) if a else 0,
            )
        if a is not None:
            reply.audits_total = a.dispatched
            reply.detections = a.detections
            reply.max_audit_lag_steps = a.max_lag
            reply.audit_wait_s = a.waited_s
            reply.audits_pending = len(self.clock.audits.pending) if self.clock.audits is not None else 0
        reply.evidence.extend(st.evidence)
        for step, loss, tps in st.losses[-history:]:
            reply.losses.add(step=step, loss=loss, tokens_per_s=tps)
        reply.events.extend(list(self.events.recent)[-history:])
        return reply

    @abort_on_error
    async def FetchCheckpoint(self, request: pb.FetchCheckpointRequest, context):
        rec = self.registry.nodes.get(request.requester)
        if rec is None:
            raise Unauthenticated(f"{request.requester!r} is not a registered node")
        claims.fetch_request(request, rec.identity, what="checkpoint request")
        if rec.role == pb.ROLE_BANNED:
            raise PermissionDenied(f"node {rec.node_id} is banned")
        if request.run_id != self.clock.state.run_id:
            raise FailedPrecondition(f"checkpoint request is for run {request.run_id!r}")
        if request.step not in self.clock.checkpoints.steps():
            raise NotFound(f"no checkpoint at step {request.step} (have {self.clock.checkpoints.steps()})")
        for chunk in self.clock.checkpoints.chunks(request.step, request.stage):
            await context.write(chunk)

    @abort_on_error
    async def ExportState(self, request: pb.ExportRequest, context):
        # Unauthenticated: one export at a time, and a client that stops reading is dropped after
        # timeouts.request per chunk (the states were fetched under the step lock, which it never holds).
        if self._exporting.locked():
            raise ResourceExhausted("an export is already being served; retry when it has finished")
        async with self._exporting:
            async for chunk in self.clock.export_state(request.include_optimizer):
                try:
                    await asyncio.wait_for(context.write(chunk), self.cfg.timeouts.request)
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(f"export client read nothing for {self.cfg.timeouts.request:g}s") from None

    # -- operator orders (admin token) -----------------------------------------------------------

    def _authorize(self, context, operator: str) -> tuple[Admin, str]:
        if self.admin is None:
            raise PermissionDenied("operator orders are turned off on this coordinator")
        return self.admin, self.admin.authorize(context, operator)

    @abort_on_error
    async def Ban(self, request: pb.BanRequest, context) -> pb.AdminReply:
        admin, who = self._authorize(context, request.operator)
        return admin.ban(request.node_id, request.reason, who)

    @abort_on_error
    async def Unban(self, request: pb.UnbanRequest, context) -> pb.AdminReply:
        admin, who = self._authorize(context, request.operator)
        return admin.unban(request.node_id, who)

    @abort_on_error
    async def StopRun(self, request: pb.StopRunRequest, context) -> pb.AdminReply:
        admin, who = self._authorize(context, request.operator)
        return await admin.stop_run(who)

    @abort_on_error
    async def SetAuditRate(self, request: pb.SetAuditRateRequest, context) -> pb.AdminReply:
        admin, who = self._authorize(context, request.operator)
        return admin.set_audit_rate(request.rate, who)

    @abort_on_error
    async def Watch(self, request: pb.WatchRequest, context):
        """Retained events after ``after_seq``, then live ones; never ends OK (see WatchRequest)."""
        queue = self.events.subscribe()  # before the replay, so nothing falls in between
        last = request.after_seq
        try:
            for ev in list(self.events.recent):
                if ev.seq > last:
                    await context.write(ev)
                    last = ev.seq
            while True:
                ev = await queue.get()
                if ev is None:  # fell behind: the events it had queued are sent, the rest is for a resume
                    context.set_trailing_metadata(((RESUME_TRAILER, str(last)),))
                    raise ResourceExhausted(
                        f"this watcher fell more than {WATCH_BACKLOG} events behind and was cut off after event "
                        f"{last}; call Watch again with after_seq={last} to continue")
                if ev.seq > last:
                    await context.write(ev)
                    last = ev.seq
        finally:
            self.events.unsubscribe(queue)
