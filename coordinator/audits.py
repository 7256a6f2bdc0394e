"""Audit scheduling and judgement: commit, then challenge; confirm before any ban.

After every stage has returned its signed StepReport for a step (so every tensor of the step
is committed), ``select`` draws audit targets from the operating system's CSPRNG: each
stage's output for each micro-batch, forward and backward, with probability ``audit.rate``,
each stage's optimizer update with the same probability, plus every message a receiver's
screen flagged. Each audit goes to a node other than the audited one, preferring standbys,
then stages that are not its neighbours; with nobody available, or when the auditor fails to
answer (crashed, silent, refused), the coordinator audits itself.

A FAIL verdict never bans by itself: the coordinator gathers the same artifacts and recomputes
them. Confirmed: the audited node is banned and an evidence bundle is written. Refuted: the
auditor lied, and it is banned instead, with a bundle proving that.

A PASS verdict is re-checked the same way for a random ``audit.recheck_rate`` of audits, and
always when the audited message was screen-flagged. A PASS that the recomputation contradicts
(beyond ``FALSE_CLEARANCE_MARGIN`` times the tolerance, so that no honest auditor's rounding
can be blamed) bans both the audited node (``audit`` bundle) and the auditor that cleared it
(``false-clearance`` bundle): an auditor covering for an accomplice.

Before anyone is convicted on a failed recomputation, the judge fetches every tensor it used
from both of its holders (the sender's sent copy and the receiver's received copy): two
different versions validly signed by the same sender are equivocation, and it is the sender,
not the audited node that computed on what it was given, who is banned.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from pipeguard import audit, evidence
from pipeguard.data import Dataset
from pipeguard.errors import PipeguardError, from_rpc_error
from pipeguard.identity import Identity, PublicIdentity
from pipeguard.signing import sign, verify
from pipeguard.v1 import pipeguard_pb2 as pb
from coordinator.registry import NodeRecord, Registry
from coordinator.state import EventLog

log = logging.getLogger(__name__)

@dataclass
class StepRecord:
    """What the coordinator knows of one step, for building audit orders."""

    step: int
    epoch: int
    nodes: list[NodeRecord]
    slots: list[int]
    reports: list[pb.StepReport]
    update_orders: list[pb.ApplyUpdateRequest] = field(default_factory=list)
    update_reports: list[pb.UpdateReport] = field(default_factory=list)


@dataclass
class AuditStats:
    dispatched: int = 0
    passed: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    performed: dict[str, int] = field(default_factory=dict)
    detections: int = 0
    incomplete: int = 0
    rechecked: int = 0
    """PASS verdicts the coordinator recomputed itself."""


class AuditScheduler:
    def __init__(self, *, identity: Identity, registry: Registry, events: EventLog, dataset: Dataset,
                 evidence_dir: Path, rate: float, tolerance: float, screen: bool, timeout: float,
                 max_tensor_bytes: int, stub_for: Callable[[str], object],
                 convict: Callable[[str, int, str, Path], None], recheck_rate: float = 0.0):
        self.identity = identity
        self.registry = registry
        self.events = events
        self.dataset = dataset
        self.evidence_dir = Path(evidence_dir)
        self.rate = rate
        self.tolerance = tolerance
        self.screen = screen
        self.recheck_rate = recheck_rate
        self.flagged_ids: set[int] = set()
        """Audits drawn because a receiver's screen flagged the message: a PASS is always re-checked."""
        self.timeout = timeout
        self.max_tensor_bytes = max_tensor_bytes
        self.stub_for = stub_for
        self.convict = convict
        self.rng = secrets.SystemRandom()
        self.stats = AuditStats()
        self.next_id = 1
        self.pending: dict[int, tuple[int, asyncio.Task]] = {}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeguard-judge")
        self._convicting: set[str] = set()
        """Nodes whose conviction is being written: one bundle per ban."""
        self.run_id = ""
        self.model_spec = pb.ModelSpec()
        self.train_spec = pb.TrainSpec()
        self.num_stages = 0
        self.data_digest = b""

    # -- choosing -----------------------------------------------------------------------------

    def select(self, rec: StepRecord) -> list[pb.AuditRequest]:
        """Draw this step's forward/backward audits. Call only once every report of the step is in."""
        out = []
        flagged: set[tuple[int, int, int]] = set()  # (sender position, direction, micro-batch)
        for pos, report in enumerate(rec.reports):
            for f in report.flags if self.screen else []:
                sender = pos - 1 if f.direction == pb.DIRECTION_FORWARD else pos + 1
                if 0 <= sender < len(rec.nodes):
                    flagged.add((sender, f.direction, f.micro_batch))
        last = len(rec.nodes) - 1
        M = self.train_spec.micro_batches
        for pos in range(len(rec.nodes)):
            for mb in range(M):
                for ok, direction, kind in ((pos < last, pb.DIRECTION_FORWARD, pb.AUDIT_KIND_FORWARD),
                                            (pos > 0, pb.DIRECTION_BACKWARD, pb.AUDIT_KIND_BACKWARD)):
                    if not ok:
                        continue
                    is_flagged = (pos, direction, mb) in flagged
                    if is_flagged or self.rng.random() < self.rate:
                        out.append(self._request(rec, pos, kind, mb))
                        if is_flagged:
                            self.flagged_ids.add(out[-1].audit_id)
        return out

    def select_updates(self, rec: StepRecord) -> list[pb.AuditRequest]:
        """Draw this step's update audits, once every stage has committed to its new state."""
        return [self._request(rec, pos, pb.AUDIT_KIND_UPDATE, 0)
                for pos in range(len(rec.nodes)) if self.rng.random() < self.rate]

    def _request(self, rec: StepRecord, pos: int, kind: int, mb: int) -> pb.AuditRequest:
        node = rec.nodes[pos]
        req = pb.AuditRequest(run_id=self.run_id, audit_id=self.next_id, kind=kind, step=rec.step,
                              stage=rec.slots[pos], micro_batch=mb, num_stages=self.num_stages,
                              model=self.model_spec, train=self.train_spec, data_digest=self.data_digest,
                              report=rec.reports[pos], tolerance=self.tolerance, epoch=rec.epoch)
        self.next_id += 1
        req.target.CopyFrom(_peer(node, rec.slots[pos]))
        if pos > 0:
            req.prev.CopyFrom(_peer(rec.nodes[pos - 1], rec.slots[pos - 1]))
        if pos < len(rec.nodes) - 1:
            req.next.CopyFrom(_peer(rec.nodes[pos + 1], rec.slots[pos + 1]))
        if kind == pb.AUDIT_KIND_UPDATE:
            req.update.CopyFrom(rec.update_orders[pos])
            req.update_report.CopyFrom(rec.update_reports[pos])
        if pos == 0 or pos == len(rec.nodes) - 1:
            req.tokens_digest = audit.tokens_digest(audit.tokens_for(req, self.dataset))
        return req

    def _choose_auditor(self, req: pb.AuditRequest) -> NodeRecord | None:
        neighbours = {req.prev.node_id, req.next.node_id}
        alive = [r for r in self.registry.nodes.values()
                 if r.node_id != req.target.node_id and self.registry.is_alive(r)]
        tiers = [
            [r for r in alive if r.role == pb.ROLE_STANDBY],
            [r for r in alive if r.role == pb.ROLE_STAGE and r.node_id not in neighbours],
            [r for r in alive if r.role == pb.ROLE_STAGE],
        ]
        for tier in tiers:
            if tier:
                return self.rng.choice(tier)
        return None

    # -- running ------------------------------------------------------------------------------

    def launch(self, requests: list[pb.AuditRequest]) -> None:
        for req in requests:
            self.stats.dispatched += 1
            task = asyncio.create_task(self._run(req))
            self.pending[req.audit_id] = (req.step, task)
            task.add_done_callback(self._done(req.audit_id))

    def _done(self, audit_id: int) -> Callable[[asyncio.Task], None]:
        def forget(_task: asyncio.Task) -> None:
            self.pending.pop(audit_id, None)
            self.flagged_ids.discard(audit_id)
        return forget

    async def drain(self, upto_step: int) -> None:
        """Wait for every audit of a step <= ``upto_step`` (their evidence is about to expire)."""
        waiting = [t for s, t in list(self.pending.values()) if s <= upto_step]
        if waiting:
            await asyncio.wait(waiting)  # a step given up while waiting must not cancel its audits

    def cancel_from(self, step: int) -> None:
        """Forget audits of steps >= ``step`` (that history was rolled back)."""
        for s, task in list(self.pending.values()):
            if s >= step:
                task.cancel()

    async def close(self) -> None:
        for _, task in list(self.pending.values()):
            task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, req: pb.AuditRequest) -> None:
        try:
            auditor = self._choose_auditor(req)
            if auditor is None:  # nobody else: the coordinator audits (its order is signed all the same)
                sign(req, self.identity)
                await self._judge(req, None)
                return
            req.auditor = auditor.node_id
            sign(req, self.identity)
            try:
                verdict = await self.stub_for(auditor.address).Audit(req, timeout=self.timeout)
            except grpc.aio.AioRpcError as err:
                # The auditor crashed, went silent or refused: the audit is not dropped (that
                # would let a crash, or a well-timed one, leave a message unchecked); the
                # coordinator recomputes it itself.
                self.events.emit("audit_error", f"audit {req.audit_id} by {auditor.node_id[:8]} failed: "
                                 f"{from_rpc_error(err)}; the coordinator audits it itself",
                                 node_id=auditor.node_id, step=req.step, persist=False)
                await self._judge(req, None)
                return
            verify(verdict, auditor.identity, what="audit verdict")
            if (verdict.audit_id, verdict.auditor, verdict.run_id) != (req.audit_id, auditor.node_id, req.run_id):
                raise PipeguardError("verdict does not answer this audit")
            self.stats.performed[auditor.node_id] = self.stats.performed.get(auditor.node_id, 0) + 1
            if verdict.verdict == pb.VERDICT_PASS:
                flagged = req.audit_id in self.flagged_ids
                if flagged or self.rng.random() < self.recheck_rate:
                    await self._recheck(req, verdict, "screen-flagged message" if flagged else "random re-check")
                else:
                    self._passed(req)
            elif verdict.verdict == pb.VERDICT_FAIL:
                if self._banned(req.target.node_id):
                    return  # already convicted: one bundle per ban is enough
                self.events.emit("audit_failed", f"auditor {auditor.node_id[:8]} reports {req.target.node_id[:8]} "
                                 f"at step {req.step} stage {req.stage}: {verdict.detail}; confirming",
                                 node_id=req.target.node_id, step=req.step)
                await self._judge(req, verdict)
            else:
                self.stats.incomplete += 1
                self.events.emit("audit_incomplete", f"audit {req.audit_id} of {req.target.node_id[:8]}: "
                                 f"{verdict.detail}", node_id=req.target.node_id, step=req.step, persist=False)
        except asyncio.CancelledError:
            raise
        except PipeguardError as exc:
            self.stats.incomplete += 1
            self.events.emit("audit_error", f"audit {req.audit_id}: {exc}", step=req.step, persist=False)
        except Exception:  # noqa: BLE001 - an audit bug must not take the coordinator down
            log.exception("audit %d crashed", req.audit_id)

    async def _equivocation(self, req: pb.AuditRequest, verdict: pb.AuditVerdict, art: audit.Artifacts) -> bool:
        """Did a node show the auditor other signed data than it showed us? Then that is the fault."""
        keys = {p.node_id: p.public_key for p in (req.target, req.prev, req.next) if p.node_id}
        for theirs, ours in audit.contradictions(verdict, art):
            signer = theirs.header.sender if isinstance(theirs, pb.TensorCommitment) else theirs.node_id
            key = keys.get(signer)
            if key is None:
                continue
            try:
                verify(theirs, PublicIdentity(key), what="claim in the auditor's verdict")
            except PipeguardError:
                continue  # a forged claim in a verdict proves nothing against its "signer"
            await self._convict_equivocation(
                req, signer, key, theirs, ours, "tensor" if isinstance(theirs, pb.TensorCommitment) else "state")
            return True
        return False

    def _passed(self, req: pb.AuditRequest) -> None:
        t = req.target.node_id
        self.stats.passed[t] = self.stats.passed.get(t, 0) + 1

    def _banned(self, node_id: str) -> bool:
        rec = self.registry.nodes.get(node_id)
        return node_id in self._convicting or (rec is not None and rec.role == pb.ROLE_BANNED)

    async def _confirm(self, req: pb.AuditRequest, verdict: pb.AuditVerdict | None
                       ) -> tuple[audit.Artifacts, audit.Finding] | None:
        """Gather and recompute what ``req`` audits, as the judge. None when there is nothing left
        to decide: the audit could not be completed, or an equivocating signer was convicted."""
        fetcher = audit.RpcFetcher(self.identity, "", self.stub_for, req.run_id, self.max_tensor_bytes, self.timeout,
                                   req.epoch)
        try:
            art = await audit.gather(req, fetcher)
        except PipeguardError as exc:
            self.stats.incomplete += 1
            self.events.emit("audit_incomplete", f"cannot confirm audit {req.audit_id}: {exc}",
                             node_id=req.target.node_id, step=req.step)
            return None
        if verdict is not None and await self._equivocation(req, verdict, art):
            return None
        if art.needs_tokens():
            art.fill_tokens(self.dataset)
            audit.check_tokens(art)
        finding = await asyncio.get_running_loop().run_in_executor(self.executor, audit.check, art)
        if finding.verdict == pb.VERDICT_FAIL:
            # Before convicting anyone: a sender that signed two versions of a tensor it sent
            # (one to its receiver, another to auditors) is the one banned.
            for sender, theirs, ours in await audit.cross_holders(req, art, fetcher):
                await self._convict_equivocation(req, sender.node_id, sender.public_key, theirs, ours, "tensor")
                return None
        return art, finding

    async def _convict_equivocation(self, req: pb.AuditRequest, signer: str, key: bytes, theirs, ours,
                                    what: str) -> None:
        if self._banned(signer):
            return
        self._convicting.add(signer)
        path = self.evidence_dir / f"step{req.step:06d}-audit{req.audit_id}-equivocation-{signer[:8]}.pgev"
        await asyncio.get_running_loop().run_in_executor(
            self.executor, evidence.write_equivocation_bundle, path, theirs, ours, key)
        self.stats.detections += 1
        self.stats.failed[signer] = self.stats.failed.get(signer, 0) + 1
        self.convict(signer, req.step, f"equivocation: signed two different versions of the same {what} "
                     f"(audit {req.audit_id})", path)

    async def _convict_target(self, req: pb.AuditRequest, art: audit.Artifacts, finding: audit.Finding) -> bool:
        target = req.target.node_id
        if self._banned(target):
            return False
        self._convicting.add(target)
        self.stats.failed[target] = self.stats.failed.get(target, 0) + 1
        self.stats.detections += 1
        path = self.evidence_dir / f"step{req.step:06d}-audit{req.audit_id}-{target[:8]}.pgev"
        await asyncio.get_running_loop().run_in_executor(self.executor, evidence.write_audit_bundle, path, art,
                                                         finding, self.identity.public_key)
        self.convict(target, req.step, f"{audit.KIND_NAMES[req.kind]} audit at step {req.step}: "
                     f"{finding.detail}", path)
        return True

    async def _judge(self, req: pb.AuditRequest, verdict: pb.AuditVerdict | None) -> None:
        """The coordinator's own recomputation: the only thing that can lead to a ban."""
        if self._banned(req.target.node_id):
            return
        confirmed = await self._confirm(req, verdict)
        if confirmed is None:
            return
        art, finding = confirmed
        target = req.target.node_id
        if finding.verdict == pb.VERDICT_FAIL:
            await self._convict_target(req, art, finding)
        elif verdict is not None and finding.verdict == pb.VERDICT_PASS:
            liar = verdict.auditor
            self._passed(req)
            if self._banned(liar):
                return
            self._convicting.add(liar)
            path = self.evidence_dir / f"step{req.step:06d}-audit{req.audit_id}-false-accusation-{liar[:8]}.pgev"
            rec = self.registry.nodes[liar]
            await asyncio.get_running_loop().run_in_executor(self.executor, lambda: evidence.write_audit_bundle(
                path, art, finding, self.identity.public_key, false_verdict=verdict, auditor_key=rec.public_key))
            self.convict(liar, -1, f"false accusation against {target[:8]} in audit {req.audit_id}", path)
        else:
            self._passed(req)

    async def _recheck(self, req: pb.AuditRequest, verdict: pb.AuditVerdict, why: str) -> None:
        """Recompute an audit an auditor signed PASS for. If the recomputation fails it clearly
        (beyond ``FALSE_CLEARANCE_MARGIN`` x tolerance), the audited node cheated and the auditor
        covered for it: both are banned, each with its own bundle."""
        self.stats.rechecked += 1
        if self._banned(req.target.node_id):
            return
        confirmed = await self._confirm(req, verdict)
        if confirmed is None:
            return
        art, finding = confirmed
        if finding.verdict != pb.VERDICT_FAIL:
            self._passed(req)
            return
        target, liar = req.target.node_id, verdict.auditor
        self.events.emit("audit_failed", f"re-check ({why}) of audit {req.audit_id} contradicts the PASS signed by "
                         f"{liar[:8]}: {finding.detail}", node_id=target, step=req.step)
        await self._convict_target(req, art, finding)
        if not evidence.clearly_fails(finding, req.tolerance) or self._banned(liar):
            return  # within rounding of the tolerance: an honest auditor may have seen a pass
        self._convicting.add(liar)
        rec = self.registry.nodes[liar]
        path = self.evidence_dir / f"step{req.step:06d}-audit{req.audit_id}-false-clearance-{liar[:8]}.pgev"
        await asyncio.get_running_loop().run_in_executor(self.executor, lambda: evidence.write_audit_bundle(
            path, art, finding, self.identity.public_key, false_verdict=verdict, auditor_key=rec.public_key))
        self.stats.detections += 1
        self.convict(liar, -1, f"false clearance of {target[:8]} in audit {req.audit_id} ({why}): "
                     f"signed PASS, recomputation {finding.detail}", path)


def _peer(rec: NodeRecord, slot: int) -> pb.PeerInfo:
    return pb.PeerInfo(node_id=rec.node_id, address=rec.address, public_key=rec.public_key, stage=slot)
