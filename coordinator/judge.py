"""The judge: the coordinator's own recomputation of an audit, the only thing that can lead to a ban.

A FAIL verdict never bans by itself: the judge gathers the same artifacts and recomputes them.
Confirmed: the audited node is convicted with an evidence bundle. Refuted: the auditor lied, and
it is convicted instead, with a bundle proving that. An audit nobody else could do (no auditor
available, or the auditor failed to answer) is judged the same way.

A PASS verdict is re-checked the same way for a random ``audit.recheck_rate`` of audits, and
always when the audited message was screen-flagged. A PASS that the recomputation contradicts
(beyond ``FALSE_CLEARANCE_MARGIN`` times the tolerance, so that no honest auditor's rounding
can be blamed) convicts both the audited node (``audit`` bundle) and the auditor that cleared it
(``false-clearance`` bundle): an auditor covering for an accomplice.

Before anyone is convicted on a failed recomputation, the judge fetches every tensor it used
from both of its holders (the sender's sent copy and the receiver's received copy): two
different versions validly signed by the same sender are equivocation, and it is the sender,
not the audited node that computed on what it was given, who is convicted. So is a node whose
signed claims in an auditor's verdict contradict what it showed the judge.

An ERROR ("incomplete") verdict is re-checked the same way, always: an auditor that cannot or
will not finish an audit only hands the audit to the judge, so refusing is never cheaper than
auditing (an accomplice answering "incomplete" for its partner shields nothing). The auditor is
not convicted for it (an honest one may have lost a neighbour mid-fetch); the audited node is
checked all the same.

When the judge's own fetch of an audited state comes back off the holder's signed attestation
(the bytes do not hash to the digest it signs), the judge asks again; after
``OFF_ATTESTATION_LIMIT`` such states from one holder (an honest holder serves none: it signs
the digest of the snapshot it serves) the holder is convicted with an ``off-attestation``
bundle. Failures to serve at all prove nothing (a crash, a partition) and never lead to a ban;
but an audit the holder keeps from being settled must not leave its work standing, so the
judge tells the clock (``on_withheld``), which routes around a live holder that withheld its
state from the judge and rolls back to before the step it kept unchecked.

A node's own signed claims about its state are checked against each other and against the run
seed by the step clock, which hands a contradiction here: a step-0 claim other than the seeded
initialisation (``initial_state``, an ``initial-state`` bundle) or a step report contradicting
the node's update report of the step before (``contradiction``).

Every conviction goes through ``Convictions`` (one bundle per ban).
"""

from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import torch

from pipeguard import audit, claims, evidence
from pipeguard.computation import StageComputation, StageSetup
from pipeguard.config import NetConfig
from pipeguard.data import Dataset
from pipeguard.device import device_class
from pipeguard.errors import PipeguardError
from pipeguard.identity import Identity
from pipeguard.v1 import pipeguard_pb2 as pb
from coordinator.channels import NodeChannels
from coordinator.convictions import Convictions
from coordinator.registry import Registry
from coordinator.state import EventLog


OFF_ATTESTATION_LIMIT = 3
"""States served to the judge off their own signed attestation before their holder is convicted."""


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
    folded: int = 0
    """Forward/backward audits drawn for a stage-step whose update audit was drawn too, which checks them."""
    merged: int = 0
    """Forward/backward audits sent as part of another's order for the same stage-step (``AuditRequest.also``)."""
    abandoned: int = 0
    """Audits taken back from an auditor that went offline while it held them (the coordinator did them)."""
    max_lag: int = 0
    """The most steps completed after an audited step while its audit still ran (``StatusReply.max_audit_lag_steps``)."""
    waited_s: float = 0.0
    """Seconds the step clock waited for audits (``AuditScheduler.drain``; ``StatusReply.audit_wait_s``)."""


INCOMPLETE = object()
"""``Judge._confirm``'s answer when it could not gather what the audit needs: nothing settled."""


