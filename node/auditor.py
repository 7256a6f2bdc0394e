"""This node as an auditor: fetch what another node committed to, recompute, sign a verdict."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from pipeguard import audit, claims
from pipeguard.errors import PipeguardError
from pipeguard.identity import Identity
from pipeguard.signing import sign
from pipeguard.v1 import pipeguard_pb2 as pb
from node.membership import Membership
from node.peers import PeerPool
from node.stage import StageRuntime

log = logging.getLogger(__name__)


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
        self._cache = audit.CachingFetcher(inner=None)  # type: ignore[arg-type]

    @property
    def fetched_state_bytes(self) -> int:
        """Bytes of audited states fetched so far (a state several audits share is fetched once)."""
        return self._cache.fetched_bytes

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
        async with self._lock:
            timeout = self.timeout if deadline is None else max(0.1, min(self.timeout, deadline - loop.time()))
            fetcher = self._cache.using(audit.RpcFetcher(
                self.identity, self.identity.node_id, self.peers.stub, req.run_id, self.net.max_tensor_bytes,
                timeout, req.epoch, max_state_tensors=self.net.max_state_tensors,
                max_state_bytes=self.net.state_bytes_limit, attempt=req.attempt))
            try:
                # Every audit also fetches the senders' own copies of the tensors: a sender that
                # shows auditors another signed version than its receiver holds is caught by the
                # pair (an update audit stands for the stage-step's forward/backward audits too).
                art = await audit.gather(req, fetcher, cross_check=True)
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
                    finding = await asyncio.get_running_loop().run_in_executor(self.executor, audit.check, art)
                    verdict.verdict, verdict.deviation, verdict.detail = (finding.verdict, finding.deviation,
                                                                          finding.detail)
            except PipeguardError as exc:
                verdict.verdict, verdict.detail = pb.VERDICT_ERROR, f"audit incomplete: {exc}"
        verdict = self.signer.sign(req, verdict)
        self.done += 1
        level = logging.WARNING if verdict.verdict == pb.VERDICT_FAIL else logging.INFO
        log.log(level, "audit %d (%s step %d stage %d mb %d of %s): %s — %s", req.audit_id,
                audit.KIND_NAMES.get(req.kind, "?"), req.step, req.stage, req.micro_batch, req.target.node_id[:8],
                pb.Verdict.Name(verdict.verdict), verdict.detail)
        return verdict

