"""This node as an auditor: fetch what another node committed to, recompute, sign a verdict."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from pipeguard import audit, claims
from pipeguard.device import device_class
from pipeguard.errors import PipeguardError
from pipeguard.identity import Identity
from pipeguard.signing import sign
from pipeguard.v1 import pipeguard_pb2 as pb
from node.membership import Membership
from node.peers import PeerPool
from node.stage import StageRuntime

log = logging.getLogger(__name__)

REPLICAS = 4
"""States an auditor keeps (``audit.Replicas``): one per stage it follows, plus a spare."""


class VerdictSigner:
    """Signs this node's verdicts as auditor (node/seams.py wraps it for a lying auditor)."""

    def __init__(self, identity: Identity):
        self.identity = identity

    def sign(self, req: pb.AuditRequest, verdict: pb.AuditVerdict) -> pb.AuditVerdict:
        """``verdict`` on ``req``, signed."""
        return sign(verdict, self.identity)


class NodeAuditor:
    def __init__(self, identity: Identity, runtime: StageRuntime, peers: PeerPool, membership: Membership,
                 net: NetConfig, timeout: float, signer: VerdictSigner | None = None):
        self.identity = identity
        self.signer = signer or VerdictSigner(identity)
        self.runtime = runtime
        self.peers = peers
        self.membership = membership
        self.net = net
        """Bounds of what an audit fetches (``max_tensor_bytes``, the state limits)."""
        self.timeout = timeout
        """Most seconds each fetch for an audit may take (``timeouts.audit``, or ``timeouts.step``
        when that is 0); never more than what is left of the Audit call's own deadline."""
        self.done = 0
        self._lock = asyncio.Lock()  # one audit's recomputation at a time: bounded memory
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeguard-audit")
        """Recomputations run here, never on the stage's compute thread: an audit this node does
        for others does not hold up the stage it serves (they share only the CPU)."""
        self.replicas = audit.Replicas(capacity=REPLICAS)
        """States this node holds by digest: fetched for an audit, or recomputed by an update audit
        that matched the committed digest exactly. An audit whose step report commits to one of
        them starts from it and fetches nothing but the tensors (several audits of one stage-step
        share one fetch; an auditor following a stage advances its replica step by step)."""
        self.workspace = audit.Workspace()
        """The module and optimizer each audited stage is recomputed in, reused (on the audit thread)."""
        self.fetched_state_bytes = 0
        """Bytes of audited states fetched so far."""

    def _fetched(self, named: dict, att: pb.StateAttestation | None) -> None:
        if att is not None:
            self.fetched_state_bytes += sum(t.numel() * t.element_size() for t in named.values())
            self.replicas.keep(att.state_digest, named)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def audit(self, req: pb.AuditRequest, remaining: float | None = None) -> pb.AuditVerdict:
        """Audit ``req``; ``remaining``: seconds left of the caller's deadline (None: none), which
        bounds every fetch (the coordinator sized it to the audit, see ``timeouts.audit``)."""
        audit.validate_request(req)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + remaining if remaining is not None else None
        verdict = pb.AuditVerdict(run_id=req.run_id, audit_id=req.audit_id, auditor=self.identity.node_id,
                                  order_digest=claims.order_digest(req))
        queued = time.perf_counter()
        gathered = 0.0
        async with self._lock:
            began = time.perf_counter()
            timeout = self.timeout if deadline is None else max(0.1, min(self.timeout, deadline - loop.time()))
            fetcher = audit.RpcFetcher(
                self.identity, self.identity.node_id, self.peers.stub, req.run_id, self.net.max_tensor_bytes,
                timeout, req.epoch, max_state_tensors=self.net.max_state_tensors,
                max_state_bytes=self.net.state_bytes_limit, attempt=req.attempt)
            try:
                # Every audit also fetches the senders' own copies of the tensors: a sender that
                # shows auditors another signed version than its receiver holds is caught by the
                # pair (an update audit stands for the stage-step's forward/backward audits too).
                art = await audit.gather(req, fetcher, cross_check=True, next_state=False, replicas=self.replicas)
                gathered = time.perf_counter()
                self._fetched(art.state, art.attestation)
                audit.attach_artifacts(verdict, art)
                if art.alternates:
                    verdict.commitments.extend(art.alternates)
                    h = art.alternates[0].header
                    verdict.verdict, verdict.deviation = pb.VERDICT_FAIL, float("inf")
                    verdict.detail = (f"equivocation: {h.sender[:8]} signed two different versions of its "
                                      f"{'activation' if h.direction == pb.DIRECTION_FORWARD else 'gradient'} of "
                                      f"step {h.step} micro-batch {h.micro_batch}")
                else:
                    if art.needs_tokens():
                        art.fill_tokens(await self.membership.dataset(req.data_digest))
                        audit.check_tokens(art)
                    finding = await self._check(art, fetcher)
                    verdict.verdict, verdict.deviation, verdict.detail = (finding.verdict, finding.deviation,
                                                                          finding.detail)
            except PipeguardError as exc:
                verdict.verdict, verdict.detail = pb.VERDICT_ERROR, f"audit incomplete: {exc}"
        verdict = self.signer.sign(req, verdict)
        self.done += 1
        level = logging.WARNING if verdict.verdict == pb.VERDICT_FAIL else logging.INFO
        end = time.perf_counter()
        log.log(level, "audit %d (%s step %d stage %d mb %d%s of %s, target on %s, audited on %s): %s — %s "
                "[waited %.0f ms, gathered in %.0f ms, %.0f ms in all]", req.audit_id,
                audit.KIND_NAMES.get(req.kind, "?"), req.step, req.stage, req.micro_batch,
                f" and {len(req.also)} more" if req.also else "", req.target.node_id[:8],
                req.target_device or "?", device_class(self.runtime.device), pb.Verdict.Name(verdict.verdict),
                verdict.detail, 1e3 * (began - queued), 1e3 * ((gathered if gathered else end) - began),
                1e3 * (end - began))
        return verdict

    async def _check(self, art: audit.Artifacts, fetcher: audit.RpcFetcher) -> audit.Finding:
        """``audit.check`` on the audit thread. An update audit fetches the state after the update
        only when its recomputation does not hash to the committed digest (then the per-element
        tolerance decides); one that does is kept as a replica of the stage's next state."""
        loop = asyncio.get_running_loop()
        device = self.runtime.device  # audits recompute where this node computes
        try:
            finding = await loop.run_in_executor(self.executor, audit.check, art, device, device_class(device),
                                                 self.workspace)
        except audit.NeedNextState:
            await audit.fetch_next_state(art, fetcher)
            self._fetched(art.next_state, art.next_attestation)
            finding = await loop.run_in_executor(self.executor, audit.check, art, device, device_class(device),
                                                 self.workspace)
        if finding.next_state is not None and finding.verdict == pb.VERDICT_PASS:
            self.replicas.keep(art.request.update_report.state_digest, finding.next_state)
        return finding