class Judge:
    def __init__(self, *, identity: Identity, registry: Registry, events: EventLog, dataset: Dataset,
                 evidence_dir: Path, timeout: float | Callable[[pb.AuditRequest], float], net: NetConfig,
                 channels: NodeChannels, convictions: Convictions, recheck_rate: float = 0.0,
                 device: torch.device | None = None):
        self.identity = identity
        self.device = torch.device("cpu") if device is None else device
        """Where the judge recomputes (``audit.device``); its class picks the tolerance it applies."""
        self.device_class = device_class(self.device)
        self.registry = registry
        self.events = events
        self.dataset = dataset
        self.evidence_dir = Path(evidence_dir)
        self.timeout = timeout if callable(timeout) else (lambda req, t=timeout: t)
        """The deadline of each fetch for an audit (``CoordinatorConfig.audit_timeout``)."""
        self.net = net
        """Size limits of the judge's fetches (``net.max_tensor_bytes``, the state limits)."""
        self.channels = channels
        self.convictions = convictions
        self.recheck_rate = recheck_rate
        self.rng = secrets.SystemRandom()
        self.stats = AuditStats()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeguard-judge")
        self.workspace = audit.Workspace()
        """The judge's recomputations reuse one module and optimizer per stage (on ``executor``)."""
        self.off_attestation: dict[str, int] = {}
        """holder id -> states it served the judge that do not hash to their signed attestation."""
        self.on_withheld: Callable[[pb.AuditRequest, str], Awaitable[None]] | None = None
        """Told each time the judge's own fetch of an audited state gets nothing from its holder
        (twice: the first try and the one after it); the clock routes around a holder that keeps
        its audits from being settled."""

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def decide(self, req: pb.AuditRequest, verdict: pb.AuditVerdict | None, flagged: bool = False) -> bool:
        """What follows from an auditor's signed ``verdict`` on ``req`` (None: nobody else audited it).
        Whether it was settled: False when neither the auditor nor the judge could complete it."""
        if verdict is None:
            return await self._judge(req, None)
        elif verdict.verdict == pb.VERDICT_PASS:
            if flagged or self.rng.random() < self.recheck_rate:
                return await self._recheck(req, verdict, "screen-flagged message" if flagged else "random re-check")
            self._passed(req)
            return True
        elif verdict.verdict == pb.VERDICT_FAIL:
            if self.convictions.banned(req.target.node_id):
                return True  # already convicted: one bundle per ban is enough
            self.events.emit("audit_failed", f"auditor {verdict.auditor[:8]} reports {req.target.node_id[:8]} "
                             f"at step {req.step} stage {req.stage}: {verdict.detail}; confirming",
                             node_id=req.target.node_id, step=req.step)
            return await self._judge(req, verdict)
        else:
            # "Incomplete" (or any verdict other than PASS/FAIL) proves nothing either way: the
            # judge does the audit itself, always, so that refusing is never cheaper than auditing.
            self.stats.incomplete += 1
            self.events.emit("audit_incomplete", f"audit {req.audit_id} of {req.target.node_id[:8]}: "
                             f"{verdict.detail}; the coordinator audits it itself", node_id=req.target.node_id,
                             step=req.step, persist=False)
            return await self._recheck(req, verdict, "incomplete verdict")

    def _passed(self, req: pb.AuditRequest) -> None:
        t = req.target.node_id
        self.stats.passed[t] = self.stats.passed.get(t, 0) + 1

    async def _convict(self, node_id: str, step: int, reason: str, path: Path, write: Callable[[], None], *,
                       failed: bool, detection: bool) -> None:
        """Write ``node_id``'s bundle to ``path`` (off the loop) and convict it, unless it is already."""
        if not self.convictions.reserve(node_id):
            return
        if failed:
            self.stats.failed[node_id] = self.stats.failed.get(node_id, 0) + 1
        if detection:
            self.stats.detections += 1
        await asyncio.get_running_loop().run_in_executor(self.executor, write)
        self.convictions.convict(node_id, step, reason, path)

    def _path(self, req: pb.AuditRequest, what: str, node_id: str) -> Path:
        return self.evidence_dir / f"step{req.step:06d}-audit{req.audit_id}-{what}{node_id[:8]}.pgev"

    async def _equivocation(self, req: pb.AuditRequest, verdict: pb.AuditVerdict, art: audit.Artifacts) -> bool:
        """Did a node show the auditor other signed data than it showed us? Then that is the fault."""
        for signer, theirs, ours in audit.contradictions(verdict, art):  # forged claims are left out
            await self._convict_equivocation(req, signer.node_id, signer.public_key, theirs, ours,
                                             "tensor" if isinstance(theirs, pb.TensorCommitment) else "state")
            return True
        return False

    async def _convict_equivocation(self, req: pb.AuditRequest, signer: str, key: bytes, theirs, ours,
                                    what: str) -> None:
        path = self._path(req, "equivocation-", signer)
        await self._convict(signer, req.step, f"equivocation: signed two different versions of the same {what} "
                            f"(audit {req.audit_id})", path,
                            lambda: evidence.write_equivocation_bundle(path, theirs, ours, key),
                            failed=True, detection=True)

    async def _confirm(self, req: pb.AuditRequest, verdict: pb.AuditVerdict | None):
        """Gather and recompute what ``req`` audits: (artifacts, finding); None when there is nothing
        left to decide (its target is convicted already, or an equivocating signer was convicted);
        ``INCOMPLETE`` when the audit could not be completed."""
        if self.convictions.banned(req.target.node_id):
            return None
        fetcher = audit.RpcFetcher(self.identity, "", self.channels.stub_for, req.run_id, self.net.max_tensor_bytes,
                                   self.timeout(req), req.epoch, max_state_tensors=self.net.max_state_tensors,
                                   max_state_bytes=self.net.state_bytes_limit, attempt=req.attempt)
        # The state after an update is fetched only when it can matter, as auditors do: the
        # auditor showed one (its attestation is compared with ours: a node that served two
        # versions is caught), or the recomputed state does not hash to the committed digest
        # (audit.NeedNextState: then the per-element tolerance decides, and a bundle keeps it).
        shown = verdict is not None and bool(verdict.next_attestation.node_id)
        try:
            art = await audit.gather(req, fetcher, next_state=shown)
        except PipeguardError as exc:
            return await self._incomplete(req, fetcher, exc)
        if verdict is not None and await self._equivocation(req, verdict, art):
            return None
        if art.needs_tokens():
            art.fill_tokens(self.dataset)
            audit.check_tokens(art)
        loop = asyncio.get_running_loop()

        def recompute():
            return loop.run_in_executor(self.executor, audit.check, art, self.device, self.device_class, self.workspace)
        try:
            finding = await recompute()
            # a bundle follows (a conviction, or an accuser's word against ours): it holds the
            # served next state, as every update audit's bundle does
            again = art.next_attestation is None and req.kind == pb.AUDIT_KIND_UPDATE and (
                finding.verdict == pb.VERDICT_FAIL or (verdict is not None and verdict.verdict == pb.VERDICT_FAIL))
        except audit.NeedNextState:
            again = True
        if again:
            try:
                await audit.fetch_next_state(art, fetcher)
            except PipeguardError as exc:
                return await self._incomplete(req, fetcher, exc)
            finding = await recompute()
        if finding.verdict == pb.VERDICT_FAIL:
            # Before convicting anyone: a sender that signed two versions of a tensor it sent
            # (one to its receiver, another to auditors) is the one banned.
            for sender, theirs, ours in await audit.cross_holders(req, art, fetcher):
                await self._convict_equivocation(req, sender.node_id, sender.public_key, theirs, ours, "tensor")
                return None
        return art, finding

    async def _incomplete(self, req: pb.AuditRequest, fetcher: audit.RpcFetcher, exc: PipeguardError):
        """The judge could not gather what ``req`` needs (``exc``): counted, told, and a withheld
        state is followed up (``_off_attestation``, ``on_withheld``). Returns ``INCOMPLETE``."""
        self.stats.incomplete += 1
        self.events.emit("audit_incomplete", f"cannot confirm audit {req.audit_id}: {exc}",
                         node_id=req.target.node_id, step=req.step)
        served = await self._off_attestation(req, fetcher)
        if isinstance(exc, audit.StateWithheld) and not served and self.on_withheld is not None:
            await self.on_withheld(req, str(exc))
        return INCOMPLETE

    async def _off_attestation(self, req: pb.AuditRequest, fetcher: audit.RpcFetcher) -> bool:
        """After a failed gather: fetch the audited state once more, and count it against its holder
        if it is off its own signed attestation; convict at ``OFF_ATTESTATION_LIMIT``. Whether the
        holder served it this time."""
        target = req.target
        try:
            named, att = await fetcher.fetch_state(target, req.step, req.stage)
            off = claims.off_attestation(att, target.public_key, named)
        except PipeguardError:
            return False  # not served at all (crashed, silent, expired): not evidence of anything
        if off:
            await self.served_off_attestation(target.node_id, target.public_key, req.step, att, named,
                                              f"audit {req.audit_id}", self._path(req, "off-attestation-", target.node_id))
        return True

    async def served_off_attestation(self, node_id: str, public_key: bytes, step: int, att: pb.StateAttestation,
                                     named: dict, where: str, path: Path | None = None) -> None:
        """Count a state ``node_id`` served the coordinator (its judge's fetch, or a checkpoint
        or export fetch: ``where``) that does not hash to its own signed attestation ``att``
        (``claims.off_attestation`` said so); convict at ``OFF_ATTESTATION_LIMIT``."""
        if self.convictions.banned(node_id):
            return
        n = self.off_attestation[node_id] = self.off_attestation.get(node_id, 0) + 1
        self.events.emit("off_attestation", f"{node_id[:8]} served the coordinator its state of step "
                         f"{step} off its own signed attestation ({where}; {n} of {OFF_ATTESTATION_LIMIT})",
                         node_id=node_id, step=step)
        if n < OFF_ATTESTATION_LIMIT:
            return
        if path is None:
            path = self.evidence_dir / f"step{step:06d}-off-attestation-{node_id[:8]}.pgev"
        await self._convict(node_id, step, f"served its state {n} times off its own signed attestation "
                            f"(last: {where})", path, lambda: evidence.write_off_attestation_bundle(
                                path, att, named, public_key, self.identity.public_key, n),
                            failed=True, detection=True)

    async def initial_state(self, order: pb.AssignRequest, claim: pb.StepReport | pb.StateAttestation,
                            holder_key: bytes) -> bool:
        """Convict the holder of ``order``'s stage if its signed ``claim`` about the stage's state at
        step 0 is not the seeded initialisation (``claims.seeded_start``); whether it was."""
        setup = StageSetup.from_specs(order.model, order.train, order.stage, order.num_stages)
        seeded = await asyncio.get_running_loop().run_in_executor(
            self.executor, StageComputation.seeded_digest, setup)
        why_not = claims.seeded_start(order, claim, self.identity.public_key, holder_key, seeded)
        if why_not is not None:
            return False
        node_id = order.node_id
        path = self.evidence_dir / f"step000000-initial-state-{node_id[:8]}.pgev"
        await self._convict(node_id, 0, f"started stage {order.stage} from other weights than the seeded "
                            "initialisation", path, lambda: evidence.write_initial_state_bundle(
                                path, order, claim, self.identity.public_key, holder_key),
                            failed=True, detection=True)
        return True

    async def contradiction(self, update: pb.UpdateReport, later: pb.StepReport | pb.StateAttestation,
                            holder_key: bytes) -> bool:
        """Convict the holder if its signed claim about the start of step t + 1 contradicts its
        signed update report of step t (``claims.contradicting_commitments``); whether it did."""
        if claims.contradicting_commitments(update, later, holder_key) is not None:
            return False
        node_id = update.node_id
        path = self.evidence_dir / f"step{later.step:06d}-contradiction-{node_id[:8]}.pgev"
        await self._convict(node_id, later.step, f"its claim about the state of stage {update.stage} at step "
                            f"{later.step} contradicts its update report of step {update.step}", path,
                            lambda: evidence.write_contradiction_bundle(path, update, later, holder_key),
                            failed=True, detection=True)
        return True

    async def _convict_target(self, req: pb.AuditRequest, art: audit.Artifacts, finding: audit.Finding) -> None:
        path = self._path(req, "", req.target.node_id)
        await self._convict(req.target.node_id, req.step, f"{audit.KIND_NAMES[req.kind]} audit at step {req.step}: "
                            f"{finding.detail}", path,
                            lambda: evidence.write_audit_bundle(path, art, finding, self.identity.public_key),
                            failed=True, detection=True)

    async def _convict_auditor(self, req: pb.AuditRequest, verdict: pb.AuditVerdict, art: audit.Artifacts,
                               finding: audit.Finding, what: str, reason: str) -> None:
        """Convict the auditor that signed ``verdict``: a false accusation or a false clearance."""
        liar = verdict.auditor
        if self.convictions.banned(liar):
            return
        key = self.registry.nodes[liar].public_key
        path = self._path(req, f"{what}-", liar)
        await self._convict(liar, -1, reason, path, lambda: evidence.write_audit_bundle(
            path, art, finding, self.identity.public_key, false_verdict=verdict, auditor_key=key),
            failed=False, detection=what == "false-clearance")

    async def _judge(self, req: pb.AuditRequest, verdict: pb.AuditVerdict | None) -> bool:
        """Confirm a FAIL (or decide an audit nobody else did): convict the target or the accuser.
        Whether it was settled."""
        confirmed = await self._confirm(req, verdict)
        if confirmed is None or confirmed is INCOMPLETE:
            return confirmed is None
        art, finding = confirmed
        if finding.verdict == pb.VERDICT_FAIL:
            await self._convict_target(req, art, finding)
            return True
        self._passed(req)
        if verdict is not None and finding.verdict == pb.VERDICT_PASS:
            await self._convict_auditor(req, verdict, art, finding, "false-accusation", f"false accusation against "
                                        f"{req.target.node_id[:8]} in audit {req.audit_id}")
        return True

    async def _recheck(self, req: pb.AuditRequest, verdict: pb.AuditVerdict, why: str) -> bool:
        """Recompute an audit an auditor signed PASS (or "incomplete") for. If the recomputation
        fails, the audited node is convicted; if it fails clearly (beyond
        ``FALSE_CLEARANCE_MARGIN`` x tolerance) after a PASS, the auditor covered for it and is
        convicted too, each with its own bundle."""
        self.stats.rechecked += 1
        confirmed = await self._confirm(req, verdict)
        if confirmed is None or confirmed is INCOMPLETE:
            return confirmed is None
        art, finding = confirmed
        if finding.verdict != pb.VERDICT_FAIL:
            self._passed(req)
            return True
        target, liar = req.target.node_id, verdict.auditor
        said = pb.Verdict.Name(verdict.verdict).removeprefix("VERDICT_")
        self.events.emit("audit_failed", f"re-check ({why}) of audit {req.audit_id} contradicts the {said} signed by "
                         f"{liar[:8]}: {finding.detail}", node_id=target, step=req.step)
        await self._convict_target(req, art, finding)
        if verdict.verdict != pb.VERDICT_PASS or not evidence.clearly_fails(finding, audit.loosest_tolerance(req)):
            return True  # within rounding of the tolerance: an honest auditor may have seen a pass
        await self._convict_auditor(req, verdict, art, finding, "false-clearance", f"false clearance of {target[:8]} "
                                    f"in audit {req.audit_id} ({why}): signed PASS, recomputation {finding.detail}")
        return True
